"""The parsers on the real Market-1501 and DukeMTMC-reID: run with UDA_REAL_DATA=<folder holding them>.

Expected counts: the datasets' readmes, and torchreid's statistics for Market's gallery after junk
(id -1) is dropped: 19,732 - 3,819 = 15,913 images, 750 test ids plus the distractor id 0000.
"""
import time

import pytest

from uda.datasets import load_dataset

pytestmark = pytest.mark.realdata

EXPECTED = {
    # name: ((train images, ids), (query images, ids), (gallery images, ids), cameras, dropped)
    "market": ((12936, 751), (3368, 750), (15913, 751), 6, {"gallery_junk": 3819}),
    "duke": ((16522, 702), (2228, 702), (17661, 1110), 8, {}),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_dataset_counts(real_data_root, name):
    start = time.perf_counter()
    dataset = load_dataset(name, real_data_root)
    seconds = time.perf_counter() - start
    (train, train_ids), (query, query_ids), (gallery, gallery_ids), num_cams, dropped = EXPECTED[name]

    def count(split):
        return len(split), len({r.pid for r in split})

    assert count(dataset.train) == (train, train_ids)
    assert count(dataset.query) == (query, query_ids)
    assert count(dataset.gallery) == (gallery, gallery_ids)
    assert dataset.dropped == dropped
    assert sorted({r.pid for r in dataset.train}) == list(range(train_ids))
    for split in (dataset.train, dataset.query, dataset.gallery):
        assert sorted({r.camid for r in split}) == list(range(num_cams))
    assert all(r.pid == r.orig_pid for r in dataset.query + dataset.gallery)
    # Relabelling keeps the order of the original ids.
    first_image_of = {}
    for r in dataset.train:
        first_image_of.setdefault(r.pid, r.orig_pid)
    assert [first_image_of[pid] for pid in range(train_ids)] == sorted(first_image_of.values())
    assert seconds < 5, f"parsing {name} took {seconds:.2f} s: it should read file names only"


def test_market_distractors_kept_and_query_ids_in_gallery(real_data_root):
    dataset = load_dataset("market", real_data_root)
    assert sum(r.pid == 0 for r in dataset.gallery) == 2798
    assert {r.pid for r in dataset.query} <= {r.pid for r in dataset.gallery}
    assert not {r.orig_pid for r in dataset.train} & {r.pid for r in dataset.query}
