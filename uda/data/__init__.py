"""From records to batches: image reading and the decoded-image cache, BoT transforms, the P x K
identity sampler and the DataLoaders built from them."""
from uda.data.images import ImageCache, prepare_images, read_image
from uda.data.loaders import ReIDImageDataset, SeededSampler, test_loader, train_loader
from uda.data.device_batches import PKSampler
from uda.data.transforms import IMAGENET_MEAN, IMAGENET_STD, test_transform, train_transform

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageCache",
    "PKSampler",
    "ReIDImageDataset",
    "SeededSampler",
    "prepare_images",
    "read_image",
    "test_loader",
    "test_transform",
    "train_loader",
    "train_transform",
]
