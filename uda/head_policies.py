"""How adaptation's classifier heads are laid out, re-created from each round's clusters, and trained:
one class per policy on one interface, so a new loop idea (a cluster memory, camera proxies) is one
class and one HEAD_POLICIES entry, never a branch in the stage.

A policy is a ModuleDict of its heads (checkpoint keys "heads.<name>.weight"). Its forward takes the
BNNeck features of a batch whose rows are the branches in order (source first) and returns each
branch's (logits, labels) for its ID loss; `recluster` gives the re-created head its rows and points the
optimizer's TARGET_GROUP at them. The source documents' findings are the defaults: separate heads
(merging hurts), rows from class / cluster centres (+2 mAP over N(0, 0.001)), cosine logits / T.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from uda.config import Config
from uda.models import ClassifierHead, ReIDModel

TARGET_GROUP = "target_head"  # the optimizer's param group of the re-created rows, found by name
HEAD_INITS = ("centers", "normal")
TEMPERATURE_SCHEDULES = ("fixed", "grow", "shrink")
MEMORY_UPDATES = ("mean", "hard")
BuildHead = Callable[[int], ClassifierHead]  # rows -> a head of the configured kind (model.head, temperature...)


class BranchHeads(nn.ModuleDict):
    """One head per branch, each scoring its own rows of the batch: the source stage's single head, and
    the base of the adaptation policies."""

    reclustered = ""  # the head re-created from the clusters each round (none here)
    optimizer_trains_rows = True  # False: the re-created rows move by a rule of their own (ClusterMemory)

    def forward(self, features: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        scored, start = {}, 0
        for branch, branch_labels in labels.items():
            rows = features[start : start + len(branch_labels)]
            scored[branch] = (self[branch](rows, branch_labels), branch_labels)
            start += len(branch_labels)
        return scored

    def set_temperature(self, temperature: float) -> None:
        """Every head's cosine temperature (adapt.temperature_schedule; settings refuse it for other heads)."""
        for head in self.values():
            head.temperature = temperature

    def resize(self, num_rows: int, optimizer: torch.optim.Optimizer) -> None:
        """The re-created head at a checkpoint's size, so that its saved rows and Adam moments load into it."""
        head = self[self.reclustered]
        replace_head(head, optimizer, head.weight.detach().new_zeros(num_rows, head.in_features))

    @torch.no_grad()
    def renormalize_rows(self) -> None:
        """Every head's rows set to unit norm (adapt.renormalize_rows: before every step)."""
        for head in self.values():
            head.weight.copy_(F.normalize(head.weight, dim=1))


