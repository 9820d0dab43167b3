"""A split's records as a torch Dataset: (image tensor, pid, camid, index) per item."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from uda.data.images import ImageCache, read_image
from uda.datasets.base import ImageRecord


class ReIDImageDataset(Dataset):
    """Images come from `cache` when given (decoded once), else from disk on every access.

    An item key is an index, or (index, seed) from `uda.data.loaders.SeededSampler`: the transform
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
