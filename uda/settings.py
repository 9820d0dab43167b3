"""Every setting of both stages, once: its default, its check, a one-line doc, whether it defines the
model, whether a resumed run may change it, and which stages read it. The stages' defaults, the early
checks, the resume rules, the source-model match and the grid's list are all derived from SETTINGS.

    python -m uda.settings [--stage pretrain|adapt]     # every key with its default, range and doc

The defaults are the strong baseline's (Luo et al. 2019); adaptation changes a few (`Setting.adapt`).
"""
from __future__ import annotations

import argparse
import difflib
import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from uda.cluster import CLUSTER_METHODS, KNN_BACKENDS
from uda.config import Config, flatten, load_config
from uda.data import IMAGENET_MEAN, IMAGENET_STD
from uda.datasets.synthetic import PRESET_NAMES
from uda.schedule import SCHEDULES
from uda.errors import ConfigError
from uda.evaluation.distance import METRICS
from uda.evaluation.metrics import AP_DEFINITIONS
from uda.head_policies import HEAD_INITS, HEAD_POLICIES, MEMORY_UPDATES, TEMPERATURE_SCHEDULES
from uda.models import BACKBONE_NAMES, HEADS, POOLINGS

STAGES = ("pretrain", "adapt")
BOTH, PRETRAIN, ADAPT = STAGES, ("pretrain",), ("adapt",)
FIXED, FREE, RESULTS = "fixed", "free", "results"  # what a resumed run may do with a key: see Setting.resume
_UNSET = object()


