"""Clustering step: sparse Jaccard vs the SpCL-style dense oracle, DBSCAN labels, centres, statistics."""
import numpy as np
import pytest
import scipy.sparse
import torch
import torch.nn.functional as F
from sklearn.cluster import DBSCAN

from baselines.spcl_jaccard import compute_jaccard_distance
from uda.cluster import cluster_centers, cluster_stats, jaccard_distance, pseudo_label_round, pseudo_labels
from uda.distributed import DistInfo
from uda.errors import ClusteringError


def _clustered_features(num_ids: int, per_id: int, noise: float, seed: int, dim: int = 32):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(num_ids, dim, generator=gen), dim=1)
    ids = torch.arange(num_ids).repeat_interleave(per_id)
    features = centres[ids] + noise * torch.randn(len(ids), dim, generator=gen)
    order = torch.randperm(len(ids), generator=gen)
    return features[order], ids[order].numpy()


def _stored(dist: scipy.sparse.csr_matrix) -> np.ndarray:
    """Dense copy where pairs that are not stored are at distance 1."""
    coo = dist.tocoo()
    dense = np.ones(dist.shape, dtype=np.float32)
    dense[coo.row, coo.col] = coo.data
    return dense


@pytest.mark.parametrize("knn_backend", ["torch", "faiss"])
@pytest.mark.parametrize("num,k1,k2,noise", [(60, 10, 4, 0.8), (150, 20, 6, 0.5), (200, 30, 6, 1.0), (90, 7, 1, 0.6)])
def test_jaccard_distance_matches_spcl_style_oracle(knn_backend, num, k1, k2, noise):
    pytest.importorskip("faiss")  # the oracle's kNN
    features, _ = _clustered_features(num // 10, 10, noise, seed=num)
    expected = compute_jaccard_distance(features, k1=k1, k2=k2)
    dist = jaccard_distance(features, k1=k1, k2=k2, device="cpu", knn_backend=knn_backend, chunk_size=32)
    assert dist.dtype == np.float32 and dist.shape == (num, num)
    np.testing.assert_allclose(_stored(dist), expected, rtol=0, atol=1e-5)
    stored = np.zeros((num, num), dtype=bool)
    coo = dist.tocoo()
    stored[coo.row, coo.col] = True
    np.testing.assert_array_equal(stored, expected < 1)  # exactly the pairs with shared support
    assert stored.diagonal().all() and (dist.diagonal() == 0).all()
    assert (dist.data >= 0).all()


def test_max_distance_keeps_only_the_close_pairs():
    features, _ = _clustered_features(8, 10, 0.7, seed=1)
    full = jaccard_distance(features, k1=12, k2=4, device="cpu")
    cut = jaccard_distance(features, k1=12, k2=4, device="cpu", max_distance=0.6)
    assert 0 < cut.nnz < full.nnz
    dense_full = _stored(full)
    np.testing.assert_array_equal(_stored(cut), np.where(dense_full <= 0.6, dense_full, 1.0))


def test_sklearn_dbscan_treats_stored_zeros_as_neighbours_and_missing_entries_as_far():
    # 0-1-2 chained by explicitly stored zeros; 3 and 4 have no stored entry between them
    rows, cols = [0, 1, 1, 2, 0, 2], [1, 0, 2, 1, 2, 0]
    dist = scipy.sparse.csr_matrix((np.zeros(6, dtype=np.float32), (rows, cols)), shape=(5, 5))
    assert dist.nnz == 6  # the zeros are stored
    labels = DBSCAN(eps=0.5, min_samples=3, metric="precomputed").fit_predict(dist)
    np.testing.assert_array_equal(labels, [0, 0, 0, -1, -1])


def _block_distances(groups: list[list[int]], num: int, within: float = 0.2) -> scipy.sparse.csr_matrix:
    dense = np.ones((num, num), dtype=np.float32)
    for group in groups:
        dense[np.ix_(group, group)] = within
    np.fill_diagonal(dense, 0)
    rows, cols = np.nonzero(dense < 1)
    return scipy.sparse.csr_matrix((dense[rows, cols], (rows, cols)), shape=(num, num))


def test_pseudo_labels_on_planted_groups_and_outliers():
    groups = [[0, 2, 4, 6, 8], [1, 3, 5, 7], [9, 10, 11, 12, 13, 14]]
    dist = _block_distances(groups, 17)  # 15 and 16 are far from everything
    labels = pseudo_labels(dist, eps=0.6, min_samples=4)
    assert labels.dtype == np.int64
    for group in groups:
        assert len(set(labels[group])) == 1 and labels[group[0]] >= 0
    assert sorted(set(labels[:15])) == [0, 1, 2]
    np.testing.assert_array_equal(labels[15:], [-1, -1])
    kept = pseudo_labels(dist, eps=0.6, min_samples=4, keep_outliers=True)
    np.testing.assert_array_equal(kept[:15], labels[:15])
    np.testing.assert_array_equal(kept[15:], [3, 4])  # each outlier its own new label


def test_pseudo_labels_recover_planted_identities_end_to_end():
    features, ids = _clustered_features(6, 12, 0.05, seed=2)
    labels = pseudo_labels(jaccard_distance(features, k1=10, k2=4, device="cpu"), eps=0.6, min_samples=4)
    assert (labels >= 0).all()
    contingency = np.zeros((labels.max() + 1, ids.max() + 1), dtype=int)
    np.add.at(contingency, (labels, ids), 1)
    assert contingency.shape == (6, 6) and ((contingency > 0).sum(axis=1) == 1).all()  # a permutation


def test_no_cluster_raises_a_clear_error():
    dist = _block_distances([], 10)
    with pytest.raises(ClusteringError, match="no cluster among 10 points"):
        pseudo_labels(dist, eps=0.6, min_samples=4)
    with pytest.raises(ClusteringError, match="eps"):
        pseudo_labels(dist, eps=1.0)
    with pytest.raises(ClusteringError, match="sparse"):
        pseudo_labels(dist.toarray())


def test_non_finite_features_raise():
    features, _ = _clustered_features(3, 10, 0.1, seed=3)
    features[4, 2] = float("nan")
    with pytest.raises(ClusteringError, match="1 of 30 feature vectors"):
        jaccard_distance(features, k1=5, k2=2)
    with pytest.raises(ClusteringError, match="NaN"):
        cluster_centers(features, np.zeros(30, dtype=int))


def test_cluster_centers_are_normalised_means_ignoring_outliers():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0], [0.0, -2.0], [5.0, 5.0]])
    labels = np.array([0, 0, 1, 1, -1])
    centres = cluster_centers(features, labels)
    expected = torch.tensor([[0.5, 0.5], [1.5, 1.0]])
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(centres, expected)
    with pytest.raises(ClusteringError, match="no gap"):
        cluster_centers(features, np.array([0, 0, 2, 2, -1]))


