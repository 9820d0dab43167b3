"""The sparse k-reciprocal core against brute-force, dense, one-point-at-a-time answers."""
import numpy as np
import pytest
import torch

from uda.kreciprocal import (
    SparseRows,
    jaccard_pairs,
    jaccard_rows,
    k_reciprocal_encoding,
    k_reciprocal_expansion,
    k_reciprocal_mask,
    nearest_neighbours,
    query_expansion,
    stable_smallest_k,
)


def _stable_argsort(values: np.ndarray) -> np.ndarray:
    return np.argsort(values, axis=1, kind="stable")


def _random_rank(num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random asymmetric distance matrix and its full stable ranking."""
    dist = torch.rand(num, num, generator=torch.Generator().manual_seed(seed))
    return dist, torch.from_numpy(_stable_argsort(dist.numpy()))


def _brute_reciprocal(rank: np.ndarray, i: int, k: int) -> set[int]:
    return {int(c) for c in rank[i, : k + 1] if i in rank[c, : k + 1]}


def _brute_expansion(rank: np.ndarray, i: int, k1: int) -> set[int]:
    base = _brute_reciprocal(rank, i, k1)
    expanded = set(base)
    for c in base:
        candidate = _brute_reciprocal(rank, c, round(k1 / 2))
        if len(candidate & base) > 2 / 3 * len(candidate):
            expanded |= candidate
    return expanded


@pytest.mark.parametrize("with_index", [False, True])
def test_stable_smallest_k_matches_stable_argsort_with_ties(with_index):
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 6, (40, 25), generator=gen).float()  # many ties
    index = torch.stack([torch.randperm(25, generator=gen) + 100 for _ in range(40)]) if with_index else None
    vals, ids = stable_smallest_k(values, 7, index)
    for row in range(40):
        ids_row = index[row].numpy() if with_index else np.arange(25)
        order = np.lexsort((ids_row, values[row].numpy()))[:7]  # by value, then by id
        np.testing.assert_array_equal(ids[row].numpy(), ids_row[order])
        np.testing.assert_array_equal(vals[row].numpy(), values[row].numpy()[order])


@pytest.mark.parametrize("chunk_size", [16, 1000])
def test_nearest_neighbours_match_full_sort(chunk_size):
    gen = torch.Generator().manual_seed(1)
    features = torch.nn.functional.normalize(torch.randn(53, 8, generator=gen), dim=1)
    features[40:45] = features[3:8]  # exact duplicates: tied similarities
    sims, ids = nearest_neighbours(features, 9, chunk_size)
    full = features @ features.T
    expected = _stable_argsort(-full.numpy())[:, :9]
    np.testing.assert_array_equal(ids.numpy(), expected)
    np.testing.assert_allclose(sims.numpy(), np.take_along_axis(full.numpy(), expected, 1), atol=1e-6)


def test_k_reciprocal_mask_and_expansion_match_brute_force():
    num, k1 = 40, 9
    _, rank = _random_rank(num, seed=2)
    rows = torch.arange(num)
    mask = k_reciprocal_mask(rank, rows, k1)
    half_mask = k_reciprocal_mask(rank, rows, round(k1 / 2))
    expansion = k_reciprocal_expansion(rank, rows, k1, half_mask)
    sizes = []
    for i in range(num):
        forward = rank[i, : k1 + 1].numpy()
        assert set(forward[mask[i].numpy()].tolist()) == _brute_reciprocal(rank.numpy(), i, k1)
        members = expansion[i][expansion[i] < num].tolist()
        assert members == sorted(_brute_expansion(rank.numpy(), i, k1))  # sorted, no duplicates
        sizes.append(len(members))
    assert max(sizes) > min(sizes)  # the 2/3 rule accepted some candidates and not others


def _random_sparse(num_rows: int, num_cols: int, density: float, seed: int) -> tuple[SparseRows, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dense = torch.rand(num_rows, num_cols, generator=gen) * (torch.rand(num_rows, num_cols, generator=gen) < density)
    rows, cols = dense.nonzero(as_tuple=True)
    crow = torch.zeros(num_rows + 1, dtype=torch.long)
    crow[1:] = torch.bincount(rows, minlength=num_rows).cumsum(0)
    return SparseRows(crow, cols, dense[rows, cols], num_cols), dense


def test_sparse_rows_transpose_and_dense():
    sparse, dense = _random_sparse(9, 13, 0.3, seed=3)
    torch.testing.assert_close(sparse.to_dense(), dense)
    torch.testing.assert_close(sparse.transpose().to_dense(), dense.T)


def test_encoding_weights_are_normalised_exponentials_over_the_expansion():
    num, k1 = 30, 6
    dist, rank = _random_rank(num, seed=4)
    V = k_reciprocal_encoding(rank, k1, lambda r, c: dist[r, c], chunk_size=7).to_dense()
    for i in range(num):
        members = sorted(_brute_expansion(rank.numpy(), i, k1))
        expected = torch.zeros(num)
        weight = torch.exp(-dist[i, members])
        expected[members] = weight / weight.sum()
        torch.testing.assert_close(V[i], expected)


@pytest.mark.parametrize("k2", [1, 4])
def test_query_expansion_is_the_dense_mean_of_neighbour_rows(k2):
    sparse, dense = _random_sparse(25, 25, 0.2, seed=5)
    _, rank = _random_rank(25, seed=6)
    expanded = query_expansion(sparse, rank, k2, chunk_size=6).to_dense()
    expected = dense if k2 == 1 else dense[rank[:, :k2]].mean(dim=1)
    torch.testing.assert_close(expanded, expected)


def _dense_jaccard(dense: torch.Tensor) -> torch.Tensor:
    t = torch.minimum(dense[:, None, :], dense[None, :, :]).sum(dim=2)
    return 1 - t / (2 - t)


@pytest.mark.parametrize("max_pairs", [30, 1 << 21])
def test_jaccard_rows_match_dense_min_sum(max_pairs):
    sparse, dense = _random_sparse(31, 31, 0.15, seed=7)
    dense = dense / dense.sum(dim=1, keepdim=True).clamp(min=1e-12)  # rows of V sum to 1
    sparse = SparseRows(sparse.crow, sparse.col, dense[sparse.row_ids(), sparse.col], 31)
    expected = _dense_jaccard(dense)
    got = jaccard_rows(sparse, sparse.transpose(), 4, 27, max_pairs=max_pairs)
    torch.testing.assert_close(got, expected[4:27])
    assert (got == 1).any() and (got < 1).any()  # both shared and disjoint supports occur


def test_jaccard_pairs_store_exactly_the_pairs_below_the_cut():
    sparse, dense = _random_sparse(40, 40, 0.1, seed=8)
    dense = dense / dense.sum(dim=1, keepdim=True).clamp(min=1e-12)
    sparse = SparseRows(sparse.crow, sparse.col, dense[sparse.row_ids(), sparse.col], 40)
    expected = _dense_jaccard(dense).clamp(min=0)
    expected.fill_diagonal_(0)
    has_support = dense.sum(dim=1) > 0
    for max_distance in (1.0, 0.9):
        rows, cols, dist = jaccard_pairs(sparse, sparse.transpose(), chunk_size=9, max_distance=max_distance)
        keep = (expected < 1) & (expected <= max_distance) & has_support[:, None] & has_support[None, :]
        assert set(zip(rows.tolist(), cols.tolist())) == set(zip(*[x.tolist() for x in keep.nonzero(as_tuple=True)]))
        torch.testing.assert_close(dist, expected[rows, cols])
    assert len(rows) < int(((expected < 1) & has_support[:, None] & has_support[None, :]).sum())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_neighbours_and_jaccard():
    gen = torch.Generator().manual_seed(9)
    features = torch.nn.functional.normalize(torch.randn(70, 8, generator=gen), dim=1)
    features[50:55] = features[3:8]
    sims, ids = nearest_neighbours(features.cuda(), 9, 16)
    cpu_sims, cpu_ids = nearest_neighbours(features, 9, 16)
    np.testing.assert_array_equal(ids.cpu().numpy(), cpu_ids.numpy())
    torch.testing.assert_close(sims.cpu(), cpu_sims)
    dist, rank = _random_rank(40, seed=10)
    encode = lambda d, r: query_expansion(k_reciprocal_encoding(r, 8, lambda a, b: d[a, b], 7), r, 3, 7)  # noqa: E731
    V, V_cuda = encode(dist, rank), encode(dist.cuda(), rank.cuda())
    torch.testing.assert_close(V_cuda.to_dense().cpu(), V.to_dense())
    torch.testing.assert_close(
        jaccard_rows(V_cuda, V_cuda.transpose(), 0, 40).cpu(), jaccard_rows(V, V.transpose(), 0, 40)
    )
