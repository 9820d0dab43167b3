"""The Market-1501 protocol written plainly, one query at a time: the reference uda.evaluation.metrics
is tested against. Slow on purpose; nothing here is clever.

The trapezoid AP follows the official devkit's compute_AP.m step by step (running recall and
precision over the ranked list, junk skipped, stop once every match is found).
"""
from __future__ import annotations

import numpy as np


def literal_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, ap="noninterp") -> dict:
    """Same inputs and output keys as uda.evaluation.metrics.evaluate (numpy arrays only)."""
    if ap not in ("noninterp", "trapezoid"):
        raise ValueError(f"unknown AP definition {ap!r}")
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    aps, inps, first_ranks = [], [], []
    for q in range(distmat.shape[0]):
        order = np.argsort(distmat[q], kind="stable")
        removed = (g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q])
        is_match = (g_pids[order] == q_pids[q])[~removed]  # the ranked list the protocol scores
        if not is_match.any():
            continue
        ranks_of_matches = np.flatnonzero(is_match) + 1  # 1-based
        aps.append(_noninterp_ap(is_match) if ap == "noninterp" else _devkit_trapezoid_ap(is_match))
        inps.append(len(ranks_of_matches) / ranks_of_matches[-1])
        first_ranks.append(ranks_of_matches[0])
    first_ranks = np.array(first_ranks)
    cmc = np.array([np.mean(first_ranks <= k + 1) for k in range(max_rank)])
    return {
        "mAP": float(np.mean(aps)),
        "mINP": float(np.mean(inps)),
        "cmc": cmc,
        "rank1": float(np.mean(first_ranks <= 1)),
        "rank5": float(np.mean(first_ranks <= 5)),
        "rank10": float(np.mean(first_ranks <= 10)),
        "num_valid_queries": len(first_ranks),
    }


def _noninterp_ap(is_match: np.ndarray) -> float:
    """Mean over the matches of the precision at each match."""
    hits, precisions = 0, []
    for position, match in enumerate(is_match):
        if match:
            hits += 1
            precisions.append(hits / (position + 1))
    return sum(precisions) / len(precisions)


def _devkit_trapezoid_ap(is_match: np.ndarray) -> float:
    """compute_AP.m of the Market-1501 devkit, with the junk already removed from the list."""
    num_good = int(is_match.sum())
    old_recall, old_precision, ap, hits = 0.0, 1.0, 0.0, 0
    for position, match in enumerate(is_match):
        if match:
            hits += 1
        recall = hits / num_good
        precision = hits / (position + 1)
        ap += (recall - old_recall) * (old_precision + precision) / 2
        old_recall, old_precision = recall, precision
        if hits == num_good:
            break
    return ap
