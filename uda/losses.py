"""The strong baseline's three losses: label-smoothed ID loss, batch-hard triplet, center loss.

Recipe (Luo et al., "Bag of Tricks and A Strong Baseline for Deep Person Re-ID", CVPR-W 2019):
    total = cross_entropy_label_smooth(logits, y) + triplet_loss(f_t, y) + 0.0005 * center_loss(f_t, y)
where f_t is the pooled feature before the BNNeck and logits come from the feature after it.
"""
from __future__ import annotations

import torch
import torch.distributed
import torch.nn.functional as F
from torch import Tensor, nn

from uda.config import Config
from uda.distributed import gather_batches
from uda.errors import ConfigError


def cross_entropy_label_smooth(logits: Tensor, targets: Tensor, epsilon: float = 0.1) -> Tensor:
    """Cross-entropy against the smoothed target q = (1 - eps) * one_hot(y) + eps / num_classes.

    This is the BoT paper's q_i = 1 - (N-1)/N * eps for i = y, eps/N otherwise, and exactly what
    torch's `F.cross_entropy(label_smoothing=eps)` computes, so we use it (it also upcasts fp16
    logits under autocast). Smoothing keeps the ID head from over-fitting the few training ids.

    logits: (B, num_classes); targets: (B,) int64 in [0, num_classes). Returns the batch mean.
    """
    if not 0.0 <= epsilon < 1.0:
        raise ConfigError(f"label smoothing epsilon={epsilon} is outside [0, 1); use e.g. 0.1")
    return F.cross_entropy(logits, targets, label_smoothing=epsilon)


def _pairwise_euclidean(features: Tensor, others: Tensor | None = None) -> Tensor:
    """(B, D) [, (M, D)] -> (B, B) [or (B, M)] Euclidean distances, safe to differentiate at zero distance.

    The squared distance is clamped to 1e-12 before the sqrt: identical features give distance
    1e-6 and zero gradient instead of sqrt'(0) = inf -> NaN.
    """
    squared_norms = features.pow(2).sum(1)
    if others is None:  # one norm node used twice: the backward sums as it always has (the same floats)
        others, other_norms = features, squared_norms
    else:
        other_norms = others.pow(2).sum(1)
    squared = squared_norms[:, None] + other_norms[None, :] - 2.0 * features @ others.T
    return squared.clamp(min=1e-12).sqrt()


class CrossBatchMemory:
    """XBM (Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020): the last `size` features of
    the target batches (detached, newest first) and their pseudo-labels, so a small CPU batch's triplet also
    finds its hardest positive and negative among a few thousand recent images. The features drift slowly
    under a small lr, which is what makes the stale ones usable. Emptied each round (the labels change).
    Under torchrun it holds every process's features (gathered in rank order), the same in all processes."""

    def __init__(self, size: int):
        self.size = size
        self.reset()

    def reset(self) -> None:
        self.features: Tensor | None = None
        self.labels: Tensor | None = None

    def enqueue(self, features: Tensor, labels: Tensor) -> None:
        features, labels = gather_batches(features.detach().float(), labels.detach())
        if self.features is not None:
            features, labels = torch.cat([features, self.features]), torch.cat([labels, self.labels])
        self.features, self.labels = features[: self.size], labels[: self.size]


def _pair_masks(targets: Tensor) -> tuple[Tensor, Tensor]:
    """(B, B) masks of the batch's pairs: same id, and same id without the anchor itself (its positives)."""
    same_id = targets[:, None] == targets[None, :]
    return same_id, same_id & ~torch.eye(len(targets), dtype=torch.bool, device=targets.device)


def _hardest_pair(dist: Tensor, same_id: Tensor, is_pos: Tensor) -> tuple[Tensor, Tensor]:
    """Batch-hard mining: per anchor (row), the column of its farthest positive and of its closest negative
    as (B, 2) indices, and whether it has both (an anchor without one is left out of the losses' means)."""
    positive = dist.masked_fill(~is_pos, float("-inf")).argmax(1)
    negative = dist.masked_fill(same_id, float("inf")).argmin(1)
    return torch.stack([positive, negative], 1), is_pos.any(1) & (~same_id).any(1)


def triplet_loss(
    features: Tensor,
    targets: Tensor,
    margin: float = 0.3,
    soft_margin: bool = False,
    memory: CrossBatchMemory | None = None,
) -> Tensor:
    """Batch-hard triplet loss (Hermans et al., "In Defense of the Triplet Loss", 2017).

    For each anchor: d_ap = distance to its farthest other image of the same id, d_an = distance
    to its closest image of another id; loss = mean over anchors of relu(d_ap - d_an + margin),
    or of softplus(d_ap - d_an) = log(1 + exp(d_ap - d_an)) with soft_margin (margin unused).
    Distances are plain Euclidean on the raw pooled feature, as in the strong baseline. With a
    `memory` (XBM), the positives and negatives are searched among the batch and the memory's features.

    An anchor with no other image of its id, or with no image of another id, has no triplet and
    is left out of the mean (the loss is 0 when no anchor has one). The P x K sampler with K >= 2
    never produces such anchors; they only appear with other samplers or tiny clusters.

    features: (B, D), computed in float32 even under autocast; targets: (B,) int64.
    """
    if margin < 0:
        raise ConfigError(f"triplet margin={margin} is negative; use e.g. 0.3")
    features = features.float()
    dist = _pairwise_euclidean(features)
    same_id, is_pos = _pair_masks(targets)
    if memory is not None and memory.features is not None:
        dist = torch.cat([dist, _pairwise_euclidean(features, memory.features)], dim=1)
        in_memory = targets[:, None] == memory.labels[None, :]
        same_id, is_pos = torch.cat([same_id, in_memory], dim=1), torch.cat([is_pos, in_memory], dim=1)
    pair, has_triplet = _hardest_pair(dist, same_id, is_pos)
    d_ap, d_an = dist.gather(1, pair).unbind(1)
    gap = (d_ap - d_an)[has_triplet]
    per_anchor = F.softplus(gap) if soft_margin else F.relu(gap + margin)
    return per_anchor.sum() / has_triplet.sum().clamp(min=1)


