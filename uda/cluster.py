"""Target pseudo-labels: features -> k-reciprocal Jaccard distance -> DBSCAN -> labels -> cluster centres.

The clustering step of the adaptation loop (SpCL / MMT recipe); `pseudo_label_round` is one whole
round of it, as adapt.py runs it each epoch. The Jaccard distance is built by the
sparse k-reciprocal core (`uda.kreciprocal`) on the GPU when there is one, and is handed to DBSCAN as a
sparse matrix: only pairs that share k-reciprocal support (Jaccard < 1) are stored, so the step fits
MSMT17-sized target sets where the dense N x N version does not.
"""
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import torch
import torch.distributed
import torch.nn.functional as F
from sklearn.cluster import DBSCAN, KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix
from torch import Tensor

from uda.datasets import ReIDDataset
from uda.distributed import DistInfo
from uda.errors import ClusteringError, ConfigError, UdaError
from uda.kreciprocal import (
    PairDistance,
    default_chunk_size,
    jaccard_pairs,
    k_reciprocal_encoding,
    nearest_neighbours,
    query_expansion,
)

KNN_BACKENDS = ("torch", "faiss")  # exact kNN: chunked torch top-k (GPU when there is one) | faiss.IndexFlatIP


def _checked_features(features: np.ndarray | Tensor) -> Tensor:
    features = torch.as_tensor(features)
    if features.dim() != 2 or features.shape[0] == 0:
        raise ClusteringError(f"features must be a non-empty (N, D) matrix, got shape {tuple(features.shape)}")
    row_sums = features.sum(dim=1)  # NaN or inf anywhere in a row shows here, without an (N, D) temporary
    if not bool(torch.isfinite(row_sums).all()):
        bad = int((~torch.isfinite(row_sums)).sum())
        raise ClusteringError(
            f"{bad} of {features.shape[0]} feature vectors contain NaN or inf; "
            "check the model (NaN loss?) before clustering"
        )
    return features


