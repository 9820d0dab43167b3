"""P x K training batches: the identity sampler, and batches built where the model trains.

The P x K identity sampler: every batch holds P identities with K images each, which the batch-hard
triplet loss needs (each anchor must have positives and negatives in its batch). Both pipelines draw
from it: the device batches below and the per-image DataLoader of `uda.data.loaders`.

Device batches: every image resized once and held as one uint8 tensor on the
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
from torch.utils.data import Sampler
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from uda.data.images import ImageCache, read_image
from uda.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from uda.datasets.base import ImageRecord
from uda.errors import ConfigError, UdaError

log = logging.getLogger(__name__)


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
