"""The learning rate of each epoch: linear warmup, then step decay or cosine. A pure function of the
epoch, so resuming needs no scheduler state beyond the epoch."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from uda.errors import UdaError

SCHEDULES = ("step", "cosine")


@dataclass
class Schedule:
    """Per-epoch learning rate: linear warmup, then step decay (x gamma at each milestone) or cosine."""

    base_lr: float = 3.5e-4
    warmup_epochs: int = 10
    warmup_from: float = 3.5e-5
    milestones: tuple[int, ...] = (40, 70)
    gamma: float = 0.1
    kind: str = "step"  # "step" | "cosine"
    epochs: int = 120

    def lr(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.warmup_from + (self.base_lr - self.warmup_from) * epoch / self.warmup_epochs
        if self.kind == "step":
            return self.base_lr * self.gamma ** sum(epoch >= m for m in self.milestones)
        if self.kind == "cosine":
            span = max(1, self.epochs - self.warmup_epochs)
            return 0.5 * self.base_lr * (1 + math.cos(math.pi * (epoch - self.warmup_epochs) / span))
        raise UdaError(f"unknown lr schedule '{self.kind}'; use one of {', '.join(SCHEDULES)}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The lr is a pure function of the epoch, so resuming needs no scheduler state beyond the epoch."""
    for group in optimizer.param_groups:
        group["lr"] = lr