@dataclass(frozen=True)
class Check:
    """A value's test and the words that say what it must be (shown when it fails)."""

    test: Callable[[Any], bool]
    rule: str
    names: tuple[str, ...] = ()  # an enumerated setting's choices (a refusal suggests the closest)

    def passes(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except TypeError:  # a string where a number belongs (keys whose default is None take any type)
            return False


def choices(names: Iterable[str]) -> Check:
    names = tuple(names)
    return Check(lambda v: v in names, "one of " + ", ".join(names), names)


POSITIVE = Check(lambda v: 0 < v < math.inf, "> 0 and finite")
NON_NEGATIVE = Check(lambda v: 0 <= v < math.inf, ">= 0 and finite")
PROBABILITY = Check(lambda v: 0 <= v <= 1, "in [0, 1]")
AT_LEAST_ONE = Check(lambda v: v >= 1, "a whole number >= 1")
FLAG = Check(lambda v: isinstance(v, bool), "true or false")
TEXT = Check(lambda v: v is None or isinstance(v, str), "a name or a path")
PIXELS = Check(lambda v: v >= 8, "at least 8 pixels")
RGB = Check(lambda v: len(v) == 3 and all(math.isfinite(x) for x in v), "3 numbers (R, G, B)")


@dataclass(frozen=True)
class Setting:
    """One key. `model`: the saved weights mean something else under another value (a source model must
    match it). `resume`: FIXED (a resumed run keeps it), FREE (where or how fast: no number changes), or
    RESULTS (may change on resume, but a finished run's report depends on it: how long, what is scored).
    `adapt`: adaptation's own default, when it differs."""

    key: str
    default: Any
    check: Check
    doc: str
    model: bool = False
    resume: str = FIXED
    stages: tuple[str, ...] = BOTH
    adapt: Any = field(default=_UNSET)

    def default_for(self, stage: str) -> Any:
        return self.adapt if stage == "adapt" and self.adapt is not _UNSET else self.default


S = Setting
SETTINGS: tuple[Setting, ...] = (
    S("seed", 0, NON_NEGATIVE, "seeds python, numpy and torch per epoch, and every loader's sampling"),
    S("device", "auto", Check(lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(v)) is not None, "auto, cpu, cuda or cuda:N"),
      "where to train", resume=FREE),
    S("deterministic", False, FLAG, "torch's deterministic algorithms: exact repeats on a GPU, slower"),
    S("data.source", None, TEXT, "source dataset: market, duke, msmt17, synth_market, synth_duke or a path (--source)"),
    S("data.target", None, TEXT, "target dataset, same choices (--target); pretrain also reports direct transfer to it"),
    S("data.root", None, TEXT, "folder holding the datasets (default: $UDA_DATA, else ./data)", resume=FREE),
    S("data.synth_preset", "small", choices(PRESET_NAMES), "size of the synthetic domains"),
    S("data.synth_seed", 0, NON_NEGATIVE, "seed the synthetic domains are drawn from"),
    S("data.msmt_train_val", False, FLAG, "MSMT17: train on list_train + list_val (as SpCL) instead of list_train"),
    S("data.subset_ids", 0, NON_NEGATIVE, "> 0: only this many train and test identities (development runs, not the protocol)"),
    S("data.height", 256, PIXELS, "input height", model=True),
    S("data.width", 128, PIXELS, "input width", model=True),
    S("data.num_pids", 16, Check(lambda v: v >= 2, "a whole number >= 2 (the triplet loss needs other identities)"),
      "P identities per batch"),
    S("data.num_instances", 4, Check(lambda v: v >= 2, "a whole number >= 2 (the triplet loss needs a positive)"),
      "K images per identity in a batch"),
    S("data.num_workers", 4, NON_NEGATIVE, "loader pipeline: DataLoader worker processes", resume=FREE),
    S("data.cache", True, FLAG, "loader pipeline: decode every image once into memory", resume=FREE),
    S("data.pipeline", "device", choices(("device", "loader")),
      "device: images resized once and held where the model trains, whole batches augmented there | loader: per-image "
      "transforms in DataLoader workers (less memory)"),
    S("data.skip_corrupt", False, FLAG, "drop unreadable images (reported) instead of stopping"),
    S("data.flip_p", 0.5, PROBABILITY, "horizontal flip probability"),
    S("data.pad", 10, NON_NEGATIVE, "pixels of padding before the random crop"),
    S("data.erasing_p", 0.5, PROBABILITY, "random erasing probability"),
    S("data.mean", list(IMAGENET_MEAN), RGB, "input normalisation mean (`python -m uda.data.stats` gives a dataset's own)",
      model=True),
    S("data.std", list(IMAGENET_STD), Check(lambda v: len(v) == 3 and all(0 < x < math.inf for x in v), "3 numbers > 0 (R, G, B)"),
      "input normalisation standard deviation", model=True),
    S("model.backbone", "resnet50", choices(BACKBONE_NAMES), "the network", model=True),
    S("model.pretrained", "imagenet", TEXT, "backbone weights: imagenet | none | PATH (adapt takes its weights from --init)",
      adapt="none"),
    S("model.last_stride", 1, Check(lambda v: v in (1, 2), "1 (strong baseline) or 2 (plain)"), "stride of the last stage",
      model=True),
    S("model.pooling", "avg", choices(POOLINGS), "global pooling", model=True),
    S("model.bnneck", True, FLAG, "BatchNorm between the pooled feature (triplet) and the classifier (ID loss)", model=True),
    S("model.embedding_dim", 0, NON_NEGATIVE, "0: none (the strong baseline); N: a bias-free D -> N layer after pooling",
      model=True),
    S("model.frozen_blocks", 0, NON_NEGATIVE, "the backbone's first N blocks (MobileNetV2: 19, stem to 1x1 conv; ResNet: 5, stem "
      "and layer1-4) get no gradient and keep their BatchNorm statistics: a cheaper step"),
    S("model.ibn_blocks", 0, NON_NEGATIVE, "IBN-a: half the channels of the first BatchNorm of each residual unit in the "
      "first N blocks after the stem normalised per image (InstanceNorm); 0: off", model=True),
    S("model.head", "linear", choices(HEADS), "classifier head", adapt="cosine"),
    S("model.temperature", 0.1, POSITIVE, "cosine head: logits = cos / T"),
    S("model.scale", 30.0, POSITIVE, "arcface / cosface scale"),
    S("model.margin", None, NON_NEGATIVE, "arcface / cosface margin; none: the head's own (ArcFace 0.5, CosFace 0.35)"),
    S("loss.ce_weight", 1.0, NON_NEGATIVE, "ID loss weight"),
    S("loss.label_smoothing", 0.1, Check(lambda v: 0 <= v < 1, "in [0, 1)"), "ID loss label smoothing"),
    S("loss.triplet_weight", 1.0, NON_NEGATIVE, "batch-hard triplet loss weight"),
    S("loss.triplet_margin", 0.3, NON_NEGATIVE, "triplet margin"),
    S("loss.soft_margin", False, FLAG, "soft-margin triplet (log(1 + exp(d+ - d-))) instead of a margin"),
    S("loss.center_weight", 0.0005, NON_NEGATIVE, "center loss weight (0: off)", stages=PRETRAIN),
    S("loss.center_lr", 0.5, POSITIVE, "the centres' own SGD lr", stages=PRETRAIN),
    S("loss.source_weight", 1.0, NON_NEGATIVE, "weight of the source branch's losses; 0: no source batch at all (target only)",
      stages=ADAPT),
    S("loss.target_weight", 1.0, NON_NEGATIVE, "weight of the target (pseudo-label) branch's losses", stages=ADAPT),
    S("optim.name", "adam", choices(("adam", "sgd")), "optimizer"),
    S("optim.lr", 3.5e-4, POSITIVE, "base learning rate"),
    S("optim.weight_decay", 5e-4, NON_NEGATIVE, "weight decay"),
    S("optim.momentum", 0.9, Check(lambda v: 0 <= v < 1, "in [0, 1)"), "sgd momentum"),
    S("optim.schedule", "step", choices(SCHEDULES), "after warmup: x gamma at each milestone, or cosine decay"),
    S("optim.warmup_epochs", 10, NON_NEGATIVE, "linear warmup epochs", adapt=0),
    S("optim.warmup_from", 3.5e-5, POSITIVE, "warmup's first lr"),
    S("optim.milestones", [40, 70], Check(lambda v: all(isinstance(m, int) and m >= 1 for m in v), "a list of epochs >= 1"),
      "epochs at which the step schedule multiplies the lr by gamma", adapt=[20, 40]),
    S("optim.gamma", 0.1, Check(lambda v: 0 < v <= 1, "in (0, 1]"), "step schedule factor"),
    S("optim.epochs", 120, AT_LEAST_ONE, "epochs to train (adapt: clustering rounds)", resume=RESULTS, adapt=50),
    S("train.amp", False, FLAG, "bf16 autocast for training and feature extraction"),
    S("train.channels_last", False, FLAG, "channels-last memory format (1.3x faster for MobileNetV2 on a CPU)"),
    S("train.eval_every", 10, Check(lambda v: v >= 1, "a whole number of epochs >= 1 (the last epoch is always evaluated)"),
      "evaluate every N epochs", resume=RESULTS, adapt=1),
    S("train.sync_bn", False, FLAG, "SyncBatchNorm under torchrun"),
    S("train.mixup_alpha", 0.0, NON_NEGATIVE, "> 0: the ID loss on images mixed with lam ~ Beta(alpha, alpha), triplet and center on the "
      "clean ones (uda/mixup.py; about twice a step's cost); 0: off", stages=PRETRAIN),
    S("train.keep_checkpoints", 2, AT_LEAST_ONE, "checkpoints kept: last.pth and the ones before it", resume=FREE),
    S("eval.batch_size", 256, AT_LEAST_ONE, "images per feature-extraction batch", resume=FREE),
    S("eval.flip", True, FLAG, "average each image's feature with its mirror's"),
    S("eval.scales", [1.0], Check(lambda v: len(v) > 0 and all(type(x) in (int, float) and 0 < x < math.inf for x in v),
                                  "a non-empty list of numbers > 0"),
      "test-time scales: features averaged over the images resized by each factor, e.g. [0.75, 1.0, 1.25] (also the clustering memory)"),
    S("eval.metric", "cosine", choices(METRICS), "distance (features are L2-normalised either way)"),
    S("eval.ap", "noninterp", choices(AP_DEFINITIONS), "noninterp (torchreid, fast-reid) | trapezoid (the official Market devkit)"),
    S("eval.rerank", False, FLAG, "also report k-reciprocal re-ranked metrics (Zhong et al. 2017)", resume=RESULTS),
    S("eval.rerank_k1", 20, AT_LEAST_ONE, "re-ranking k1"),
    S("eval.rerank_k2", 6, AT_LEAST_ONE, "re-ranking k2"),
    S("eval.rerank_lambda", 0.3, PROBABILITY, "re-ranking: weight of the original distance"),
    S("adapt.init", None, TEXT, "source model to start from (--init; default runs/pretrain/<source>/model_final.pth)",
      resume=FREE, stages=ADAPT),
    S("adapt.iters", 400, AT_LEAST_ONE, "training steps per clustering round", stages=ADAPT),
    S("adapt.classifier", "separate", choices(HEAD_POLICIES),
      "head policy: separate source and target heads | merged: one head over both label sets | memory: separate, the "
      "target rows a cluster memory moved by momentum (Cluster Contrast) | proxies: separate, the target trained on "
      "per-camera cluster proxies (CAP)", stages=ADAPT),
    S("adapt.head_init", "centers", choices(HEAD_INITS), "rows start from the class / cluster centres, or N(0, 0.001)",
      stages=ADAPT),
    S("adapt.temperature_schedule", "fixed", choices(TEMPERATURE_SCHEDULES),
      "cosine heads: fixed T | grow: T (1 + ln e) | shrink: T / (1 + ln e), epoch e = 1, 2, ...", stages=ADAPT),
    S("adapt.memory_momentum", 0.2, Check(lambda v: 0 <= v < 1, "in [0, 1)"),
      "memory: row <- normalise(m row + (1 - m) f) after each step (Cluster Contrast: 0.1-0.2)", stages=ADAPT),
    S("adapt.memory_temperature", 0.05, POSITIVE, "memory: logits = cos / T (Cluster Contrast: 0.05)", stages=ADAPT),
    S("adapt.memory_update", "mean", choices(MEMORY_UPDATES),
      "memory: each of the batch's images moves its row | hard: only the one least similar to it", stages=ADAPT),
    S("adapt.proxy_momentum", 0.2, Check(lambda v: 0 <= v < 1, "in [0, 1)"), "proxies: each image moves its proxy by momentum (CAP: 0.2)",
      stages=ADAPT),
    S("adapt.proxy_temperature", 0.07, POSITIVE, "proxies: logits = cos / T (CAP: 0.07)", stages=ADAPT),
    S("adapt.proxy_inter_weight", 0.5, NON_NEGATIVE, "proxies: weight of the inter-camera term beside the intra-camera one (CAP: 0.5)",
      stages=ADAPT),
    S("adapt.proxy_negatives", 50, AT_LEAST_ONE, "proxies: hard negatives (other clusters' most similar proxies) of the inter-camera term",
      stages=ADAPT),
    S("adapt.xbm_size", 0, NON_NEGATIVE, "cross-batch memory (XBM): the target triplet also mines the last N target features "
      "of the round; 0: off", stages=ADAPT),
    S("adapt.teacher_momentum", 0.0, Check(lambda v: 0 <= v < 1, "in [0, 1)"),
      "> 0: a mean teacher (MMT-style), teacher <- m teacher + (1 - m) model after each step, clustered, evaluated and "
      "saved, and giving the target branch soft targets (MMT: 0.999); 0: off", stages=ADAPT),
    S("adapt.soft_ce_weight", 0.5, PROBABILITY, "mean teacher: target ID loss (1 - w) CE + w soft CE against the teacher's "
      "logits (MMT: 0.5)", stages=ADAPT),
    S("adapt.soft_triplet_weight", 0.8, PROBABILITY, "mean teacher: target triplet (1 - w) hard + w soft triplet against the "
      "teacher's distances (MMT: 0.8)", stages=ADAPT),
    S("adapt.renormalize_rows", False, FLAG, "the heads' rows set to unit norm before every step", stages=ADAPT),
    S("cluster.method", "dbscan", choices(CLUSTER_METHODS), "dbscan (Jaccard distances) | kmeans (MMT-style)", stages=ADAPT),
    S("cluster.num_clusters", 500, Check(lambda v: v >= 2, "a whole number >= 2"), "kmeans only: clusters per round", stages=ADAPT),
    S("cluster.k1", 30, AT_LEAST_ONE, "k-reciprocal neighbours of the Jaccard distance", stages=ADAPT),
    S("cluster.k2", 6, AT_LEAST_ONE, "neighbours averaged in the Jaccard distance (query expansion)", stages=ADAPT),
    S("cluster.eps", 0.6, Check(lambda v: 0 < v < 1, "in (0, 1): Jaccard distances lie in [0, 1]"), "DBSCAN radius",
      stages=ADAPT),
    S("cluster.min_samples", 4, AT_LEAST_ONE, "DBSCAN core-point neighbours", stages=ADAPT),
    S("cluster.keep_outliers", False, FLAG, "each outlier becomes its own singleton class instead of being dropped", stages=ADAPT),
    S("cluster.knn_backend", "torch", choices(KNN_BACKENDS), "torch (chunked top-k, GPU when there is one) | faiss", stages=ADAPT),
    S("cluster.camera_normalize", False, FLAG, "cluster features minus their camera's mean (cross-camera grouping)", stages=ADAPT),
)
BY_KEY = {s.key: s for s in SETTINGS}
MODEL_SETTINGS = tuple(s.key for s in SETTINGS if s.model)
RESUME_MAY_CHANGE = frozenset(s.key for s in SETTINGS if s.resume != FIXED)
CHANGE_RESULTS = tuple(s.key for s in SETTINGS if s.resume == RESULTS)  # a finished run's numbers depend on these too


