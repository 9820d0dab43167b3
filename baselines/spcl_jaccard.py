"""The k-reciprocal Jaccard distance for clustering, done the way SpCL / MMT do it (dense, per-row loops).

This is the benchmark's reference and the test oracle for `uda.cluster.jaccard_distance`. Like
`compute_jaccard_distance` in SpCL's `spcl/utils/faiss_rerank.py` (and MMT's copy of it) it runs an
exact kNN with faiss on the CPU (IndexFlatIP here; their IndexFlatL2 gives the same order on unit
vectors), builds k-reciprocal sets with Python loops, keeps a dense float32 N x N encoding V,
does dense query expansion, an inverted index, a per-row min-sum loop and returns a dense N x N
Jaccard matrix; distances are squared Euclidean 2 - 2 cos on L2-normalised features and the weights
are exp(-d) / sum over the expanded set (they write it as a softmax, which is the same number).

The subtlety: those repositories call `index.search(features, k1)`, so `initial_rank` has only k1
columns (the point itself plus k1 - 1 others), and `initial_rank[i, :k1 + 1]` in
`k_reciprocal_neigh` silently returns those k1 columns: numpy clamps the slice. Their k-reciprocal
sets therefore look at one neighbour fewer than Zhong et al.'s re-ranking, which ranks every point
and really takes k1 + 1. Here the search asks for k1 + 1 (the point itself and k1 others), the
definition `uda.cluster.jaccard_distance` uses, so the two can be compared exactly; with their
convention, k1 = 30 here corresponds to k1 = 31 there.
"""
import numpy as np
import torch
import torch.nn.functional as F


def _k_reciprocal_neighbours(initial_rank: np.ndarray, i: int, k: int) -> np.ndarray:
    """Those of i's first k+1 neighbours that also have i among their first k+1."""
    forward = initial_rank[i, : k + 1]
    backward = initial_rank[forward, : k + 1]
    return forward[np.where(backward == i)[0]]


def compute_jaccard_distance(features: torch.Tensor, k1: int = 30, k2: int = 6) -> np.ndarray:
    """Dense (N, N) float32 k-reciprocal Jaccard distances of (N, D) features (L2-normalised here)."""
    import faiss  # here: importing this module (tests do) must not need the optional faiss

    features = F.normalize(torch.as_tensor(features, dtype=torch.float32), dim=1).cpu()
    num = features.shape[0]
    index = faiss.IndexFlatIP(features.shape[1])
    index.add(features.numpy())
    _, initial_rank = index.search(features.numpy(), max(k1 + 1, k2))

    half_k1 = int(np.around(k1 / 2))
    nn_k1 = [_k_reciprocal_neighbours(initial_rank, i, k1) for i in range(num)]
    nn_k1_half = [_k_reciprocal_neighbours(initial_rank, i, half_k1) for i in range(num)]

    V = np.zeros((num, num), dtype=np.float32)
    for i in range(num):
        k_reciprocal_index = nn_k1[i]
        expansion_index = k_reciprocal_index
        for candidate in k_reciprocal_index:
            candidate_index = nn_k1_half[candidate]
            if len(np.intersect1d(candidate_index, k_reciprocal_index)) > 2 / 3 * len(candidate_index):
                expansion_index = np.append(expansion_index, candidate_index)
        expansion_index = np.unique(expansion_index)
        dist = 2 - 2 * torch.mm(features[i].unsqueeze(0), features[expansion_index].t())
        V[i, expansion_index] = F.softmax(-dist, dim=1).view(-1).numpy()
    del nn_k1, nn_k1_half

    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
        del V_qe
    del initial_rank

    inverted_index = [np.where(V[:, k] != 0)[0] for k in range(num)]
    jaccard_dist = np.zeros((num, num), dtype=np.float32)
    for i in range(num):
        temp_min = np.zeros(num, dtype=np.float32)
        nonzero = np.where(V[i, :] != 0)[0]
        for k in nonzero:
            rows = inverted_index[k]
            temp_min[rows] = temp_min[rows] + np.minimum(V[i, k], V[rows, k])
        jaccard_dist[i] = 1 - temp_min / (2 - temp_min)
    del inverted_index, V

    jaccard_dist[jaccard_dist < 0] = 0.0
    return jaccard_dist
