"""Stage 2: unsupervised adaptation to the unlabelled target by clustering (pseudo-labels), trained
jointly with the labelled source.

    python uda/adapt.py --source market --target duke [--init PATH] [--config configs/uda/market2duke.yaml]
        [--output-dir DIR] [--resume] [--opts key=value ...]

Each epoch: (1) features of every target training image with the current model (the feature memory,
flip-averaged, L2-normalised); (2) sparse k-reciprocal Jaccard distances (GPU when there is one);
(3) DBSCAN -> pseudo-labels, outliers dropped; (4) the target head re-created with one row per cluster,
initialised from the clusters' mean memory features; (5) `adapt.iters` steps on a P x K source batch
plus a P x K target batch: source CE + triplet on the source head, target CE + triplet on the target
head -- two separate temperature-scaled cosine heads; (6) evaluation on the target test set with the
clusters' statistics (NMI/ARI/pairwise P/R against the true ids are diagnostics, never used to train).
The reported result is the last epoch's: no best-epoch picking on target test labels.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as `python uda/adapt.py`: import the package, not uda/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch
import torch.nn.functional as F

from uda import checkpoint, stage
from uda.cli import run_main, stage_parser
from uda.cluster import CLUSTER_METHODS, cluster_centers, pseudo_label_round
from uda.config import Config, flatten, load_config, opt
from uda.distributed import convert_sync_bn, init_distributed, pick_device, wrap_model
from uda.engine import fit, log_evaluation, seed_everything, set_lr, train_steps
from uda.errors import ConfigError, UdaError
from uda.evaluation.features import extract_features
from uda.models import ClassifierHead
from uda.models.backbone import imagenet_weights_on_disk
from uda.pretrain import default_output_dir as pretrain_output_dir
from uda.runlog import FINAL_MODEL, RunDir

DEFAULTS = stage.defaults(
    model={"pretrained": "none", "head": "cosine", "temperature": 0.1},
    optim={"warmup_epochs": 0, "milestones": [20, 40], "epochs": 50},
    train={"eval_every": 1},
    loss={"source_weight": 1.0, "target_weight": 1.0},
    adapt={
        "init": None, "iters": 400,
        "classifier": "separate",  # separate: a source head and a target head | merged: one head over both label sets
        "head_init": "centers",  # centers: rows start from the class / cluster centres | normal: N(0, 0.001) rows
        "temperature_schedule": "fixed",  # cosine heads: fixed T | grow: T (1 + ln e) | shrink: T / (1 + ln e), epoch e = 1, 2, ...
        "renormalize_rows": False,  # True: the heads' rows set to unit norm before every step
    },
    cluster={
        "method": "dbscan",  # dbscan (Jaccard distances) | kmeans (MMT-style, cluster.num_clusters given)
        "num_clusters": 500,  # kmeans only
        "k1": 30, "k2": 6, "eps": 0.6, "min_samples": 4,
        "keep_outliers": False,  # True: each outlier becomes its own singleton class
        "knn_backend": "torch",  # torch (chunked top-k, GPU when there is one) | faiss
        "camera_normalize": False,  # cluster features minus their camera's mean (cross-camera grouping)
    },
)


def default_init(cfg: Config, source_name: str) -> Path:
    """The source model of the matching pretrain run, or a message saying which command makes it."""
    path = pretrain_output_dir(source_name) / FINAL_MODEL
    if path.is_file():
        return path
    config, weights_here = matching_pretrain_config(cfg, source_name)
    settings = flatten(cfg.to_dict())
    how = f"--config {config} " if config else ""
    opts = "" if config else " --opts " + " ".join(opt(key, settings[key]) for key in stage.MODEL_SETTINGS)
    note = "" if weights_here else (
        f" ({config} starts from ImageNet {settings['model.backbone']} weights this machine does not have; the "
        f"*_mobilenet.yaml configs of configs/uda and configs/pretrain start from ones `make install` provides)"
    )
    raise UdaError(
        f"no source model at {path}; make one this config accepts with `python uda/pretrain.py {how}--source "
        f"{cfg.data.source} --target {cfg.data.target}{opts}`{note}, or pass --init PATH"
    )


PRETRAIN_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"


def matching_pretrain_config(cfg: Config, source_name: str) -> tuple[Path | None, bool]:
    """(the shipped configs/pretrain/<source>*.yaml whose model and image size are this adapt config's,
    so it makes a source model adapt accepts; whether its backbone weights are on this machine),
    preferring a config whose weights are here; (None, True) when none matches."""
    from uda.pretrain import DEFAULTS as PRETRAIN_DEFAULTS  # the source stage's defaults, as pretrain.py reads them

    wanted = {key: flatten(cfg.to_dict())[key] for key in stage.MODEL_SETTINGS}
    matches = []
    shipped = [*PRETRAIN_CONFIGS.glob(f"{source_name}.yaml"), *PRETRAIN_CONFIGS.glob(f"{source_name}_*.yaml")]
    for path in sorted(shipped):
        candidate = flatten(load_config(PRETRAIN_DEFAULTS, path).to_dict())
        if all(candidate[key] == value for key, value in wanted.items()):
            weights_here = candidate["model.pretrained"] != "imagenet" or imagenet_weights_on_disk(candidate["model.backbone"])
            matches.append((not weights_here, path.relative_to(PRETRAIN_CONFIGS.parents[1])))
    if not matches:
        return None, True
    lacks_weights, path = min(matches)
    return path, not lacks_weights


def memory_features(model: torch.nn.Module, loader, cfg: Config, device: torch.device, desc: str) -> torch.Tensor:
    """(N, D) L2-normalised features of a whole split with the current model, extracted as the test
    sets are (eval.flip, eval.scales, bf16 under train.amp): the clusters group what evaluation would
    match. Multi-scale test-time augmentation therefore also costs len(eval.scales) forwards per memory image."""
    return extract_features(model, loader, flip=cfg.eval.flip, normalize=True, amp_dtype=stage.amp_dtype(cfg, device), desc=desc,
                            scales=cfg.eval.scales)


TARGET_GROUP = "target_head"  # the optimizer's param group of the re-created head's rows, found by name
CLASSIFIERS = ("separate", "merged")
HEAD_INITS = ("centers", "normal")
TEMPERATURE_SCHEDULES = ("fixed", "grow", "shrink")


def reclustered_head(cfg: Config) -> str:
    """The head re-created from the clusters each epoch: 'target', or 'merged' (source rows + cluster rows)."""
    return "merged" if cfg.adapt.classifier == "merged" else "target"


def build_optimizer(net: stage.TrainNet, cfg: Config) -> torch.optim.Optimizer:
    """One optimizer over the model and the heads. The re-created head's rows are their own param group,
    named TARGET_GROUP, which `replace_head` re-points each time the clusters change. A name, not a
    position or a reference: load_state_dict replaces the group dicts but keeps their keys."""
    head = reclustered_head(cfg)
    body = [p for name, p in net.named_parameters() if not name.startswith(f"heads.{head}.")]
    return stage.build_optimizer(
        [{"params": body, "name": "body"}, {"params": [net.heads[head].weight], "name": TARGET_GROUP}], cfg
    )


def replace_head(head: ClassifierHead, optimizer: torch.optim.Optimizer, rows: torch.Tensor) -> None:
    """Re-create `head` with these rows and point the optimizer's TARGET_GROUP at them (the old rows'
    Adam moments are dropped: they belonged to clusters that no longer exist)."""
    [group] = [g for g in optimizer.param_groups if g.get("name") == TARGET_GROUP]
    optimizer.state.pop(head.weight, None)
    head.reset_classifier(rows.shape[0], rows)
    group["params"] = [head.weight]


def initial_rows(centers: torch.Tensor, cfg: Config, epoch: int) -> torch.Tensor:
    """A head's starting rows: the (normalised) centres themselves, or under adapt.head_init=normal the
    strong baseline's N(0, 0.001) draw of the same shape (seeded by the run's seed and the epoch, so a
    resumed run draws the same rows). The draw is kept raw, as in the source documents' comparison: in a
    cosine head such rows (norm ~0.001 sqrt(D)) turn much faster under Adam than unit-norm centres, which
    is part of what that comparison measured (adapt.renormalize_rows is the other part)."""
    if cfg.adapt.head_init == "centers":
        return centers
    generator = torch.Generator().manual_seed(stage.stream_seed(cfg.seed, 1000 + epoch))
    return (0.001 * torch.randn(centers.shape, generator=generator)).to(centers.device, centers.dtype)


def temperature_at(base: float, schedule: str, epoch: int) -> float:
    """The cosine heads' temperature in (1-based) epoch `epoch`: the source documents' schedules."""
    if schedule == "grow":
        return base * (1 + math.log(epoch))
    if schedule == "shrink":
        return base / (1 + math.log(epoch))
    return base


@torch.no_grad()
def renormalize_rows(heads: torch.nn.ModuleDict) -> None:
    """Every head's rows set to unit norm (adapt.renormalize_rows: before every step)."""
    for head in heads.values():
        head.weight.copy_(F.normalize(head.weight, dim=1))


