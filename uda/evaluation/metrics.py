"""Retrieval metrics under the Market-1501 protocol: mAP, mINP and CMC, vectorised over queries.

The protocol, for each query: gallery items with the query's id *and* the query's camera are removed
(they are too easy); every other gallery item with the query's id is a match; everything else,
distractors (id 0) included, is a non-match. A query with no match left is skipped and not counted in
any mean. Junk images (Market's id -1) are not special-cased here: the dataset parsers drop them
before evaluation, so they never reach this function.

Ranking: ascending distance, compared as float32 (float64 input is rounded first). Ties are broken
as a stable sort breaks them: of two gallery items at the same distance, the one earlier in the
gallery ranks first; this is the order ``numpy.argsort(row, kind="stable")`` gives.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import torch

from uda.errors import UdaError

APDefinition = Literal["noninterp", "trapezoid"]
AP_DEFINITIONS: tuple[str, ...] = ("noninterp", "trapezoid")

# Rows per chunk are chosen so one chunk holds about this many (query, gallery) pairs: its float32
# distances, their sorted copy and one boolean mask stay under 40 MB whatever the gallery size.
_PAIRS_PER_CHUNK = 1 << 22
# Pads rows of ranking keys; above every real key (the largest is +inf's bits << 32 | index).
_PAD_KEY = torch.iinfo(torch.int64).max


def evaluate(
    distmat: np.ndarray | torch.Tensor,
    q_pids: np.ndarray | torch.Tensor,
    g_pids: np.ndarray | torch.Tensor,
    q_camids: np.ndarray | torch.Tensor,
    g_camids: np.ndarray | torch.Tensor,
    max_rank: int = 50,
    ap: APDefinition = "noninterp",
    remove_same_camera: bool = True,
) -> dict:
    """Score a (num_query, num_gallery) distance matrix (smaller = more similar).

    AP of a query with n matches, the i-th of them (i = 1..n) at rank r_i (1-based, counted after
    the same-id same-camera items are removed):
      "noninterp" (default; torchreid, fast-reid): AP = (1/n) * sum_i  i / r_i
      "trapezoid" (the official Market-1501 devkit, compute_AP.m): the area under the
          precision-recall curve by the trapezoid rule; recall steps by 1/n at each match, and the
          precision at the left end of that step is the precision just before the match (1 when the
          match is at rank 1):  AP = (1/n) * sum_i ( p_before_i + i / r_i ) / 2,
          p_before_i = (i - 1) / (r_i - 1) if r_i > 1 else 1.
    INP (Ye et al., "Deep Learning for Person Re-identification", TPAMI 2021) = n / r_n, the
    fraction of the list down to the hardest match that are matches; mINP is its mean.
    remove_same_camera=False: no item is removed (a dataset without camera ids; not the Market-1501
    protocol, which removes the query's id seen from the query's camera).
    cmc[k] = fraction of valid queries whose first match is within the top k + 1 (length max_rank;
    entries past the gallery length are 1). rank1/5/10 are cmc at 1, 5, 10, whatever max_rank is.

    distmat may be a numpy array or a tensor on any device (the work runs on that device); ids and
    camera ids are 1-D integer arrays or tensors. Returns floats in [0, 1], cmc as a float64 numpy
    array, and num_valid_queries (queries with at least one match).
    """
    distmat, q_pids, g_pids, q_camids, g_camids = _checked_inputs(distmat, q_pids, g_pids, q_camids, g_camids)
    if ap not in AP_DEFINITIONS:
        raise UdaError(f"unknown AP definition {ap!r}: use one of {', '.join(AP_DEFINITIONS)}")
    if max_rank < 1:
        raise UdaError(f"max_rank must be at least 1, got {max_rank}")

    ap_per_query, inp_per_query, first_rank = _score_in_chunks(distmat, q_pids, g_pids, q_camids, g_camids, ap, remove_same_camera)
    valid = first_rank > 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise UdaError(
            "no query has a match in the gallery" + (" from another camera" if remove_same_camera else "")
            + ": check that query and gallery come from the same dataset and that ids (and camera ids) were parsed"
        )
    first_rank = first_rank[valid]

    def fraction_within(k: torch.Tensor | int) -> torch.Tensor:
        return (first_rank.unsqueeze(-1) <= torch.as_tensor(k)).double().mean(0)

    return {
        "mAP": float(ap_per_query[valid].mean()), "mINP": float(inp_per_query[valid].mean()),
        "cmc": fraction_within(torch.arange(1, max_rank + 1)).numpy(),
        "rank1": float(fraction_within(1)), "rank5": float(fraction_within(5)), "rank10": float(fraction_within(10)),
        "num_valid_queries": num_valid,
    }


def _score_in_chunks(distmat, q_pids, g_pids, q_camids, g_camids, ap, remove_same_camera):
    """_score_queries over blocks of query rows (_PAIRS_PER_CHUNK pairs each: MSMT17's matrix does not fit
    at once); (AP, INP, rank of the first match or 0) per query, on the CPU."""
    num_query, num_gallery = distmat.shape
    rows_per_chunk = max(1, _PAIRS_PER_CHUNK // num_gallery)
    scores = [_score_queries(distmat[start:start + rows_per_chunk], q_pids[start:start + rows_per_chunk], g_pids,
                             q_camids[start:start + rows_per_chunk], g_camids, ap, remove_same_camera)
              for start in range(0, num_query, rows_per_chunk)]
    return tuple(torch.cat(part).cpu() for part in zip(*scores))


def _score_queries(
    dist: torch.Tensor,
    q_pids: torch.Tensor,
    g_pids: torch.Tensor,
    q_camids: torch.Tensor,
    g_camids: torch.Tensor,
    ap: APDefinition,
    remove_same_camera: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AP, INP and first-match rank of each query of a chunk of B rows; (B,) each, rank 0 = no match.

    Sorting each row's distances is the only O(B * G log G) step (float32: twice as fast as sorting
    int64 keys). After it, only the gallery items that share the query's id (its matches and its
    removed items, a handful per query) are looked at: how many items rank before each is found by
    binary search in the sorted row, plus, for a distance shared with other items (a tie), how many of
    those come earlier in the gallery.
    """
    num_queries = dist.shape[0]
    dist = dist.float() + 0.0  # + 0.0 turns -0.0 into +0.0: they compare equal
    sorted_dist = _sort_rows(dist)

    query, item = (g_pids.unsqueeze(0) == q_pids.unsqueeze(1)).nonzero(as_tuple=True)
    removed = (g_camids[item] == q_camids[query]) & remove_same_camera
    # Lay the same-id items out as (B, K) rows padded with a key above every real key, then put
    # each row in ranking order.
    per_query = torch.bincount(query, minlength=num_queries)
    width = max(int(per_query.max()), 1)
    slot = torch.arange(len(query), device=dist.device) - (per_query.cumsum(0) - per_query)[query]
    same_id_keys = torch.full((num_queries, width), _PAD_KEY, dtype=torch.int64, device=dist.device)
    same_id_keys[query, slot] = _ranking_keys(dist[query, item], item)
    same_id_removed = torch.zeros((num_queries, width), dtype=torch.bool, device=dist.device)
    same_id_removed[query, slot] = removed
    same_id_keys, in_rank_order = same_id_keys.sort(dim=1)
    same_id_removed = same_id_removed.gather(1, in_rank_order)

    real = same_id_keys != _PAD_KEY
    is_match = real & ~same_id_removed
    position = _items_before(dist, sorted_dist, torch.where(real, same_id_keys & 0xFFFFFFFF, 0), real)  # 0-based
    removed_before = same_id_removed.cumsum(1) - same_id_removed.long()
    r = (position + 1 - removed_before).double()  # 1-based rank once the removed items are gone
    i = is_match.cumsum(1).double()  # this is the query's i-th match
    precision = i / r
    if ap == "noninterp":
        area = precision
    else:
        precision_before = torch.where(r > 1, (i - 1) / (r - 1).clamp(min=1), torch.ones_like(r))
        area = (precision_before + precision) / 2

    num_matches = is_match.sum(1)
    zero = torch.zeros((), dtype=torch.float64, device=dist.device)
    ap_per_query = torch.where(is_match, area, zero).sum(1) / num_matches.clamp(min=1)
    hardest_rank = torch.where(is_match, r, zero).amax(1)
    inp_per_query = num_matches / hardest_rank.clamp(min=1)
    first_rank = torch.where(is_match, r, torch.inf).amin(1)
    first_rank = torch.where(num_matches > 0, first_rank, zero).long()
    return ap_per_query, inp_per_query, first_rank


