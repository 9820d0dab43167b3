"""uda.evaluation.metrics: hand-computed cases, and agreement with the literal per-query reference."""
import numpy as np
import pytest
import torch

import uda.evaluation.metrics as metrics
from baselines.literal_metrics import literal_evaluate
from uda.errors import UdaError
from uda.evaluation.metrics import evaluate

# Gallery of 7: (pid, camid). Index 3 is a distractor (id 0); index 6 is id 4 seen only by camera 0.
G_PIDS = np.array([1, 2, 1, 0, 1, 2, 4])
G_CAMS = np.array([0, 1, 1, 1, 2, 2, 0])
# Queries: id 1 cam 0, id 2 cam 0, id 4 cam 0 (only a same-camera match: skipped), id 3 (no match).
Q_PIDS = np.array([1, 2, 4, 3])
Q_CAMS = np.array([0, 0, 0, 1])
DISTMAT = np.array(
    [
        # q0: ranking 0,1,2,3,4,5,6; index 0 (same id, same camera) is removed, leaving
        #     non-match, MATCH, distractor, MATCH, ...: matches at ranks 2 and 4.
        [1, 2, 3, 4, 5, 6, 7],
        # q1: ranking 5,3,1,0,2,4,6: MATCH (index 5), distractor, MATCH (index 1): ranks 1 and 3.
        [4, 3, 5, 2, 6, 1, 7],
        [1, 2, 3, 4, 5, 6, 7],
        [1, 2, 3, 4, 5, 6, 7],
    ],
    dtype=np.float32,
)


def test_hand_computed_noninterpolated_ap_minp_and_cmc():
    result = evaluate(DISTMAT, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, max_rank=10)
    # AP(q0) = (1/2 + 2/4) / 2 = 1/2;  AP(q1) = (1/1 + 2/3) / 2 = 5/6.
    assert result["mAP"] == pytest.approx((1 / 2 + 5 / 6) / 2, abs=1e-12)
    # INP = matches / rank of the last match: q0 2/4, q1 2/3.
    assert result["mINP"] == pytest.approx((2 / 4 + 2 / 3) / 2, abs=1e-12)
    # First matches at ranks 2 and 1; q2 and q3 are skipped.
    assert result["num_valid_queries"] == 2
    np.testing.assert_allclose(result["cmc"], [0.5] + [1.0] * 9)
    assert (result["rank1"], result["rank5"], result["rank10"]) == (0.5, 1.0, 1.0)


def test_hand_computed_devkit_trapezoid_ap():
    result = evaluate(DISTMAT, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, ap="trapezoid")
    # Each match adds (1/n) * (precision just before it + precision at it) / 2, with 1 before rank 1.
    # q0, ranks 2 and 4: ((0 + 1/2)/2 + (1/3 + 2/4)/2) / 2 = 1/3.
    # q1, ranks 1 and 3: ((1 + 1)/2 + (1/2 + 2/3)/2) / 2 = 19/24.
    assert result["mAP"] == pytest.approx((1 / 3 + 19 / 24) / 2, abs=1e-12)
    assert result["mINP"] == pytest.approx((2 / 4 + 2 / 3) / 2, abs=1e-12)  # independent of the AP rule


