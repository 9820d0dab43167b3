"""Inference features of a whole loader: eval mode, BatchNorm folded, optional flip and multi-scale
averaging and L2 normalization."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.optimization import fuse
from tqdm import tqdm

from uda.errors import UdaError


def extract_features(
    model: nn.Module,
    loader: Iterable,
    flip: bool = True,
    normalize: bool = True,
    amp_dtype: torch.dtype | None = None,
    desc: str = "features",
    fold_bn: bool = True,
    scales: Sequence[float] = (1.0,),
) -> torch.Tensor:
    """(N, D) float32 features on the CPU, one row per image, in the loader's order.

    model: eval-mode forward maps images (B, 3, H, W) to features (B, D). It runs where its
        parameters are: move the model to the GPU first to extract there. Every submodule is put in
        eval mode for the extraction and gets its own previous mode back afterwards, even on error.
    loader: yields tuples (or lists) whose first element is the image batch, as our datasets'
        (img, pid, camid, index); it must not shuffle if rows are to line up with the records.
    flip: average each image's feature with its horizontal mirror's (before normalization).
    normalize: L2-normalize each row (after flip averaging), for cosine-style comparison.
    amp_dtype: run the forward under torch.autocast with this dtype (e.g. torch.bfloat16 on a GPU);
        features are returned as float32 whatever it is.
    desc: label of the progress bar (shown only on a terminal).
    fold_bn: extract with a copy of the model whose BatchNorms are folded into the layers before them
        (fold_batchnorm); False for a model folded once already (uda.load_model's).
    scales: test-time scales (eval.scales): the feature is the mean over these of the (flip-averaged)
        features of the batch resized by each factor (multi_scale_features); (1.0,) is the plain feature.
    """
    device = _model_device(model)
    previous_modes = [(module, module.training) for module in model.modules()]
    model.eval()
    rows = []
    try:
        runner = fold_batchnorm(model) if fold_bn else model
        with torch.inference_mode():
            for batch in tqdm(loader, desc=desc, disable=None, leave=False):
                images = _image_batch(batch).to(device, non_blocking=True)
                features = multi_scale_features(lambda batch: _forward(runner, batch, amp_dtype), images, scales, flip)
                if normalize:
                    features = F.normalize(features, dim=1)
                rows.append(features.cpu())
    finally:
        for module, was_training in previous_modes:
            module.training = was_training
    if not rows:
        raise UdaError("the loader yielded no batches: check that the split has images")
    return torch.cat(rows)


def multi_scale_features(
    forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, scales: Sequence[float], flip: bool
) -> torch.Tensor:
    """(B, D) mean over `scales` of forward(images resized by the scale), each flip-averaged (forward of
    the image and of its horizontal mirror, halved) when `flip`; not normalised.

    images: (B, 3, H, W), already normalised (resizing is linear, so it commutes with the per-channel
    normalisation); at scale s they are resized to (round(H * s), round(W * s)) by bilinear interpolation
    (align_corners=False, no antialiasing), and scale 1.0 is the images as they are, so scales (1.0,) is
    exactly the single-scale feature. The model must accept any input size (global pooling does).
    Shared by extract_features and the ONNX export (uda.export), so both compute the same thing.
    """
    if len(scales) == 0:
        raise UdaError("scales is empty: list at least one test-time scale, e.g. [1.0]")
    total = None
    for scale in scales:
        resized = images if scale == 1.0 else _resized(images, scale)
        features = forward(resized)
        if flip:
            features = (features + forward(resized.flip(3))) / 2
        total = features if total is None else total + features
    return total / len(scales)


def _resized(images: torch.Tensor, scale: float) -> torch.Tensor:
    height, width = images.shape[-2:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode `model` with each BatchNorm that directly follows a convolution (or linear
    layer) folded into that layer's weights and bias (torch.fx's `fuse`): the same outputs up to float
    rounding, without one pass over every activation map per BatchNorm, so MobileNetV2 at 128x64
    extracts 1.56x faster than with channels_last alone on a 2-core CPU (BENCHMARKS.md). `model` itself is left as it is. A model
    without BatchNorm, or one torch.fx cannot trace, is returned as it is: the fold only saves time."""
    if model.training:
        raise ValueError("fold_batchnorm needs an eval-mode model: the fold uses BatchNorm's running statistics")
    if not any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules()):
        return model  # nothing to fold, and tracing would drop a plain model's Python side effects
    try:
        return fuse(model)
    except Exception:  # not traceable by torch.fx (e.g. control flow on tensor values): run it unfolded
        return model


def _forward(model: nn.Module, images: torch.Tensor, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """(B, D) float32 features of one batch, checked so a wrong model fails here and says why."""
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        features = model(images)
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or len(features) != len(images):
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise UdaError(
            f"the model must return a (batch, feature_dim) tensor in eval mode, got {shape} for a batch "
            f"of {len(images)}: make its eval-mode forward return the inference feature"
        )
    return features.float()


def _image_batch(batch) -> torch.Tensor:
    """The (B, 3, H, W) image tensor at the front of a loader batch."""
    images = batch[0] if isinstance(batch, (tuple, list)) and batch else None
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise UdaError(
            "each loader batch must be a tuple whose first element is a (B, 3, H, W) image tensor, "
            "as (img, pid, camid, index) from our datasets"
        )
    return images


def _model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters (or, failing those, buffers) live; the CPU for a stateless model."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")
