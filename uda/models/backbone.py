"""ResNet trunks that end at the last feature map, with the strong baseline's last stride of 1.

`build_backbone(name, pretrained, last_stride)` returns a `ResNetBackbone`: images (B, 3, H, W) ->
feature map (B, out_channels, H/16, W/16) with last stride 1 (16x8 at 256x128) or H/32 with 2.
Names: torchvision's `resnet18`, `resnet34`, `resnet50`, and `resnet18_w16` / `resnet18_w32`, the
ResNet-18 topology at base width 16 / 32 (channels 16-32-64-128 / 32-64-128-256) built from
torchvision's `BasicBlock`, small enough to train on a CPU for demos and tests.

Weights (`pretrained`): "none" (torchvision's initialisation, deterministic given the torch seed),
"imagenet" (torchvision's IMAGENET1K_V1 file, from torch hub's cache or downloaded into it), or a PATH
to a state dict: a torchvision checkpoint, or one of ours (a dict with a "model" key whose keys may
carry a "module." / "backbone." prefix).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.resnet import BasicBlock

from uda.errors import ConfigError, UdaError

log = logging.getLogger(__name__)

# name -> (torchvision constructor, the ImageNet weights the strong baseline starts from)
TORCHVISION_RESNETS: dict[str, tuple[Callable[..., tvm.ResNet], tvm.WeightsEnum]] = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1),
}
# name -> base width of a ResNet-18 topology (torchvision's is 64)
REDUCED_RESNETS: dict[str, int] = {"resnet18_w16": 16, "resnet18_w32": 32}
BACKBONE_NAMES = (*TORCHVISION_RESNETS, *REDUCED_RESNETS)


class ResNetBackbone(nn.Module):
    """A ResNet without its average pool and fc: (B, 3, H, W) -> (B, out_channels, h, w).

    Submodule names match torchvision's ResNet (conv1, bn1, layer1..layer4), so a torchvision state
    dict loads into it unchanged (its fc.* keys aside).
    """

    def __init__(self, conv1: nn.Conv2d, bn1: nn.BatchNorm2d, layers: list[nn.Sequential], out_channels: int):
        super().__init__()
        self.conv1, self.bn1 = conv1, bn1
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _basic_stage(in_channels: int, channels: int, num_blocks: int, stride: int) -> nn.Sequential:
    """A stage of torchvision BasicBlocks; the first block changes resolution/width via a 1x1 shortcut."""
    downsample = None
    if stride != 1 or in_channels != channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(channels)
        )
    blocks = [BasicBlock(in_channels, channels, stride, downsample)]
    blocks += [BasicBlock(channels, channels) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def _reduced_resnet18(width: int) -> ResNetBackbone:
    """ResNet-18 (2-2-2-2 BasicBlocks, 7x7 stem + max pool) with channels width * (1, 2, 4, 8)."""
    widths = [width, 2 * width, 4 * width, 8 * width]
    layers, in_channels = [], width
    for stage, channels in enumerate(widths):
        layers.append(_basic_stage(in_channels, channels, num_blocks=2, stride=1 if stage == 0 else 2))
        in_channels = channels
    conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    backbone = ResNetBackbone(conv1, nn.BatchNorm2d(width), layers, out_channels=widths[-1])
    for m in backbone.modules():  # torchvision ResNet's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return backbone


def _set_stride_one(block: nn.Module) -> None:
    """Make a down-sampling residual block keep its resolution (its strided conv and its shortcut)."""
    for m in block.modules():
        if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
            m.stride = (1, 1)


def _torchvision_cache_path(weights: tvm.WeightsEnum) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def _imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights from torch hub's cache, downloading them there if absent."""
    if name not in TORCHVISION_RESNETS:
        raise ConfigError(f"no ImageNet weights exist for backbone '{name}'; use pretrained: none or pretrained: PATH")
    weights = TORCHVISION_RESNETS[name][1]
    cache = _torchvision_cache_path(weights)
    was_cached = cache.is_file()
    try:
        return torch.hub.load_state_dict_from_url(weights.url, map_location="cpu", check_hash=True, weights_only=True)
    except Exception as exc:  # network errors, hash mismatch, unreadable file: all fixed by providing the file
        if was_cached:
            raise UdaError(
                f"cannot read ImageNet weights {cache} ({type(exc).__name__}: {exc}); "
                f"replace it with a good copy of {weights.url} or pass pretrained: PATH"
            ) from None
        raise UdaError(
            f"ImageNet weights for {name} are not at {cache} and downloading them failed ({type(exc).__name__}); "
            f"copy {weights.url} there or pass pretrained: PATH"
        ) from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a file: a plain one, or a checkpoint of ours holding it under "model"."""
    if not path.is_file():
        raise UdaError(f"pretrained weights file {path} does not exist; fix the path or use pretrained: none")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean "not a readable weights file"
        raise UdaError(f"cannot read pretrained weights {path} ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UdaError(f"{path} holds no state dict (expected name -> tensor, or a checkpoint with a 'model' key)")
    return obj


def _backbone_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP's "module." and our model's "backbone." prefixes; drop torchvision's fc classifier."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):  # a whole ReIDModel: keep its backbone part only
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def load_backbone_weights(backbone: ResNetBackbone, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `backbone`; report missing/unexpected keys on one line, fail on shape mismatch."""
    state = _backbone_keys(state)
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
        raise UdaError(f"weights {source} share no parameter name with this backbone; is it a ResNet state dict?")
    result = backbone.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]  # a counter, not a weight
    unexpected = result.unexpected_keys
    message = f"loaded backbone weights from {source}: missing {missing or 'none'}, unexpected {unexpected or 'none'}"
    (log.warning if missing or unexpected else log.info)(message)


def build_backbone(name: str, pretrained: str = "none", last_stride: int = 1) -> ResNetBackbone:
    """A ResNet trunk (see the module docstring); `out_channels` gives the feature map's depth."""
    if last_stride not in (1, 2):
        raise ConfigError(f"last_stride must be 1 (strong baseline) or 2 (plain ResNet), got {last_stride!r}")
    if name in TORCHVISION_RESNETS:
        net = TORCHVISION_RESNETS[name][0](weights=None)
        layers = [net.layer1, net.layer2, net.layer3, net.layer4]
        backbone = ResNetBackbone(net.conv1, net.bn1, layers, out_channels=net.fc.in_features)
    elif name in REDUCED_RESNETS:
        backbone = _reduced_resnet18(REDUCED_RESNETS[name])
    else:
        raise ConfigError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONE_NAMES)}")
    if last_stride == 1:
        _set_stride_one(backbone.layer4[0])

    if pretrained == "imagenet":
        load_backbone_weights(backbone, _imagenet_state_dict(name), source=f"torchvision ImageNet ({name})")
    elif pretrained != "none":
        path = Path(pretrained).expanduser()
        load_backbone_weights(backbone, _read_state_dict(path), source=str(path))
    return backbone
