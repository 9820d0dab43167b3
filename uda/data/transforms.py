"""The strong-baseline (BoT) image transforms, built from torchvision.transforms.v2.

Input: an RGB PIL image of any size. Output: a (3, height, width) float32 tensor, normalised.
Each random stage of the training transform is switched off by its parameter (flip_p=0, pad=0,
erasing_p=0), so ablation configs can turn the tricks on one at a time; with all three off the
training transform is exactly the test transform.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _resize(height: int, width: int) -> v2.Resize:
    """Bilinear with antialiasing: what PIL's resize does, as in the BoT reference code."""
    return v2.Resize((height, width), interpolation=v2.InterpolationMode.BILINEAR, antialias=True)


def _to_normalised_tensor(mean: tuple[float, ...], std: tuple[float, ...]) -> list:
    """uint8 PIL -> float32 in [0, 1] -> (x - mean) / std, as a plain tensor (not a tv_tensors.Image)."""
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
        v2.ToPureTensor(),
    ]


def train_transform(
    height: int = 256,
    width: int = 128,
    pad: int = 10,
    flip_p: float = 0.5,
    erasing_p: float = 0.5,
    erasing_area: tuple[float, float] = (0.02, 0.4),
    erasing_ratio: tuple[float, float] = (0.3, 3.33),
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> v2.Compose:
    """Resize -> horizontal flip -> zero-pad `pad` pixels + random crop back to size -> tensor ->
    normalise -> random erasing (the BoT order).

    Random erasing picks a rectangle covering `erasing_area` (fraction of the image) with aspect
    height/width in `erasing_ratio` (sampled log-uniformly) and fills it with 0 *after*
    normalisation, i.e. with the mean colour (BoT fills with the ImageNet mean values in normalised
    space, a slightly different colour). torchvision gives up after 10 tries at a rectangle that
    fits and leaves the image unchanged; BoT tries 100 times.
    """
    stages: list = [_resize(height, width)]
    if flip_p > 0:
        stages.append(v2.RandomHorizontalFlip(p=flip_p))
    if pad > 0:
        stages += [v2.Pad(pad, fill=0), v2.RandomCrop((height, width))]
    stages += _to_normalised_tensor(mean, std)
    if erasing_p > 0:
        stages.append(v2.RandomErasing(p=erasing_p, scale=erasing_area, ratio=erasing_ratio, value=0))
    return v2.Compose(stages)


def test_transform(
    height: int = 256,
    width: int = 128,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> v2.Compose:
    """Resize -> tensor -> normalise: deterministic, used for query, gallery and feature extraction."""
    return v2.Compose([_resize(height, width)] + _to_normalised_tensor(mean, std))


test_transform.__test__ = False  # pytest would otherwise collect it as a test wherever it is imported
