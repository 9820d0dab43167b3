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
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from uda.config import Config
from uda.distributed import gather_batches
from uda.models import ClassifierHead, ReIDModel

TARGET_GROUP = "target_head"  # the optimizer's param group of the re-created rows, found by name
HEAD_INITS = ("centers", "normal")
TEMPERATURE_SCHEDULES = ("fixed", "grow", "shrink")
MEMORY_UPDATES = ("mean", "hard")
BuildHead = Callable[[int], ClassifierHead]  # rows -> a head of the configured kind (model.head, temperature...)


class Scored(NamedTuple):
    """One branch's ID-loss inputs: its logits and labels, or (id_loss) a loss the policy computes itself."""

    logits: torch.Tensor | None
    labels: torch.Tensor
    id_loss: torch.Tensor | None = None


@dataclass
class Round:
    """One clustering round, what a policy re-creates its target rows from: the rows to start from
    (cluster centres, or N(0, 0.001) under adapt.head_init=normal) and the target memory they came from."""

    rows: torch.Tensor  # (C, D)
    features: torch.Tensor  # (N, D) L2-normalised memory features
    labels: torch.Tensor  # (N,) cluster ids, -1 outliers
    camids: torch.Tensor  # (N,) camera ids


class BranchHeads(nn.ModuleDict):
    """One head per branch, each scoring its own rows of the batch: the source stage's single head, and
    the base of the adaptation policies."""

    reclustered = ""  # the head re-created from the clusters each round (none here)
    optimizer_trains_rows = True  # False: the re-created rows move by a rule of their own (ClusterMemory)

    def forward(self, features: torch.Tensor, labels: dict[str, torch.Tensor], cameras: dict[str, torch.Tensor] | None = None
                ) -> dict[str, Scored]:
        """{branch: Scored}; the rows of `features` are the branches in `labels`' order (`cameras`: their camera ids)."""
        scored, start = {}, 0
        for branch, branch_labels in labels.items():
            rows = features[start : start + len(branch_labels)]
            scored[branch] = Scored(self[branch](rows, branch_labels), branch_labels)
            start += len(branch_labels)
        return scored

    def init_source(self, rows: torch.Tensor) -> None:
        """The source head's rows: the source class centres under the source model."""
        self["source"].reset_classifier(rows.shape[0], rows)

    def set_temperature(self, temperature: float) -> None:
        """Every cosine head's temperature (adapt.temperature_schedule; settings refuse it for other heads); a
        memory or proxies keep their own (adapt.memory_temperature, adapt.proxy_temperature)."""
        for head in self.values():
            if isinstance(head, ClassifierHead):
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

    def recluster(self, round: Round, optimizer: torch.optim.Optimizer) -> None:
        replace_head(self["target"], optimizer, round.rows)


class MergedHead(BranchHeads):
    """One head over both label sets: the source ids' rows, then each round's cluster rows (an ablation:
    the source documents found it hurts). The source rows train on across rounds."""

    reclustered = "merged"

    def __init__(self, build_head: BuildHead, num_source_classes: int, options: Config | None = None):
        super().__init__({"merged": build_head(num_source_classes)})
        self.num_source_classes = num_source_classes

    def forward(self, features, labels, cameras=None):
        n = len(labels["source"])
        merged = torch.cat([labels["source"], labels["target"] + self.num_source_classes])
        logits = self["merged"](features, merged)
        return {"source": Scored(logits[:n], merged[:n]), "target": Scored(logits[n:], merged[n:])}

    def init_source(self, rows: torch.Tensor) -> None:
        self["merged"].reset_classifier(rows.shape[0], rows)

    def recluster(self, round: Round, optimizer: torch.optim.Optimizer) -> None:
        source_rows = self["merged"].weight.detach()[: self.num_source_classes]
        replace_head(self["merged"], optimizer, torch.cat([source_rows, round.rows]))


@torch.no_grad()
def momentum_update(rows: torch.Tensor, indices: torch.Tensor, features: torch.Tensor, momentum: float) -> torch.Tensor:
    """A copy of `rows` after moving rows[indices[i]] <- normalise(m row + (1 - m) features[i]), in order
    (a row named twice moves twice): the memories' update of Cluster Contrast and CAP."""
    rows = rows.clone()
    for index, feature in zip(indices.tolist(), features):
        rows[index] = F.normalize(momentum * rows[index] + (1 - momentum) * feature, dim=0)
    return rows


