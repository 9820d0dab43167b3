"""A run's images, from a dataset's records to what trains and what is scored: datasets parsed by name,
splits prepared once (resized on the training device, or decoded into a cache), P x K training loaders
with their own seeded streams, and in-order loaders for features."""
from __future__ import annotations

import numpy as np
import torch

from uda.config import Config
from uda.data import prepare_images, test_loader, test_transform, train_loader, train_transform
from uda.data.device_batches import BatchAugment, DeviceImages, DevicePlainLoader, DeviceTrainLoader
from uda.data.images import ImageCache
from uda.datasets import ReIDDataset, load_dataset
from uda.datasets.base import ImageRecord, relabel_train, subset_identities
from uda.errors import ConfigError, DatasetError


def load_named_dataset(name: str | None, cfg: Config, role: str) -> ReIDDataset:
    """Dataset `name` parsed (file names only), to be used as `role` (source, target, test): a source
    must have train ids (custom data may not)."""
    if not name:
        raise ConfigError("no dataset named: pass --source (and --target), e.g. --source market --target duke")
    dataset = load_dataset(
        name, cfg.data.root, synth_preset=cfg.data.synth_preset, synth_seed=cfg.data.synth_seed,
        msmt_train_val=cfg.data.msmt_train_val,
    )
    if role == "source" and not dataset.train_labelled:
        raise DatasetError(
            f"{dataset.name} ({dataset.root}): its train images have no ids, so it can only be a target; a source "
            f"needs train/<id>/<image> subfolders (or a pid column)"
        )
    return subset_identities(dataset, cfg.data.subset_ids)


def uses_device_pipeline(cfg: Config) -> bool:
    """data.pipeline: 'device' (batches built on the training device, see uda.data.device_batches) or
    'loader' (the per-image DataLoader pipeline: less memory, for splits too large to hold resized)."""
    return cfg.data.pipeline == "device"


Images = ImageCache | DeviceImages | None  # where a split's loaders take their pixels from


def prepare_split(
    records: list[ImageRecord], cfg: Config, device: torch.device, *, on_host: bool = False
) -> tuple[list[ImageRecord], Images]:
    """The records kept (corrupt ones dropped under data.skip_corrupt) and their pixels: resized images
    for the device pipeline (on `device`, or in host memory with on_host=True), else the decoded-image
    cache (data.cache) or None (read from disk)."""
    resized = uses_device_pipeline(cfg)
    kept, cache = prepare_images(records, cache=cfg.data.cache or resized, skip_corrupt=cfg.data.skip_corrupt)
    if resized:
        return kept, DeviceImages.build(kept, cfg.data.height, cfg.data.width, torch.device("cpu") if on_host else device, cache)
    return kept, cache


def prepare_train_split(records: list[ImageRecord], cfg: Config, device: torch.device) -> tuple[list[ImageRecord], Images]:
    """prepare_split for a training split: ids made 0..N-1 again, since data.skip_corrupt may have
    dropped every image of one (a gap would leave a classifier row with no images, or an id past the last)."""
    kept, images = prepare_split(records, cfg, device)
    return relabel_train(kept), images


def stream_seed(seed: int, stream: int) -> int:
    """The seed of one of a run's independent training streams. Stream 0 is the run's seed itself (what
    pretraining draws); any other gets its own, so adaptation's target batches do not repeat the source
    batches' sampling and augmentation draws position for position."""
    if stream == 0:
        return seed
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


def make_train_loader(
    records: list[ImageRecord], cfg: Config, images: Images, *, rank: int = 0, world_size: int = 1,
    num_iterations: int | None = None, stream: int = 0,
):
    """P x K batches (images, pids, camids, indices); `loader.sampler.set_epoch(epoch)` before each epoch.
    Loaders trained on side by side take different `stream`s (`stream_seed`)."""
    d = cfg.data
    seed = stream_seed(cfg.seed, stream)
    if uses_device_pipeline(cfg):  # prepare_split made `images` for the same pipeline
        augment = BatchAugment(pad=d.pad, flip_p=d.flip_p, erasing_p=d.erasing_p, mean=tuple(d.mean), std=tuple(d.std))
        return DeviceTrainLoader(
            images, records, augment, d.num_pids, d.num_instances, seed,
            num_iterations=num_iterations, rank=rank, world_size=world_size,
        )
    transform = train_transform(d.height, d.width, pad=d.pad, flip_p=d.flip_p, erasing_p=d.erasing_p, mean=tuple(d.mean), std=tuple(d.std))
    return train_loader(
        records, transform, d.num_pids, d.num_instances, seed, d.num_workers,
        num_iterations=num_iterations, cache=images, rank=rank, world_size=world_size,
    )


def make_plain_loader(records: list[ImageRecord], cfg: Config, images: Images, device: torch.device | None = None):
    """Records in order, test transform: for evaluation and for the target feature memory. Batches of
    resized images are normalised on `device` (default: where the images are)."""
    if uses_device_pipeline(cfg):  # prepare_split made `images` for the same pipeline
        return DevicePlainLoader(images, records, cfg.eval.batch_size, device=device, mean=tuple(cfg.data.mean), std=tuple(cfg.data.std))
    return test_loader(records, test_transform(cfg.data.height, cfg.data.width, tuple(cfg.data.mean), tuple(cfg.data.std)),
                       cfg.eval.batch_size, cfg.data.num_workers, images)
