"""Models: ResNet backbone (last stride 1) -> pooling (avg / GeM) -> BNNeck, and separate classifier heads."""
from uda.models.backbone import BACKBONE_NAMES, ResNetBackbone, build_backbone, load_backbone_weights
from uda.models.heads import (
    HEADS,
    ArcFaceHead,
    ClassifierHead,
    CosFaceHead,
    CosineHead,
    LinearHead,
    build_head,
)
from uda.models.pooling import POOLINGS, GeM, build_pooling
from uda.models.reid import ReIDModel, build_model

__all__ = [
    "BACKBONE_NAMES",
    "HEADS",
    "POOLINGS",
    "ArcFaceHead",
    "ClassifierHead",
    "CosFaceHead",
    "CosineHead",
    "GeM",
    "LinearHead",
    "ReIDModel",
    "ResNetBackbone",
    "build_backbone",
    "build_head",
    "build_model",
    "build_pooling",
    "load_backbone_weights",
]