def defaults(stage: str | None = None) -> dict:
    """The nested defaults of one stage, or (None) of the keys every stage has: what a saved model's config is read against."""
    nested: dict = {}
    for s in SETTINGS:
        if stage in s.stages or (stage is None and s.stages == BOTH):
            *sections, name = s.key.split(".")
            node = nested
            for section in sections:
                node = node.setdefault(section, {})
            value = s.default_for(stage or "pretrain")
            node[name] = list(value) if isinstance(value, list) else value
    return nested


def load(stage: str, path: str | Path | None = None, opts: Iterable[str] = ()) -> Config:
    """A stage's config: defaults <- YAML file <- overrides, checked (an unknown key, a wrong type or a bad value is refused)."""
    cfg = load_config(defaults(stage), path, opts)
    check(cfg)
    return cfg


def check(cfg: Config) -> None:
    """Every setting the config has against its check, then the rules that tie several together: refused
    as soon as the config is read, naming the key, not after minutes of decoding or training."""
    values = flatten(cfg.to_dict())
    for key, value in values.items():
        s = BY_KEY.get(key)
        if s is not None and value is not None and not s.check.passes(value):
            close = difflib.get_close_matches(str(value), s.check.names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key} must be {s.check.rule}, got {value!r}{hint}")
    if values.get("loss.ce_weight") == 0 and values.get("loss.triplet_weight") == 0:
        raise ConfigError("loss.ce_weight and loss.triplet_weight are both 0: nothing to train")
    if values.get("train.mixup_alpha", 0) > 0:
        _check_mixup(cfg)
    if "adapt.iters" in values:
        _check_adaptation(cfg)


