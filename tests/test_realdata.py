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


def test_every_stage_runs_on_real_images_at_reduced_size(real_data_root, tmp_path):
    """Real parsers, image decoding, training, clustering, evaluation and re-ranking on real Market ->
    Duke images, cut to 60 identities, 64x32 images and a small backbone so a CPU does it in a minute."""
    from uda import adapt, pretrain
    from uda.report import collect
    from uda.runlog import read_metrics

    small = ["data.subset_ids=60", "data.height=64", "data.width=32", "data.num_workers=0", "model.backbone=resnet18_w16",
             "model.pretrained=none", "eval.batch_size=128", "eval.rerank=true"]
    common = ["--source", "market", "--target", "duke", "--data-root", str(real_data_root)]
    pretrain.main(common + ["--output-dir", str(tmp_path / "pretrain"), "--opts", *small, "optim.lr=3.5e-3",
                            "optim.warmup_epochs=1", "optim.epochs=4", "train.eval_every=4"])
    source = read_metrics(tmp_path / "pretrain")[-1]
    assert set(source) == {"epoch", "market", "market_rerank", "duke", "duke_rerank"}
    assert source["market"]["mAP"] > 0.05  # 60 ids: chance is far lower
    adapt.main(common + ["--init", str(tmp_path / "pretrain" / "model_final.pth"), "--output-dir", str(tmp_path / "adapt"),
                         "--opts", *small, "optim.epochs=1", "adapt.iters=5", "data.num_pids=4",
                         "cluster.k1=10", "cluster.eps=0.5", "cluster.min_samples=2"])
    records = read_metrics(tmp_path / "adapt")
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[1]["clusters"]["num_clusters"] >= 4
    results = collect(tmp_path / "adapt", "duke")
    assert {"direct", "adapted", "direct_rerank", "adapted_rerank"} <= set(results)
    for row in results.values():
        assert 0 < row["mAP"] <= row["rank10"] + 1e-9 <= 1 + 1e-9