def joint_losses(train_net: torch.nn.Module, batch, cfg: Config, device: torch.device, num_source_classes: int = 0) -> dict[str, torch.Tensor]:
    """One step's losses: a source P x K batch and a target (pseudo-labelled) P x K batch through one
    forward, each branch's CE + triplet, weighted by loss.{source,target}_weight. Each branch has its
    own head (adapt.classifier=separate), or both share the merged head, whose first
    `num_source_classes` rows are the source ids and the rest the clusters (merged)."""
    (source_images, source_pids, *_), (target_images, target_pids, *_) = batch
    n = source_images.shape[0]
    images = torch.cat([source_images, target_images]).to(device, non_blocking=True)
    if cfg.train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    source_pids, target_pids = source_pids.to(device), target_pids.to(device)
    if cfg.adapt.classifier == "merged":
        target_pids = target_pids + num_source_classes
        out, logits = train_net(images, {"merged": (slice(None), torch.cat([source_pids, target_pids]))})
        branch_logits = {"source": logits["merged"][:n], "target": logits["merged"][n:]}
    else:
        out, branch_logits = train_net(images, {"source": (slice(0, n), source_pids), "target": (slice(n, None), target_pids)})
    losses = {}
    for name, rows, pids in (("source", slice(0, n), source_pids), ("target", slice(n, None), target_pids)):
        weight = cfg.loss[f"{name}_weight"]
        branch = stage.reid_losses(out["global"][rows], branch_logits[name], pids, cfg, prefix=f"{name}_")
        losses.update({key: weight * value for key, value in branch.items()})
    return losses


