"""What both stages (pretrain.py, adapt.py) build from a config: the config defaults they share,
datasets and loaders, the model with its heads, the optimizer, the ReID losses of one branch, and the
evaluation of test sets. One place for each, so the two entry points cannot drift apart."""
from __future__ import annotations

import copy
import difflib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from uda import checkpoint
from uda.cluster import KNN_BACKENDS
from uda.config import Config, flatten, load_config, opt
from uda.data import IMAGENET_MEAN, IMAGENET_STD, prepare_images, test_loader, test_transform, train_loader, train_transform
from uda.data.device_batches import BatchAugment, DeviceImages, DevicePlainLoader, DeviceTrainLoader
from uda.data.images import ImageCache
from uda.datasets import ReIDDataset, load_dataset
from uda.datasets.base import ImageRecord, relabel_train, subset_identities
from uda.datasets.synthetic import PRESET_NAMES
from uda.distributed import DistInfo, barrier, pick_device
from uda.engine import SCHEDULES, Schedule
from uda.errors import ConfigError, DatasetError, UdaError
from uda.evaluation.distance import METRICS, pairwise_distance
from uda.evaluation.features import extract_features
from uda.evaluation.metrics import AP_DEFINITIONS, evaluate
from uda.evaluation.rerank import re_ranking
from uda.losses import cross_entropy_label_smooth, triplet_loss
from uda.models import BACKBONE_NAMES, HEADS, POOLINGS, ClassifierHead, ReIDModel, build_head, build_model

# Every key a stage accepts, with the strong baseline's values (Luo et al. 2019) as defaults.
COMMON_DEFAULTS: dict = {
    "seed": 0,
    "device": "auto",  # auto | cpu | cuda | cuda:N
    "deterministic": False,  # torch.use_deterministic_algorithms (slower; exact repeats on GPU)
    "data": {
        "source": None,
        "target": None,
        "root": None,  # default: $UDA_DATA, else ./data
        "synth_preset": "small",  # tiny | small | full, for synth_market / synth_duke
        "synth_seed": 0,
        "msmt_train_val": False,  # MSMT17: train on list_train + list_val (as SpCL) instead of list_train
        "subset_ids": 0,  # > 0: only this many train and test identities (development runs, not the protocol)
        "height": 256,
        "width": 128,
        "num_pids": 16,  # P identities x K images per batch
        "num_instances": 4,
        "num_workers": 4,  # loader pipeline: DataLoader worker processes (the device pipeline decodes once, in threads)
        "cache": True,  # loader pipeline: decode every image once into memory (the device pipeline always does)
        "pipeline": "device",  # device: images resized once and held where the model trains, whole batches
        #                        augmented there | loader: per-image transforms in DataLoader workers
        "skip_corrupt": False,  # drop unreadable images (reported) instead of stopping
        "flip_p": 0.5,
        "pad": 10,
        "erasing_p": 0.5,
        "mean": list(IMAGENET_MEAN),  # input normalisation; `python -m uda.data.stats` gives a dataset's own
        "std": list(IMAGENET_STD),
    },
    "model": {
        "backbone": "resnet50",  # resnet18 | resnet34 | resnet50 | resnet18_w16 | resnet18_w32 | mobilenet_v2
        "pretrained": "imagenet",  # imagenet | none | PATH
        "last_stride": 1,
        "pooling": "avg",  # avg | gem
        "bnneck": True,
        "embedding_dim": 0,  # 0: none (the strong baseline); N: a bias-free D -> N layer after pooling (an ablation)
        "head": "linear",  # linear | cosine | arcface | cosface
        "temperature": 0.1,  # cosine head: logits = cos / T
        "scale": 30.0,  # arcface / cosface
        "margin": None,  # arcface / cosface; None: the head's own (ArcFace 0.5, CosFace 0.35)
    },
    "loss": {
        "ce_weight": 1.0,
        "label_smoothing": 0.1,
        "triplet_weight": 1.0,
        "triplet_margin": 0.3,
        "soft_margin": False,
    },
    "optim": {
        "name": "adam",  # adam | sgd
        "lr": 3.5e-4,
        "weight_decay": 5e-4,
        "momentum": 0.9,  # sgd only
        "schedule": "step",  # step | cosine
        "warmup_epochs": 10,
        "warmup_from": 3.5e-5,
        "milestones": [40, 70],
        "gamma": 0.1,
        "epochs": 120,
    },
    "train": {
        "amp": False,  # bf16 autocast
        "channels_last": False,
        "eval_every": 10,
        "sync_bn": False,  # SyncBatchNorm under torchrun
        "keep_checkpoints": 2,  # last.pth and the one before (last.1.pth): a damaged newest one is not the end of the run
    },
    "eval": {
        "batch_size": 256,
        "flip": True,  # average each image's feature with its mirror's
        "scales": [1.0],  # test-time scales: features averaged over the images resized by each factor, e.g. [0.75, 1.0, 1.25]
        "metric": "cosine",  # cosine | euclidean (features are L2-normalised either way)
        "ap": "noninterp",  # noninterp (torchreid, fast-reid) | trapezoid (the official Market devkit)
        "rerank": False,  # also report k-reciprocal re-ranked metrics (Zhong et al. 2017)
        "rerank_k1": 20,
        "rerank_k2": 6,
        "rerank_lambda": 0.3,
    },
}


