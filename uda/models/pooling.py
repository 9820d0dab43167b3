"""Global pooling of a feature map (B, C, H, W) into one vector per image (B, C).

Average pooling is the strong baseline's; GeM (generalised mean, Radenovic et al. 2018) interpolates
between average (p=1) and max (p -> infinity) with a learnable exponent, often +1-2 mAP in ReID.
"""
from __future__ import annotations

import torch
from torch import nn

from uda.errors import ConfigError


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