class SeparateHeads(BranchHeads):
    """A source head (one row per source id) and a target head re-created with one row per cluster each round."""

    reclustered = "target"

    def __init__(self, build_head: BuildHead, num_source_classes: int, options: Config | None = None):
        super().__init__({"source": build_head(num_source_classes), "target": build_head(1)})

    def init_source(self, rows: torch.Tensor) -> None:
        self["source"].reset_classifier(rows.shape[0], rows)

    def recluster(self, rows: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        replace_head(self["target"], optimizer, rows)


class MergedHead(BranchHeads):
    """One head over both label sets: the source ids' rows, then each round's cluster rows (an ablation:
    the source documents found it hurts). The source rows train on across rounds."""

    reclustered = "merged"

    def __init__(self, build_head: BuildHead, num_source_classes: int, options: Config | None = None):
        super().__init__({"merged": build_head(num_source_classes)})
        self.num_source_classes = num_source_classes

    def forward(self, features, labels):
        n = len(labels["source"])
        merged = torch.cat([labels["source"], labels["target"] + self.num_source_classes])
        logits = self["merged"](features, merged)
        return {"source": (logits[:n], merged[:n]), "target": (logits[n:], merged[n:])}

    def init_source(self, rows: torch.Tensor) -> None:
        self["merged"].reset_classifier(rows.shape[0], rows)

    def recluster(self, rows: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        source_rows = self["merged"].weight.detach()[: self.num_source_classes]
        replace_head(self["merged"], optimizer, torch.cat([source_rows, rows]))


class ClusterMemory(nn.Module):
    """Target rows kept as a cluster memory (Cluster Contrast, Dai et al. 2021): each round's cluster
    centres, then moved after every training forward toward the batch's features of their cluster,
    never by the optimizer. "mean": for each image in batch order, row <- normalise(m row + (1 - m) f)
    (their per-instance update); "hard": once per cluster in the batch, with the batch's image least
    similar to the row. Logits cos(f, row) / T are taken before the update; gradients reach the features only.
    Under torchrun DistributedDataParallel broadcasts buffers from the main process before each forward,
    so every process holds the main process's memory, updated with its share of the batch."""

    def __init__(self, in_features: int, momentum: float, temperature: float, hard: bool):
        super().__init__()
        self.in_features, self.momentum, self.temperature, self.hard = in_features, momentum, temperature, hard
        self.register_buffer("weight", torch.zeros(1, in_features))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def reset_classifier(self, num_classes: int, weight: torch.Tensor) -> None:
        """The memory's rows set to `weight` (num_classes, D): a round's L2-normalised cluster centres."""
        if tuple(weight.shape) != (num_classes, self.in_features):
            raise ValueError(f"memory rows must be ({num_classes}, {self.in_features}), got {tuple(weight.shape)}")
        self.weight = weight.detach().to(self.weight).clone()

    def forward(self, features: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        features = F.normalize(features, dim=1)
        logits = features @ self.weight.clone().T / self.temperature  # backward keeps the clone: the rows change in place
        if self.training and targets is not None:
            self.weight.copy_(self.updated_rows(features.detach().float(), targets))
        return logits

    @torch.no_grad()
    def updated_rows(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The rows after one batch (features (B, D) L2-normalised, targets (B,) cluster ids)."""
        rows, m = self.weight.clone(), self.momentum
        if self.hard:
            updates = []
            for label in targets.unique().tolist():
                mine = features[targets == label]
                updates.append((label, mine[(mine @ rows[label]).argmin()]))
        else:
            updates = zip(targets.tolist(), features)
        for label, feature in updates:
            rows[label] = F.normalize(m * rows[label] + (1 - m) * feature, dim=0)
        return rows


class ClusterMemoryHeads(BranchHeads):
    """The source head as in SeparateHeads; the target rows a ClusterMemory (adapt.memory_momentum,
    adapt.memory_temperature, adapt.memory_update), re-set to the centres each round."""

    reclustered = "target"
    optimizer_trains_rows = False

    def __init__(self, build_head: BuildHead, num_source_classes: int, options: Config):
        source = build_head(num_source_classes)
        memory = ClusterMemory(source.in_features, options.memory_momentum, options.memory_temperature, options.memory_update == "hard")
        super().__init__({"source": source, "target": memory})

    def init_source(self, rows: torch.Tensor) -> None:
        self["source"].reset_classifier(rows.shape[0], rows)

    def recluster(self, rows: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        self["target"].reset_classifier(rows.shape[0], rows)

    def resize(self, num_rows: int, optimizer: torch.optim.Optimizer) -> None:
        self["target"].reset_classifier(num_rows, self["target"].weight.new_zeros(num_rows, self["target"].in_features))

    def set_temperature(self, temperature: float) -> None:
        """The source head's temperature only: the memory keeps adapt.memory_temperature."""
        self["source"].temperature = temperature


class TrainNet(nn.Module):
    """The model and its classifier heads as one module, so DistributedDataParallel synchronises the
    heads' gradients too. `heads` (a policy) scores each branch's rows of the batch."""

    def __init__(self, model: ReIDModel, heads: BranchHeads):
        super().__init__()
        self.model = model
        self.heads = heads

    def forward(self, images: torch.Tensor, labels: dict[str, torch.Tensor]):
        """(the model's outputs, {branch: (logits, labels)}); the batch's rows are the branches in `labels`' order."""
        out = self.model(images)
        return out, self.heads(out["bn"], labels)


HEAD_POLICIES: dict[str, type[BranchHeads]] = {"separate": SeparateHeads, "merged": MergedHead, "memory": ClusterMemoryHeads}


def param_groups(net: nn.Module, heads: BranchHeads) -> list[dict]:
    """The optimizer's groups: everything else ("body"), and the re-created head's rows (TARGET_GROUP),
    which `replace_head` re-points each round. A name, not a position or a reference: load_state_dict
    replaces the group dicts but keeps their keys. Rows the optimizer does not train have no group."""
    if not heads.optimizer_trains_rows:
        return [{"params": list(net.parameters()), "name": "body"}]
    rows = heads[heads.reclustered].weight
    return [{"params": [p for p in net.parameters() if p is not rows], "name": "body"}, {"params": [rows], "name": TARGET_GROUP}]


def replace_head(head: ClassifierHead, optimizer: torch.optim.Optimizer, rows: torch.Tensor) -> None:
    """Re-create `head` with these rows and point the optimizer's TARGET_GROUP at them (the old rows'
    Adam moments are dropped: they belonged to clusters that no longer exist)."""
    [group] = [g for g in optimizer.param_groups if g.get("name") == TARGET_GROUP]
    optimizer.state.pop(head.weight, None)
    head.reset_classifier(rows.shape[0], rows)
    group["params"] = [head.weight]


def initial_rows(centers: torch.Tensor, head_init: str, seed: int) -> torch.Tensor:
    """A head's starting rows: the (normalised) centres themselves, or under head_init=normal the strong
    baseline's N(0, 0.001) draw of the same shape from `seed` (a resumed run draws the same rows). The
    draw is kept raw, as in the source documents' comparison: in a cosine head such rows (norm ~0.001
    sqrt(D)) turn much faster under Adam than unit-norm centres, which is part of what that comparison
    measured (adapt.renormalize_rows is the other part)."""
    if head_init == "centers":
        return centers
    generator = torch.Generator().manual_seed(seed)
    return (0.001 * torch.randn(centers.shape, generator=generator)).to(centers.device, centers.dtype)


def temperature_at(base: float, schedule: str, epoch: int) -> float:
    """The cosine heads' temperature in (1-based) epoch `epoch`: the source documents' schedules."""
    if schedule == "grow":
        return base * (1 + math.log(epoch))
    if schedule == "shrink":
        return base / (1 + math.log(epoch))
    return base
