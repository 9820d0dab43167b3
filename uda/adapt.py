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
The reported result is the last epoch's: no best-epoch picking on target test labels. A change to the
loop is a subclass of `Adaptation`: `MeanTeacherAdaptation` (adapt.teacher_momentum > 0) clusters,
evaluates and saves a temporal average of the model that also gives the target branch soft targets.
"""
from __future__ import annotations

import copy
import dataclasses
import sys
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as `python uda/adapt.py`: import the package, not uda/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch

from uda import checkpoint
from uda.build import (amp_dtype, build_classifier, build_optimizer, build_reid_model, build_schedule, check_model_settings,
                       load_model_weights, runtime)
from uda.cli import config_overrides, run_main, stage_parser
from uda.cluster import PseudoLabels, check_camera_normalize, cluster_centers, pseudo_label_round
from uda.config import Config, flatten, load_config, opt
from uda.data.splits import load_named_dataset, make_plain_loader, make_train_loader, prepare_train_split, stream_seed
from uda.datasets import ReIDDataset
from uda.distributed import DistInfo, convert_sync_bn, wrap_model
from uda.engine import fit, log_evaluation, seed_everything, train_steps
from uda.errors import ConfigError, UdaError
from uda.evaluation.features import extract_features
from uda.evaluation.protocol import evaluate_test_sets, make_test_set
from uda.head_policies import HEAD_POLICIES, Round, TrainNet, initial_rows, param_groups, temperature_at
from uda.losses import CrossBatchMemory, reid_losses, soft_cross_entropy, soft_triplet_loss
from uda.models import ReIDModel
from uda.models.backbone import imagenet_weights_on_disk
from uda.pretrain import default_output_dir as pretrain_output_dir
from uda.runlog import FINAL_MODEL, RunDir
from uda.schedule import set_lr
from uda.settings import MODEL_SETTINGS, defaults, load

DEFAULTS = defaults("adapt")


def main(argv: list[str] | None = None) -> dict:
    parser = stage_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--init", help="source model to start from (default: runs/pretrain/<source>/model_final.pth)")
    args = parser.parse_args(argv)
    cfg = load("adapt", args.config, config_overrides(args))
    if not cfg.data.target:
        raise UdaError("adapt needs --target (the unlabelled dataset to adapt to), e.g. --source market --target duke")
    dist, device = runtime(cfg)
    source = load_named_dataset(cfg.data.source, cfg, "source")
    target = load_named_dataset(cfg.data.target, cfg, "target")
    check_target(cfg, target)
    init_path = Path(cfg.adapt.init) if cfg.adapt.init else default_init(cfg, source.name)
    seed_everything(cfg.seed)
    model = load_source_model(cfg, init_path)  # before any image is decoded: a wrong source model fails early
    output_dir = args.output_dir or Path("runs") / "adapt" / f"{source.name}2{target.name}"
    run = RunDir(output_dir, cfg, resume=args.resume, is_main=dist.is_main)
    loop = MeanTeacherAdaptation if cfg.adapt.teacher_momentum > 0 else Adaptation
    return fit(run, loop(cfg, run, model, source, target, init_path, device, dist))


class Adaptation:
    """Everything one adaptation trains with, built once: the source and target splits, the model and
    its head policy (adapt.classifier), the optimizer. Each epoch is one clustering round and
    `adapt.iters` joint steps; `uda.engine.fit` runs the epochs, checkpoints and resumes."""

    def __init__(self, cfg: Config, run: RunDir, model: ReIDModel, source: ReIDDataset, target: ReIDDataset,
                 init_path: Path, device: torch.device, dist: DistInfo):
        self.cfg, self.run, self.init_path, self.device, self.dist = cfg, run, init_path, device, dist
        self.epochs, self.eval_every, self.seed = cfg.optim.epochs, cfg.train.eval_every, cfg.seed
        run.log(source.summary())
        run.log(target.summary())
        source_train, source_images = prepare_train_split(source.train, cfg, device)
        self.target_train, self.target_images = prepare_train_split(target.train, cfg, device)
        self.true_ids = np.array([r.orig_pid for r in self.target_train]) if target.train_labelled else None  # diagnostics only
        self.camids = torch.tensor([r.camid for r in self.target_train])  # cameras are known without labels
        self.memory_loader = make_plain_loader(self.target_train, cfg, self.target_images)
        self.source_loader = None  # loss.source_weight=0: the target branch alone (Cluster Contrast's loop), half the step
        if cfg.loss.source_weight > 0:
            self.source_loader = make_train_loader(source_train, cfg, source_images, rank=dist.rank, world_size=dist.world_size,
                                                   num_iterations=cfg.adapt.iters)
        self.test_sets = [make_test_set(target, cfg, device)]

        num_source_classes = len({r.pid for r in source_train})
        self.cross_batch = CrossBatchMemory(cfg.adapt.xbm_size) if cfg.adapt.xbm_size else None  # the target triplet's XBM
        self.heads = HEAD_POLICIES[cfg.adapt.classifier](partial(build_classifier, cfg, model.feature_dim), num_source_classes, cfg.adapt)
        net = TrainNet(model, self.heads).to(device)
        if self.source_loader is None and "source" in self.heads:
            self.heads["source"].requires_grad_(False)  # never scored: neither trained nor awaited by DDP
        elif not run.resuming:  # the source rows start from the source class centres under the source model
            source_ids = torch.tensor([r.pid for r in source_train])
            features = memory_features(model, make_plain_loader(source_train, cfg, source_images), cfg, device, "source memory")
            self.heads.init_source(initial_rows(cluster_centers(features, source_ids).to(device), cfg.adapt.head_init, stream_seed(cfg.seed, 1000)))
        if cfg.train.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = convert_sync_bn(net, dist, cfg.train.sync_bn)
        self.heads = self.net.heads  # SyncBatchNorm conversion copies modules
        self.optimizer = build_optimizer(param_groups(self.net, self.heads), cfg)
        self.schedule, self.amp = build_schedule(cfg), amp_dtype(cfg, device)

    def start(self) -> None:
        """A fresh run's epoch 0: the direct transfer, before any adaptation."""
        self.run.log(f"initialised from {self.init_path}")
        log_evaluation(self.run, 0, self.evaluate(-1))

    @property
    def feature_model(self) -> ReIDModel:
        """The model whose features are clustered, evaluated and saved."""
        return self.net.model

    def train_epoch(self, epoch: int) -> dict:
        """One round: cluster the target memory, re-create the target rows, train `adapt.iters` joint steps."""
        cfg = self.cfg
        clusters = self.new_round(epoch)
        pseudo = [dataclasses.replace(r, pid=int(label)) for r, label in zip(self.target_train, clusters.labels) if label >= 0]
        target_loader = make_train_loader(pseudo, cfg, self.target_images, rank=self.dist.rank, world_size=self.dist.world_size,
                                          num_iterations=cfg.adapt.iters, stream=1)
        lr = self.schedule.lr(epoch)
        set_lr(self.optimizer, lr)
        target_loader.sampler.set_epoch(epoch)
        if self.source_loader is not None:
            self.source_loader.sampler.set_epoch(epoch)
            batches = zip(self.source_loader, target_loader)
        else:
            batches = ((None, target) for target in target_loader)
        losses = train_steps(batches, self.step_losses, [self.optimizer], num_steps=cfg.adapt.iters,
                             device=self.device, amp_dtype=self.amp, desc=f"epoch {epoch + 1}/{self.epochs}")
        scheduled = {"temperature": self.temperature} if cfg.adapt.temperature_schedule != "fixed" else {}
        return {"train": {**losses, "lr": lr, **scheduled}, "clusters": clusters.stats}

    def new_round(self, epoch: int) -> PseudoLabels:
        """This round's clusters, the target rows re-created from them, the round's temperature set."""
        cfg = self.cfg
        features, clusters = self.pseudo_labels(epoch)
        rows = initial_rows(clusters.centers.to(self.device), cfg.adapt.head_init, stream_seed(cfg.seed, 1001 + epoch))
        self.heads.recluster(Round(rows, features, torch.as_tensor(clusters.labels, device=features.device), self.camids.to(features.device)),
                             self.optimizer)
        self.temperature = temperature_at(cfg.model.temperature, cfg.adapt.temperature_schedule, epoch + 1)
        if cfg.adapt.temperature_schedule != "fixed":
            self.heads.set_temperature(self.temperature)
        if self.cross_batch:
            self.cross_batch.reset()  # its labels were last round's
        self.train_net = wrap_model(self.net, self.dist)  # DDP registers parameters once: wrap again around the new rows
        return clusters

    def pseudo_labels(self, epoch: int) -> tuple[torch.Tensor, PseudoLabels]:
        """(the target memory, this round's clusters of it): the clusters saved in the run folder and logged with
        their agreement with the true ids."""
        features = memory_features(self.feature_model, self.memory_loader, self.cfg, self.device, f"target memory {epoch + 1}")
        clusters = pseudo_label_round(features, self.camids, device=self.device, true_ids=self.true_ids, dist=self.dist,
                                      seed=self.cfg.seed + epoch, **self.cfg.cluster)
        stats = clusters.stats
        self.run.save_pseudo_labels(epoch + 1, clusters.labels, [r.path for r in self.target_train], self.true_ids)
        agreement = (
            f", NMI {stats['nmi']:.3f} ARI {stats['ari']:.3f} pairwise P/R {stats['pairwise_precision']:.3f}/"
            f"{stats['pairwise_recall']:.3f} (diagnostics vs true ids)" if "nmi" in stats else ""
        )
        self.run.log(f"epoch {epoch + 1} clusters: {stats['num_clusters']} ({stats['outlier_fraction']:.1%} outliers){agreement}")
        if stats["num_clusters"] < self.cfg.data.num_pids:
            raise UdaError(
                f"epoch {epoch + 1}: {stats['num_clusters']} target clusters, fewer than the {self.cfg.data.num_pids} "
                "identities of a P x K batch; train the source model longer, or adjust cluster.eps / data.num_pids"
            )
        return features, clusters

    def step_losses(self, batch) -> dict[str, torch.Tensor]:
        if self.cfg.adapt.renormalize_rows:
            self.heads.renormalize_rows()
        return joint_losses(self.train_net, batch, self.cfg, self.device, self.cross_batch)

    def evaluate(self, epoch: int) -> dict:
        return evaluate_test_sets(self.feature_model, self.test_sets, self.cfg, self.device, self.dist)

    def state_dict(self, epoch: int) -> dict:
        return {checkpoint.EPOCH: epoch, checkpoint.NET: self.net.state_dict(), checkpoint.OPTIMIZER: self.optimizer.state_dict(),
                checkpoint.NUM_CLUSTERS: self.heads[self.heads.reclustered].num_classes, checkpoint.CONFIG: self.cfg.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.heads.resize(state[checkpoint.NUM_CLUSTERS], self.optimizer)
        self.net.load_state_dict(state[checkpoint.NET])
        self.optimizer.load_state_dict(state[checkpoint.OPTIMIZER])

    def final_model(self) -> dict:
        return {checkpoint.MODEL: self.feature_model.state_dict(), checkpoint.CONFIG: self.cfg.to_dict()}


class MeanTeacherAdaptation(Adaptation):
    """Adaptation with a mean teacher (MMT, Ge et al. 2020, one network instead of two): a temporal average of
    the model and its heads, teacher <- m teacher + (1 - m) student after every step (adapt.teacher_momentum;
    buffers such as BatchNorm statistics and memory rows copied). The teacher's features are clustered,
    evaluated and saved, and the target branch also learns the teacher's soft targets on the same batch:
    ID (1 - w) CE + w soft CE against the teacher's logits over the same rows (adapt.soft_ce_weight), and
    triplet (1 - w') hard + w' soft triplet against the teacher's distances (adapt.soft_triplet_weight).
    The teacher runs in eval mode (its copied BatchNorm statistics) on the target images only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = frozen_copy(self.net)
        self.student_moved = False  # whether the optimizer has stepped since the teacher last followed

    @property
    def feature_model(self) -> ReIDModel:
        return self.teacher.model

    def new_round(self, epoch: int) -> PseudoLabels:
        clusters = super().new_round(epoch)
        self.teacher.heads = frozen_copy(self.net.heads)  # the round's rows, for the teacher's logits
        return clusters

    def train_epoch(self, epoch: int) -> dict:
        result = super().train_epoch(epoch)
        self.follow_student()  # the round's last step
        return result

    def follow_student(self) -> None:
        if self.student_moved:
            ema_update(self.teacher, self.net, self.cfg.adapt.teacher_momentum)
            self.student_moved = False

    def step_losses(self, batch) -> dict[str, torch.Tensor]:
        self.follow_student()  # the previous step's update, before this step's targets
        if self.cfg.adapt.renormalize_rows:
            self.heads.renormalize_rows()
        cfg, (_, (_, target_pids, target_cams, *_)) = self.cfg, batch
        images, out, scored = joint_forward(self.train_net, batch, cfg, self.device)
        losses = branch_losses(out, scored, cfg, self.cross_batch)
        n = len(images) - len(target_pids)
        target_pids = target_pids.to(self.device)
        with torch.no_grad():
            teacher = self.teacher.model.outputs(images[n:])
            empty = target_pids.new_empty(0)
            teacher_logits = self.teacher.heads(teacher["bn"], {"source": empty, "target": target_pids},
                                                {"source": empty, "target": target_cams.to(self.device)})["target"].logits
        soft_ce, soft_triplet, weight = cfg.adapt.soft_ce_weight, cfg.adapt.soft_triplet_weight, cfg.loss.target_weight
        if "target_ce" in losses and soft_ce > 0:
            losses["target_ce"] = (1 - soft_ce) * losses["target_ce"]
            losses["target_soft_ce"] = weight * cfg.loss.ce_weight * soft_ce * soft_cross_entropy(scored["target"].logits, teacher_logits)
        if "target_triplet" in losses and soft_triplet > 0:
            losses["target_triplet"] = (1 - soft_triplet) * losses["target_triplet"]
            losses["target_soft_triplet"] = weight * cfg.loss.triplet_weight * soft_triplet * soft_triplet_loss(
                out["global"][n:], teacher["global"], target_pids)
        self.student_moved = True  # train_steps steps the optimizer next
        return losses

    def state_dict(self, epoch: int) -> dict:
        return {**super().state_dict(epoch), checkpoint.TEACHER: self.teacher.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.teacher.heads = frozen_copy(self.net.heads)  # at the checkpoint's size
        self.teacher.load_state_dict(state[checkpoint.TEACHER])


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy in eval mode that no optimizer or backward reaches (a mean teacher)."""
    return copy.deepcopy(module).eval().requires_grad_(False)


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """teacher <- m teacher + (1 - m) student for every parameter; every buffer copied (BatchNorm statistics,
    memory rows: a statistic is not averaged twice)."""
    for mean, current in zip(teacher.parameters(), student.parameters(), strict=True):
        mean.mul_(momentum).add_(current.detach(), alpha=1 - momentum)
    for mean, current in zip(teacher.buffers(), student.buffers(), strict=True):
        mean.copy_(current)


def joint_losses(train_net: torch.nn.Module, batch, cfg: Config, device: torch.device,
                 cross_batch: CrossBatchMemory | None = None) -> dict[str, torch.Tensor]:
    """One step's losses: a source P x K batch and a pseudo-labelled target P x K batch through one forward,
    each branch's CE (on the logits its head policy gives it) + triplet (the target's also against the
    cross-batch memory, when adapt.xbm_size > 0), weighted by loss.{source,target}_weight."""
    _, out, scored = joint_forward(train_net, batch, cfg, device)
    return branch_losses(out, scored, cfg, cross_batch)


def joint_forward(train_net: torch.nn.Module, batch, cfg: Config, device: torch.device):
    """(the images, source rows first; the model's outputs; {branch: Scored}) of one forward of both batches
    (a source batch of None: the target's alone, with an empty source branch)."""
    source, (target_images, target_pids, target_cams, *_) = batch
    if source is None:
        source = target_images[:0], target_pids[:0], target_cams[:0]
    source_images, source_pids, source_cams, *_ = source
    images = torch.cat([source_images, target_images]).to(device, non_blocking=True)
    if cfg.train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    out, scored = train_net(images, {"source": source_pids.to(device), "target": target_pids.to(device)},
                            {"source": source_cams.to(device), "target": target_cams.to(device)})
    return images, out, scored


def branch_losses(out: dict, scored: dict, cfg: Config, cross_batch: CrossBatchMemory | None = None) -> dict[str, torch.Tensor]:
    """Each branch's weighted CE + triplet on its rows of the batch (the target's triplet also against `cross_batch`);
    a branch without rows (the source under loss.source_weight=0) has no loss."""
    losses, start = {}, 0
    for branch, (logits, labels, id_loss) in scored.items():
        rows = slice(start, start + len(labels))
        start += len(labels)
        if not len(labels):
            continue
        weighted = reid_losses(out["global"][rows], logits, labels, cfg.loss, prefix=f"{branch}_", id_loss=id_loss,
                               memory=cross_batch if branch == "target" else None)
        losses.update({name: cfg.loss[f"{branch}_weight"] * value for name, value in weighted.items()})
    return losses


def memory_features(model: torch.nn.Module, loader, cfg: Config, device: torch.device, desc: str) -> torch.Tensor:
    """(N, D) L2-normalised features of a whole split with the current model, extracted as the test
    sets are (eval.flip, eval.scales, bf16 under train.amp): the clusters group what evaluation would
    match. Multi-scale test-time augmentation therefore also costs len(eval.scales) forwards per memory image."""
    return extract_features(model, loader, flip=cfg.eval.flip, normalize=True, amp_dtype=amp_dtype(cfg, device), desc=desc,
                            scales=cfg.eval.scales)


def load_source_model(cfg: Config, path: Path) -> ReIDModel:
    """The source model, checked against this config's model settings (a mismatch is one line naming them)."""
    saved = checkpoint.read(path, "source model")
    check_model_settings(cfg, saved, path)
    model = build_reid_model(cfg, pretrained="none")
    load_model_weights(model, saved, path)
    return model


def check_target(cfg: Config, target: ReIDDataset) -> None:
    """Settings the target dataset cannot serve, refused before any image is decoded."""
    check_camera_normalize(cfg.cluster.camera_normalize, target)
    if cfg.adapt.classifier == "proxies" and not target.has_cameras:
        raise ConfigError(f"adapt.classifier=proxies keeps a proxy per cluster and camera, and {target.name} ({target.root}) has no "
                          "camera ids: use another adapt.classifier, or give its images cameras")
    if cfg.cluster.method == "kmeans" and cfg.cluster.num_clusters > len(target.train):
        raise ConfigError(f"cluster.num_clusters={cfg.cluster.num_clusters} is more than the {len(target.train)} train images of "
                          f"{target.name}: k-means needs an image per cluster (set cluster.num_clusters to about its identity count)")


def default_init(cfg: Config, source_name: str) -> Path:
    """The source model of the matching pretrain run, or a message saying which command makes it."""
    path = pretrain_output_dir(source_name) / FINAL_MODEL
    if path.is_file():
        return path
    config, weights_here = matching_pretrain_config(cfg, source_name)
    settings = flatten(cfg.to_dict())
    how = f"--config {config} " if config else ""
    opts = "" if config else " --opts " + " ".join(opt(key, settings[key]) for key in MODEL_SETTINGS)
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
    wanted = {key: flatten(cfg.to_dict())[key] for key in MODEL_SETTINGS}
    matches = []
    shipped = [*PRETRAIN_CONFIGS.glob(f"{source_name}.yaml"), *PRETRAIN_CONFIGS.glob(f"{source_name}_*.yaml")]
    for path in sorted(shipped):
        candidate = flatten(load_config(defaults("pretrain"), path).to_dict())
        if all(candidate[key] == value for key, value in wanted.items()):
            weights_here = candidate["model.pretrained"] != "imagenet" or imagenet_weights_on_disk(candidate["model.backbone"])
            matches.append((not weights_here, path.relative_to(PRETRAIN_CONFIGS.parents[1])))
    if not matches:
        return None, True
    lacks_weights, path = min(matches)
    return path, not lacks_weights


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
