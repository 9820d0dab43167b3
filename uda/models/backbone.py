"""Backbone trunks that end at the last feature map, with the strong baseline's last stride of 1.

`build_backbone(name, pretrained, last_stride, ibn_blocks)` returns a trunk: images (B, 3, H, W) -> feature map
(B, out_channels, H/16, W/16) with last stride 1 (16x8 at 256x128) or H/32 with 2. Every trunk has
the same small interface: `out_channels`, `last_downsampling_block()` (the block whose strides last
stride 1 removes) and `weights_source` (where its weights came from, for the run's record).

Names (`BACKBONES`): torchvision's `resnet18`, `resnet34`, `resnet50`; `resnet18_w16` / `resnet18_w32`,
the ResNet-18 topology at base width 16 / 32 (channels 16-32-64-128 / 32-64-128-256) built from
torchvision's `BasicBlock`, small enough to train on a CPU for demos and tests; and torchvision's
`mobilenet_v2` (width 1.0, 1280-d), whose ImageNet weights also install offline (uda.models.weights).

`ibn_blocks=N` makes the first N blocks after the stem IBN-a blocks (Pan et al., "Two at Once", 2018):
the first BatchNorm of each residual unit normalises half its channels per image (InstanceNorm, which
removes an image's colour and contrast: appearance that differs between camera networks) and half per
batch. IBN-Net puts them in ResNet's layer1-3 and reports +5.8 mAP of direct transfer (MMT's table);
here the units start from the ImageNet BatchNorm, not from IBN ImageNet weights.

Weights (`pretrained`): "none" (torchvision's initialisation, deterministic given the torch seed),
"imagenet" (see uda.models.weights for where they are looked for), or a PATH to a state dict: a
torchvision checkpoint, or one of ours (a dict with a "model" key whose keys may carry a "module." /
"backbone." prefix).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.resnet import BasicBlock

from uda.errors import ConfigError
from uda.models.weights import imagenet_on_disk, imagenet_state_dict, load_backbone_weights, read_state_dict


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
        self.weights_source = "none"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def last_downsampling_block(self) -> nn.Module:
        return self.layer4[0]

    def blocks(self) -> list[nn.Module]:
        """The stages in forward order, what model.frozen_blocks counts: the stem (conv1 + bn1), layer1..layer4."""
        return [nn.ModuleList([self.conv1, self.bn1]), self.layer1, self.layer2, self.layer3, self.layer4]


class MobileNetV2Backbone(nn.Module):
    """torchvision's MobileNetV2 `features` (stem, 17 inverted residual blocks, 1x1 conv to 1280), without
    its classifier: (B, 3, H, W) -> (B, 1280, h, w). Keys match torchvision's `mobilenet_v2()` state dict
    (its classifier.* keys aside)."""

    def __init__(self, features: nn.Sequential, out_channels: int):
        super().__init__()
        self.features = features
        self.out_channels = out_channels
        self.weights_source = "none"
        self._last_downsampling = max(i for i, block in enumerate(features) if _strided_convs(block))  # before last stride 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    def last_downsampling_block(self) -> nn.Module:
        """The last block built with a strided conv: features[14] (96 -> 160 channels, H/16 -> H/32)."""
        return self.features[self._last_downsampling]

    def blocks(self) -> list[nn.Module]:
        """The blocks in forward order, what model.frozen_blocks counts: the stem, 17 inverted residual blocks, the 1x1 conv."""
        return list(self.features)


class IBN(nn.Module):
    """IBN-a's normalisation: InstanceNorm (affine) on the first `half` channels, BatchNorm on the rest."""

    def __init__(self, channels: int, half: int):
        super().__init__()
        self.half = half
        self.IN = nn.InstanceNorm2d(half, affine=True)
        self.BN = nn.BatchNorm2d(channels - half)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> "IBN":
        """Half the channels of `bn` (rounded down) to InstanceNorm, starting from bn's scale and shift; the
        rest keep bn's parameters and running statistics, so a pretrained unit starts where it was."""
        ibn = cls(bn.num_features, bn.num_features // 2).to(bn.weight.device)
        with torch.no_grad():
            ibn.IN.weight.copy_(bn.weight[: ibn.half])
            ibn.IN.bias.copy_(bn.bias[: ibn.half])
            rest = {k: (v[ibn.half:] if v.dim() else v) for k, v in bn.state_dict().items()}
            ibn.BN.load_state_dict(rest)
        return ibn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, rest = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat([self.IN(first.contiguous()), self.BN(rest.contiguous())], dim=1)


def convert_to_ibn(backbone: nn.Module, ibn_blocks: int) -> None:
    """The first BatchNorm of every residual unit in blocks 1..ibn_blocks (after the stem) becomes an IBN:
    ResNet's BasicBlock/Bottleneck bn1 in its first stages, MobileNetV2's first BatchNorm of each inverted
    residual block. The last block is left out, as IBN-a leaves out layer4."""
    blocks = backbone.blocks()
    if not 0 <= ibn_blocks <= len(blocks) - 2:
        raise ConfigError(f"model.ibn_blocks={ibn_blocks}, but this backbone has {len(blocks) - 2} blocks between its stem "
                          "and its last block (0: no IBN)")
    for block in blocks[1: ibn_blocks + 1]:
        units = list(block) if isinstance(block, nn.Sequential) else [block]  # a ResNet stage, or one MobileNetV2 block
        for unit in units:
            name, bn = next((n, m) for n, m in unit.named_modules() if isinstance(m, nn.BatchNorm2d))
            parent_name, _, attr = name.rpartition(".")
            setattr(unit.get_submodule(parent_name), attr, IBN.from_batchnorm(bn))


def _strided_convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]


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


