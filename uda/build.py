"""What a stage builds from its config: torch's backends, the ReID model (new, or a trained one loaded
and checked against the config), a classifier head, the optimizer and the lr schedule."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from uda import checkpoint
from uda.config import Config, flatten, load_config, opt
from uda.distributed import DistInfo, init_distributed, pick_device
from uda.schedule import Schedule
from uda.errors import UdaError
from uda.models import ClassifierHead, ReIDModel, build_head, build_model
from uda.settings import MODEL_SETTINGS, check, defaults


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


def runtime(cfg: Config) -> tuple[DistInfo, torch.device]:
    """torch's backends set (before any tensor work), then this process's place in a torchrun job and its device."""
    set_backends(cfg)
    dist = init_distributed()
    return dist, pick_device(dist, cfg.device)


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 when train.amp (autocast for training and feature extraction), else None. On a CPU without
    native bf16, autocast emulates it: 5x slower than fp32 on our 2-core machine, so a run there says so."""
    if not cfg.train.amp:
        return None
    if device.type == "cpu":
        warnings.warn("train.amp=true on the CPU: bf16 autocast is often several times slower there than fp32 (--opts train.amp=false)",
                      RuntimeWarning, stacklevel=2)  # shown once per place
    return torch.bfloat16


def build_reid_model(cfg: Config, pretrained: str | None = None) -> ReIDModel:
    m = cfg.model
    return build_model(m.backbone, pretrained or m.pretrained, m.last_stride, m.pooling, m.bnneck, m.embedding_dim, m.frozen_blocks,
                       m.ibn_blocks)


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
    check(cfg)
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


def build_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)
    return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)


def build_schedule(cfg: Config) -> Schedule:
    o = cfg.optim
    return Schedule(o.lr, o.warmup_epochs, o.warmup_from, tuple(o.milestones), o.gamma, o.schedule, o.epochs)
