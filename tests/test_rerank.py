"""Vectorised re-ranking against the literal published algorithm (baselines/literal_rerank.py)."""
import numpy as np
import pytest
import torch

from baselines.literal_rerank import re_ranking_literal
from uda.errors import UdaError
from uda.evaluation.rerank import re_ranking

PARAMS = [(20, 6, 0.3), (5, 1, 0.5), (4, 3, 0.0), (8, 10, 1.0), (3, 2, 0.7)]


def _euclidean(num_query: int, num_gallery: int, seed: int, duplicates: bool = False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_query + num_gallery, 8)).astype(np.float32)
    if duplicates:  # identical images give exactly tied distances
        x[num_query : num_query + 3] = x[:3]
        x[20:23] = x[25:28]
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1)).astype(np.float32)
    return d[:num_query, num_query:], d[:num_query, :num_query], d[num_query:, num_query:]


def _asymmetric(num_query: int, num_gallery: int, seed: int, integer: bool = False):
    rng = np.random.default_rng(seed)
    def make(shape):
        return (rng.integers(1, 4, shape) if integer else rng.random(shape)).astype(np.float32)

    return make((num_query, num_gallery)), make((num_query, num_query)), make((num_gallery, num_gallery))


@pytest.mark.parametrize("k1,k2,lambda_value", PARAMS)
@pytest.mark.parametrize("kind", ["euclidean", "asymmetric"])
def test_matches_literal_on_random_inputs(kind, k1, k2, lambda_value):
    for seed in range(2):
        inputs = _euclidean(7, 23, seed) if kind == "euclidean" else _asymmetric(7, 23, seed)
        expected = re_ranking_literal(*inputs, k1=k1, k2=k2, lambda_value=lambda_value)
        for chunk_size in (5, 1024):
            got = re_ranking(*inputs, k1=k1, k2=k2, lambda_value=lambda_value, device="cpu", chunk_size=chunk_size)
            assert got.dtype == np.float32 and got.shape == (7, 23)
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("inputs", [_euclidean(9, 31, 3, duplicates=True), _asymmetric(9, 31, 4, integer=True)])
def test_matches_literal_with_tied_distances(inputs):
    expected = re_ranking_literal(*inputs, k1=6, k2=4, lambda_value=0.2)
    got = re_ranking(*inputs, k1=6, k2=4, lambda_value=0.2, device="cpu", chunk_size=4)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_accepts_tensors_and_float64():
    q_g, q_q, g_g = _asymmetric(6, 15, seed=5)
    expected = re_ranking_literal(q_g, q_q, g_g, k1=5, k2=3)
    got = re_ranking(torch.from_numpy(q_g), q_q.astype(np.float64), torch.from_numpy(g_g), k1=5, k2=3, device="cpu")
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_lambda_one_is_the_normalised_squared_distance_of_the_transposed_matrix():
    q_g, q_q, g_g = _asymmetric(4, 6, seed=6)
    full = np.block([[q_q, q_g], [q_g.T, g_g]]) ** 2
    column_max = full.max(axis=0)  # row a of the working matrix is column a of full / its max
    expected = (full.T / column_max[:, None])[:4, 4:]
    got = re_ranking(q_g, q_q, g_g, k1=3, k2=2, lambda_value=1.0, device="cpu")
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert not np.allclose(got, (full / full.max(axis=1, keepdims=True))[:4, 4:], atol=1e-3)  # the quirk matters


def test_bad_inputs_raise_clear_errors():
    q_g, q_q, g_g = _euclidean(5, 8, seed=7)
    with pytest.raises(UdaError, match="g_g_dist has shape"):
        re_ranking(q_g, q_q, g_g[:7, :7], k1=5)
    bad = q_g.copy()
    bad[0, 0] = np.nan
    with pytest.raises(UdaError, match="NaN"):
        re_ranking(bad, q_q, g_g, k1=5)
    with pytest.raises(UdaError, match="k1"):
        re_ranking(q_g, q_q, g_g, k1=13)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("inputs", [_euclidean(7, 23, 8), _asymmetric(7, 23, 9), _asymmetric(9, 31, 10, integer=True)])
def test_matches_literal_on_cuda(inputs):
    expected = re_ranking_literal(*inputs, k1=6, k2=4, lambda_value=0.3)
    got = re_ranking(*inputs, k1=6, k2=4, lambda_value=0.3, device="cuda", chunk_size=5)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