def check_adapt_settings(cfg: Config) -> None:
    """Adaptation settings that would otherwise fail, or do nothing, only after the first feature memory."""
    if str(cfg.model.pretrained).lower() != "none":
        raise ConfigError(
            f"model.pretrained={cfg.model.pretrained!r} does not apply to adapt: its weights come from the source "
            "model (--init); give backbone weights to pretrain.py instead"
        )
    stage.check_choices(flatten(cfg.to_dict()), {
        "adapt.classifier": CLASSIFIERS, "adapt.head_init": HEAD_INITS,
        "adapt.temperature_schedule": TEMPERATURE_SCHEDULES, "cluster.method": CLUSTER_METHODS,
    })
    if cfg.adapt.temperature_schedule != "fixed" and cfg.model.head != "cosine":
        raise ConfigError(f"adapt.temperature_schedule={cfg.adapt.temperature_schedule} schedules the cosine head's "
                          f"temperature; model.head={cfg.model.head} has none (use model.head=cosine)")
    if cfg.cluster.method == "kmeans" and cfg.cluster.num_clusters < cfg.data.num_pids:
        raise ConfigError(f"cluster.num_clusters={cfg.cluster.num_clusters} must be at least data.num_pids={cfg.data.num_pids} "
                          "(the identities of one P x K batch)")
    if cfg.cluster.knn_backend == "faiss" and importlib.util.find_spec("faiss") is None:
        raise ConfigError("cluster.knn_backend=faiss needs faiss (pip install -e '.[gpu]', or faiss-cpu); "
                          "or use cluster.knn_backend=torch")


