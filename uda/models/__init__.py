"""Models: ResNet / MobileNetV2 backbone (last stride 1) -> pooling (avg / GeM) -> BNNeck, and separate classifier heads."""
from uda.models.backbone import BACKBONE_NAMES, BACKBONES, MobileNetV2Backbone, ResNetBackbone, build_backbone
from uda.models.reid import (
    HEADS,
    POOLINGS,
    ArcFaceHead,
    ClassifierHead,
    CosFaceHead,
    CosineHead,
    GeM,
    LinearHead,
    ReIDModel,
    build_head,
    build_model,
    build_pooling,
)
from uda.models.weights import load_backbone_weights

__all__ = [
    "BACKBONES",
    "BACKBONE_NAMES",
    "HEADS",
    "POOLINGS",
    "ArcFaceHead",
    "ClassifierHead",
    "CosFaceHead",
    "CosineHead",
    "GeM",
    "LinearHead",
    "MobileNetV2Backbone",
    "ReIDModel",
    "ResNetBackbone",
    "build_backbone",
    "build_head",
    "build_model",
    "build_pooling",
    "load_backbone_weights",
]