def _ranking_keys(dist: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """int64 keys whose ascending order is the ranking: distance first, gallery index on ties.

    A float32's bits read as an int32 order like the float for non-negative values; flipping the 31
    low bits of negative ones makes them order like the float everywhere. The gallery index in the
    low 32 bits makes every key unique, so any sort of the keys gives the stable order.
    """
    bits = dist.float().view(torch.int32)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # bits >> 31 is -1 (all ones) for negatives, 0 otherwise
    return (bits.long() << 32) | index


def _items_before(dist: torch.Tensor, sorted_dist: torch.Tensor, item: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(B, K): how many gallery items rank before item[b, k] in row b (a smaller distance, or the same
    distance and an earlier gallery index); where real is False, anything."""
    value = dist.gather(1, item)
    below = torch.searchsorted(sorted_dist, value)
    tied = real & (torch.searchsorted(sorted_dist, value, right=True) - below > 1)
    rows, cols = tied.nonzero(as_tuple=True)
    gallery = torch.arange(dist.shape[1], device=dist.device)
    for start in range(0, len(rows), 256):  # ties are rare in real distances; a block bounds the (T, G) masks
        r, c = rows[start:start + 256], cols[start:start + 256]
        earlier = (dist[r] == value[r, c].unsqueeze(1)) & (gallery < item[r, c].unsqueeze(1))
        below[r, c] += earlier.sum(1)
    return below


def _sort_rows(values: torch.Tensor) -> torch.Tensor:
    """Each row sorted ascending. On the CPU numpy's SIMD sort is about 8x faster than torch's, but it
    runs on one thread; it releases the GIL, so blocks of rows are sorted side by side, one per torch
    thread (the sort is most of an evaluation's time)."""
    if values.device.type != "cpu":
        return torch.sort(values, dim=1).values
    rows = values.numpy()
    out = np.empty_like(rows)
    blocks = [block for block in np.array_split(np.arange(len(rows)), torch.get_num_threads()) if len(block)]

    def sort_block(block: np.ndarray) -> None:
        view = out[block[0]:block[-1] + 1]
        view[...] = rows[block[0]:block[-1] + 1]
        view.sort(axis=1)

    with ThreadPoolExecutor(len(blocks)) as pool:
        list(pool.map(sort_block, blocks))
    return torch.from_numpy(out)


def _checked_inputs(
    distmat, q_pids, g_pids, q_camids, g_camids
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tensors on distmat's device, or a UdaError naming what does not fit."""
    distmat = torch.as_tensor(distmat)
    if distmat.ndim != 2 or distmat.numel() == 0:
        raise UdaError(
            f"distmat must be a non-empty (num_query, num_gallery) matrix, got shape {tuple(distmat.shape)}"
        )
    if distmat.is_complex() or distmat.dtype == torch.bool:
        raise UdaError(f"distmat must hold real distances, got dtype {distmat.dtype}")
    if distmat.is_floating_point() and bool(torch.isnan(distmat).any()):
        raise UdaError(
            "distmat contains NaN: the features or the distance computation produced NaN; fix them first"
        )
    num_query, num_gallery = distmat.shape

    def ids(name: str, values, expected: int) -> torch.Tensor:
        if not isinstance(values, torch.Tensor):
            values = np.asarray(values)
            if values.dtype.kind not in "iu":
                raise UdaError(f"{name} must hold integer ids, got dtype {values.dtype}")
            values = torch.from_numpy(values)
        elif values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise UdaError(f"{name} must hold integer ids, got dtype {values.dtype}")
        if values.ndim != 1 or len(values) != expected:
            raise UdaError(
                f"{name} must be 1-D of length {expected} to match distmat {tuple(distmat.shape)}, "
                f"got shape {tuple(values.shape)}"
            )
        return values.to(device=distmat.device, dtype=torch.int64)

    return (
        distmat,
        ids("q_pids", q_pids, num_query),
        ids("g_pids", g_pids, num_gallery),
        ids("q_camids", q_camids, num_query),
        ids("g_camids", g_camids, num_gallery),
    )
