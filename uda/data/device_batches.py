"""Batches built where the model trains: every image resized once and held as one uint8 tensor on the
training device, P x K batches gathered and augmented there, a whole batch per tensor operation.

Why: the per-image pipeline (PIL + torchvision transforms in DataLoader workers) redoes the resize and
the augmentation of every image every epoch, one image at a time. Here the only per-epoch work is
indexing and a few element-wise operations; the images cost one decode and one resize for the whole run
(the "decode JPEGs once into arrays" of the strong-baseline documents, taken one step further). Measured
(BENCHMARKS.md): 2.2x faster epochs on the CPU demo; on an H100 evaluation and feature memories are
faster and the CPU cores stay free, while a Market-1501 epoch is bound by the model either way.

The result is the same as the per-image pipeline's (`uda.data.transforms`), image for image: the resize
is torchvision's on the PIL image (PIL's antialiased bilinear), flip -> zero-pad + random crop ->
scale to [0, 1] -> normalise -> random erasing with torchvision's sampling rules (10 tries at a
rectangle that fits, else no erasing). Only the random numbers come from a different stream: one
torch.Generator on the device per (seed, epoch, rank), so an epoch's batches are still a pure function
of those three and a resumed run repeats the uninterrupted one.
"""
from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from uda.data.images import ImageCache, read_image
from uda.data.sampler import PKSampler
from uda.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from uda.datasets.base import ImageRecord
from uda.errors import UdaError

log = logging.getLogger(__name__)


class DeviceImages:
    """The images of one split at the training size: pixels (N, H, W, 3) uint8 on `device`, row i
    holding `paths[i]` resized as the test transform resizes it. Keyed by path, so one copy serves every
    record list over those files (the target split is relabelled after each clustering round)."""

    def __init__(self, paths: Sequence[str], pixels: torch.Tensor):
        if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.dtype != torch.uint8 or len(paths) != len(pixels):
            raise ValueError(f"pixels must be (len(paths), H, W, 3) uint8, got {tuple(pixels.shape)} {pixels.dtype}")
        self.pixels = pixels
        self._row = {path: i for i, path in enumerate(paths)}

    @classmethod
    def build(
        cls,
        records: Sequence[ImageRecord],
        height: int,
        width: int,
        device: torch.device,
        cache: ImageCache | None = None,
        num_threads: int | None = None,
    ) -> "DeviceImages":
        """Resize every record's image (from `cache` when given, else read from disk) and move the
        stack to `device`. PIL resizes outside the GIL, so a thread pool uses every core."""
        paths = [r.path for r in records]
        host = torch.empty((len(paths), height, width, 3), dtype=torch.uint8)

        def resize_into(row: int) -> None:
            img = cache.image(paths[row]) if cache is not None else read_image(paths[row])
            resized = TF.resize(img, [height, width], interpolation=InterpolationMode.BILINEAR, antialias=True)
            host[row] = torch.from_numpy(np.array(resized))

        threads = num_threads or min(16, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(resize_into, range(len(paths))))
        if device.type == "cuda":
            try:
                host = host.pin_memory().to(device, non_blocking=True)
            except torch.OutOfMemoryError:
                raise UdaError(
                    f"{len(paths)} images at {height}x{width} ({host.nbytes / 2**30:.1f} GiB) do not fit on {device}; "
                    "set data.pipeline=loader (per-image loading) or lower data.height/width"
                ) from None
        images = cls(paths, host.to(device))
        log.info(images.summary())
        return images

    def __len__(self) -> int:
        return len(self._row)

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    @property
    def size(self) -> tuple[int, int]:
        return int(self.pixels.shape[1]), int(self.pixels.shape[2])

    def rows(self, records: Sequence[ImageRecord]) -> torch.Tensor:
        """(len(records),) int64 rows of `records` in `pixels`, on the device."""
        try:
            rows = [self._row[r.path] for r in records]
        except KeyError as exc:
            raise ValueError(f"{exc.args[0]} is not among these device images") from None
        return torch.tensor(rows, dtype=torch.int64, device=self.device)

    def labels(self, records: Sequence[ImageRecord]) -> tuple[torch.Tensor, torch.Tensor]:
        """(pids, camids) of `records` as int64 tensors on the device, for the batches' labels."""
        pids = torch.tensor([r.pid for r in records], dtype=torch.int64, device=self.device)
        return pids, torch.tensor([r.camid for r in records], dtype=torch.int64, device=self.device)

    def summary(self) -> str:
        height, width = self.size
        return f"images on {self.device}: {len(self)} at {height}x{width}, {self.pixels.nbytes / 2**20:.1f} MiB"


