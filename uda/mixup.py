"""mixup for the source stage (train.mixup_alpha; Zhang et al. 2018, as "Bag of Tricks for Image
Classification", He et al. 2019, trains with it): the ID loss learns from images blended with a shuffled
copy of the batch, against the blend of their label-smoothed targets.

    lam ~ Beta(alpha, alpha), perm a random permutation of the batch
    mixed = lam * x + (1 - lam) * x[perm]
    ID loss = CE(logits(mixed), lam * smooth(y) + (1 - lam) * smooth(y[perm]))
            = lam * CE_smooth(logits(mixed), y) + (1 - lam) * CE_smooth(logits(mixed), y[perm])

The triplet and center losses need hard identities, so they see the clean images: each step runs one
forward of the mixed and the clean images together (2B rows), the ID loss on the mixed rows' logits and
the triplet / center losses on the clean rows' pooled features. That costs about twice a plain step's
compute and activation memory; the backbone's BatchNorm statistics are taken over both halves. A single
forward (not one per half) keeps DistributedDataParallel's one-forward-one-backward contract.
Batches arrive augmented (either pipeline): mixing happens after augmentation, on the batch tensor.
"""
from __future__ import annotations

import scipy.special
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uda.config import Config
from uda.errors import ConfigError
from uda.losses import CenterLoss, cross_entropy_label_smooth, triplet_loss

def mixup(images: Tensor, labels: Tensor, alpha: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, float]:
    """(mixed images, labels_a, labels_b, lam): mixed = lam * images + (1 - lam) * images[perm], with
    labels_a = labels and labels_b = labels[perm].

    images: (B, C, H, W); labels: (B,) int64. lam ~ Beta(alpha, alpha), drawn by inverting its CDF at one
    uniform; perm is a random permutation of the B rows. Both are drawn on the CPU from `generator` (None:
    torch's global CPU generator, which the engine reseeds every epoch, so a resumed run draws the same),
    whatever device the images are on.
    """
    if not alpha > 0:
        raise ConfigError(f"mixup alpha must be > 0 (0 turns mixup off), got {alpha}")
    uniform = torch.rand((), generator=generator, dtype=torch.float64).item()
    lam = float(scipy.special.betaincinv(alpha, alpha, uniform))
    perm = torch.randperm(len(images), generator=generator).to(images.device)
    return lam * images + (1 - lam) * images[perm], labels, labels[perm], lam


def mixup_targets(labels_a: Tensor, labels_b: Tensor, lam: float, num_classes: int, epsilon: float) -> Tensor:
    """(B, num_classes) soft targets lam * smooth(labels_a) + (1 - lam) * smooth(labels_b), smooth(y) =
    (1 - eps) * one_hot(y) + eps / num_classes; each row sums to 1. What mixup_cross_entropy is the
    cross-entropy against (it never builds this matrix)."""
    def smooth(labels: Tensor) -> Tensor:
        return (1 - epsilon) * F.one_hot(labels, num_classes).float() + epsilon / num_classes

    return lam * smooth(labels_a) + (1 - lam) * smooth(labels_b)


def mixup_cross_entropy(logits: Tensor, labels_a: Tensor, labels_b: Tensor, lam: float, epsilon: float = 0.1) -> Tensor:
    """Cross-entropy of (B, num_classes) logits against mixup_targets, as the two-label form
    lam * CE_smooth(logits, labels_a) + (1 - lam) * CE_smooth(logits, labels_b): cross-entropy is linear
    in its target, and CE_smooth is the unmixed ID loss (uda.losses.cross_entropy_label_smooth). Batch mean."""
    return lam * cross_entropy_label_smooth(logits, labels_a, epsilon) + (1 - lam) * cross_entropy_label_smooth(logits, labels_b, epsilon)


def mixup_losses(net: nn.Module, images: Tensor, pids: Tensor, cfg: Config, center: CenterLoss | None,
                 generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """One source step's weighted losses under mixup ('ce', 'triplet', 'center', named as without it):
    one forward of the clean and mixed images (module docstring), `net` a uda.head_policies.TrainNet with a 'source' head."""
    mixed, labels_a, labels_b, lam = mixup(images, pids, cfg.train.mixup_alpha, generator)
    out, scored = net(torch.cat([mixed, images]), {"source": labels_a})  # the head scores the first rows: the mixed ones
    features, loss = out["global"][len(images):], cfg.loss
    losses = {"ce": loss.ce_weight * mixup_cross_entropy(scored["source"].logits.float(), labels_a, labels_b, lam, loss.label_smoothing)}
    if loss.triplet_weight > 0:
        losses["triplet"] = loss.triplet_weight * triplet_loss(features, pids, loss.triplet_margin, loss.soft_margin)
    if center is not None:
        losses["center"] = center.weight * center(features, pids)
    return losses
