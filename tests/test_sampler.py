"""PKSampler: batch structure, small identities, determinism, exact length, num_iterations, ranks, outliers."""
import numpy as np
import pytest

from uda.data.device_batches import PKSampler
from uda.errors import ConfigError

# 10 identities with 2..13 images (id 0 has fewer than K=4), interleaved with DBSCAN outliers (-1).
COUNTS = [2, 4, 5, 7, 8, 9, 4, 13, 6, 11]
PIDS = np.array([pid for pid, n in enumerate(COUNTS) for _ in range(n)] + [-1] * 9)
PIDS = PIDS[np.random.default_rng(0).permutation(len(PIDS))]
P, K = 3, 4


def batches_of(sampler: PKSampler) -> list[np.ndarray]:
    stream = np.array(list(sampler), dtype=np.int64)
    assert len(stream) % (P * K) == 0
    return list(stream.reshape(-1, P * K))


def check_batch(batch: np.ndarray, pids: np.ndarray = PIDS) -> None:
    """P consecutive groups of K indices, each group one identity, the P identities distinct."""
    group_pids = pids[batch].reshape(P, K)
    assert (group_pids == group_pids[:, :1]).all(), group_pids
    assert len(set(group_pids[:, 0].tolist())) == P
    assert (group_pids >= 0).all()


def test_every_batch_has_p_distinct_ids_with_k_images_each():
    sampler = PKSampler(PIDS, num_pids=P, num_instances=K, seed=1)
    for epoch in range(5):
        sampler.set_epoch(epoch)
        batches = batches_of(sampler)
        assert len(batches) >= 1
        for batch in batches:
            check_batch(batch)
        # within one pass an image of an identity with >= K images is drawn at most once
        drawn = np.concatenate(batches)
        big = drawn[PIDS[drawn] != 0]
        assert len(big) == len(set(big.tolist()))


def test_identity_with_fewer_than_k_images_yields_k_of_its_own_indices():
    own = set(np.flatnonzero(PIDS == 0).tolist())
    sampler = PKSampler(PIDS, num_pids=P, num_instances=K, seed=0)
    seen = 0
    for epoch in range(20):
        sampler.set_epoch(epoch)
        for batch in batches_of(sampler):
            groups = batch.reshape(P, K)
            for group in groups[PIDS[groups[:, 0]] == 0]:
                seen += 1
                assert len(group) == K and set(group.tolist()) == own  # both images, plus repeats
    assert seen > 0


def test_stream_is_a_pure_function_of_seed_and_epoch():
    def stream(seed: int, epoch: int) -> list[int]:
        sampler = PKSampler(PIDS, num_pids=P, num_instances=K, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert stream(0, 0) == stream(0, 0)
    assert stream(0, 3) == stream(0, 3)
    assert stream(0, 0) != stream(0, 1)
    assert stream(0, 0) != stream(1, 0)
    # a "resumed" sampler jumping straight to epoch 3 matches one that went through epochs 0..2
    walked = PKSampler(PIDS, num_pids=P, num_instances=K, seed=0)
    for epoch in range(4):
        walked.set_epoch(epoch)
        last = list(walked)
    assert last == stream(0, 3)


def test_len_is_exact():
    sampler = PKSampler(PIDS, num_pids=P, num_instances=K, seed=2)
    for epoch in range(6):
        sampler.set_epoch(epoch)
        assert len(sampler) == len(list(sampler))
    # one group per identity (exactly K images each): floor(10 / 3) = 3 batches, every epoch
    even = PKSampler(np.repeat(np.arange(10), K), num_pids=P, num_instances=K, seed=0)
    for epoch in range(3):
        even.set_epoch(epoch)
        assert len(even) == len(list(even)) == 3 * P * K


def test_num_iterations_yields_exactly_that_many_batches():
    one_pass = len(PKSampler(PIDS, num_pids=P, num_instances=K, seed=0)) // (P * K)
    wanted = 3 * one_pass + 1  # forces several passes with fresh shuffles
    sampler = PKSampler(PIDS, num_pids=P, num_instances=K, seed=0, num_iterations=wanted)
    batches = batches_of(sampler)
    assert len(batches) == wanted and len(sampler) == wanted * P * K
    for batch in batches:
        check_batch(batch)
    short = PKSampler(PIDS, num_pids=P, num_instances=K, seed=0, num_iterations=1)
    assert list(short) == [int(i) for i in batches[0]]  # same stream, cut after one batch


@pytest.mark.parametrize("num_iterations", [None, 5])
def test_ranks_are_disjoint_and_cover_the_single_process_stream(num_iterations):
    world = 2
    ranks = [
        batches_of(PKSampler(PIDS, P, K, seed=4, num_iterations=num_iterations, rank=r, world_size=world))
        for r in range(world)
    ]
    assert len({len(b) for b in ranks}) == 1  # equal shares
    per_rank = len(ranks[0])
    assert per_rank >= 2  # so a contiguous split would differ from the strided one
    single_iterations = None if num_iterations is None else num_iterations * world
    single = batches_of(PKSampler(PIDS, P, K, seed=4, num_iterations=single_iterations))
    assert per_rank == len(single) // world
    interleaved = [ranks[r][i] for i in range(per_rank) for r in range(world)]
    assert np.array_equal(np.array(interleaved), np.array(single[: per_rank * world]))
    if num_iterations is None:  # one pass draws every image of an identity with >= K images at most once
        sets = [set(np.concatenate(b)[PIDS[np.concatenate(b)] != 0].tolist()) for b in ranks]
        assert all(not (sets[a] & sets[b]) for a in range(world) for b in range(a + 1, world))


def test_outliers_are_never_sampled_and_every_identity_is():
    sampler = PKSampler(PIDS, num_pids=P, num_instances=K, seed=0, num_iterations=40)
    drawn = np.array(list(sampler))
    assert (PIDS[drawn] != -1).all()
    assert set(PIDS[drawn].tolist()) == set(range(len(COUNTS)))


def test_too_few_identities_is_a_config_error():
    with pytest.raises(ConfigError, match="needs 4 identities but the labels hold 3"):
        PKSampler([0, 0, 1, 1, 2, 2, -1, -1, -1, -1], num_pids=4, num_instances=2)
