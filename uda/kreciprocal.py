"""k-reciprocal encoding and Jaccard distance (Zhong et al., CVPR 2017) as sparse, chunked torch code.

Re-ranking (`uda.evaluation.rerank`) and clustering (`uda.cluster`) share one recipe on N points:

    initial_rank (N, K)         each point's neighbours, nearest first (itself usually first)
    R(i, k)                     k-reciprocal neighbours: i's first k+1 that also have i in their first k+1
    R*(i)                       R(i, k1) plus every R(c, round(k1/2)), c in R(i, k1), that shares more
                                than 2/3 of its members with R(i, k1)
    V[i, j]                     exp(-d(i, j)) / sum over R*(i), for j in R*(i); zero elsewhere
    V <- mean of k2 rows        local query expansion over initial_rank[i, :k2]
    jaccard(i, j)               1 - t / (2 - t),  t = sum_k min(V[i, k], V[j, k])

V has O(k1^2) nonzeros per row, so it is kept sparse (CSR, `SparseRows`) and nothing here is N x N:
every step runs over chunks of rows with small per-row tensors. The same code runs on the CPU and on
CUDA; all tensors live on the device of `initial_rank` (or of the features for `nearest_neighbours`).
The caller supplies the distance d through `pair_distance`, which is the only thing that differs
between re-ranking (normalised squared distances from given matrices) and clustering (2 - 2 cos).
"""
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

PairDistance = Callable[[Tensor, Tensor], Tensor]
"""d(rows, cols): (P,) int64 row ids and (P,) int64 column ids -> (P,) float32 distances."""

PAIRS_PER_ROW = 512
"""Jaccard pieces pair at most this many (entry, entry) per row of the chunk (about 40 bytes each)."""


class SparseRows(NamedTuple):
    """A sparse (num_rows, num_cols) matrix in CSR form, columns sorted within each row.

    Row i is `col[crow[i]:crow[i+1]]` with values `val[crow[i]:crow[i+1]]`.
    crow: (num_rows + 1,) int64; col: (nnz,) int64; val: (nnz,) float32.
    """

    crow: Tensor
    col: Tensor
    val: Tensor
    num_cols: int

    @property
    def num_rows(self) -> int:
        return self.crow.numel() - 1

    def row_ids(self) -> Tensor:
        """(nnz,) int64: the row of every stored entry."""
        rows = torch.arange(self.num_rows, device=self.crow.device)
        return torch.repeat_interleave(rows, self.crow.diff())

    def transpose(self) -> "SparseRows":
        """The (num_cols, num_rows) transpose, i.e. this matrix in CSC order (rows sorted per column)."""
        order = torch.sort(self.col, stable=True).indices  # entries are row-major: rows stay sorted
        return SparseRows(
            _crow_from_counts(torch.bincount(self.col, minlength=self.num_cols)),
            self.row_ids()[order],
            self.val[order],
            self.num_rows,
        )

    def to_dense(self) -> Tensor:
        """(num_rows, num_cols) dense copy, for tests and small inputs."""
        dense = self.val.new_zeros(self.num_rows, self.num_cols)
        dense[self.row_ids(), self.col] = self.val
        return dense


def _crow_from_counts(counts: Tensor) -> Tensor:
    """(R,) entries per row -> (R + 1,) CSR row pointers."""
    crow = counts.new_zeros(counts.numel() + 1)
    crow[1:] = counts.cumsum(0)
    return crow


def _sparse_from_row_major(rows: Tensor, cols: Tensor, vals: Tensor, shape: tuple[int, int]) -> SparseRows:
    """CSR from COO triples already sorted by (row, col)."""
    counts = torch.bincount(rows, minlength=shape[0])
    return SparseRows(_crow_from_counts(counts), cols, vals, shape[1])


def _segment_positions(starts: Tensor, counts: Tensor) -> Tensor:
    """Concatenation of arange(s, s + c) for every (s, c): (counts.sum(),) int64."""
    shift = starts - (counts.cumsum(0) - counts)  # position p of segment n is p + starts[n] - (its first p)
    shift = torch.repeat_interleave(shift, counts)
    return shift.add_(torch.arange(shift.numel(), device=counts.device))


def default_chunk_size(device: torch.device) -> int:
    """Rows per chunk: 1024 on the CPU (blocks that stay in cache), 4096 on a GPU (fewer, larger kernels)."""
    return 4096 if device.type == "cuda" else 1024


