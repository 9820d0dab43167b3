"""The evaluation protocol of a run: a dataset's query and gallery loaded once, features extracted as
the run extracts them, and mAP / CMC / mINP under the Market-1501 protocol (optionally re-ranked)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from uda.build import amp_dtype
from uda.config import Config
from uda.data.device_batches import DevicePlainLoader
from uda.data.splits import make_plain_loader, prepare_split
from uda.datasets import ReIDDataset
from uda.datasets.base import ImageRecord
from uda.distributed import DistInfo, barrier
from uda.evaluation.distance import pairwise_distance
from uda.evaluation.features import extract_features
from uda.evaluation.metrics import evaluate
from uda.evaluation.rerank import re_ranking


@dataclass
class TestSet:
    """A dataset's query and gallery, loaded once (query first, then gallery, in one loader).
    remove_same_camera: the Market-1501 protocol; False for custom data without camera ids."""

    name: str
    query: list[ImageRecord]
    gallery: list[ImageRecord]
    loader: DataLoader | DevicePlainLoader
    remove_same_camera: bool = True


def make_test_set(dataset: ReIDDataset, cfg: Config, device: torch.device) -> TestSet:
    """Test images stay in host memory (read once per evaluation); batches go to `device`. MSMT17's
    93,820 test images at 256x128 are 9 GB: on the GPU they would crowd out training on a 24 GB card."""
    records, images = prepare_split(dataset.query + dataset.gallery, cfg, device, on_host=True)
    kept = {r.path for r in records}
    query = [r for r in dataset.query if r.path in kept]
    gallery = [r for r in dataset.gallery if r.path in kept]
    loader = make_plain_loader(query + gallery, cfg, images, device)
    return TestSet(dataset.name, query, gallery, loader, remove_same_camera=dataset.has_cameras)


def evaluate_test_sets(
    model: nn.Module, test_sets: list[TestSet], cfg: Config, device: torch.device, dist: DistInfo = DistInfo()
) -> dict[str, dict]:
    """{set name: {mAP, mINP, rank1, rank5, rank10}} (+ '<name>_rerank' when eval.rerank).
    Under torchrun the main process evaluates while the others wait (and get {})."""
    results = _evaluate(model, test_sets, cfg, device) if dist.is_main else {}
    barrier(dist)
    return results


def test_set_features(model: nn.Module, test_set: TestSet, cfg: Config, amp: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(query features, gallery features), L2-normalised, as evaluation scores them (eval.flip, eval.scales, bf16 under train.amp)."""
    features = extract_features(model, test_set.loader, flip=cfg.eval.flip, normalize=True, amp_dtype=amp, desc=f"features {test_set.name}",
                                scales=cfg.eval.scales)
    return features[: len(test_set.query)], features[len(test_set.query):]


Distances = Callable[[str, str, str], torch.Tensor]  # (rows, columns: "query" | "gallery", metric) -> distance matrix


def score_test_set(test_set: TestSet, cfg: Config, device: torch.device, distances: Distances) -> dict[str, dict]:
    """{name: metrics} (+ '<name>_rerank' under eval.rerank) of one test set under the Market-1501 protocol,
    from `distances`: one model's features, or an ensemble's weighted mean (uda/evaluate.py)."""
    q_pids, q_cams = torch.tensor([r.pid for r in test_set.query]), torch.tensor([r.camid for r in test_set.query])
    g_pids, g_cams = torch.tensor([r.pid for r in test_set.gallery]), torch.tensor([r.camid for r in test_set.gallery])
    protocol = {"ap": cfg.eval.ap, "remove_same_camera": test_set.remove_same_camera}
    results = {test_set.name: summary(evaluate(distances("query", "gallery", cfg.eval.metric), q_pids, g_pids, q_cams, g_cams, **protocol))}
    if cfg.eval.rerank:  # the published re-ranking squares its input, so it is given Euclidean distances
        reranked = re_ranking(
            distances("query", "gallery", "euclidean"), distances("query", "query", "euclidean"), distances("gallery", "gallery", "euclidean"),
            k1=cfg.eval.rerank_k1, k2=cfg.eval.rerank_k2, lambda_value=cfg.eval.rerank_lambda, device=device,
        )
        results[f"{test_set.name}_rerank"] = summary(evaluate(reranked, q_pids, g_pids, q_cams, g_cams, **protocol))
    return results


def feature_distances(features: dict[str, torch.Tensor], device: torch.device, rows: str, columns: str, metric: str) -> torch.Tensor:
    """Distances between one model's {"query": (Q, D), "gallery": (G, D)} features (a `Distances` once partially applied)."""
    return pairwise_distance(features[rows], features[columns], metric=metric, device=device)


def _evaluate(model: nn.Module, test_sets: list[TestSet], cfg: Config, device: torch.device) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for test_set in test_sets:
        qf, gf = test_set_features(model, test_set, cfg, amp_dtype(cfg, device))
        results.update(score_test_set(test_set, cfg, device, partial(feature_distances, {"query": qf, "gallery": gf}, device)))
    return results


def summary(metrics: dict) -> dict:
    """The metrics a run reports, as floats."""
    return {key: float(metrics[key]) for key in ("mAP", "mINP", "rank1", "rank5", "rank10")}
