"""The ReID model above the backbone: global pooling -> BNNeck (strong baseline, Luo et al. 2019), and the
classifier heads the training step applies to its feature.

The triplet loss wants the pooled feature f_t (free in scale, Euclidean geometry); the ID loss wants
a feature whose batch statistics are normalised, f_i = BN(f_t), which is also the inference feature.
BNNeck gives both from one vector with no extra embedding layer.

Pooling: average (the strong baseline's) or GeM (generalised mean, Radenovic et al. 2018), which
interpolates between average (p=1) and max (p -> infinity) with a learnable exponent, often +1-2 mAP.

Classifier heads, all with one interface:

    head(features (B, D), targets (B,) int64 or None) -> logits (B, num_classes)
    head.num_classes, head.in_features, head.reset_classifier(num_classes, weight=None)

Heads live outside the ReID model because the UDA stage trains two of them on one backbone (source
identities and target clusters): merging both label sets into one classifier hurts. Each stores its
weight matrix (num_classes, in_features) as `weight`, unnormalised; the normalised heads normalise it
inside forward. `reset_classifier` replaces `weight` with a NEW Parameter (the number of rows changes
each time the target clusters change). An optimizer holding the old Parameter no longer updates the
head: rebuild the optimizer (or its param group for this head) after every reset, and re-wrap the head
if it sits inside DistributedDataParallel, which registers its parameters once.
"""
from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from uda.errors import ConfigError
from uda.models.backbone import build_backbone


class AvgPool(nn.Module):
    """Mean over all spatial positions: (B, C, H, W) -> (B, C)."""

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return fmap.mean(dim=(2, 3))


class GeM(nn.Module):
    """Generalised mean (mean over positions of x^p)^(1/p): (B, C, H, W) -> (B, C).

    p is learned (shared by all channels) and starts at 3; inputs are clamped to `eps` first because
    x^(1/p) and the gradient of x^p with respect to p are undefined for x <= 0.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return fmap.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, eps={self.eps}"


POOLINGS = {"avg": AvgPool, "gem": GeM}


def build_pooling(name: str) -> nn.Module:
    """"avg" | "gem" -> a module mapping (B, C, H, W) to (B, C)."""
    if name not in POOLINGS:
        raise ConfigError(f"unknown pooling '{name}'; choose one of {', '.join(POOLINGS)}")
    return POOLINGS[name]()


class ReIDModel(nn.Module):
    """images (B, 3, H, W) -> {"global": f_t (B, D), "bn": f_i (B, D)} in training, f_i (B, D) in eval.

    `bnneck=False` is the strong baseline's ablation without the neck: f_i is f_t itself, so the ID and
    triplet losses act on the same vector, which is also the inference feature. `embedding_dim=N > 0`
    is the other ablation: a bias-free linear D -> N layer between pooling and the neck, so f_t is N-d
    (the documents: an added 2048 -> 1024 layer cost ~6 mAP). `frozen_blocks=N`: the backbone's first N
    blocks get no gradient and keep their BatchNorm statistics, so a step skips their backward.
    """

    def __init__(self, backbone: nn.Module, pooling: nn.Module, bnneck: bool = True, embedding_dim: int = 0, frozen_blocks: int = 0):
        super().__init__()
        self.backbone = backbone
        self.frozen_blocks = frozen_blocks
        blocks = backbone.blocks()
        if not 0 <= frozen_blocks <= len(blocks):
            raise ConfigError(f"model.frozen_blocks={frozen_blocks}, but this backbone has {len(blocks)} blocks (0 freezes none)")
        for block in blocks[:frozen_blocks]:
            block.requires_grad_(False)
        self.pooling = pooling
        self.embedding: nn.Module = nn.Identity()
        self.feature_dim = backbone.out_channels
        if embedding_dim:
            self.embedding = nn.Linear(self.feature_dim, embedding_dim, bias=False)
            nn.init.kaiming_normal_(self.embedding.weight, mode="fan_out")
            self.feature_dim = embedding_dim
        self.bnneck: nn.Module = nn.Identity()
        if bnneck:
            # scale learned (init 1), shift frozen at 0 so f_i stays centred for the bias-free classifier
            self.bnneck = nn.BatchNorm1d(self.feature_dim)
            nn.init.ones_(self.bnneck.weight)
            nn.init.zeros_(self.bnneck.bias)
            self.bnneck.bias.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> "ReIDModel":
        """As nn.Module.train, except that the frozen blocks stay in eval mode: their BatchNorms normalise
        with, and keep, the statistics they came with (model.frozen_blocks)."""
        super().train(mode)
        for block in self.backbone.blocks()[: self.frozen_blocks]:
            block.train(False)
        return self

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map (B, D, h, w), e.g. 16x8 for 256x128 input at last stride 1."""
        return self.backbone(images)

    def outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both features in either mode: the pooled one (the triplet's) and the BNNeck's (the ID loss's, retrieval's)."""
        global_feature = self.embedding(self.pooling(self.forward_features(images)))
        return {"global": global_feature, "bn": self.bnneck(global_feature)}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
        out = self.outputs(images)
        return out if self.training else out["bn"]


def build_model(
    backbone: str = "resnet50",
    pretrained: str = "none",
    last_stride: int = 1,
    pooling: str = "avg",
    bnneck: bool = True,
    embedding_dim: int = 0,
    frozen_blocks: int = 0,
    ibn_blocks: int = 0,
) -> ReIDModel:
    """The strong baseline's feature extractor by default (ResNet-50, last stride 1, average pooling, BNNeck)."""
    trunk = build_backbone(backbone, pretrained, last_stride, ibn_blocks)
    return ReIDModel(trunk, build_pooling(pooling), bnneck, embedding_dim, frozen_blocks)


# Classifier heads

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