def soft_cross_entropy(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """MMT's soft ID loss: the cross-entropy of the student's class probabilities against the teacher's,
    -sum_c softmax(teacher)_c log softmax(student)_c, averaged over the batch (no gradient to the teacher)."""
    return -(teacher_logits.detach().float().softmax(1) * logits.float().log_softmax(1)).sum(1).mean()


def soft_triplet_loss(features: Tensor, teacher_features: Tensor, targets: Tensor) -> Tensor:
    """MMT's soft triplet loss (Ge et al., ICLR 2020): for each anchor the student's hardest positive p and
    negative n (as `triplet_loss` mines them), the student's softmax over (-d_ap, -d_an) trained toward the
    teacher's softmax over its own distances to the same p and n (binary cross-entropy), averaged over the
    anchors that have both. Soft targets instead of a margin: how much closer p is than n under the teacher."""
    features, teacher_features = features.float(), teacher_features.detach().float()
    dist = _pairwise_euclidean(features)
    same_id, is_pos = _pair_masks(targets)
    pair, has_triplet = _hardest_pair(dist, same_id, is_pos)
    log_prob = (-dist.gather(1, pair)).log_softmax(1)
    with torch.no_grad():
        target = (-_pairwise_euclidean(teacher_features).gather(1, pair)).softmax(1)
    per_anchor = -(target * log_prob).sum(1)
    return per_anchor[has_triplet].sum() / has_triplet.sum().clamp(min=1)


class CenterLoss(nn.Module):
    """Center loss (Wen et al., ECCV 2016) as the strong baseline's code computes it, with its own optimizer.

    loss = sum_i ||x_i - c_{y_i}||^2 / B, with one learnable centre per class. The papers write
    1/2 * sum_i ||x_i - c_{y_i}||^2 (no 1/B); we follow the reid-strong-baseline code (no 1/2,
    divided by B) because the published weight 0.0005 and centre lr 0.5 were tuned against it.
    Its gradient is d loss / d c_j = (2 / B) * sum_{i: y_i = j} (c_j - x_i).

    The centres are not trained by the model's optimizer: the loss brings its own `step()` (plain SGD
    at `lr` on the unweighted gradient, see `step`), so the engine steps it like any optimizer, and
    its state_dict (the centres; plain SGD keeps no state) goes into checkpoints as any module's.
    Centres start at randn (seed the RNG before constructing).
    """

    def __init__(self, num_classes: int, feat_dim: int, weight: float = 0.0005, lr: float = 0.5):
        super().__init__()
        if weight <= 0 or lr <= 0:
            raise ConfigError(f"center loss weight and lr must be positive (0.0005 and 0.5 in the recipe), got {weight}, {lr}")
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))
        self.weight = weight
        self.optimizer = torch.optim.SGD([self.centers], lr=lr)

    def forward(self, features: Tensor, targets: Tensor) -> Tensor:
        """features: (B, feat_dim); targets: (B,) int64 in [0, num_classes). Returns the unweighted scalar."""
        own_centers = self.centers[targets]  # (B, feat_dim): a gather, no (B, num_classes) matrix
        return (features.float() - own_centers).pow(2).sum() / len(targets)

    @torch.no_grad()
    def step(self) -> None:
        """Move the centres, after a backward through `weight * self(features, targets)`.

        The centres then hold weight * d loss / d c; dividing by the weight recovers the unweighted
        gradient, so the update c_j -= lr * (2 / B) * sum_{i: y_i = j} (c_j - x_i) does not shrink with
        the tiny loss weight (0.0005): the weight decides how strongly features are pulled to their
        centres, the centre lr alone how fast centres move. Classes absent from the batch stay put.
        Under torchrun the gradients are averaged over processes first (the centres live outside DDP).
        """
        if self.centers.grad is None:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.centers.grad)
            self.centers.grad /= torch.distributed.get_world_size()
        self.centers.grad.mul_(1.0 / self.weight)
        self.optimizer.step()


def reid_losses(global_features: Tensor, logits: Tensor | None, labels: Tensor, loss: Config, prefix: str = "",
                id_loss: Tensor | None = None, memory: CrossBatchMemory | None = None) -> dict[str, Tensor]:
    """The strong baseline's two losses on one branch: ID (label-smoothed CE on the head's logits of f_i,
    or `id_loss` where a head policy computes its own) and batch-hard triplet on the pooled f_t (also
    against `memory`'s features, which then takes this batch's); weighted by the config's `loss` section,
    named '<prefix>ce' and '<prefix>triplet'."""
    losses = {}
    if loss.ce_weight > 0:
        own = id_loss if id_loss is not None else cross_entropy_label_smooth(logits.float(), labels, loss.label_smoothing)
        losses[f"{prefix}ce"] = loss.ce_weight * own
    if loss.triplet_weight > 0:
        losses[f"{prefix}triplet"] = loss.triplet_weight * triplet_loss(global_features, labels, loss.triplet_margin, loss.soft_margin,
                                                                        memory)
    if memory is not None:
        memory.enqueue(global_features, labels)
    if not losses:
        raise ConfigError("loss.ce_weight and loss.triplet_weight are both 0: nothing to train")
    return losses
