"""uda.evaluation.distance: each metric against a brute-force answer; chunking changes nothing; ensembles are weighted means."""
import numpy as np
import pytest
import torch

from uda.errors import UdaError
from uda.evaluation.distance import ensemble_distance, ensemble_weights, pairwise_distance
from uda.evaluation.metrics import evaluate


def features(seed: int, rows: int, dim: int = 16) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))


X, Y = features(0, 11), features(1, 7)


def brute_force(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    """Float64 answers from the definitions, one difference vector per pair."""
    x, y = x.double(), y.double()
    if metric == "cosine":
        cos = (x[:, None, :] * y[None, :, :]).sum(-1) / (x.norm(dim=1)[:, None] * y.norm(dim=1)[None, :])
        return 1 - cos
    squared = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    return squared.sqrt() if metric == "euclidean" else squared


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_matches_brute_force(metric):
    distances = pairwise_distance(X, Y, metric=metric, device="cpu")
    assert distances.dtype == torch.float32 and distances.device.type == "cpu"
    assert distances.shape == (11, 7)
    expected = brute_force(X, Y, metric).float()
    torch.testing.assert_close(distances, expected, rtol=1e-5, atol=1e-5)


def test_euclidean_matches_cdist():
    expected = torch.cdist(X.double(), Y.double()).float()
    torch.testing.assert_close(pairwise_distance(X, Y), expected, rtol=1e-5, atol=1e-5)


def test_hand_computed_values():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    y = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    torch.testing.assert_close(pairwise_distance(x, y), torch.tensor([[3.0, 2.0], [4.0, 13**0.5]]))
    torch.testing.assert_close(pairwise_distance(x, y, "sqeuclidean"), torch.tensor([[9.0, 4.0], [16.0, 13]]))
    # cos((3,4), (3,0)) = 3/5, cos((3,4), (0,2)) = 4/5; the zero vector normalizes to zero: cos 0.
    torch.testing.assert_close(pairwise_distance(x, y, "cosine"), torch.tensor([[1.0, 1.0], [0.4, 0.2]]))


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_chunking_does_not_change_the_result(metric):
    whole = pairwise_distance(X, Y, metric=metric, chunk_size=4096)
    chunked = pairwise_distance(X, Y, metric=metric, chunk_size=3)  # 11 rows: chunks of 3, 3, 3, 2
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


def test_distance_to_itself_is_clamped_not_nan():
    x = features(2, 50) * 10  # large norms make the cancellation in the expansion visible
    distances = pairwise_distance(x, x)
    assert not distances.isnan().any()
    assert (distances >= 0).all()
    assert distances.diagonal().max() < 1e-2 * x.norm(dim=1).max()
    assert (pairwise_distance(x, x, "sqeuclidean") >= 0).all()


def test_accepts_numpy_and_float64_and_returns_float32():
    distances = pairwise_distance(X.double().numpy(), Y.numpy())
    assert distances.dtype == torch.float32
    torch.testing.assert_close(distances, pairwise_distance(X, Y))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(x=X, y=features(3, 5, dim=8)), "same feature dimension"),
        (dict(x=X[0], y=Y), "x must be a"),
        (dict(x=X, y=Y, metric="manhattan"), "unknown distance metric"),
        (dict(x=X, y=Y, chunk_size=0), "chunk_size"),
        (dict(x=X.long(), y=Y), "floating-point"),
    ],
)
def test_bad_inputs_raise_uda_error(kwargs, message):
    with pytest.raises(UdaError, match=message):
        pairwise_distance(**kwargs)


def test_empty_query_set_gives_empty_matrix():
    assert pairwise_distance(np.zeros((0, 16), np.float32), Y).shape == (0, 7)


def test_ensemble_of_a_model_with_itself_is_its_own_distances():
    distmat = pairwise_distance(X, Y, metric="cosine", device="cpu")
    assert torch.equal(ensemble_distance([distmat, distmat], [0.5, 0.5]), distmat)
    torch.testing.assert_close(ensemble_distance([distmat, distmat], [2.0, 7.0]), distmat)  # any weights: the same, up to rounding
    assert torch.equal(ensemble_distance([distmat], [3.0]), distmat)
    assert torch.equal(ensemble_distance(iter([distmat, distmat]), [1.0, 1.0]), distmat)  # a generator of matrices


def test_ensemble_is_the_weighted_mean_and_scores_as_it():
    # 1 query, 2 gallery items of other cameras; item 0 is the match. Model A ranks it second (AP 1/2),
    # model B first (AP 1). Weights 1:3 -> (0.25 * 0.6 + 0.75 * 0.1, 0.25 * 0.2 + 0.75 * 0.5) = (0.225, 0.425): AP 1.
    # Weights 3:1 -> (0.475, 0.275): AP 1/2.
    a, b = torch.tensor([[0.6, 0.2]]), torch.tensor([[0.1, 0.5]])
    ids = {"q_pids": torch.tensor([1]), "g_pids": torch.tensor([1, 2]), "q_camids": torch.tensor([0]), "g_camids": torch.tensor([1, 1])}
    for weights, mean, expected_map in (([1.0, 3.0], [[0.225, 0.425]], 1.0), ([3.0, 1.0], [[0.475, 0.275]], 0.5)):
        ensemble = ensemble_distance([a, b], weights)
        torch.testing.assert_close(ensemble, torch.tensor(mean))
        assert evaluate(ensemble, **ids)["mAP"] == pytest.approx(expected_map)
        assert evaluate(ensemble, **ids)["mAP"] == evaluate(torch.tensor(mean), **ids)["mAP"]
    # larger planted matrices: the normalised weighted mean, element by element
    d1, d2 = torch.rand(5, 8, generator=torch.Generator().manual_seed(2)), torch.rand(5, 8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ensemble_distance([d1, d2], [0.2, 0.6]), 0.25 * d1 + 0.75 * d2)


@pytest.mark.parametrize("weights, message", [
    ([1.0], "1 weights for 2 models"),
    ([1.0, 1.0, 1.0], "3 weights for 2 models"),
    ([1.0, -0.5], "must be >= 0 and finite"),
    ([1.0, float("nan")], "must be >= 0 and finite"),
    ([float("inf"), 1.0], "must be >= 0 and finite"),
    ([0.0, 0.0], "all 0"),
])
def test_bad_ensemble_weights_are_refused(weights, message):
    with pytest.raises(UdaError, match=message):
        ensemble_weights(weights, 2)


def test_ensemble_weights_are_normalised_and_default_to_equal():
    assert ensemble_weights(None, 4) == [0.25] * 4
    assert ensemble_weights([1, 3], 2) == [0.25, 0.75]
    assert ensemble_weights([0, 2], 2) == [0.0, 1.0]


def test_ensemble_of_matrices_of_other_shapes_or_counts_is_refused():
    with pytest.raises(UdaError, match="model 2's distances are \\(3, 4\\), the first's \\(3, 5\\)"):
        ensemble_distance([torch.zeros(3, 5), torch.zeros(3, 4)], [1.0, 1.0])
    with pytest.raises(UdaError, match="1 distance matrices for 2 weights"):
        ensemble_distance([torch.zeros(3, 5)], [1.0, 1.0])