def _check_mixup(cfg: Config) -> None:
    """Mixup with settings it cannot work with."""
    if cfg.model.head in ("arcface", "cosface"):
        raise ConfigError(f"train.mixup_alpha > 0 with model.head={cfg.model.head}: a margin head needs one hard label per "
                          f"image, and a mixed image has two; use model.head=linear or cosine, or train.mixup_alpha=0")
    if cfg.loss.ce_weight == 0:
        raise ConfigError("train.mixup_alpha > 0 with loss.ce_weight=0: mixup changes only the ID loss, so it would "
                          "only cost a second forward; set train.mixup_alpha=0")


def _check_adaptation(cfg: Config) -> None:
    """Adaptation settings that would otherwise fail, or do nothing, only after the first feature memory."""
    if str(cfg.model.pretrained).lower() != "none":
        raise ConfigError(
            f"model.pretrained={cfg.model.pretrained!r} does not apply to adapt: its weights come from the source "
            "model (--init); give backbone weights to pretrain.py instead"
        )
    if cfg.adapt.temperature_schedule != "fixed" and cfg.model.head != "cosine":
        raise ConfigError(f"adapt.temperature_schedule={cfg.adapt.temperature_schedule} schedules the cosine head's "
                          f"temperature; model.head={cfg.model.head} has none (use model.head=cosine)")
    for policy, prefix in (("memory", "memory_"), ("proxies", "proxy_")):
        changed = [k for k in cfg.adapt if k.startswith(prefix) and cfg.adapt[k] != BY_KEY[f"adapt.{k}"].default]
        if changed and cfg.adapt.classifier != policy:
            raise ConfigError(f"adapt.{changed[0]} applies to adapt.classifier={policy} only: add it, or leave the setting out")
    soft = [k for k in ("soft_ce_weight", "soft_triplet_weight") if cfg.adapt[k] != BY_KEY[f"adapt.{k}"].default]
    if soft and cfg.adapt.teacher_momentum == 0:
        raise ConfigError(f"adapt.{soft[0]} applies to the mean teacher only: add adapt.teacher_momentum (e.g. 0.999), "
                          "or leave the setting out")
    if cfg.adapt.teacher_momentum > 0 and cfg.adapt.classifier == "proxies" and cfg.adapt.soft_ce_weight > 0:
        raise ConfigError("adapt.teacher_momentum > 0 with adapt.classifier=proxies: the camera proxies give no logits "
                          "for the soft ID loss; set adapt.soft_ce_weight=0 (the soft triplet still applies)")
    if cfg.adapt.classifier in ("memory", "proxies") and cfg.adapt.head_init != "centers":
        raise ConfigError(f"adapt.classifier={cfg.adapt.classifier} starts its target rows from the clusters themselves; "
                          "adapt.head_init=normal does not apply to it")
    if cfg.cluster.method == "kmeans" and cfg.cluster.num_clusters < cfg.data.num_pids:
        raise ConfigError(f"cluster.num_clusters={cfg.cluster.num_clusters} must be at least data.num_pids={cfg.data.num_pids} "
                          "(the identities of one P x K batch)")
    if cfg.cluster.knn_backend == "faiss" and importlib.util.find_spec("faiss") is None:
        raise ConfigError("cluster.knn_backend=faiss needs faiss (pip install -e '.[gpu]', or faiss-cpu); "
                          "or use cluster.knn_backend=torch")


def describe(stage: str | None = None) -> str:
    """The table as text: key, default, what it must be, doc, and the flags (model, resume, stages)."""
    lines = []
    for s in SETTINGS:
        if stage is not None and stage not in s.stages:
            continue
        adapt_default = f" (adapt: {s.adapt!r})" if stage is None and s.adapt is not _UNSET else ""
        flags = [f for f, on in (("defines the model", s.model), (f"resume: {s.resume}", s.resume != FIXED),
                                 (f"{'/'.join(s.stages)} only", s.stages != BOTH)) if on]
        lines.append(f"{s.key} = {s.default_for(stage or 'pretrain')!r}{adapt_default}")
        lines.append(f"    {s.doc}; must be {s.check.rule}" + (f" [{', '.join(flags)}]" if flags else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Every setting with its default, what it must be, and what it does.")
    parser.add_argument("--stage", choices=STAGES, help="only this stage's keys, with its defaults")
    print(describe(parser.parse_args(argv).stage))


if __name__ == "__main__":
    main()
