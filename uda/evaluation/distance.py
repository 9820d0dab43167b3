"""Query-to-gallery distance matrices, computed in row chunks so the GPU holds one chunk at a time, and
the weighted mean of several models' matrices (an ensemble)."""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from uda.errors import UdaError

Metric = Literal["euclidean", "sqeuclidean", "cosine"]
METRICS: tuple[str, ...] = ("euclidean", "sqeuclidean", "cosine")


def pairwise_distance(
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    metric: Metric = "euclidean",
    chunk_size: int = 4096,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(M, N) float32 distances on the CPU between the rows of x (M, D) and y (N, D).

    euclidean:   ||x - y||, from ||x||^2 + ||y||^2 - 2 x.y clamped at 0 (one matrix product instead
                 of M * N differences; near 0 its absolute error is about sqrt(eps) * ||x||, so a
                 point's distance to itself comes out ~1e-3 for unit-norm float32 features, not 0).
    sqeuclidean: the same before the square root. Not for re-ranking: `re_ranking` takes euclidean
                 distances and squares them itself, as Zhong et al.'s code does (these would reach
                 it raised to the fourth power).
    cosine:      1 - cos(x, y), on L2-normalized copies of the inputs; in [0, 2].
    The work runs on `device` (None: CUDA when available, else CPU) in chunks of chunk_size rows of
    x; y stays on the device and each (chunk_size, N) block is moved to the CPU as soon as it is done,
    so device memory is bounded by (chunk_size + N) * (D + 1) floats.
    """
    if metric not in METRICS:
        raise UdaError(f"unknown distance metric {metric!r}: use one of {', '.join(METRICS)}")
    if chunk_size < 1:
        raise UdaError(f"chunk_size must be at least 1, got {chunk_size}")
    x, y = _as_feature_matrix("x", x), _as_feature_matrix("y", y)
    if x.shape[1] != y.shape[1]:
        raise UdaError(f"x and y must have the same feature dimension, got {x.shape[1]} and {y.shape[1]}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"

    y = y.to(device)
    if metric == "cosine":
        y = F.normalize(y, dim=1)
    else:
        y_sq_norms = y.pow(2).sum(1)
    distances = torch.empty((x.shape[0], y.shape[0]), dtype=torch.float32)
    for start in range(0, x.shape[0], chunk_size):
        x_chunk = x[start : start + chunk_size].to(device)
        if metric == "cosine":
            block = 1 - F.normalize(x_chunk, dim=1) @ y.T
        else:
            x_sq_norms = x_chunk.pow(2).sum(1, keepdim=True)
            block = torch.addmm(x_sq_norms + y_sq_norms, x_chunk, y.T, alpha=-2).clamp_(min=0)
            if metric == "euclidean":
                block = block.sqrt_()
        distances[start : start + chunk_size] = block.cpu()
    return distances


def _as_feature_matrix(name: str, features: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A float32 (rows, D) tensor, or a UdaError naming what is wrong."""
    features = torch.as_tensor(features)
    if features.ndim != 2:
        raise UdaError(
            f"{name} must be a (num_items, feature_dim) matrix, got shape {tuple(features.shape)}"
        )
    if not features.is_floating_point():
        raise UdaError(f"{name} must hold floating-point features, got dtype {features.dtype}")
    return features.float()


def ensemble_weights(weights: Sequence[float] | None, num_models: int) -> list[float]:
    """`num_models` weights normalised to sum 1 (None: equal weights), or UdaError when there are not
    as many as models, one is negative or not finite, or all are zero: checked before any model is read."""
    if weights is None:
        return [1.0 / num_models] * num_models
    weights = [float(w) for w in weights]
    if len(weights) != num_models:
        raise UdaError(f"{len(weights)} weights for {num_models} models: give one weight per model, in the models' order")
    if not all(0 <= w < math.inf for w in weights):
        raise UdaError(f"ensemble weights must be >= 0 and finite, got {weights}")
    total = sum(weights)
    if total == 0:
        raise UdaError(f"ensemble weights are all 0, got {weights}: give at least one model a weight > 0")
    return [w / total for w in weights]


def ensemble_distance(distmats: Iterable[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The weighted mean sum_m w_m * D_m / sum_m w_m of models' distance matrices of the same pairs: the
    ensemble of the source documents' competition entry, which averages distances rather than features,
    so models with different feature sizes and input sizes combine.

    distmats: one (M, N) matrix per model (same shape, same rows and columns in the same order), e.g. a
    generator that computes each only when it is needed, so at most two are held at a time.
    weights: one >= 0 per model, not all 0; normalised here (ensemble_weights). A model with itself, or a
    single model, gives its own distances back exactly. Returns (M, N) float32 on the matrices' device.
    """
    weights = ensemble_weights(weights, len(weights))
    total = None
    count = 0
    for weight, distmat in zip(weights, distmats):
        distmat = torch.as_tensor(distmat, dtype=torch.float32)
        if total is not None and distmat.shape != total.shape:
            raise UdaError(f"ensemble_distance: model {count + 1}'s distances are {tuple(distmat.shape)}, the first's "
                           f"{tuple(total.shape)}: the models must score the same query and gallery")
        total = weight * distmat if total is None else total.add_(distmat, alpha=weight)
        count += 1
    if count != len(weights):
        raise UdaError(f"ensemble_distance: {count} distance matrices for {len(weights)} weights")
    return total