def defaults(**overrides: dict) -> dict:
    """COMMON_DEFAULTS with whole sections added or keys changed, e.g. defaults(loss={...})."""
    result = copy.deepcopy(COMMON_DEFAULTS)
    for section, values in overrides.items():
        if isinstance(values, dict):
            result.setdefault(section, {}).update(copy.deepcopy(values))
        else:
            result[section] = values
    return result


def cli_overrides(args) -> list[str]:
    """Command-line flags as config overrides, applied before --opts (so --opts wins)."""
    opts = []
    for flag, key in (("source", "data.source"), ("target", "data.target"), ("data_root", "data.root")):
        value = getattr(args, flag, None)
        if value is not None:
            opts.append(f"{key}={value}")
    return opts + list(args.opts)


OPTIMIZERS = ("adam", "sgd")
PIPELINES = ("device", "loader")

# Enumerated settings -> the names their implementation accepts (each registry's own list).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.backbone": BACKBONE_NAMES,
    "model.pooling": tuple(POOLINGS),
    "model.head": tuple(HEADS),
    "optim.name": OPTIMIZERS,
    "optim.schedule": SCHEDULES,
    "data.pipeline": PIPELINES,
    "data.synth_preset": PRESET_NAMES,
    "eval.metric": METRICS,
    "eval.ap": AP_DEFINITIONS,
    "cluster.knn_backend": KNN_BACKENDS,
}
_POSITIVE, _NON_NEGATIVE = (lambda v: 0 < v < math.inf, "> 0 and finite"), (lambda v: 0 <= v < math.inf, ">= 0 and finite")
_PROBABILITY = (lambda v: 0 <= v <= 1, "in [0, 1]")
_AT_LEAST_ONE, _AT_LEAST_TWO = (lambda v: v >= 1, "a whole number >= 1"), (lambda v: v >= 2, "a whole number >= 2")
# Numeric settings -> (test, what the value must be). Keys a stage does not have are skipped.
RANGES: dict[str, tuple] = {
    "data.height": (lambda v: v >= 8, "at least 8 pixels"), "data.width": (lambda v: v >= 8, "at least 8 pixels"),
    "data.num_pids": (_AT_LEAST_TWO[0], "a whole number >= 2 (the triplet loss needs other identities)"),
    "data.num_instances": (_AT_LEAST_TWO[0], "a whole number >= 2 (the triplet loss needs a positive)"),
    "data.num_workers": _NON_NEGATIVE, "data.subset_ids": _NON_NEGATIVE, "data.pad": _NON_NEGATIVE,
    "data.mean": (lambda v: len(v) == 3 and all(math.isfinite(x) for x in v), "3 numbers (R, G, B)"),
    "data.std": (lambda v: len(v) == 3 and all(0 < x < math.inf for x in v), "3 numbers > 0 (R, G, B)"),
    "data.flip_p": _PROBABILITY, "data.erasing_p": _PROBABILITY, "data.synth_seed": _NON_NEGATIVE,
    "model.last_stride": (lambda v: v in (1, 2), "1 (strong baseline) or 2 (plain)"),
    "model.embedding_dim": _NON_NEGATIVE, "model.temperature": _POSITIVE, "model.scale": _POSITIVE, "model.margin": _NON_NEGATIVE,
    "loss.ce_weight": _NON_NEGATIVE, "loss.triplet_weight": _NON_NEGATIVE, "loss.triplet_margin": _NON_NEGATIVE,
    "loss.label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"), "loss.center_weight": _NON_NEGATIVE,
    "loss.center_lr": _POSITIVE, "loss.source_weight": _NON_NEGATIVE, "loss.target_weight": _NON_NEGATIVE,
    "optim.lr": _POSITIVE, "optim.weight_decay": _NON_NEGATIVE, "optim.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.warmup_epochs": _NON_NEGATIVE, "optim.warmup_from": _POSITIVE, "optim.gamma": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "optim.epochs": _AT_LEAST_ONE,
    "optim.milestones": (lambda v: all(isinstance(m, int) and m >= 1 for m in v), "a list of epochs >= 1"),
    "train.eval_every": (_AT_LEAST_ONE[0], "a whole number of epochs >= 1 (the last epoch is always evaluated)"),
    "train.keep_checkpoints": _AT_LEAST_ONE, "train.mixup_alpha": _NON_NEGATIVE,
    "eval.batch_size": _AT_LEAST_ONE, "eval.rerank_k1": _AT_LEAST_ONE, "eval.rerank_k2": _AT_LEAST_ONE,
    "eval.rerank_lambda": _PROBABILITY,
    "eval.scales": (lambda v: len(v) > 0 and all(type(x) in (int, float) and 0 < x < math.inf for x in v), "a non-empty list of numbers > 0"),
    "adapt.iters": _AT_LEAST_ONE, "cluster.k1": _AT_LEAST_ONE, "cluster.k2": _AT_LEAST_ONE,
    "cluster.eps": (lambda v: 0 < v < 1, "in (0, 1): Jaccard distances lie in [0, 1]"), "cluster.min_samples": _AT_LEAST_ONE,
}