def main(argv: list[str] | None = None) -> dict:
    parser = stage_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--init", help="source model to start from (default: runs/pretrain/<source>/model_final.pth)")
    args = parser.parse_args(argv)
    opts = stage.cli_overrides(args)
    if args.init:
        opts.insert(0, f"adapt.init={args.init}")
    cfg = load_config(DEFAULTS, args.config, opts)
    if not cfg.data.target:
        raise UdaError("adapt needs --target (the unlabelled dataset to adapt to), e.g. --source market --target duke")
    stage.check_settings(cfg)
    check_adapt_settings(cfg)
    stage.set_backends(cfg)

    dist = init_distributed()
    device = pick_device(dist, cfg.device)
    source = stage.load_named_dataset(cfg.data.source, cfg, "source")
    target = stage.load_named_dataset(cfg.data.target, cfg, "target")
    if cfg.cluster.camera_normalize and not target.has_cameras:
        raise ConfigError(
            f"cluster.camera_normalize=true needs camera ids, and {target.name} ({target.root}) has none: "
            f"pass --opts cluster.camera_normalize=false, or give its images cameras (names c<N>_..., or a camid column)"
        )
    if cfg.cluster.method == "kmeans" and cfg.cluster.num_clusters > len(target.train):
        raise ConfigError(f"cluster.num_clusters={cfg.cluster.num_clusters} is more than the {len(target.train)} train images of "
                          f"{target.name}: k-means needs an image per cluster (set cluster.num_clusters to about its identity count)")
    init_path = Path(cfg.adapt.init) if cfg.adapt.init else default_init(cfg, source.name)
    seed_everything(cfg.seed)
    source_model = checkpoint.read(init_path, "source model")  # before any image is decoded: a wrong source model fails early
    stage.check_model_settings(cfg, source_model, init_path)
    model = stage.build_reid_model(cfg, pretrained="none")
    stage.load_model_weights(model, source_model, init_path)
    output_dir = args.output_dir or Path("runs") / "adapt" / f"{source.name}2{target.name}"
    run = RunDir(output_dir, cfg, resume=args.resume, is_main=dist.is_main)
    run.log(source.summary())
    run.log(target.summary())

    source_train, source_images = stage.prepare_train_split(source.train, cfg, device)
    target_train, target_images = stage.prepare_train_split(target.train, cfg, device)
    target_true_ids = np.array([r.orig_pid for r in target_train]) if target.train_labelled else None  # diagnostics only
    target_camids = torch.tensor([r.camid for r in target_train])  # cameras are known without labels
    target_memory_loader = stage.make_plain_loader(target_train, cfg, target_images)
    iters = cfg.adapt.iters
    source_loader = stage.make_train_loader(source_train, cfg, source_images, rank=dist.rank, world_size=dist.world_size, num_iterations=iters)
    test_sets = [stage.make_test_set(target, cfg, device)]

    num_source_classes = len({r.pid for r in source_train})
    reclustered = reclustered_head(cfg)
    if reclustered == "merged":  # one head: the source ids' rows, then each epoch's cluster rows
        heads = {"merged": stage.build_classifier(cfg, model.feature_dim, num_source_classes)}
    else:  # the target head is re-created from the clusters each epoch
        heads = {name: stage.build_classifier(cfg, model.feature_dim, rows) for name, rows in (("source", num_source_classes), ("target", 1))}
    source_head = heads["merged" if reclustered == "merged" else "source"]
    net = stage.TrainNet(model, heads).to(device)
    resumed = run.load_checkpoint() if args.resume else None
    if resumed is None:  # the source rows start from the source class centres under the source model
        loader = stage.make_plain_loader(source_train, cfg, source_images)
        source_ids = torch.tensor([r.pid for r in source_train])
        centers = cluster_centers(memory_features(net.model, loader, cfg, device, "source memory"), source_ids)
        source_head.reset_classifier(num_source_classes, initial_rows(centers.to(device), cfg, epoch=0))
    else:
        net.heads[reclustered].reset_classifier(resumed[checkpoint.NUM_CLUSTERS])
    if cfg.train.channels_last:
        net = net.to(memory_format=torch.channels_last)
    net = convert_sync_bn(net, dist, cfg.train.sync_bn)
    optimizer = build_optimizer(net, cfg)

    start_epoch = 0
    if resumed is not None:
        net.load_state_dict(resumed[checkpoint.NET])
        optimizer.load_state_dict(resumed[checkpoint.OPTIMIZER])
        start_epoch = resumed[checkpoint.EPOCH]
        run.log(f"resumed at epoch {start_epoch}")
        run.drop_metrics_after(start_epoch)
    else:
        run.log(f"initialised from {init_path}")
        log_evaluation(run, 0, stage.evaluate_test_sets(net.model, test_sets, cfg, device, dist))  # epoch 0 = direct transfer, before any adaptation
    schedule = stage.build_schedule(cfg)
    amp = stage.amp_dtype(cfg, device)

    def train_epoch(epoch: int) -> dict:
        features = memory_features(net.model, target_memory_loader, cfg, device, f"target memory {epoch + 1}")
        clusters = pseudo_label_round(
            features, target_camids, device=device, true_ids=target_true_ids, dist=dist, seed=cfg.seed + epoch, **cfg.cluster
        )
        stats = clusters.stats
        run.save_pseudo_labels(epoch + 1, clusters.labels, [r.path for r in target_train], target_true_ids)
        agreement = (
            f", NMI {stats['nmi']:.3f} ARI {stats['ari']:.3f} pairwise P/R {stats['pairwise_precision']:.3f}/"
            f"{stats['pairwise_recall']:.3f} (diagnostics vs true ids)" if "nmi" in stats else ""
        )
        run.log(f"epoch {epoch + 1} clusters: {stats['num_clusters']} ({stats['outlier_fraction']:.1%} outliers){agreement}")
        if stats["num_clusters"] < cfg.data.num_pids:
            raise UdaError(
                f"epoch {epoch + 1}: {stats['num_clusters']} target clusters, fewer than the {cfg.data.num_pids} "
                "identities of a P x K batch; train the source model longer, or adjust cluster.eps / data.num_pids"
            )
        rows = initial_rows(clusters.centers.to(device), cfg, epoch + 1)
        if reclustered == "merged":  # the source rows go on as trained; the cluster rows are new
            rows = torch.cat([net.heads["merged"].weight.detach()[:num_source_classes], rows])
        replace_head(net.heads[reclustered], optimizer, rows)
        temperature = temperature_at(cfg.model.temperature, cfg.adapt.temperature_schedule, epoch + 1)
        for head in net.heads.values():
            if hasattr(head, "temperature"):
                head.temperature = temperature
        train_net = wrap_model(net, dist)  # DDP registers parameters once: wrap again around the new head
        pseudo = [dataclasses.replace(r, pid=int(label)) for r, label in zip(target_train, clusters.labels) if label >= 0]
        target_loader = stage.make_train_loader(
            pseudo, cfg, target_images, rank=dist.rank, world_size=dist.world_size, num_iterations=iters, stream=1,
        )
        losses_of = partial(joint_losses, train_net, cfg=cfg, device=device, num_source_classes=num_source_classes)

        def step_losses(batch):
            if cfg.adapt.renormalize_rows:
                renormalize_rows(net.heads)
            return losses_of(batch)

        lr = schedule.lr(epoch)
        set_lr(optimizer, lr)
        source_loader.sampler.set_epoch(epoch)
        target_loader.sampler.set_epoch(epoch)
        losses = train_steps(
            zip(source_loader, target_loader), step_losses, [optimizer],
            num_steps=iters, device=device, amp_dtype=amp, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
        )
        return {"train": {**losses, "lr": lr, **({"temperature": temperature} if cfg.adapt.temperature_schedule != "fixed" else {})}, "clusters": stats}

    def checkpoint_state(epoch: int) -> dict:
        return {
            checkpoint.EPOCH: epoch, checkpoint.NET: net.state_dict(), checkpoint.OPTIMIZER: optimizer.state_dict(),
            checkpoint.NUM_CLUSTERS: net.heads[reclustered].num_classes, checkpoint.CONFIG: cfg.to_dict(),
        }

    metrics = fit(
        run, start_epoch=start_epoch, epochs=cfg.optim.epochs, train_epoch=train_epoch,
        evaluate=lambda epoch: stage.evaluate_test_sets(net.model, test_sets, cfg, device, dist),
        eval_every=cfg.train.eval_every, checkpoint_state=checkpoint_state, seed=cfg.seed,
    )
    run.save_final_model({checkpoint.MODEL: net.model.state_dict(), checkpoint.CONFIG: cfg.to_dict()})
    run.close()
    return metrics


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
