"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), step by step as in the authors' released code.

Slow (Python loops over every point, dense (Q+G) x (Q+G) matrices) and kept only as the reference
that `uda.evaluation.rerank.re_ranking` is tested against. Every quirk of the released code is kept:
the input is squared, each column is divided by its maximum and the matrix is then transposed (so
row a holds column a of the squared matrix; this matters when the input is not symmetric), the
expansion set uses R(c, round(k1 / 2)) with numpy's round-half-to-even, query expansion is skipped
when k2 == 1, and the final blend uses the normalised squared distance, not the input.

One deliberate choice: `np.argsort(kind="stable")`, so that tied distances are ranked by index
(the released code uses numpy's default, unstable quicksort, whose order on ties is unspecified).
"""
import numpy as np


def _k_reciprocal_neighbours(initial_rank: np.ndarray, i: int, k: int) -> np.ndarray:
    """R(i, k): those of i's first k+1 neighbours that also have i among their first k+1."""
    forward = initial_rank[i, : k + 1]
    backward = initial_rank[forward, : k + 1]
    keep = np.where(backward == i)[0]
    return forward[keep]


def re_ranking_literal(
    q_g_dist: np.ndarray,
    q_q_dist: np.ndarray,
    g_g_dist: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray:
    """Re-ranked (Q, G) float32 distances from (Q, G), (Q, Q), (G, G) Euclidean distances."""
    num_query = q_g_dist.shape[0]
    original_dist = np.concatenate(
        [
            np.concatenate([q_q_dist, q_g_dist], axis=1),
            np.concatenate([q_g_dist.T, g_g_dist], axis=1),
        ],
        axis=0,
    )
    original_dist = np.power(original_dist, 2).astype(np.float32)
    original_dist = np.transpose(original_dist / np.max(original_dist, axis=0))
    num_all = original_dist.shape[0]
    initial_rank = np.argsort(original_dist, axis=1, kind="stable")
    half_k1 = int(np.around(k1 / 2))

    V = np.zeros_like(original_dist, dtype=np.float32)
    for i in range(num_all):
        k_reciprocal_index = _k_reciprocal_neighbours(initial_rank, i, k1)
        expansion_index = k_reciprocal_index
        for candidate in k_reciprocal_index:
            candidate_index = _k_reciprocal_neighbours(initial_rank, candidate, half_k1)
            overlap = len(np.intersect1d(candidate_index, k_reciprocal_index))
            if overlap > 2 / 3 * len(candidate_index):
                expansion_index = np.append(expansion_index, candidate_index)
        expansion_index = np.unique(expansion_index)
        weight = np.exp(-original_dist[i, expansion_index])
        V[i, expansion_index] = weight / np.sum(weight)

    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(num_all):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe

    inverted_index = [np.where(V[:, k] != 0)[0] for k in range(num_all)]
    jaccard_dist = np.zeros((num_query, num_all), dtype=np.float32)
    for i in range(num_query):
        temp_min = np.zeros(num_all, dtype=np.float32)
        nonzero = np.where(V[i, :] != 0)[0]
        for k in nonzero:
            rows = inverted_index[k]
            temp_min[rows] = temp_min[rows] + np.minimum(V[i, k], V[rows, k])
        jaccard_dist[i] = 1 - temp_min / (2 - temp_min)

    final_dist = jaccard_dist * (1 - lambda_value) + original_dist[:num_query] * lambda_value
    return final_dist[:, num_query:]