class ClusterMemory(nn.Module):
    """Target rows kept as a cluster memory (Cluster Contrast, Dai et al. 2021): each round's cluster
    centres, then moved after every training forward toward the batch's features of their cluster,
    never by the optimizer. "mean": for each image in batch order, row <- normalise(m row + (1 - m) f)
    (their per-instance update); "hard": once per cluster in the batch, with the batch's image least
    similar to the row. Logits cos(f, row) / T are taken before the update; gradients reach the features only.
    Under torchrun every process moves the memory by all processes' features (gathered in rank order), so
    each holds the memory one process would with the whole batch."""

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
            self.weight.copy_(self.updated_rows(*gather_batches(features.detach().float(), targets)))
        return logits

    @torch.no_grad()
    def updated_rows(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The rows after one batch (features (B, D) L2-normalised, targets (B,) cluster ids)."""
        if not self.hard:
            return momentum_update(self.weight, targets, features, self.momentum)
        labels = targets.unique()
        hardest = [features[targets == label][(features[targets == label] @ self.weight[label]).argmin()] for label in labels.tolist()]
        return momentum_update(self.weight, labels, torch.stack(hardest), self.momentum)


class ClusterMemoryHeads(BranchHeads):
    """The source head as in SeparateHeads; the target rows a ClusterMemory (adapt.memory_momentum,
    adapt.memory_temperature, adapt.memory_update), re-set to the centres each round."""

    reclustered = "target"
    optimizer_trains_rows = False

    def __init__(self, build_head: BuildHead, num_source_classes: int, options: Config):
        source = build_head(num_source_classes)
        memory = ClusterMemory(source.in_features, options.memory_momentum, options.memory_temperature, options.memory_update == "hard")
        super().__init__({"source": source, "target": memory})

    def recluster(self, round: Round, optimizer: torch.optim.Optimizer) -> None:
        self["target"].reset_classifier(round.rows.shape[0], round.rows)

    def resize(self, num_rows: int, optimizer: torch.optim.Optimizer) -> None:
        self["target"].reset_classifier(num_rows, self["target"].weight.new_zeros(num_rows, self["target"].in_features))


class CameraProxies(nn.Module):
    """Target rows kept per cluster and camera (CAP, Wang et al. 2021): each round, one proxy per
    (cluster, camera) the cluster has images from, their mean memory feature; after every training
    forward each image moves its own proxy by momentum, as ClusterMemory's rows move. Its loss is the
    intra-camera term (a softmax over the proxies of the image's camera, its own proxy the target) plus
    `inter_weight` x the inter-camera term (every proxy of its cluster a positive, against the
    `negatives` most similar proxies of other clusters), both on cos / T: camera-invariant clusters
    without one camera's style dominating a cluster's centre. Under torchrun the proxies move by every
    process's images, as ClusterMemory's rows do."""

    def __init__(self, in_features: int, momentum: float, temperature: float, inter_weight: float, negatives: int):
        super().__init__()
        self.in_features, self.momentum, self.temperature = in_features, momentum, temperature
        self.inter_weight, self.negatives = inter_weight, negatives
        self.register_buffer("weight", torch.zeros(1, in_features))  # (P, D) proxies
        self.register_buffer("proxy_cluster", torch.zeros(1, dtype=torch.long))  # (P,)
        self.register_buffer("proxy_camera", torch.zeros(1, dtype=torch.long))  # (P,)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def reset(self, features: torch.Tensor, labels: torch.Tensor, camids: torch.Tensor) -> None:
        """Proxies from a round's memory: the L2-normalised mean of each (cluster, camera) group, ordered by cluster then camera."""
        clustered, cameras = labels >= 0, int(camids.max()) + 1
        keys = labels[clustered].long() * cameras + camids[clustered].long()
        groups, group_of = torch.unique(keys, return_inverse=True)
        sums = features.new_zeros(len(groups), features.shape[1]).index_add_(0, group_of, features[clustered].float())
        self.resize(len(groups))
        self.weight.copy_(F.normalize(sums, dim=1))
        self.proxy_cluster.copy_(groups // cameras)
        self.proxy_camera.copy_(groups % cameras)

    def resize(self, num_proxies: int) -> None:
        self.weight = self.weight.new_zeros(num_proxies, self.in_features)
        self.proxy_cluster = self.proxy_cluster.new_zeros(num_proxies)
        self.proxy_camera = self.proxy_camera.new_zeros(num_proxies)

    def forward(self, features: torch.Tensor, labels: torch.Tensor, cameras: torch.Tensor) -> torch.Tensor:
        """The CAP loss of a batch (features (B, D), cluster labels and camera ids (B,)); moves the proxies when training."""
        features = F.normalize(features, dim=1)
        logits = features @ self.weight.clone().T / self.temperature  # (B, P); backward keeps the clone
        own = (self.proxy_cluster[None] == labels[:, None]) & (self.proxy_camera[None] == cameras[:, None])  # (B, P), one True a row
        same_camera = self.proxy_camera[None] == cameras[:, None]
        intra = -(logits.masked_fill(~same_camera, float("-inf")).log_softmax(1)[own]).mean()
        positive = self.proxy_cluster[None] == labels[:, None]
        hard = logits.detach().masked_fill(positive, float("-inf"))
        hard_negative = torch.zeros_like(positive).scatter_(1, hard.topk(min(self.negatives, hard.shape[1]), dim=1).indices, True) & ~positive
        log_prob = logits.masked_fill(~(positive | hard_negative), float("-inf")).log_softmax(1)
        inter = -(log_prob.masked_fill(~positive, 0).sum(1) / positive.sum(1)).mean()
        if self.training:
            self.weight.copy_(self.updated_proxies(*gather_batches(features.detach().float(), own.float().argmax(1))))
        return intra + self.inter_weight * inter

    @torch.no_grad()
    def updated_proxies(self, features: torch.Tensor, proxies: torch.Tensor) -> torch.Tensor:
        """The proxies after one batch: image by image, its proxy <- normalise(m proxy + (1 - m) f)."""
        return momentum_update(self.weight, proxies, features, self.momentum)


class CameraProxyHeads(BranchHeads):
    """The source head as in SeparateHeads; the target branch trained on CameraProxies (adapt.proxy_*)
    instead of a classifier over the clusters. Needs the target's camera ids."""

    reclustered = "target"
    optimizer_trains_rows = False

    def __init__(self, build_head: BuildHead, num_source_classes: int, options: Config):
        source = build_head(num_source_classes)
        proxies = CameraProxies(source.in_features, options.proxy_momentum, options.proxy_temperature, options.proxy_inter_weight,
                                options.proxy_negatives)
        super().__init__({"source": source, "target": proxies})

    def forward(self, features, labels, cameras=None):
        n = len(labels["source"])
        source = Scored(self["source"](features[:n], labels["source"]), labels["source"])
        return {"source": source, "target": Scored(None, labels["target"], self["target"](features[n:], labels["target"], cameras["target"]))}

    def recluster(self, round: Round, optimizer: torch.optim.Optimizer) -> None:
        self["target"].reset(round.features, round.labels, round.camids)

    def resize(self, num_rows: int, optimizer: torch.optim.Optimizer) -> None:
        self["target"].resize(num_rows)


class TrainNet(nn.Module):
    """The model and its classifier heads as one module, so DistributedDataParallel synchronises the
    heads' gradients too. `heads` (a policy) scores each branch's rows of the batch."""

    def __init__(self, model: ReIDModel, heads: BranchHeads):
        super().__init__()
        self.model = model
        self.heads = heads

    def forward(self, images: torch.Tensor, labels: dict[str, torch.Tensor], cameras: dict[str, torch.Tensor] | None = None):
        """(the model's outputs, {branch: Scored}); the batch's rows are the branches in `labels`' order."""
        out = self.model(images)
        return out, self.heads(out["bn"], labels, cameras)


HEAD_POLICIES: dict[str, type[BranchHeads]] = {"separate": SeparateHeads, "merged": MergedHead, "memory": ClusterMemoryHeads,
                                               "proxies": CameraProxyHeads}


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