def row_chunks(num_rows: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """(start, end) ranges of at most chunk_size rows covering range(num_rows)."""
    for start in range(0, num_rows, chunk_size):
        yield start, min(start + chunk_size, num_rows)


def stable_smallest_k(values: Tensor, k: int, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The k smallest entries of each row in the order of a stable argsort: by value, ties by index.

    values: (B, M) float; index: (B, M) int64 ids of the entries (default: their column 0..M-1).
    Returns (B, k) values and (B, k) int64 ids. torch.topk leaves ties in an unspecified order; fixing
    it makes the ranks, and all that follows, a function of the distances alone (duplicate images
    give exact ties).
    """
    take = min(k + 1, values.shape[1])
    vals, positions = values.topk(take, dim=1, largest=False, sorted=True)
    ids = positions if index is None else index.gather(1, positions)
    # The k+1 smallest values are well defined; if none of them repeats, so is the order of the first k.
    tied = (vals[:, 1:] == vals[:, :-1]).any(dim=1)
    if tied.any():  # rare: order those rows completely by (value, index) with two stable sorts
        rows = tied.nonzero().squeeze(1)
        row_values = values[rows]
        if index is None:
            row_ids = torch.arange(values.shape[1], device=values.device).expand_as(row_values)
        else:
            row_ids = index[rows]
        by_index = row_ids.sort(dim=1, stable=True)
        by_value = row_values.gather(1, by_index.indices).sort(dim=1, stable=True)
        vals[rows] = by_value.values[:, :take]
        ids[rows] = by_index.values.gather(1, by_value.indices[:, :take])
    return vals[:, :k], ids[:, :k]


def nearest_neighbours(features: Tensor, k: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    """For each row, the k rows of largest cosine similarity (itself included), ties by index.

    features: (N, D) float32 on the compute device, normalised here block by block (rows of
    F.normalize(features), without making that (N, D) copy). Returns (N, k) float32 cosine
    similarities, descending, and (N, k) int64 row ids.
    Each pair of row blocks (I, J), J >= I, is multiplied once and ranks both I's and J's rows: half
    the FLOPs of the full N x N product, which is what dominates on a CPU. Keeps only the running
    top-k, (N, k), never the N x N similarities.
    """
    num = features.shape[0]
    best_val = features.new_full((num, k), float("inf"))  # negated similarities: smaller is nearer
    best_idx = torch.full((num, k), num, dtype=torch.long, device=features.device)

    def merge(start: int, end: int, block: Tensor, col_start: int) -> None:
        # Only entries no farther than a row's current k-th neighbour can enter its list; after the
        # first blocks they are few, and gathering them is cheaper than a top-k over the whole block.
        candidate = block <= best_val[start:end, -1:]
        counts = candidate.sum(dim=1)
        width = int(counts.max())
        if width == 0:
            return
        if width > block.shape[1] // 8:
            vals, ids = stable_smallest_k(block, min(k, block.shape[1]))
        else:
            rows, cols = candidate.nonzero(as_tuple=True)
            slot = torch.arange(rows.numel(), device=rows.device) - (counts.cumsum(0) - counts)[rows]
            vals = block.new_full((end - start, width), float("inf"))
            ids = torch.full((end - start, width), num - col_start, dtype=torch.long, device=block.device)  # -> N
            vals[rows, slot], ids[rows, slot] = block[rows, cols], cols
        candidates_val = torch.cat([best_val[start:end], vals], dim=1)
        candidates_idx = torch.cat([best_idx[start:end], ids + col_start], dim=1)
        best_val[start:end], best_idx[start:end] = stable_smallest_k(candidates_val, k, candidates_idx)

    zero = features.new_zeros(())
    for i0, i1 in row_chunks(num, chunk_size):
        for j0, j1 in row_chunks(num, chunk_size):
            if j0 < i0:
                continue
            rows, cols = F.normalize(features[i0:i1], dim=1), F.normalize(features[j0:j1], dim=1)
            neg_sim = torch.addmm(zero, rows, cols.T, beta=0, alpha=-1)
            merge(i0, i1, neg_sim, j0)
            if j0 != i0:
                merge(j0, j1, neg_sim.T.contiguous(), i0)
    return best_val.neg_(), best_idx


def k_reciprocal_mask(initial_rank: Tensor, rows: Tensor, k: int) -> Tensor:
    """(B, k+1) bool over initial_rank[rows, :k+1]: True where that neighbour also ranks the row in its first k+1.

    initial_rank: (N, >= k+1) int64; rows: (B,) int64. The True entries form R(i, k).
    """
    forward = initial_rank[rows, : k + 1]  # (B, k+1)
    backward = initial_rank[forward, : k + 1]  # (B, k+1, k+1)
    return (backward == rows[:, None, None]).any(dim=2)


def k_reciprocal_expansion(initial_rank: Tensor, rows: Tensor, k1: int, half_mask: Tensor) -> Tensor:
    """(B, W) int64: the expanded set R*(i) of each row, ascending, with N in the unused slots.

    initial_rank: (N, >= k1+1) int64; rows: (B,) int64; half_mask: (N, round(k1/2)+1) bool, the
    `k_reciprocal_mask` of every point for k = round(k1/2). A candidate c in R(i, k1) adds R(c, k1/2)
    when |R(c, k1/2) & R(i, k1)| > 2/3 |R(c, k1/2)| (the same float comparison as the published code).
    """
    num = initial_rank.shape[0]
    forward = initial_rank[rows, : k1 + 1]  # (B, F)
    reciprocal = k_reciprocal_mask(initial_rank, rows, k1)  # (B, F)
    reciprocal_sorted = forward.masked_fill(~reciprocal, num).sort(dim=1).values  # R(i, k1), padded with N
    candidate_members = initial_rank[forward, : half_mask.shape[1]].flatten(1)  # (B, F * H)
    candidate_mask = half_mask[forward].flatten(1)  # (B, F * H): R(c, k1/2) for every forward neighbour c
    position = torch.searchsorted(reciprocal_sorted, candidate_members).clamp_(max=forward.shape[1] - 1)
    in_reciprocal = reciprocal_sorted.gather(1, position) == candidate_members
    overlap = (in_reciprocal & candidate_mask).view(*forward.shape, -1).sum(dim=2)  # (B, F)
    size = candidate_mask.view(*forward.shape, -1).sum(dim=2)
    accepted = reciprocal & (overlap.double() > 2 / 3 * size.double())
    added = candidate_mask & accepted.repeat_interleave(half_mask.shape[1], dim=1)
    members = torch.cat([reciprocal_sorted, candidate_members.masked_fill(~added, num)], dim=1).sort(dim=1).values
    members = members[:, : int((members < num).sum(dim=1).max())]
    duplicate = torch.zeros_like(members, dtype=torch.bool)
    duplicate[:, 1:] = members[:, 1:] == members[:, :-1]
    return members.masked_fill_(duplicate, num)


def k_reciprocal_encoding(
    initial_rank: Tensor, k1: int, pair_distance: PairDistance, chunk_size: int
) -> SparseRows:
    """Sparse V, (N, N): V[i, j] = exp(-d(i, j)) / sum_{j' in R*(i)} exp(-d(i, j')) for j in R*(i), else 0.

    initial_rank: (N, >= k1+1) int64 on the compute device; pair_distance gives d. Each row sums to 1.
    round(k1/2) is Python's round-half-to-even, like np.around in the published code.
    """
    num, device = initial_rank.shape[0], initial_rank.device
    half_k1 = round(k1 / 2)
    half_mask = torch.cat(
        [
            k_reciprocal_mask(initial_rank, torch.arange(s, e, device=device), half_k1)
            for s, e in row_chunks(num, chunk_size)
        ]
    )
    rows_out, cols_out, vals_out = [], [], []
    for start, end in row_chunks(num, chunk_size):
        rows = torch.arange(start, end, device=device)
        members = k_reciprocal_expansion(initial_rank, rows, k1, half_mask)
        valid = members < num
        local_rows = torch.arange(end - start, device=device)[:, None].expand_as(members)[valid]
        cols = members[valid]
        weight = torch.exp(-pair_distance(local_rows + start, cols))
        total = weight.new_zeros(end - start).index_add_(0, local_rows, weight)
        rows_out.append(local_rows + start)
        cols_out.append(cols)
        vals_out.append(weight / total[local_rows])
    return _sparse_from_row_major(torch.cat(rows_out), torch.cat(cols_out), torch.cat(vals_out), (num, num))


def query_expansion(V: SparseRows, initial_rank: Tensor, k2: int, chunk_size: int) -> SparseRows:
    """Local query expansion: row i becomes the mean of the V rows of initial_rank[i, :k2].

    V: (N, N) sparse; initial_rank: (N, >= k2) int64. With k2 == 1, V is returned unchanged, as in the
    published code (it is not replaced by the row of i's nearest neighbour).
    """
    if k2 == 1:
        return V
    num, device = V.num_rows, V.crow.device
    rows_out, cols_out, vals_out = [], [], []
    for start, end in row_chunks(num, chunk_size):
        neighbours = initial_rank[start:end, :k2].flatten()  # (B * k2,)
        starts = V.crow[neighbours]
        counts = V.crow[neighbours + 1] - starts
        owner = torch.repeat_interleave(torch.arange(end - start, device=device).repeat_interleave(k2), counts)
        positions = _segment_positions(starts, counts)
        keys, inverse = torch.unique(owner * num + V.col[positions], sorted=True, return_inverse=True)
        summed = V.val.new_zeros(keys.numel()).index_add_(0, inverse, V.val[positions])
        rows_out.append(keys // num + start)
        cols_out.append(keys % num)
        vals_out.append(summed / k2)
    return _sparse_from_row_major(torch.cat(rows_out), torch.cat(cols_out), torch.cat(vals_out), (num, V.num_cols))


def _pair_budget_chunks(
    V: SparseRows, V_t: SparseRows, start: int, end: int, max_pairs: int
) -> Iterator[tuple[int, int]]:
    """Split rows [start, end) so that no piece pairs more than max_pairs entries (a single row may)."""
    lo = V.crow[start]
    pairs_per_entry = V_t.crow.diff()[V.col[lo : V.crow[end]]]
    cumulative = torch.cat([pairs_per_entry.new_zeros(1), pairs_per_entry.cumsum(0)])
    row_cumulative = cumulative[V.crow[start : end + 1] - lo].cpu()  # (end - start + 1,)
    piece_start = 0
    while piece_start < end - start:
        limit = row_cumulative[piece_start] + max_pairs
        piece_end = int(torch.searchsorted(row_cumulative, limit, right=True)) - 1
        piece_end = min(max(piece_end, piece_start + 1), end - start)
        yield start + piece_start, start + piece_end
        piece_start = piece_end


def _min_sum(V: SparseRows, V_t: SparseRows, start: int, end: int) -> Tensor:
    """(end - start, N) float32: t[i, j] = sum_k min(V[i, k], V[j, k]) for rows i in [start, end).

    Each stored (i, k) is paired with every stored (j, k) of column k (V_t, CSC order) and the minima
    are added into the dense chunk: the cost is the number of such pairs, not N.
    """
    device, num_cols = V.crow.device, V_t.num_cols
    lo, hi = V.crow[start], V.crow[end]
    local_row = torch.repeat_interleave(torch.arange(end - start, device=device), V.crow[start : end + 1].diff())
    cols, vals = V.col[lo:hi], V.val[lo:hi]
    col_starts = V_t.crow[cols]
    col_counts = V_t.crow[cols + 1] - col_starts
    positions = _segment_positions(col_starts, col_counts)  # one per (entry, entry of its column) pair
    keys = torch.repeat_interleave(local_row * num_cols, col_counts).add_(V_t.col[positions])
    minima = torch.minimum(torch.repeat_interleave(vals, col_counts), V_t.val[positions])
    t = vals.new_zeros((end - start) * num_cols)
    t.index_add_(0, keys, minima)
    return t.view(end - start, num_cols)


def jaccard_rows(V: SparseRows, V_t: SparseRows, start: int, end: int, max_pairs: int | None = None) -> Tensor:
    """(end - start, N) float32 dense Jaccard distances 1 - t / (2 - t) of rows [start, end) to every point.

    V: (N, N) sparse encoding (after query expansion); V_t: V.transpose(). Pairs with no shared
    support get t = 0, distance 1. The caller picks the row range (and so the memory, (end - start) x N);
    at most max_pairs (default PAIRS_PER_ROW per row) entry pairs are materialised at a time.
    """
    max_pairs = max_pairs or PAIRS_PER_ROW * (end - start)
    pieces = []
    for s, e in _pair_budget_chunks(V, V_t, start, end, max_pairs):
        t = _min_sum(V, V_t, s, e)
        pieces.append(1 - t / (2 - t))
    return torch.cat(pieces)


def jaccard_pairs(
    V: SparseRows, V_t: SparseRows, chunk_size: int, max_distance: float = 1.0, max_pairs: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Sparse Jaccard distances: (rows, cols, dist) for the pairs with t > 0, sorted by (row, col).

    rows, cols: (P,) int64; dist: (P,) float32, clipped at 0, exactly 0 on the diagonal (t_ii = 1,
    so every point appears). Pairs with no shared support have distance exactly 1 and are left out;
    with max_distance < 1, so are the pairs farther than max_distance (DBSCAN needs only those <= eps).
    Memory: one (piece rows, N) accumulator and at most max_pairs (default PAIRS_PER_ROW * chunk_size)
    entry pairs at a time.
    """
    max_pairs = max_pairs or PAIRS_PER_ROW * chunk_size
    rows_out, cols_out, dist_out = [], [], []
    for start, end in row_chunks(V.num_rows, chunk_size):
        for s, e in _pair_budget_chunks(V, V_t, start, end, max_pairs):
            t = _min_sum(V, V_t, s, e)
            # 1 - t / (2 - t) <= m  <=>  t >= 2 (1 - m) / (2 - m); a little lower, the exact test follows
            t_min = 2 * (1 - max_distance) / (2 - max_distance) * (1 - 1e-4)
            local_rows, cols = (t > t_min).nonzero(as_tuple=True)
            t = t[local_rows, cols]
            rows = local_rows + s
            dist = (1 - t / (2 - t)).clamp_(min=0).masked_fill_(rows == cols, 0.0)
            if max_distance < 1:
                keep = dist <= max_distance
                rows, cols, dist = rows[keep], cols[keep], dist[keep]
            rows_out.append(rows)
            cols_out.append(cols)
            dist_out.append(dist)
    return torch.cat(rows_out), torch.cat(cols_out), torch.cat(dist_out)