def test_cluster_stats_on_hand_computed_examples():
    perfect = cluster_stats(np.array([1, 1, 0, 0, 0, -1]), np.array([7, 7, 3, 3, 3, 9]))
    assert perfect["num_clusters"] == 2 and perfect["outlier_fraction"] == pytest.approx(1 / 6)
    for key in ("nmi", "ari", "pairwise_precision", "pairwise_recall"):
        assert perfect[key] == pytest.approx(1.0)
    # clusters {0,1,2}, {3,4}; true ids {0,1}, {2,3,4}; point 5 is an outlier (excluded from pairs)
    stats = cluster_stats(np.array([0, 0, 0, 1, 1, -1]), np.array([5, 5, 6, 6, 6, 6]))
    # same-cluster pairs: 3 + 1 = 4; same-id pairs among clustered points: 1 + 3 = 4; both: (0,1), (3,4) = 2
    assert stats["pairwise_precision"] == pytest.approx(2 / 4)
    assert stats["pairwise_recall"] == pytest.approx(2 / 4)
    assert 0 < stats["nmi"] < 1 and stats["ari"] < 1
    assert cluster_stats(np.array([0, 0, 1, -1, -1])) == {"num_clusters": 2, "outlier_fraction": 0.4}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_jaccard_distance_on_cuda_matches_the_oracle():
    pytest.importorskip("faiss")
    features, _ = _clustered_features(15, 10, 0.8, seed=11)
    expected = compute_jaccard_distance(features, k1=20, k2=6)
    dist = jaccard_distance(features, k1=20, k2=6, device="cuda", chunk_size=64)
    np.testing.assert_allclose(_stored(dist), expected, rtol=0, atol=1e-5)
    centres = cluster_centers(features.cuda(), pseudo_labels(dist))
    assert centres.is_cuda and torch.allclose(centres.norm(dim=1), torch.ones(1, device="cuda"))