def _passes(ok, value) -> bool:
    try:
        return bool(ok(value))
    except TypeError:  # a string where a number belongs (keys whose default is None take any type)
        return False


def check_choices(values: dict, choices_of: dict[str, tuple[str, ...]]) -> None:
    """ConfigError for the first flattened setting not among its choices, naming them and the closest."""
    for key, choices in choices_of.items():
        if key in values and values[key] not in choices:
            close = difflib.get_close_matches(str(values[key]), choices, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {values[key]!r}{hint}")


def check_settings(cfg: Config) -> None:
    """Every enumerated and numeric setting, checked as soon as the config is read, so nothing fails
    after minutes of decoding or training with a traceback from deep inside: a name not in its
    registry (the message lists the registry's names and the closest one), a number out of range."""
    values = flatten(cfg.to_dict())
    check_choices(values, CHOICES)
    for key, (ok, rule) in RANGES.items():
        if key in values and values[key] is not None and not _passes(ok, values[key]):
            raise ConfigError(f"{key} must be {rule}, got {values[key]!r}")
    if cfg.loss.ce_weight == 0 and cfg.loss.triplet_weight == 0:
        raise ConfigError("loss.ce_weight and loss.triplet_weight are both 0: nothing to train")


def set_backends(cfg: Config) -> None:
    """cfg.deterministic: exact repeats (torch's deterministic algorithms); otherwise let cuDNN time its
    convolution algorithms once per input shape and keep the fastest (shapes are fixed here).

    On the CPU, subnormal floats (below 1.2e-38) are flushed to zero: late in a from-scratch run weight
    decay drives the weights of dead channels subnormal, and x86 arithmetic on them made epochs up to
    9x slower (scripts/bench_denormal.py). torch's worker threads inherit the setting only when it is
    made before its thread pool starts: the stages call this before any tensor work."""
    torch.set_flush_denormal(True)
    if cfg.deterministic:  # cuBLAS repeats its results only with a fixed workspace; without it torch raises at the first matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(cfg.deterministic)
    torch.backends.cudnn.benchmark = not cfg.deterministic


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 when train.amp (autocast for training and feature extraction), else None. On a CPU without
    native bf16, autocast emulates it: 5x slower than fp32 on our 2-core machine, so a run there says so."""
    if not cfg.train.amp:
        return None
    if device.type == "cpu":
        warnings.warn("train.amp=true on the CPU: bf16 autocast is often several times slower there than fp32 (--opts train.amp=false)",
                      RuntimeWarning, stacklevel=2)  # shown once per place
    return torch.bfloat16


def load_named_dataset(name: str | None, cfg: Config, role: str) -> ReIDDataset:
    """Dataset `name` parsed (file names only), to be used as `role` (source, target, test): a source
    must have train ids (custom data may not)."""
    if not name:
        raise ConfigError("no dataset named: pass --source (and --target), e.g. --source market --target duke")
    dataset = load_dataset(
        name, cfg.data.root, synth_preset=cfg.data.synth_preset, synth_seed=cfg.data.synth_seed,
        msmt_train_val=cfg.data.msmt_train_val,
    )
    if role == "source" and not dataset.train_labelled:
        raise DatasetError(
            f"{dataset.name} ({dataset.root}): its train images have no ids, so it can only be a target; a source "
            f"needs train/<id>/<image> subfolders (or a pid column)"
        )
    return subset_identities(dataset, cfg.data.subset_ids)


def uses_device_pipeline(cfg: Config) -> bool:
    """data.pipeline: 'device' (batches built on the training device, see uda.data.device_batches) or
    'loader' (the per-image DataLoader pipeline: less memory, for splits too large to hold resized)."""
    if cfg.data.pipeline not in PIPELINES:  # also for callers that build splits without check_settings
        raise ConfigError(f"data.pipeline must be one of {', '.join(PIPELINES)}, got {cfg.data.pipeline!r}")
    return cfg.data.pipeline == "device"


Images = ImageCache | DeviceImages | None  # where a split's loaders take their pixels from


def prepare_split(
    records: list[ImageRecord], cfg: Config, device: torch.device, *, on_host: bool = False
) -> tuple[list[ImageRecord], Images]:
    """The records kept (corrupt ones dropped under data.skip_corrupt) and their pixels: resized images
    for the device pipeline (on `device`, or in host memory with on_host=True), else the decoded-image
    cache (data.cache) or None (read from disk)."""
    resized = uses_device_pipeline(cfg)
    kept, cache = prepare_images(records, cache=cfg.data.cache or resized, skip_corrupt=cfg.data.skip_corrupt)
    if resized:
        return kept, DeviceImages.build(kept, cfg.data.height, cfg.data.width, torch.device("cpu") if on_host else device, cache)
    return kept, cache


def prepare_train_split(records: list[ImageRecord], cfg: Config, device: torch.device) -> tuple[list[ImageRecord], Images]:
    """prepare_split for a training split: ids made 0..N-1 again, since data.skip_corrupt may have
    dropped every image of one (a gap would leave a classifier row with no images, or an id past the last)."""
    kept, images = prepare_split(records, cfg, device)
    return relabel_train(kept), images


def stream_seed(seed: int, stream: int) -> int:
    """The seed of one of a run's independent training streams. Stream 0 is the run's seed itself (what
    pretraining draws); any other gets its own, so adaptation's target batches do not repeat the source
    batches' sampling and augmentation draws position for position."""
    if stream == 0:
        return seed
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


def make_train_loader(
    records: list[ImageRecord], cfg: Config, images: Images, *, rank: int = 0, world_size: int = 1,
    num_iterations: int | None = None, stream: int = 0,
):
    """P x K batches (images, pids, camids, indices); `loader.sampler.set_epoch(epoch)` before each epoch.
    Loaders trained on side by side take different `stream`s (`stream_seed`)."""
    d = cfg.data
    seed = stream_seed(cfg.seed, stream)
    if isinstance(images, DeviceImages):
        augment = BatchAugment(pad=d.pad, flip_p=d.flip_p, erasing_p=d.erasing_p, mean=tuple(d.mean), std=tuple(d.std))
        return DeviceTrainLoader(
            images, records, augment, d.num_pids, d.num_instances, seed,
            num_iterations=num_iterations, rank=rank, world_size=world_size,
        )
    transform = train_transform(d.height, d.width, pad=d.pad, flip_p=d.flip_p, erasing_p=d.erasing_p, mean=tuple(d.mean), std=tuple(d.std))
    return train_loader(
        records, transform, d.num_pids, d.num_instances, seed, d.num_workers,
        num_iterations=num_iterations, cache=images, rank=rank, world_size=world_size,
    )


def make_plain_loader(records: list[ImageRecord], cfg: Config, images: Images, device: torch.device | None = None):
    """Records in order, test transform: for evaluation and for the target feature memory. Batches of
    resized images are normalised on `device` (default: where the images are)."""
    if isinstance(images, DeviceImages):
        return DevicePlainLoader(images, records, cfg.eval.batch_size, device=device, mean=tuple(cfg.data.mean), std=tuple(cfg.data.std))
    return test_loader(records, test_transform(cfg.data.height, cfg.data.width, tuple(cfg.data.mean), tuple(cfg.data.std)),
                       cfg.eval.batch_size, cfg.data.num_workers, images)


@dataclass
class TestSet:
    """A dataset's query and gallery, loaded once (query first, then gallery, in one loader).
    remove_same_camera: the Market-1501 protocol; False for custom data without camera ids."""

    name: str
    query: list[ImageRecord]
    gallery: list[ImageRecord]
    loader: DataLoader | DevicePlainLoader
    remove_same_camera: bool = True


def make_test_set(dataset: ReIDDataset, cfg: Config, device: torch.device) -> TestSet:
    """Test images stay in host memory (read once per evaluation); batches go to `device`. MSMT17's
    93,820 test images at 256x128 are 9 GB: on the GPU they would crowd out training on a 24 GB card."""
    records, images = prepare_split(dataset.query + dataset.gallery, cfg, device, on_host=True)
    kept = {r.path for r in records}
    query = [r for r in dataset.query if r.path in kept]
    gallery = [r for r in dataset.gallery if r.path in kept]
    loader = make_plain_loader(query + gallery, cfg, images, device)
    return TestSet(dataset.name, query, gallery, loader, remove_same_camera=dataset.has_cameras)


def evaluate_test_sets(
    model: nn.Module, test_sets: list[TestSet], cfg: Config, device: torch.device, dist: DistInfo = DistInfo()
) -> dict[str, dict]:
    """{set name: {mAP, mINP, rank1, rank5, rank10}} (+ '<name>_rerank' when eval.rerank).
    Under torchrun the main process evaluates while the others wait (and get {})."""
    results = _evaluate(model, test_sets, cfg, device) if dist.is_main else {}
    barrier(dist)
    return results


def test_set_features(model: nn.Module, test_set: TestSet, cfg: Config, amp: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(query features, gallery features), L2-normalised, as evaluation scores them (eval.flip, bf16 under train.amp)."""
    features = extract_features(model, test_set.loader, flip=cfg.eval.flip, normalize=True, amp_dtype=amp, desc=f"features {test_set.name}",
                                scales=cfg.eval.scales)
    return features[: len(test_set.query)], features[len(test_set.query):]


def _evaluate(model: nn.Module, test_sets: list[TestSet], cfg: Config, device: torch.device) -> dict[str, dict]:
    results: dict[str, dict] = {}
    amp = amp_dtype(cfg, device)
    for test_set in test_sets:
        qf, gf = test_set_features(model, test_set, cfg, amp)
        q_pids, q_cams = torch.tensor([r.pid for r in test_set.query]), torch.tensor([r.camid for r in test_set.query])
        g_pids, g_cams = torch.tensor([r.pid for r in test_set.gallery]), torch.tensor([r.camid for r in test_set.gallery])
        distmat = pairwise_distance(qf, gf, metric=cfg.eval.metric, device=device)
        protocol = {"ap": cfg.eval.ap, "remove_same_camera": test_set.remove_same_camera}
        results[test_set.name] = _summary(evaluate(distmat, q_pids, g_pids, q_cams, g_cams, **protocol))
        if cfg.eval.rerank:
            # the published re-ranking squares its input, so it is given Euclidean distances
            reranked = re_ranking(
                pairwise_distance(qf, gf, metric="euclidean", device=device),
                pairwise_distance(qf, qf, metric="euclidean", device=device),
                pairwise_distance(gf, gf, metric="euclidean", device=device),
                k1=cfg.eval.rerank_k1, k2=cfg.eval.rerank_k2, lambda_value=cfg.eval.rerank_lambda, device=device,
            )
            results[f"{test_set.name}_rerank"] = _summary(evaluate(reranked, q_pids, g_pids, q_cams, g_cams, **protocol))
    return results


def _summary(metrics: dict) -> dict:
    return {key: float(metrics[key]) for key in ("mAP", "mINP", "rank1", "rank5", "rank10")}


def build_reid_model(cfg: Config, pretrained: str | None = None) -> ReIDModel:
    m = cfg.model
    return build_model(m.backbone, pretrained or m.pretrained, m.last_stride, m.pooling, m.bnneck, m.embedding_dim)


def with_defaults(saved: dict, base: dict) -> dict:
    """A saved config with every key it lacks taken from `base`: a model saved before a setting existed
    was made under that setting's default (e.g. data.mean, model.embedding_dim)."""
    filled = {key: with_defaults(value, base[key]) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
              for key, value in saved.items()}
    return {**{key: value for key, value in base.items() if key not in saved}, **filled}


def load_trained_model(path: str | Path, opts: list[str] | tuple = ()) -> tuple[ReIDModel, Config]:
    """A saved model (model_final.pth or a run's last.pth) built under the config saved with it (a
    bare state dict: the defaults), `opts` applied on top: what evaluate.py and uda.extract run."""
    saved = checkpoint.read(path)
    cfg = load_config(with_defaults(saved.get(checkpoint.CONFIG) or {}, defaults()), None, opts)
    check_settings(cfg)
    model = build_reid_model(cfg, pretrained="none")
    load_model_weights(model, saved, path)
    return model, cfg


def inference_model(path: str | Path, opts: list[str] | tuple = (), data_root: str | None = None) -> tuple[ReIDModel, Config, torch.device]:
    """load_trained_model (with data.root=`data_root` when given) in eval mode on the device the config
    picks, channels_last when the run trained so: how evaluate.py, uda.visualize and uda.cluster_sweep
    hold a saved model, so that all three compute the features the run's own evaluation did."""
    model, cfg = load_trained_model(path, ([f"data.root={data_root}"] if data_root else []) + list(opts))
    device = pick_device(DistInfo(), cfg.device)
    model = model.to(device).eval()
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, cfg, device


# What a saved model's weights mean: a model loaded under other values computes other features even
# when every tensor shape fits (last stride, pooling, neck, image size).
MODEL_SETTINGS = ("model.backbone", "model.last_stride", "model.pooling", "model.bnneck", "model.embedding_dim", "data.height", "data.width",
                  "data.mean", "data.std")


def check_model_settings(cfg: Config, saved: dict, path: str | Path) -> None:
    """UdaError listing each MODEL_SETTINGS key where `cfg` differs from the config saved with a model
    (nothing to compare for a bare state dict)."""
    if not isinstance(saved.get(checkpoint.CONFIG), dict):
        return
    # a model saved before a setting existed was trained under its default
    before, now = flatten(with_defaults(saved[checkpoint.CONFIG], defaults())), flatten(cfg.to_dict())
    differ = [key for key in MODEL_SETTINGS if key in before and before[key] != now[key]]
    if differ:
        listed = ", ".join(f"{key}={before[key]!r} (here {now[key]!r})" for key in differ)
        raise UdaError(
            f"{path} was trained with {listed}; use a config with the same model and image size "
            f"(e.g. the configs/uda/ file paired with its pretrain config) or add --opts "
            + " ".join(opt(key, before[key]) for key in differ)
        )


def load_model_weights(model: ReIDModel, saved: dict, path: str | Path) -> None:
    """Put a checkpoint's ReID model (uda.checkpoint.read: model_final.pth, or a run's last.pth) into `model`."""
    state, own = checkpoint.model_state(saved, path), model.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    wrong = [f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}" for key in state if key in own and state[key].shape != own[key].shape]
    if missing or unexpected or wrong:  # one short line, however many tensors differ
        raise UdaError(
            f"{path} does not fit this model (model.* settings differ from the run that saved it): {len(missing)} "
            f"tensors missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
            f"{len(wrong)} of another shape (e.g. {wrong[:2]})"
        )
    model.load_state_dict(state)


def build_classifier(cfg: Config, in_features: int, num_classes: int) -> ClassifierHead:
    m = cfg.model
    margin = {} if m.margin is None else {"margin": m.margin}
    options = {"linear": {}, "cosine": {"temperature": m.temperature}}.get(m.head, {"scale": m.scale, **margin})
    return build_head(m.head, in_features, num_classes, **options)


class TrainNet(nn.Module):
    """The model and its classifier heads as one module, so DistributedDataParallel synchronises the
    heads' gradients too. `targets` maps a head's name to (rows of the batch, their labels)."""

    def __init__(self, model: ReIDModel, heads: dict[str, ClassifierHead]):
        super().__init__()
        self.model = model
        self.heads = nn.ModuleDict(heads)

    def forward(self, images: torch.Tensor, targets: dict[str, tuple[slice, torch.Tensor]]):
        out = self.model(images)
        logits = {name: self.heads[name](out["bn"][rows], labels) for name, (rows, labels) in targets.items()}
        return out, logits


def reid_losses(global_features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, cfg: Config, prefix: str = "") -> dict:
    """The strong baseline's two losses on one branch: ID (label-smoothed CE on the head's logits of f_i)
    and batch-hard triplet on the pooled f_t; weighted, named '<prefix>ce' and '<prefix>triplet'."""
    loss = cfg.loss
    losses = {}
    if loss.ce_weight > 0:
        losses[f"{prefix}ce"] = loss.ce_weight * cross_entropy_label_smooth(logits.float(), labels, loss.label_smoothing)
    if loss.triplet_weight > 0:
        losses[f"{prefix}triplet"] = loss.triplet_weight * triplet_loss(global_features, labels, loss.triplet_margin, loss.soft_margin)
    if not losses:
        raise ConfigError("loss.ce_weight and loss.triplet_weight are both 0: nothing to train")
    return losses


def build_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)
    raise ConfigError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {o.name!r}")


def build_schedule(cfg: Config) -> Schedule:
    o = cfg.optim
    return Schedule(o.lr, o.warmup_epochs, o.warmup_from, tuple(o.milestones), o.gamma, o.schedule, o.epochs)
