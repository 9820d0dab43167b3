"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) on the GPU, in row chunks, without an N x N matrix.

Gives the same numbers as the authors' released code (`baselines/literal_rerank.py`, to 1e-5) on any
input, symmetric or not, including its quirks: the input distances are squared, and row a of the
matrix it works on is column a of the squared (Q+G) x (Q+G) matrix [[q_q, q_g], [q_g^T, g_g]] divided
by that column's maximum. Memory beyond the inputs and the (Q, G) output is O((Q+G) * k1^2) plus one
chunk of rows.
"""
import numpy as np
import torch
from torch import Tensor

from uda.errors import UdaError
from uda.kreciprocal import (
    default_chunk_size,
    jaccard_rows,
    k_reciprocal_encoding,
    query_expansion,
    row_chunks,
    stable_smallest_k,
)


class _StackedSquaredDistances:
    """Rows and entries of S^T, S = [[q_q, q_g], [q_g^T, g_g]] ** 2, read from the three blocks in place.

    The blocks are read where they are (host memory, or the GPU when `re_ranking` could copy them
    there); only the rows and entries asked for are squared (in the input dtype, as numpy does), cast
    to float32 and moved to `device`.
    """

    def __init__(self, q_g: Tensor, q_q: Tensor, g_g: Tensor, device: torch.device):
        """Blocks (Q, G), (Q, Q), (G, G) of one dtype, on the host or on `device`."""
        self.q_g, self.q_q, self.g_g, self.device = q_g, q_q, g_g, device
        self.num_query = q_g.shape[0]
        self.num_all = q_g.shape[0] + q_g.shape[1]

    def _finish(self, values: Tensor) -> Tensor:
        return values.to(self.device).pow(2).float()

    def rows(self, start: int, end: int) -> Tensor:
        """(end - start, Q + G) float32: rows [start, end) of S^T, i.e. columns of S."""
        Q = self.num_query
        parts = []
        if start < Q:  # column a < Q of the stacked matrix is [q_q[:, a]; q_g[a, :]]
            a0, a1 = start, min(end, Q)
            parts.append(torch.cat([self.q_q[:, a0:a1].T, self.q_g[a0:a1]], dim=1))
        if end > Q:  # column Q + b is [q_g[:, b]; g_g[:, b]]
            b0, b1 = max(start, Q) - Q, end - Q
            parts.append(torch.cat([self.q_g[:, b0:b1].T, self.g_g[:, b0:b1].T], dim=1))
        return self._finish(torch.cat(parts))

    def entries(self, rows: Tensor, cols: Tensor) -> Tensor:
        """(P,) float32: S^T[rows, cols] = S[cols, rows] for (P,) int64 indices."""
        Q = self.num_query
        rows, cols = rows.to(self.q_g.device), cols.to(self.q_g.device)
        out = self.q_g.new_empty(rows.shape)
        row_query, col_query = rows < Q, cols < Q
        for mask, block, first, second in (
            (row_query & col_query, self.q_q, cols, rows),  # S[c, r] = q_q[c, r]
            (row_query & ~col_query, self.q_g, rows, cols - Q),  # S[c, r] = q_g^T[c - Q, r]
            (~row_query & col_query, self.q_g, cols, rows - Q),  # S[c, r] = q_g[c, r - Q]
            (~row_query & ~col_query, self.g_g, cols - Q, rows - Q),
        ):
            out[mask] = block[first[mask], second[mask]]
        return self._finish(out)


def _checked_matrices(q_g_dist, q_q_dist, g_g_dist) -> tuple[Tensor, Tensor, Tensor]:
    """The three inputs as tensors of one dtype, with shapes (Q, G), (Q, Q), (G, G)."""
    q_g = torch.as_tensor(q_g_dist)
    if q_g.dim() != 2 or 0 in q_g.shape:
        raise UdaError(f"re_ranking: q_g_dist must be a non-empty (Q, G) matrix, got shape {tuple(q_g.shape)}")
    num_query, num_gallery = q_g.shape
    matrices = {"q_g_dist": q_g, "q_q_dist": torch.as_tensor(q_q_dist), "g_g_dist": torch.as_tensor(g_g_dist)}
    expected = {"q_g_dist": (num_query, num_gallery), "q_q_dist": (num_query,) * 2, "g_g_dist": (num_gallery,) * 2}
    for name, matrix in matrices.items():
        if tuple(matrix.shape) != expected[name]:
            raise UdaError(
                f"re_ranking: {name} has shape {tuple(matrix.shape)}, expected {expected[name]}; "
                "pass q_g (Q, G), q_q (Q, Q), g_g (G, G)"
            )
    dtype = torch.promote_types(torch.promote_types(q_g.dtype, matrices["q_q_dist"].dtype), matrices["g_g_dist"].dtype)
    return tuple(matrix.to(dtype) for matrix in matrices.values())


def _check_finite(matrices: tuple[Tensor, ...]) -> None:
    for name, matrix in zip(("q_g_dist", "q_q_dist", "g_g_dist"), matrices):
        if matrix.is_floating_point() and not bool(torch.isfinite(matrix.sum(dim=1)).all()):  # no N x N temporary
            raise UdaError(f"re_ranking: {name} contains NaN or inf; check the features the distances come from")


def re_ranking(
    q_g_dist: np.ndarray | Tensor,
    q_q_dist: np.ndarray | Tensor,
    g_g_dist: np.ndarray | Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    device: str | torch.device | None = None,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Re-ranked (Q, G) float32 distances: (1 - lambda) * Jaccard + lambda * normalised squared distance.

    q_g_dist (Q, G), q_q_dist (Q, Q), g_g_dist (G, G): numpy arrays or tensors of EUCLIDEAN distances,
    e.g. `pairwise_distance(..., metric="euclidean")` (not squared, not "sqeuclidean": the published
    algorithm squares its input, so squared distances would be raised to the fourth power). Computed
    on `device` (default: CUDA when available) in chunks of `chunk_size` rows (default
    `default_chunk_size(device)`): ranks by a stable top-(k1+1) per row, sparse
    k-reciprocal encoding, Jaccard for the query rows only. The inputs are never copied into a
    (Q+G) x (Q+G) matrix; on a GPU they are copied there as they are when they take less than half its
    free memory, else read from the host in chunks.
    """
    matrices = _checked_matrices(q_g_dist, q_q_dist, g_g_dist)
    num_query, num_gallery = matrices[0].shape
    num_all = num_query + num_gallery
    if k1 < 1 or k2 < 1 or max(k1 + 1, k2) > num_all:
        raise UdaError(f"re_ranking: need 1 <= k1 < Q + G = {num_all} and 1 <= k2 <= Q + G, got k1={k1}, k2={k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise UdaError(f"re_ranking: lambda_value must lie in [0, 1], got {lambda_value}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and sum(m.nbytes for m in matrices) < torch.cuda.mem_get_info(device)[0] // 2:
        matrices = tuple(m.to(device) for m in matrices)  # one copy, then every row and entry is read there
    _check_finite(matrices)
    chunk_size = chunk_size or default_chunk_size(device)
    squared = _StackedSquaredDistances(*matrices, device)

    column_max = torch.cat([squared.rows(s, e).amax(dim=1) for s, e in row_chunks(num_all, chunk_size)])
    if not bool((column_max > 0).all()):
        raise UdaError("re_ranking: some point is at distance 0 from every point; remove duplicated or empty features")
    num_ranks = max(k1 + 1, k2)
    initial_rank = torch.cat(
        [
            stable_smallest_k(squared.rows(s, e) / column_max[s:e, None], num_ranks)[1]
            for s, e in row_chunks(num_all, chunk_size)
        ]
    )

    def normalised_distance(rows: Tensor, cols: Tensor) -> Tensor:
        return squared.entries(rows, cols) / column_max[rows]

    V = k_reciprocal_encoding(initial_rank, k1, normalised_distance, chunk_size)
    V = query_expansion(V, initial_rank, k2, chunk_size)
    V_t = V.transpose()
    final = np.empty((num_query, num_gallery), dtype=np.float32)
    for start, end in row_chunks(num_query, chunk_size):
        jaccard = jaccard_rows(V, V_t, start, end)[:, num_query:]
        original = squared.rows(start, end)[:, num_query:] / column_max[start:end, None]
        final[start:end] = (jaccard * (1 - lambda_value) + original * lambda_value).cpu().numpy()
    return final