@dataclass(frozen=True)
class BatchAugment:
    """The strong baseline's training augmentation for a whole uint8 batch; each sample draws its own
    parameters. Any stage is off when its parameter is 0 (as in `uda.data.transforms.train_transform`)."""

    pad: int = 10
    flip_p: float = 0.5
    erasing_p: float = 0.5
    erasing_area: tuple[float, float] = (0.02, 0.4)
    erasing_ratio: tuple[float, float] = (0.3, 3.33)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def sample(self, batch: int, height: int, width: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-sample parameters on the generator's device: flip (B,) bool, crop offsets top/left in
        [0, 2 * pad], and the erased rectangle (top, left, height, width; height 0 = none)."""
        device = generator.device

        def uniform(*shape: int) -> torch.Tensor:
            return torch.rand(shape, generator=generator, device=device)

        flip = uniform(batch) < self.flip_p
        top = (uniform(batch) * (2 * self.pad + 1)).floor().long()
        left = (uniform(batch) * (2 * self.pad + 1)).floor().long()
        erase = self._erasing_boxes(batch, height, width, uniform)
        return {"flip": flip, "top": top, "left": left, **erase}

    def _erasing_boxes(self, batch: int, height: int, width: int, uniform) -> dict[str, torch.Tensor]:
        """torchvision's RandomErasing sampling, for all samples at once: with probability p, up to 10
        tries at (area fraction, log-uniform aspect); the first whose rounded box fits strictly inside
        the image is placed uniformly; no fit in 10 tries leaves the image unchanged."""
        tries = 10
        area = height * width * (self.erasing_area[0] + (self.erasing_area[1] - self.erasing_area[0]) * uniform(batch, tries))
        log_lo, log_hi = math.log(self.erasing_ratio[0]), math.log(self.erasing_ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * uniform(batch, tries))
        box_h = torch.sqrt(area * aspect).round().long()
        box_w = torch.sqrt(area / aspect).round().long()
        fits = (box_h < height) & (box_w < width)
        first = fits.long().argmax(dim=1, keepdim=True)  # index of the first try that fits (0 if none)
        erased = (uniform(batch) < self.erasing_p) & fits.any(dim=1)
        box_h = torch.where(erased, box_h.gather(1, first).squeeze(1), 0)
        box_w = torch.where(erased, box_w.gather(1, first).squeeze(1), 0)
        box_top = (uniform(batch) * (height - box_h + 1)).floor().long()
        box_left = (uniform(batch) * (width - box_w + 1)).floor().long()
        return {"erase_top": box_top, "erase_left": box_left, "erase_height": box_h, "erase_width": box_w}

    def apply(self, pixels: torch.Tensor, rows: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, 3, H, W) float32 normalised images of `pixels[rows]` under
        `params`: flip, then zero-pad + crop (one gather from the unpadded images), then erasing."""
        _, height, width, _ = pixels.shape
        device = pixels.device
        ys = torch.arange(height, device=device) + params["top"][:, None] - self.pad  # (B, H) source rows
        xs = torch.arange(width, device=device) + params["left"][:, None] - self.pad  # (B, W) in the flipped image
        inside = ((ys >= 0) & (ys < height))[:, :, None] & ((xs >= 0) & (xs < width))[:, None, :]
        xs = torch.where(params["flip"][:, None], width - 1 - xs, xs)
        crops = pixels[rows[:, None, None], ys.clamp(0, height - 1)[:, :, None], xs.clamp(0, width - 1)[:, None, :]]
        crops = crops * inside[..., None]  # the zero padding: black before normalisation, as v2.Pad(fill=0)
        images = normalise(crops, self.mean, self.std)
        ys, xs = torch.arange(height, device=device), torch.arange(width, device=device)
        top, left = params["erase_top"][:, None], params["erase_left"][:, None]
        in_rows = (ys >= top) & (ys < top + params["erase_height"][:, None])
        in_cols = (xs >= left) & (xs < left + params["erase_width"][:, None])
        erased = in_rows[:, None, :, None] & in_cols[:, None, None, :]
        return images.masked_fill(erased, 0.0)  # filled with 0 after normalisation, as v2.RandomErasing(value=0)


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1], normalised: torchvision's own functions, so
    the numbers equal the per-image test transform's."""
    images = TF.to_dtype(pixels.permute(0, 3, 1, 2), torch.float32, scale=True)
    return TF.normalize(images, list(mean), list(std))


class DeviceTrainLoader:
    """P x K training batches from device images: (images (B, 3, H, W) float32, pids, camids, indices),
    all on the device. Same interface as the DataLoader of `uda.data.loaders.train_loader`: call
    `loader.sampler.set_epoch(epoch)` before each epoch; len() is the number of batches."""

    def __init__(
        self,
        images: DeviceImages,
        records: Sequence[ImageRecord],
        augment: BatchAugment,
        num_pids: int,
        num_instances: int,
        seed: int,
        num_iterations: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.images, self.augment, self.seed = images, augment, seed
        self.batch_size = num_pids * num_instances
        self.sampler = PKSampler(
            [r.pid for r in records], num_pids, num_instances, seed=seed, num_iterations=num_iterations, rank=rank, world_size=world_size
        )
        self._rows = images.rows(records)
        self._pids, self._camids = images.labels(records)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        device = self.images.device
        indices = torch.tensor(list(self.sampler), dtype=torch.int64).to(device)
        stream_seed = np.random.default_rng([self.seed, self.sampler.epoch, self.sampler.rank]).integers(2**62)
        generator = torch.Generator(device=device).manual_seed(int(stream_seed))
        height, width = self.images.size
        for batch in indices.split(self.batch_size):
            params = self.augment.sample(len(batch), height, width, generator)
            images = self.augment.apply(self.images.pixels, self._rows[batch], params)
            yield images, self._pids[batch], self._camids[batch], batch


class DevicePlainLoader:
    """Records in order, no augmentation, in batches of `batch_size`: what `test_loader` yields, from
    resized images (for evaluation and the target feature memory). The images may live in host memory
    (test sets: read once per evaluation, so they need not take GPU memory) while the batches are
    normalised on `device` (default: where the images are)."""

    def __init__(self, images: DeviceImages, records: Sequence[ImageRecord], batch_size: int,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 device: torch.device | None = None):
        self.images, self.batch_size, self.mean, self.std = images, batch_size, mean, std
        self.device = device or images.device
        self._rows = images.rows(records)
        self._pids, self._camids = images.labels(records)

    def __len__(self) -> int:
        return math.ceil(len(self._rows) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        indices = torch.arange(len(self._rows), device=self.images.device)
        for batch in indices.split(self.batch_size):
            pixels = self.images.pixels[self._rows[batch]].to(self.device, non_blocking=True)
            yield normalise(pixels, self.mean, self.std), self._pids[batch], self._camids[batch], batch