def test_ties_are_ranked_by_gallery_index():
    g_pids, g_cams = np.array([2, 1, 1, 1]), np.array([1, 1, 0, 2])
    # All tied: ranking 0,1,2,3; index 2 (same camera) is removed: non-match, MATCH, MATCH.
    result = evaluate(np.zeros((1, 4), np.float32), [1], g_pids, [0], g_cams)
    assert result["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    # Reversing the gallery puts both matches first.
    result = evaluate(np.zeros((1, 4), np.float32), [1], g_pids[::-1].copy(), [0], g_cams[::-1].copy())
    assert result["mAP"] == pytest.approx(1.0)


def test_negative_zero_inf_and_negative_distances_rank_like_floats():
    # -0.0 and 0.0 tie (gallery order decides), -1 comes first, inf last.
    distmat = np.array([[0.0, -0.0, np.inf, -1.0, 2.0]], np.float32)
    g_pids, g_cams = np.array([7, 1, 1, 3, 1]), np.array([1, 1, 2, 1, 0])
    # Ranking: index 3 (-1), 0 (0.0), 1 (-0.0), 4 (2.0, removed: same camera), 2 (inf).
    # Matches at ranks 3 and 4: AP = (1/3 + 2/4) / 2.
    result = evaluate(distmat, [1], g_pids, [0], g_cams)
    assert result["mAP"] == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert result["cmc"][:3].tolist() == [0.0, 0.0, 1.0]


def random_protocol(seed: int, num_query=40, num_gallery=300, num_ids=25, num_cams=5, decimals=None):
    """A random evaluation problem with repeated ids, distractors (id 0) and several cameras.

    Some queries are skipped: ids above num_ids are not in the gallery, and id 1 is seen only by
    camera 0 in both query and gallery.
    """
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(1, num_ids + 3, num_query)
    g_pids = rng.integers(0, num_ids, num_gallery)
    q_cams = rng.integers(0, num_cams, num_query)
    g_cams = rng.integers(0, num_cams, num_gallery)
    q_cams[q_pids == 1] = 0
    g_cams[g_pids == 1] = 0
    distmat = rng.normal(size=(num_query, num_gallery)).astype(np.float32)
    if decimals is not None:  # many ties
        distmat = distmat.round(decimals)
    return distmat, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("ap", ["noninterp", "trapezoid"])
@pytest.mark.parametrize("seed,decimals", [(0, None), (1, None), (2, 1), (3, 0)])
def test_agrees_with_literal_reference(ap, seed, decimals):
    problem = random_protocol(seed, decimals=decimals)
    fast = evaluate(*problem, max_rank=20, ap=ap)
    slow = literal_evaluate(*problem, max_rank=20, ap=ap)
    assert fast["num_valid_queries"] == slow["num_valid_queries"]
    assert 0 < fast["num_valid_queries"] < len(problem[1])  # some queries were skipped
    for key in ("mAP", "mINP", "rank1", "rank5", "rank10"):
        assert fast[key] == pytest.approx(slow[key], abs=1e-6), key
    np.testing.assert_allclose(fast["cmc"], slow["cmc"], atol=1e-6)


def test_the_two_ap_definitions_differ():
    problem = random_protocol(4)
    noninterp = evaluate(*problem)["mAP"]
    trapezoid = evaluate(*problem, ap="trapezoid")["mAP"]
    assert abs(noninterp - trapezoid) > 1e-3


def test_chunking_does_not_change_the_result(monkeypatch):
    problem = random_protocol(5, decimals=1)
    whole = evaluate(*problem)
    monkeypatch.setattr(metrics, "_PAIRS_PER_CHUNK", 7 * problem[0].shape[1])  # chunks of 7 queries
    chunked = evaluate(*problem)
    for key in ("mAP", "mINP", "rank1", "num_valid_queries"):
        assert chunked[key] == whole[key]
    np.testing.assert_array_equal(chunked["cmc"], whole["cmc"])


@pytest.mark.parametrize("threads, num_rows", [(1, 5), (2, 5), (3, 2), (4, 1)])
def test_rows_sorted_in_blocks_side_by_side_equal_one_sort(threads, num_rows):
    keys = torch.from_numpy(np.random.default_rng(0).integers(-2**62, 2**62, size=(num_rows, 1000)))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sorted_rows = metrics._sort_rows(keys)
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(sorted_rows.numpy(), np.sort(keys.numpy(), axis=1))
    assert not np.array_equal(keys.numpy(), sorted_rows.numpy())  # the input is left as it was


def test_accepts_tensors_lists_and_float64():
    distmat, q_pids, g_pids, q_cams, g_cams = random_protocol(6)
    expected = evaluate(distmat, q_pids, g_pids, q_cams, g_cams)
    as_tensors = evaluate(*(torch.as_tensor(a) for a in (distmat, q_pids, g_pids, q_cams, g_cams)))
    as_lists = evaluate(
        distmat.astype(np.float64), q_pids.tolist(), g_pids.tolist(), q_cams.tolist(), g_cams.tolist()
    )
    for result in (as_tensors, as_lists):
        assert result["mAP"] == expected["mAP"]
        np.testing.assert_array_equal(result["cmc"], expected["cmc"])


def test_cmc_length_is_max_rank_even_past_the_gallery():
    result = evaluate(DISTMAT, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, max_rank=3)
    np.testing.assert_allclose(result["cmc"], [0.5, 1.0, 1.0])
    assert result["rank10"] == 1.0


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda args: {**args, "distmat": np.where(DISTMAT == 3, np.nan, DISTMAT)}, "NaN"),
        (lambda args: {**args, "g_pids": G_PIDS[:-1]}, "g_pids must be 1-D of length 7"),
        (lambda args: {**args, "q_camids": Q_CAMS[:, None]}, "q_camids must be 1-D of length 4"),
        (lambda args: {**args, "q_pids": Q_PIDS.astype(float)}, "integer ids"),
        (lambda args: {**args, "distmat": DISTMAT[0]}, "non-empty (num_query, num_gallery)"),
        (lambda args: {**args, "ap": "sklearn"}, "unknown AP definition"),
        (lambda args: {**args, "max_rank": 0}, "max_rank"),
        (
            lambda args: {**args, "q_pids": np.full(4, 4), "q_camids": np.zeros(4, int)},
            "no query has a match",
        ),
    ],
)
def test_bad_inputs_raise_uda_error(change, message):
    args = dict(distmat=DISTMAT, q_pids=Q_PIDS, g_pids=G_PIDS, q_camids=Q_CAMS, g_camids=G_CAMS)
    with pytest.raises(UdaError, match=message.replace("(", r"\(").replace(")", r"\)")):
        evaluate(**change(args))