def _faiss_neighbours(features: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(N, k) cosine similarities and (N, k) int64 ids of exact neighbours from faiss.IndexFlatIP, on the host."""
    import faiss  # the optional backend: imported only when asked for

    host = F.normalize(features, dim=1).cpu().numpy()
    index = faiss.IndexFlatIP(host.shape[1])
    index.add(host)
    similarities, neighbours = index.search(host, k)
    return torch.from_numpy(similarities).to(features.device), torch.from_numpy(neighbours).to(features.device)


def _squared_euclidean_distance(features: Tensor, neighbour_sims: Tensor, initial_rank: Tensor) -> PairDistance:
    """d(rows, cols) = 2 - 2 cos(f_row, f_col), i.e. squared Euclidean on L2-normalised features.

    Most pairs asked for are among the row's kNN, whose similarities the search already has; only
    the others are gathered, normalised and multiplied (D floats each), in blocks of a few MB.
    """

    def distance(rows: Tensor, cols: Tensor) -> Tensor:
        sims = features.new_empty(rows.shape)
        for start in range(0, rows.numel(), 1 << 16):
            r, c = rows[start : start + (1 << 16)], cols[start : start + (1 << 16)]
            match = initial_rank[r] == c[:, None]  # (P, K): at most one True per pair
            found = match.any(dim=1)
            block = (neighbour_sims[r] * match).sum(dim=1)
            missing = (~found).nonzero().squeeze(1)
            for m in missing.split(max(1, (1 << 22) // features.shape[1])):
                unit_r, unit_c = F.normalize(features[r[m]], dim=1), F.normalize(features[c[m]], dim=1)
                block[m] = (unit_r * unit_c).sum(dim=1)
            sims[start : start + r.numel()] = block
        return 2 - 2 * sims

    return distance


def jaccard_distance(
    features: np.ndarray | Tensor,
    k1: int = 30,
    k2: int = 6,
    device: str | torch.device | None = None,
    knn_backend: str = "torch",
    chunk_size: int | None = None,
    max_distance: float = 1.0,
) -> scipy.sparse.csr_matrix:
    """(N, N) sparse k-reciprocal Jaccard distances of (N, D) features, for DBSCAN.

    Features are L2-normalised (block by block: no normalised copy is kept); neighbours are the exact
    top-(k1+1) by cosine similarity (the point itself included), from chunked matmul + top-k on
    `device` (default: CUDA when available) or from faiss.IndexFlatIP (knn_backend="faiss");
    d(i, j) = 2 - 2 cos for the weights; chunk_size: rows per block (default: `default_chunk_size`).
    Stored entries are the pairs with Jaccard < 1, float32, clipped at >= 0; the diagonal is stored
    explicitly as 0. A pair that is not stored is at distance exactly 1. Equals
    `baselines.spcl_jaccard` to 1e-5.
    max_distance < 1 stores only the pairs within it: pass DBSCAN's eps (or more) to keep the matrix
    small on large sets, since `pseudo_labels` looks at nothing farther (about 25 instead of 800 pairs
    per point on re-ID features).
    """
    features = _checked_features(features)
    num = features.shape[0]
    if not (1 <= k1 < num and 1 <= k2 <= num):
        raise ClusteringError(
            f"k-reciprocal Jaccard needs 1 <= k1 < N and 1 <= k2 <= N; got k1={k1}, k2={k2} for N={num} features"
        )
    if not 0 < max_distance <= 1:
        raise ClusteringError(f"max_distance must lie in (0, 1], got {max_distance}")
    if knn_backend not in KNN_BACKENDS:
        raise ClusteringError(f"knn_backend must be 'torch' or 'faiss', got {knn_backend!r}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    features = features.to(device=device, dtype=torch.float32)  # normalised where used, not copied
    chunk_size = chunk_size or default_chunk_size(device)

    num_ranks = max(k1 + 1, k2)
    if knn_backend == "faiss":
        neighbour_sims, initial_rank = _faiss_neighbours(features, num_ranks)
    else:
        neighbour_sims, initial_rank = nearest_neighbours(features, num_ranks, chunk_size)
    squared_euclidean = _squared_euclidean_distance(features, neighbour_sims, initial_rank)
    V = k_reciprocal_encoding(initial_rank, k1, squared_euclidean, chunk_size)
    V = query_expansion(V, initial_rank, k2, chunk_size)
    del initial_rank, neighbour_sims
    rows, cols, dist = jaccard_pairs(V, V.transpose(), chunk_size, max_distance)
    del V
    index_dtype = np.int32 if rows.numel() < np.iinfo(np.int32).max else np.int64
    indptr = np.zeros(num + 1, dtype=index_dtype)
    indptr[1:] = torch.bincount(rows, minlength=num).cumsum(0).cpu().numpy()
    return scipy.sparse.csr_matrix(
        (dist.cpu().numpy(), cols.cpu().numpy().astype(index_dtype), indptr), shape=(num, num)
    )


def remove_camera_means(features: np.ndarray | Tensor, camids: np.ndarray | Tensor) -> Tensor:
    """(N, D) features minus the mean feature of their camera, L2-normalised again.

    Why: a camera's background and lighting shift all of its images the same way, so on a new domain
    the nearest neighbours of an image are often other people in the same camera. Removing each
    camera's mean before clustering (as camera-aware UDA methods do) lets DBSCAN group the same
    person across cameras. Used for clustering only; the features themselves are unchanged.
    """
    features = _checked_features(features).float()
    camids = torch.as_tensor(camids, device=features.device).long()
    if camids.shape != (features.shape[0],):
        raise ClusteringError(f"camids must have shape ({features.shape[0]},) to match the features, got {tuple(camids.shape)}")
    _, cams = torch.unique(camids, return_inverse=True)
    counts = torch.bincount(cams).float()
    means = features.new_zeros(int(counts.numel()), features.shape[1]).index_add_(0, cams, features) / counts[:, None]
    return F.normalize(features - means[cams], dim=1)


def check_camera_normalize(camera_normalize: bool, target: ReIDDataset) -> None:
    """cluster.camera_normalize needs the target's camera ids (custom data may have none). adapt checks it
    at its start, a grid when it is read: not after the grid's source models have trained."""
    if camera_normalize and not target.has_cameras:
        raise ConfigError(
            f"cluster.camera_normalize=true needs camera ids, and {target.name} ({target.root}) has none: "
            f"pass --opts cluster.camera_normalize=false, or give its images cameras (names c<N>_..., or a camid column)"
        )


def pseudo_labels(
    dist: scipy.sparse.csr_matrix, eps: float = 0.6, min_samples: int = 4, keep_outliers: bool = False
) -> np.ndarray:
    """(N,) int64 DBSCAN labels 0..C-1 from a sparse precomputed distance matrix (`jaccard_distance`).

    Stored entries <= eps are neighbours (explicitly stored zeros included); missing entries are not,
    which is right because they stand for distance 1 > eps. Outliers get -1, or with keep_outliers
    each its own new label C, C+1, ... in index order (SpCL's un-clustered instances). If the matrix
    was built with max_distance < 1, eps must not exceed it.
    """
    if not scipy.sparse.issparse(dist):
        raise ClusteringError("pseudo_labels needs the sparse matrix of jaccard_distance (stored = closer than 1)")
    if not 0 < eps < 1:
        raise ClusteringError(
            f"eps must lie in (0, 1) for a sparse Jaccard matrix (missing pairs are at distance 1), got {eps}"
        )
    num = dist.shape[0]
    dist = scipy.sparse.csr_matrix(dist)
    within = dist.data <= eps  # only these can be neighbours: same neighbourhoods, less for sklearn to copy
    indptr = np.concatenate([[0], np.cumsum(within)])[dist.indptr]
    dist = scipy.sparse.csr_matrix((dist.data[within], dist.indices[within], indptr), shape=dist.shape)
    labels = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(dist).astype(np.int64)
    num_clusters = int(labels.max()) + 1
    if num_clusters == 0:
        raise ClusteringError(
            f"DBSCAN found no cluster among {num} points at eps={eps}, min_samples={min_samples}; "
            f"try a larger eps or a smaller min_samples, or check that the features are trained"
        )
    if keep_outliers:
        outliers = labels == -1
        labels[outliers] = num_clusters + np.arange(int(outliers.sum()))
    return labels


def cluster_centers(features: np.ndarray | Tensor, labels: np.ndarray | Tensor) -> Tensor:
    """(C, D) L2-normalised mean feature of each cluster 0..C-1; label -1 (outliers) is ignored.

    features: (N, D); labels: (N,) int. The centres initialise the target classifier, on the device
    of `features`.
    """
    features = _checked_features(features).float()
    labels = torch.as_tensor(labels, device=features.device).long()
    if labels.shape != (features.shape[0],):
        raise ClusteringError(
            f"labels must have shape ({features.shape[0]},) to match the features, got {tuple(labels.shape)}"
        )
    clustered = labels >= 0
    num_clusters = int(labels.max()) + 1 if bool(clustered.any()) else 0
    counts = torch.bincount(labels[clustered], minlength=num_clusters)
    if num_clusters == 0 or bool((counts == 0).any()):
        raise ClusteringError(
            f"cluster labels must cover 0..C-1 with no gap; got {num_clusters} labels, {int((counts == 0).sum())} empty"
        )
    # outliers are summed into an extra row that is dropped: no copy of the clustered features
    sums = features.new_zeros(num_clusters + 1, features.shape[1])
    sums.index_add_(0, labels.masked_fill(~clustered, num_clusters), features)
    return F.normalize(sums[:num_clusters] / counts[:, None], dim=1)


def cluster_stats(labels: np.ndarray, true_ids: np.ndarray | None = None) -> dict[str, int | float]:
    """Cluster count and outlier fraction; with true ids (diagnostics only), agreement with them.

    labels: (N,) int, -1 = outlier. Agreement is measured on the clustered points only (labels >= 0),
    the outlier fraction telling how many were left out:
      nmi, ari: sklearn's normalized_mutual_info_score / adjusted_rand_score (labels vs true ids);
      pairwise_precision = #pairs in one cluster with one true id / #pairs in one cluster;
      pairwise_recall    = #pairs in one cluster with one true id / #pairs with one true id;
    pairs are unordered pairs of distinct clustered points, counted from the contingency table
    (sum of n(n-1)/2 over its cells, rows, columns); a ratio with no pair to count is 0.
    """
    labels = np.asarray(labels)
    clustered = labels >= 0
    stats = {
        "num_clusters": int(len(np.unique(labels[clustered]))),
        "outlier_fraction": float(1 - clustered.mean()) if labels.size else 0.0,
    }
    if true_ids is None:
        return stats
    true_ids = np.asarray(true_ids)
    if true_ids.shape != labels.shape:
        raise ClusteringError(f"true_ids must have the shape of labels {labels.shape}, got {true_ids.shape}")
    labels, true_ids = labels[clustered], true_ids[clustered]
    if labels.size == 0:
        return {**stats, "nmi": 0.0, "ari": 0.0, "pairwise_precision": 0.0, "pairwise_recall": 0.0}
    table = contingency_matrix(labels, true_ids, sparse=True)

    def pairs(counts: np.ndarray) -> float:
        counts = np.asarray(counts, dtype=np.float64)
        return float((counts * (counts - 1) / 2).sum())

    same_both = pairs(table.data)
    same_cluster = pairs(table.sum(axis=1))
    same_id = pairs(table.sum(axis=0))
    return {
        **stats,
        "nmi": float(normalized_mutual_info_score(true_ids, labels)),
        "ari": float(adjusted_rand_score(true_ids, labels)),
        "pairwise_precision": same_both / same_cluster if same_cluster else 0.0,
        "pairwise_recall": same_both / same_id if same_id else 0.0,
    }


@dataclass
class PseudoLabels:
    """One clustering round's outcome: labels (N,) int64 (-1 = outlier), centres (C, D) L2-normalised
    mean memory features of the clusters (on the features' device), and `cluster_stats`."""

    labels: np.ndarray
    centers: Tensor
    stats: dict[str, int | float]


CLUSTER_METHODS = ("dbscan", "kmeans")


def kmeans_labels(features: Tensor, num_clusters: int, seed: int = 0) -> np.ndarray:
    """(N,) labels 0..num_clusters-1 from k-means on L2-normalised features (MMT's pseudo-labels: a
    cluster count given in advance, every point labelled, no outliers). sklearn's Lloyd k-means, one
    k-means++ start, seeded: the same features give the same labels."""
    features = _checked_features(features)
    if not 2 <= num_clusters <= features.shape[0]:
        raise ClusteringError(f"k-means needs 2 <= cluster.num_clusters <= {features.shape[0]} (the points), got {num_clusters}")
    points = F.normalize(features.float(), dim=1).cpu().numpy()
    return KMeans(num_clusters, n_init=1, random_state=seed).fit_predict(points).astype(np.int64)


def pseudo_label_round(
    features: Tensor,
    camids: Tensor,
    *,
    k1: int,
    k2: int,
    eps: float,
    min_samples: int,
    keep_outliers: bool = False,
    knn_backend: str = "torch",
    camera_normalize: bool = False,
    method: str = "dbscan",
    num_clusters: int = 500,
    seed: int = 0,
    device: torch.device | None = None,
    true_ids: np.ndarray | None = None,
    dist: DistInfo = DistInfo(),
) -> PseudoLabels:
    """The target memory (N, D) -> [camera means removed] -> Jaccard -> DBSCAN -> labels, centres, stats
    (method="kmeans": k-means with `num_clusters` on the [camera-normalised] features instead of
    Jaccard + DBSCAN; k1, k2, eps, min_samples unused).

    The keyword settings are adapt's `cluster.*` keys. Under torchrun the main process clusters and
    broadcasts the labels, so every GPU trains on the same clusters; a clustering error travels the same
    way, so every process stops with the main one's message instead of waiting for labels that never
    come. Centres are taken from the features themselves (camera normalisation only guides the
    grouping). `true_ids` feed the diagnostic statistics only (NMI, ARI, pairwise P/R), never the labels.
    """
    if method not in CLUSTER_METHODS:
        raise ClusteringError(f"cluster.method must be one of {', '.join(CLUSTER_METHODS)}, got {method!r}")
    labels: list = [None]
    if dist.is_main:
        try:
            grouped = remove_camera_means(features, camids) if camera_normalize else features
            if method == "kmeans":
                labels[0] = kmeans_labels(grouped, num_clusters, seed)
            else:
                distances = jaccard_distance(grouped, k1=k1, k2=k2, device=device, knn_backend=knn_backend, max_distance=eps)
                labels[0] = pseudo_labels(distances, eps=eps, min_samples=min_samples, keep_outliers=keep_outliers)
        except UdaError as exc:
            labels[0] = exc
    if dist.enabled:
        torch.distributed.broadcast_object_list(labels, src=0)
    if isinstance(labels[0], UdaError):
        raise labels[0]
    return PseudoLabels(labels[0], cluster_centers(features, labels[0]), cluster_stats(labels[0], true_ids))