def _torchvision_resnet(constructor: Callable[..., tvm.ResNet]) -> ResNetBackbone:
    net = constructor(weights=None)
    return ResNetBackbone(net.conv1, net.bn1, [net.layer1, net.layer2, net.layer3, net.layer4], net.fc.in_features)


def _torchvision_mobilenet_v2() -> MobileNetV2Backbone:
    net = tvm.mobilenet_v2(weights=None)
    return MobileNetV2Backbone(net.features, out_channels=net.last_channel)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a randomly initialised trunk, and torchvision's ImageNet weights for it (if any)."""

    build: Callable[[], nn.Module]
    imagenet: tvm.WeightsEnum | None = None


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(partial(_torchvision_resnet, tvm.resnet18), tvm.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": BackboneSpec(partial(_torchvision_resnet, tvm.resnet34), tvm.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": BackboneSpec(partial(_torchvision_resnet, tvm.resnet50), tvm.ResNet50_Weights.IMAGENET1K_V1),
    "resnet18_w16": BackboneSpec(partial(_reduced_resnet18, 16)),
    "resnet18_w32": BackboneSpec(partial(_reduced_resnet18, 32)),
    "mobilenet_v2": BackboneSpec(_torchvision_mobilenet_v2, tvm.MobileNet_V2_Weights.IMAGENET1K_V1),
}
BACKBONE_NAMES = tuple(BACKBONES)


def imagenet_weights_on_disk(name: str) -> bool:
    """Whether `model.pretrained: imagenet` for backbone `name` would load here without a download."""
    spec = BACKBONES.get(name)
    return spec is not None and spec.imagenet is not None and imagenet_on_disk(name, spec.imagenet)


def _set_stride_one(block: nn.Module) -> None:
    """Make a down-sampling block keep its resolution (its strided convs, shortcut included)."""
    for m in _strided_convs(block):
        m.stride = (1, 1)


def build_backbone(name: str, pretrained: str = "none", last_stride: int = 1, ibn_blocks: int = 0) -> nn.Module:
    """A trunk (see the module docstring); `out_channels` gives the feature map's depth."""
    if last_stride not in (1, 2):
        raise ConfigError(f"last_stride must be 1 (strong baseline) or 2 (plain ResNet), got {last_stride!r}")
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONE_NAMES)}")
    spec = BACKBONES[name]
    backbone = spec.build()
    if last_stride == 1:
        _set_stride_one(backbone.last_downsampling_block())

    if pretrained == "imagenet":
        if spec.imagenet is None:
            raise ConfigError(
                f"no ImageNet weights exist for backbone '{name}'; use pretrained: none or pretrained: PATH "
                f"(backbones with ImageNet weights: {', '.join(n for n, s in BACKBONES.items() if s.imagenet)})"
            )
        state, source = imagenet_state_dict(name, spec.imagenet)
        load_backbone_weights(backbone, state, source=source)
        backbone.weights_source = source
    elif pretrained != "none":
        path = Path(pretrained).expanduser()
        load_backbone_weights(backbone, read_state_dict(path), source=str(path))
        backbone.weights_source = str(path)
    convert_to_ibn(backbone, ibn_blocks)  # after the weights: its units start from their BatchNorms
    return backbone
