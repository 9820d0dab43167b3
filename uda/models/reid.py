"""The ReID feature extractor: backbone -> global pooling -> BNNeck (strong baseline, Luo et al. 2019).

The triplet loss wants the pooled feature f_t (free in scale, Euclidean geometry); the ID loss wants
a feature whose batch statistics are normalised, f_i = BN(f_t), which is also the inference feature.
BNNeck gives both from one vector with no extra embedding layer. Classifier heads are not part of the
model (the UDA stage keeps separate source and target heads): the training step applies them to f_i.
"""
from __future__ import annotations

import torch
from torch import nn

from uda.errors import ConfigError
from uda.models.backbone import build_backbone
from uda.models.pooling import build_pooling


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

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
        global_feature = self.embedding(self.pooling(self.forward_features(images)))
        bn_feature = self.bnneck(global_feature)
        if self.training:
            return {"global": global_feature, "bn": bn_feature}
        return bn_feature


def build_model(
    backbone: str = "resnet50",
    pretrained: str = "none",
    last_stride: int = 1,
    pooling: str = "avg",
    bnneck: bool = True,
    embedding_dim: int = 0,
    frozen_blocks: int = 0,
) -> ReIDModel:
    """The strong baseline's feature extractor by default (ResNet-50, last stride 1, average pooling, BNNeck)."""
    return ReIDModel(build_backbone(backbone, pretrained, last_stride), build_pooling(pooling), bnneck, embedding_dim, frozen_blocks)