def test_remove_camera_means_subtracts_each_cameras_mean_and_renormalises():
    from uda.cluster import remove_camera_means

    features = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    camids = torch.tensor([7, 7, 2, 2])
    out = remove_camera_means(features, camids)
    expected = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])  # means (2, 0) and (0, 3)
    assert torch.allclose(out, expected, atol=1e-6)
    with pytest.raises(ClusteringError, match="camids must have shape"):
        remove_camera_means(features, camids[:3])


# ---------------------------------------------------------------- one whole round (adapt.py's clustering step)


def test_camera_normalize_groups_people_across_cameras_when_cameras_dominate():
    """Planted features: 6 people x 2 cameras x 5 images, a camera offset larger than the person
    signal. Plain clustering groups by camera; with camera_normalize it recovers the people."""
    gen = torch.Generator().manual_seed(0)
    people = F.normalize(torch.randn(6, 64, generator=gen), dim=1)
    cameras = 3 * F.normalize(torch.randn(2, 64, generator=gen), dim=1)
    ids = torch.arange(6).repeat_interleave(10)
    cams = torch.tensor([0] * 5 + [1] * 5).repeat(6)
    features = F.normalize(people[ids] + cameras[cams] + 0.05 * torch.randn(60, 64, generator=gen), dim=1)
    settings = {"k1": 12, "k2": 3, "eps": 0.5, "min_samples": 3, "device": torch.device("cpu"), "true_ids": ids.numpy()}
    plain = pseudo_label_round(features, cams, **settings)
    aware = pseudo_label_round(features, cams, camera_normalize=True, **settings)
    plain_stats, aware_stats = plain.stats, aware.stats
    # the centres are the clusters' mean *memory* features: camera normalisation only guides the grouping
    assert torch.allclose(aware.centers, cluster_centers(features, aware.labels))
    assert aware_stats["nmi"] > 0.95 and aware_stats["num_clusters"] == 6
    assert plain_stats["nmi"] < aware_stats["nmi"] - 0.1, (plain_stats, aware_stats)


def test_a_clustering_error_stops_every_process_with_the_main_ones_message(monkeypatch):
    """Under torchrun only the main process clusters; if it fails, the others must not wait for labels."""
    sent = []

    def broadcast(objects, src):  # the main process's list is what every process receives
        if sent:
            objects[0] = sent[0]
        else:
            sent.append(objects[0])

    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast)
    far_apart = F.normalize(torch.randn(12, 256, generator=torch.Generator().manual_seed(0)), dim=1)  # no dense region
    cams = torch.zeros(12, dtype=torch.int64)
    for rank in (0, 1):
        with pytest.raises(ClusteringError, match="no cluster") as info:
            pseudo_label_round(far_apart, cams, k1=4, k2=2, eps=0.2, min_samples=4, device=torch.device("cpu"),
                               dist=DistInfo(rank=rank, world_size=2))
        assert info.value is sent[0]


def test_without_faiss_only_the_tests_that_need_it_are_skipped():
    """faiss is optional (cluster.knn_backend=faiss): the oracle's module imports without it, so this
    file collects and its other tests run, instead of failing to collect as a whole."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = ("import sys; sys.modules['faiss'] = None; import pytest; "
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_cluster.py', '-k', 'spcl_style_oracle or centers']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)})
    assert result.returncode == 0 and "1 passed, 8 skipped" in result.stdout, result.stdout[-2000:]
