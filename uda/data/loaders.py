"""The per-image pipeline (`data.pipeline: loader`): a split's records as a Dataset, and the DataLoaders
for training (P x K batches, reproducible augmentation) and for feature extraction."""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from uda.data.images import ImageCache, read_image
from uda.data.device_batches import PKSampler
from uda.datasets.base import ImageRecord


class ReIDImageDataset(Dataset):
    """Images come from `cache` when given (decoded once), else from disk on every access.

    An item key is an index, or (index, seed) from `SeededSampler` (below): the transform
    then runs with torch's RNG seeded by `seed`, so the augmentation of every draw is fixed by the
    sampler and not by which worker process happens to load it (torchvision's v2 transforms draw
    from torch's RNG only, so seeding it is enough).
    Returns (image (3, H, W) float32, pid, camid, index); the index lets a caller match features
    back to records (e.g. to update a feature memory).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        transform: Callable[[Image.Image], torch.Tensor],
        cache: ImageCache | None = None,
    ):
        self.records = list(records)
        self.transform = transform
        self.cache = cache
        if cache is not None:
            missing = [r.path for r in self.records if r.path not in cache]
            if missing:
                raise ValueError(f"{len(missing)} records are not in the image cache, e.g. {missing[0]}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        record = self.records[index]
        img = self.cache.image(record.path) if self.cache is not None else read_image(record.path)
        if seed is None:
            return self.transform(img), record.pid, record.camid, index
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
            torch.manual_seed(seed)
            return self.transform(img), record.pid, record.camid, index


class SeededSampler(Sampler[tuple[int, int]]):
    """Wraps an index sampler with `set_epoch`; yields (index, seed): the j-th draw of an epoch gets the
    augmentation seed number j of a generator seeded by (seed, epoch, rank).

    Why per draw rather than per worker: the augmentation of every draw is then a pure function of
    (seed, epoch, rank, position), the same with 0, 2 or 8 workers, after a resume, and different for
    the repeated images of an identity with fewer than K images.
    """

    def __init__(self, index_sampler: PKSampler, seed: int):
        self.index_sampler = index_sampler
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch: selects both the index order and the augmentation seeds."""
        self.index_sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(self.index_sampler)
        rng = np.random.default_rng([self.seed, self.index_sampler.epoch, self.index_sampler.rank])
        seeds = rng.integers(0, 2**63 - 1, size=len(indices), dtype=np.int64).tolist()
        return iter(zip(indices, seeds))

    def __len__(self) -> int:
        return len(self.index_sampler)


def train_loader(
    records: Sequence[ImageRecord],
    transform: Callable[[Image.Image], torch.Tensor],
    num_pids: int,
    num_instances: int,
    seed: int,
    num_workers: int,
    num_iterations: int | None = None,
    cache: ImageCache | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Batches of P*K = num_pids * num_instances images: (images (B, 3, H, W), pids, camids, indices).

    Call `loader.sampler.set_epoch(epoch)` before each epoch (see PKSampler and SeededSampler);
    records with pid -1 are never drawn. len(loader) is the exact number of batches of the epoch.
    """
    sampler = SeededSampler(
        PKSampler(
            [r.pid for r in records], num_pids, num_instances, seed=seed,
            num_iterations=num_iterations, rank=rank, world_size=world_size,
        ),
        seed=seed,
    )
    return DataLoader(
        ReIDImageDataset(records, transform, cache),
        batch_size=num_pids * num_instances,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


def test_loader(
    records: Sequence[ImageRecord],
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    num_workers: int,
    cache: ImageCache | None = None,
) -> DataLoader:
    """All records in order, in batches of `batch_size` (the last one may be smaller):
    (images (B, 3, H, W), pids, camids, indices)."""
    return DataLoader(
        ReIDImageDataset(records, transform, cache),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


test_loader.__test__ = False  # pytest would otherwise collect it as a test wherever it is imported
