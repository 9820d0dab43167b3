"""The P x K identity sampler: every batch holds P identities with K images each, which the
batch-hard triplet loss needs (each anchor must have positives and negatives in its batch).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from uda.errors import ConfigError


class PKSampler(Sampler[int]):
    """A flat stream of dataset indices, read in batches of P*K (use batch_size=P*K, drop_last=True).

    One pass over the data (the strong baseline's RandomIdentitySampler):
      1. for each identity, shuffle its images and cut them into groups of K, dropping the remainder;
         an identity with fewer than K images gets one group: all its images plus K - n drawn again
         with replacement (BoT draws all K with replacement, which can repeat one image K times);
      2. repeatedly pick P distinct identities at random among those with groups left, and emit one
         group of each as a batch, until fewer than P identities have groups left (the rest is
         dropped).
    Without `num_iterations` an epoch is one pass. With it (the UDA stage: a fixed number of steps
    per epoch whatever the number of clusters) passes with fresh shuffles are chained until
    `num_iterations` batches per rank are emitted.

    Indices whose pid is -1 (DBSCAN outliers in pseudo-labels) are never sampled.

    The stream is a pure function of (seed, epoch): `set_epoch(epoch)` selects it, so a run resumed
    at an epoch boundary reproduces the uninterrupted one without saving RNG states.

    Distributed: all ranks compute the same global list of batches and rank r takes batches
    r, r + world_size, ...; each rank gets the same number of batches (the global count is cut to a
    multiple of world_size), so DDP ranks never wait on one another at the end of an epoch. Each rank's
    batch is still P x K, so the global batch is world_size * P * K.
    """

    def __init__(
        self,
        pids: Sequence[int],
        num_pids: int = 16,
        num_instances: int = 4,
        seed: int = 0,
        num_iterations: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        if num_pids < 1 or num_instances < 1:
            raise ConfigError(f"P x K batches need num_pids >= 1 and num_instances >= 1, got {num_pids} x {num_instances}")
        if num_iterations is not None and num_iterations < 1:
            raise ConfigError(f"num_iterations must be a positive number of batches per epoch, got {num_iterations}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        pids = np.asarray(pids, dtype=np.int64)
        order = np.argsort(pids, kind="stable")  # indices grouped by pid, ascending within each
        unique, starts = np.unique(pids[order], return_index=True)
        groups = np.split(order, starts[1:])
        self._images_of = {int(pid): images for pid, images in zip(unique, groups) if pid >= 0}
        if len(self._images_of) < num_pids:
            raise ConfigError(
                f"a P x K batch needs {num_pids} identities but the labels hold {len(self._images_of)} "
                "(pid -1 excluded); lower num_pids"
            )
        self.num_pids, self.num_instances = num_pids, num_instances
        self.seed, self.num_iterations = seed, num_iterations
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._stream: tuple[int, np.ndarray] | None = None  # (epoch, this rank's indices), computed once per epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _one_pass(self, rng: np.random.Generator) -> list[np.ndarray]:
        """Batches ((P*K,) int64 index arrays) of one pass over all identities."""
        k = self.num_instances
        groups: dict[int, list[np.ndarray]] = {}
        for pid, images in self._images_of.items():
            if len(images) < k:
                images = np.concatenate([images, rng.choice(images, size=k - len(images), replace=True)])
            images = rng.permutation(images)
            num_groups = len(images) // k
            groups[pid] = list(images[: num_groups * k].reshape(num_groups, k))
        available = list(groups)
        batches = []
        while len(available) >= self.num_pids:
            chosen = rng.choice(len(available), size=self.num_pids, replace=False)
            batches.append(np.concatenate([groups[available[i]].pop() for i in chosen]))
            available = [pid for pid in available if groups[pid]]
        return batches

    def _rank_stream(self) -> np.ndarray:
        """This rank's flat index stream for the current epoch (cached: __len__ and __iter__ share it)."""
        if self._stream is None or self._stream[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            batches = self._one_pass(rng)
            if self.num_iterations is not None:
                wanted = self.num_iterations * self.world_size
                while len(batches) < wanted:  # each pass yields >= 1 batch: there are >= P identities
                    batches += self._one_pass(rng)
                batches = batches[:wanted]
            per_rank = len(batches) // self.world_size
            mine = batches[self.rank :: self.world_size][:per_rank]
            stream = np.concatenate(mine) if mine else np.zeros(0, dtype=np.int64)
            self._stream = (self.epoch, stream)
        return self._stream[1]

    def __iter__(self) -> Iterator[int]:
        return iter(self._rank_stream().tolist())

    def __len__(self) -> int:
        """Exact number of indices this rank yields this epoch (a multiple of P*K)."""
        return len(self._rank_stream())
