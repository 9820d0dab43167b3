"""Classifier heads on the BNNeck feature f_i, all with one interface.

    head(features (B, D), targets (B,) int64 or None) -> logits (B, num_classes)
    head.num_classes, head.in_features, head.reset_classifier(num_classes, weight=None)

Heads live outside the ReID model because the UDA stage trains two of them on one backbone (source
identities and target clusters): merging both label sets into one classifier hurts. Each stores its
weight matrix (num_classes, in_features) as `weight`, unnormalised; the normalised heads normalise it
inside forward.

`reset_classifier` replaces `weight` with a NEW Parameter (the number of rows changes each time the
target clusters change). An optimizer holding the old Parameter no longer updates the head: rebuild
the optimizer (or its param group for this head) after every reset, and re-wrap the head if it sits
inside DistributedDataParallel, which registers its parameters once.
"""
from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from uda.errors import ConfigError


class ClassifierHead(nn.Module, ABC):
    """Holds the weight matrix and its re-creation; subclasses define `forward` and `init_weight`."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(self.init_weight(torch.empty(num_classes, in_features)))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @abstractmethod
    def init_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Fill an empty (num_classes, in_features) tensor with this head's random initialisation."""

    def reset_classifier(self, num_classes: int, weight: torch.Tensor | None = None) -> None:
        """A fresh weight Parameter with `num_classes` rows: random, or a copy of `weight` (num_classes, D).

        Used by the UDA loop to start the target head from L2-normalised cluster centres. The new
        Parameter keeps the old one's device and dtype; rebuild the optimizer afterwards.
        """
        old = self.weight
        if weight is None:
            new = self.init_weight(torch.empty(num_classes, self.in_features, device=old.device, dtype=old.dtype))
        else:
            if tuple(weight.shape) != (num_classes, self.in_features):
                raise ValueError(
                    f"classifier weight must be ({num_classes}, {self.in_features}), got {tuple(weight.shape)}"
                )
            new = weight.detach().to(device=old.device, dtype=old.dtype).clone()
        self.weight = nn.Parameter(new)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}"


class LinearHead(ClassifierHead):
    """The strong baseline's classifier: f @ W.T, no bias, W ~ N(0, 0.001)."""

    def init_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(weight, std=0.001)

    def forward(self, features: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(features, self.weight)


class NormalizedHead(ClassifierHead):
    """Base of the cosine-logit heads: cos(f, w_c) for every class, from L2-normalised f and rows of W.

    Random rows are drawn unit-norm, the same norm as rows initialised from normalised cluster
    centres, so the step size of the normalised weight does not depend on how the head was started.
    """

    def init_weight(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(nn.init.normal_(weight), dim=1)

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, num_classes) cosines, clamped to [-1, 1] against rounding."""
        return F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1)).clamp(-1.0, 1.0)

    def use_margin(self, targets: torch.Tensor | None) -> bool:
        """Margins apply to training logits only: evaluation and inference see plain scaled cosines."""
        return self.training and targets is not None


class CosineHead(NormalizedHead):
    """cos(f, w_c) / T. T=0.1 was best in the source documents' UDA runs (0.05: -1.7 mAP, 0.2: -13)."""

    def __init__(self, in_features: int, num_classes: int, temperature: float = 0.1):
        if temperature <= 0:
            raise ConfigError(f"cosine head temperature must be > 0, got {temperature}")
        super().__init__(in_features, num_classes)
        self.temperature = temperature

    def forward(self, features: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        return self.cosine(features) / self.temperature

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"


class ArcFaceHead(NormalizedHead):
    """Additive angular margin (ArcFace): s * cos(theta + m) for the target class, s * cos(theta) others.

    Standard (InsightFace, non-"easy-margin") variant: past theta = pi - m, cos(theta + m) would rise
    again with theta (a worse match would get a larger logit), so there the target logit is
    s * (cos(theta) - m * sin(m)), a CosFace-like penalty. The target logit then decreases in theta
    over all of [0, pi]: at theta = pi - m it steps down from -s to -s * (cos(m) + m * sin(m)).
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 30.0, margin: float = 0.5):
        if scale <= 0 or not 0 <= margin < math.pi / 2:
            raise ConfigError(f"arcface head needs scale > 0 and 0 <= margin < pi/2, got {scale}, {margin}")
        super().__init__(in_features, num_classes)
        self.scale, self.margin = scale, margin

    def forward(self, features: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        cos = self.cosine(features)
        if not self.use_margin(targets):
            return self.scale * cos
        # the floor keeps sqrt's gradient finite at |cos| = 1 (also in the branch torch.where discards)
        sin = (1.0 - cos * cos).clamp(min=1e-12).sqrt()
        cos_plus_margin = cos * math.cos(self.margin) - sin * math.sin(self.margin)
        past_pi = cos <= math.cos(math.pi - self.margin)  # theta + m >= pi
        target_logit = torch.where(past_pi, cos - self.margin * math.sin(self.margin), cos_plus_margin)
        is_target = F.one_hot(targets, self.num_classes).bool()
        return self.scale * torch.where(is_target, target_logit, cos)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}, margin={self.margin}"


class CosFaceHead(NormalizedHead):
    """Additive cosine margin (CosFace / AM-softmax): s * (cos(theta) - m) for the target class."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 30.0, margin: float = 0.35):
        if scale <= 0 or margin < 0:
            raise ConfigError(f"cosface head needs scale > 0 and margin >= 0, got {scale}, {margin}")
        super().__init__(in_features, num_classes)
        self.scale, self.margin = scale, margin

    def forward(self, features: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        cos = self.cosine(features)
        if self.use_margin(targets):
            cos = cos - self.margin * F.one_hot(targets, self.num_classes).to(cos.dtype)
        return self.scale * cos

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}, margin={self.margin}"


HEADS: dict[str, type[ClassifierHead]] = {
    "linear": LinearHead,
    "cosine": CosineHead,
    "arcface": ArcFaceHead,
    "cosface": CosFaceHead,
}


def build_head(kind: str, in_features: int, num_classes: int, **options: float) -> ClassifierHead:
    """"linear" | "cosine" | "arcface" | "cosface" -> head; `options` are that head's keyword arguments."""
    if kind not in HEADS:
        raise ConfigError(f"unknown classifier head '{kind}'; choose one of {', '.join(HEADS)}")
    try:
        inspect.signature(HEADS[kind]).bind(in_features, num_classes, **options)
    except TypeError as exc:
        raise ConfigError(f"classifier head '{kind}': {exc} (options given: {sorted(options)})") from None
    return HEADS[kind](in_features, num_classes, **options)
