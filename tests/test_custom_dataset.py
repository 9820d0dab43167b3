"""Your own data (uda.datasets.custom): folder and CSV layouts, optional cameras and train ids, and the
no-camera evaluation protocol, down to a run that adapts to an unlabelled camera-less target."""
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from uda import adapt, evaluate, extract, pretrain
from uda.datasets import load_dataset
from uda.errors import ConfigError, DatasetError
from uda.evaluation.metrics import evaluate as score

from tests.test_datasets import touch


def write_folder(root: Path, *, train_ids: bool = True, cameras: bool = True) -> Path:
    cam = (lambda c: f"c{c}_") if cameras else (lambda c: "")
    if train_ids:
        touch(root / "train" / "bob", f"{cam(2)}001.jpg", f"{cam(1)}002.png")
        touch(root / "train" / "10", f"{cam(1)}003.jpg")
        touch(root / "train" / "2", f"{cam(3)}004.JPG")
    else:
        touch(root / "train", f"{cam(2)}001.jpg", f"{cam(1)}002.jpg", "notes.txt")
    touch(root / "query" / "10", f"{cam(1)}q1.jpg")
    touch(root / "gallery" / "10", f"{cam(2)}g1.jpg", f"{cam(1)}g2.jpg")
    touch(root / "gallery" / "alice", f"{cam(3)}g3.jpg")  # an id no query has: a distractor
    return root


def names(records) -> list[tuple[str, int, int, int]]:
    return [(f"{Path(r.path).parent.name}/{Path(r.path).name}", r.pid, r.camid, r.orig_pid) for r in records]


def test_folder_layout_maps_id_names_in_natural_order_and_cameras_from_file_names(tmp_path):
    dataset = load_dataset(str(write_folder(tmp_path / "mycams")))
    assert dataset.name == "mycams" and dataset.has_cameras and dataset.train_labelled
    # ids over all splits in natural order: 2, 10, alice, bob -> 0, 1, 2, 3; train relabelled 0..2 by orig id
    # cameras 1, 2, 3 -> 0, 1, 2
    assert names(dataset.train) == [("10/c1_003.jpg", 1, 0, 1), ("2/c3_004.JPG", 0, 2, 0), ("bob/c1_002.png", 2, 0, 3), ("bob/c2_001.jpg", 2, 1, 3)]
    assert names(dataset.query) == [("10/c1_q1.jpg", 1, 0, 1)]
    assert names(dataset.gallery) == [("10/c1_g2.jpg", 1, 0, 1), ("10/c2_g1.jpg", 1, 1, 1), ("alice/c3_g3.jpg", 2, 2, 2)]


def test_unlabelled_camera_less_folder_is_a_target_only(tmp_path):
    dataset = load_dataset(str(write_folder(tmp_path / "shop", train_ids=False, cameras=False)))
    assert not dataset.has_cameras and not dataset.train_labelled
    assert names(dataset.train) == [("train/001.jpg", -1, -1, -1), ("train/002.jpg", -1, -1, -1)]  # notes.txt skipped
    summary = dataset.summary()
    assert "unlabelled: a target only" in summary and "no camera ids: evaluation keeps same-camera matches" in summary


def test_csv_layout_with_relative_paths_optional_ids_and_cameras(tmp_path):
    touch(tmp_path / "img", "a.jpg", "b.jpg", "q.jpg", "g.jpg")
    (tmp_path / "list.csv").write_text(
        "split,path,pid,camid\ntrain,img/a.jpg,,7\ntrain,img/b.jpg,,3\n"
        f"query,img/q.jpg,5,3\ngallery,{tmp_path / 'img' / 'g.jpg'},5,7\n"
    )
    dataset = load_dataset(str(tmp_path / "list.csv"))
    assert dataset.name == "list" and dataset.has_cameras and not dataset.train_labelled
    assert names(dataset.train) == [("img/a.jpg", -1, 1, -1), ("img/b.jpg", -1, 0, -1)]
    assert names(dataset.query) == [("img/q.jpg", 0, 0, 0)] and names(dataset.gallery) == [("img/g.jpg", 0, 1, 0)]


def test_csv_without_camera_column(tmp_path):
    touch(tmp_path, "a.jpg", "q.jpg", "g.jpg")
    (tmp_path / "data.csv").write_text("path,split,pid\na.jpg,train,1\nq.jpg,query,1\ng.jpg,gallery,1\n")
    dataset = load_dataset(str(tmp_path / "data.csv"))
    assert not dataset.has_cameras and dataset.train_labelled and names(dataset.train) == [(f"{tmp_path.name}/a.jpg", 0, -1, 0)]


def test_the_image_suffixes_extract_reads_are_images_and_other_files_are_counted(tmp_path, caplog):
    """.webp and .tif were skipped here without a word while uda.extract read them."""
    root = write_folder(tmp_path / "mine")
    touch(root / "train" / "bob", "c1_005.webp", "c2_006.TIF", "c1_007.tiff", "notes.txt", ".DS_Store")
    touch(root / "gallery", "README.md")
    with caplog.at_level(logging.WARNING, logger="uda.datasets.custom"):
        dataset = load_dataset(str(root))
    assert {"c1_005.webp", "c2_006.TIF", "c1_007.tiff"} <= {Path(r.path).name for r in dataset.train}
    assert dataset.dropped == {"not_images": 2}  # hidden files (.DS_Store) are not counted
    assert "mine: skipped 2 file(s) that are not images (.jpg .jpeg .png .bmp .webp .tif .tiff), e.g. " in caplog.text
    assert {p.name for p in extract.list_images(root / "train")} == {Path(r.path).name for r in dataset.train}


@pytest.mark.parametrize("make, message", [
    (lambda root: shutil.rmtree(root / "gallery"), "split folder .*gallery is missing"),
    (lambda root: touch(root / "query", "c1_x.jpg"), "query images go into one subfolder per identity"),
    (lambda root: touch(root / "train", "c1_x.jpg"), "holds images directly .* and identity subfolders"),
    (lambda root: touch(root / "gallery" / "10", "nocam.jpg"), "some images have a camera id and some do not .*nocam.jpg"),
    (lambda root: shutil.rmtree(root / "query" / "10"), "the query split holds no images"),
    (lambda root: (root / "gallery" / "10" / "c2_g1.jpg").unlink(), "no query has a gallery image of its id from another camera"),
])
def test_folder_layout_errors_name_the_problem(tmp_path, make, message):
    root = write_folder(tmp_path / "mine")
    make(root)
    with pytest.raises(DatasetError, match=message):
        load_dataset(str(root))


@pytest.mark.parametrize("text, message", [
    ("path,pid\na.jpg,1\n", "must name the columns split,path .*missing split"),
    ("split,path,pid\ntest,a.jpg,1\n", r"data.csv:2: split must be one of train, query, gallery, got 'test'"),
    ("split,path,pid\ntrain,a.jpg,1\nquery,q.jpg,\ngallery,g.jpg,1\n", "query image .*q.jpg has no id"),
    ("split,path,pid\ntrain,a.jpg,1\ntrain,b.jpg,\nquery,q.jpg,1\ngallery,g.jpg,1\n", "some train images have ids and some do not"),
    ("split,path,pid\ntrain,a.jpg,1\nquery,q.jpg,1\ngallery,q.jpg,1\n", "q.jpg is listed twice among query and gallery"),
    ("split,path,pid\ntrain,missing.jpg,1\nquery,q.jpg,1\ngallery,g.jpg,1\n", "image .*missing.jpg does not exist"),
    ("split,path,pid\ntrain,a.jpg,1\ntrain,b.jpg,2\ntrain,a.jpg,2\nquery,q.jpg,1\ngallery,g.jpg,1\n",
     r"train image .*a.jpg is listed twice \(ids 1 and 2\); list each image once"),  # was: taken with both ids
    ("split,path,pid\ntrain,a.jpg,1\ntrain,./a.jpg,1\nquery,q.jpg,1\ngallery,g.jpg,1\n", r"a.jpg is listed twice \(id 1 both times\)"),
    ("split,path,pid\ntrain,a.jpg,\ntrain,a.jpg,\nquery,q.jpg,1\ngallery,g.jpg,1\n", r"a.jpg is listed twice \(unlabelled\)"),
    ("split,path,pid\ntrain,a,b.jpg,1\n", r"data.csv:2: 4 fields for the header's 3 columns \(split,path,pid\); quote a path"),
])
def test_csv_errors_name_file_and_line(tmp_path, text, message):
    touch(tmp_path, "a.jpg", "b.jpg", "q.jpg", "g.jpg")
    (tmp_path / "data.csv").write_text(text)
    with pytest.raises(DatasetError, match=message):
        load_dataset(str(tmp_path / "data.csv"))


@pytest.mark.parametrize("listing", ["img/../img/q.jpg", "hard link", "symbolic link"])
def test_a_query_listed_again_in_the_gallery_under_another_name_is_refused(tmp_path, listing):
    """Without cameras nothing removes a query's own copy from the gallery: it ranks first, so rank-1
    read 100.0 and mAP 36.7 instead of 29.4, with no message."""
    touch(tmp_path / "img", "a.jpg", "q.jpg", "g.jpg")
    if listing != "img/../img/q.jpg":
        (os.link if listing == "hard link" else os.symlink)(tmp_path / "img" / "q.jpg", tmp_path / "img" / "q2.jpg")
        listing = "img/q2.jpg"
    (tmp_path / "list.csv").write_text(f"split,path,pid\ntrain,img/a.jpg,\nquery,img/q.jpg,5\ngallery,img/g.jpg,5\ngallery,{listing},5\n")
    with pytest.raises(DatasetError, match=rf"list: .*img/q.jpg is listed twice among query and gallery \(again as .*{listing}\); "
                                           "a query must not be its own match"):
        load_dataset(str(tmp_path / "list.csv"))


def test_missing_custom_paths_and_unknown_names_say_what_is_accepted(tmp_path):
    with pytest.raises(DatasetError, match="dataset folder .*nowhere does not exist"):
        load_dataset(str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="dataset list .*none.csv does not exist"):
        load_dataset(str(tmp_path / "none.csv"))
    with pytest.raises(DatasetError, match=r"or give the path of your own data .*e.g. ./mycams"):
        load_dataset("mycams", tmp_path)


def test_without_cameras_same_camera_matches_count():
    # one query (id 1, camera 0); gallery: id 1 from camera 0 ranked first, id 1 from camera 1 third
    dist = torch.tensor([[0.1, 0.2, 0.3]])
    q_pids, g_pids = torch.tensor([1]), torch.tensor([1, 2, 1])
    q_cams, g_cams = torch.tensor([0]), torch.tensor([0, 0, 1])
    market = score(dist, q_pids, g_pids, q_cams, g_cams)
    assert market["mAP"] == pytest.approx(1 / 2) and market["rank1"] == 0  # the same-camera item is removed
    kept = score(dist, q_pids, g_pids, q_cams, g_cams, remove_same_camera=False)
    assert kept["mAP"] == pytest.approx((1 / 1 + 2 / 3) / 2) and kept["rank1"] == 1


def synth_as_custom(synth_root: Path, out: Path, *, cameras: bool, train_ids: bool) -> Path:
    """The tiny synth_duke domain rewritten in the custom folder layout (symlinks, no copies)."""
    dataset = load_dataset("synth_duke", synth_root, synth_preset="tiny")
    for split, records in (("train", dataset.train), ("query", dataset.query), ("gallery", dataset.gallery)):
        for r in records:
            folder = out / split / (str(r.orig_pid) if split != "train" or train_ids else "")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / ((f"c{r.camid + 1}_" if cameras else "") + Path(r.path).name)).symlink_to(r.path)
    return out


def test_custom_copy_of_a_dataset_scores_like_it_and_without_cameras_keeps_same_camera_matches(synth_root, source_model, tmp_path, capsys):
    with_cams = synth_as_custom(synth_root, tmp_path / "with_cams", cameras=True, train_ids=True)
    no_cams = synth_as_custom(synth_root, tmp_path / "no_cams", cameras=False, train_ids=True)
    results = evaluate.main(["--model", str(source_model), "--data-root", str(synth_root),
                             "--dataset", "synth_duke", str(with_cams), str(no_cams), "--opts", "data.num_workers=0"])
    assert results["with_cams"] == pytest.approx(results["synth_duke"])  # same images, ids, cameras: same protocol
    assert results["no_cams"]["rank1"] > results["synth_duke"]["rank1"]  # same-camera matches are easy ones
    notes = [line for line in capsys.readouterr().out.splitlines() if "no camera ids" in line]  # as the training logs say
    assert notes == ["no_cams: no camera ids: evaluation keeps same-camera matches (not the Market-1501 protocol)"]


def test_adapt_to_an_unlabelled_camera_less_target(synth_root, source_model, tmp_path, monkeypatch):
    target = synth_as_custom(synth_root, tmp_path / "shop", cameras=False, train_ids=False)
    monkeypatch.chdir(tmp_path)
    argv = ["--source", "synth_market", "--target", str(target), "--data-root", str(synth_root), "--init", str(source_model)]
    tiny = ["device=cpu", "data.synth_preset=tiny", "data.num_workers=0", "data.height=64", "data.width=32", "model.backbone=resnet18_w16",
            "eval.batch_size=64", "data.num_pids=4", "cluster.k1=10", "cluster.min_samples=2", "cluster.eps=0.4", "adapt.iters=4", "optim.epochs=1"]
    with pytest.raises(ConfigError, match="cluster.camera_normalize=true needs camera ids, and shop .* has none"):
        adapt.main(argv + ["--opts", *tiny, "cluster.camera_normalize=true"])
    with pytest.raises(ConfigError, match="adapt.classifier=proxies keeps a proxy per cluster and camera, and shop .* has no camera ids"):
        adapt.main(argv + ["--opts", *tiny, "adapt.classifier=proxies"])
    adapt.main(argv + ["--opts", *tiny])
    run = tmp_path / "runs" / "adapt" / "synth_market2shop"  # named after the folder, not its path
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and 0 < records[1]["shop"]["mAP"] <= 1
    assert set(records[1]["clusters"]) == {"num_clusters", "outlier_fraction"}  # no true ids, no agreement scores
    log = (run / "log.txt").read_text()
    assert "no camera ids: evaluation keeps same-camera matches" in log and "diagnostics vs true ids" not in log
    with pytest.raises(DatasetError, match="its train images have no ids, so it can only be a target"):
        pretrain.main(["--source", str(target), "--opts", "device=cpu"])


@pytest.mark.parametrize("cameras", [False, True])
def test_data_whose_queries_have_no_gallery_id_is_refused_when_loaded(tmp_path, cameras):
    """With cameras too the message is about the ids, not a hint to drop the cameras."""
    root = write_folder(tmp_path / "mine", cameras=cameras)
    shutil.rmtree(root / "gallery" / "10")
    with pytest.raises(DatasetError, match="no query id appears in the gallery"):
        load_dataset(str(root))


def test_your_data_may_not_take_a_built_in_datasets_name(tmp_path):
    with pytest.raises(DatasetError, match="your dataset's name 'duke' .* rename it \\(e.g. my_duke\\)"):
        load_dataset(str(write_folder(tmp_path / "duke")))


def test_csv_with_a_byte_order_mark(tmp_path):
    touch(tmp_path, "a.jpg", "q.jpg", "g.jpg")
    (tmp_path / "bom.csv").write_text("\ufeffsplit,path,pid\ntrain,a.jpg,1\nquery,q.jpg,1\ngallery,g.jpg,1\n", encoding="utf-8")
    assert len(load_dataset(str(tmp_path / "bom.csv")).train) == 1


def test_a_csv_that_is_not_utf8_is_named(tmp_path):
    touch(tmp_path, "a.jpg")
    (tmp_path / "latin1.csv").write_bytes("split,path,pid\ntrain,caf\xe9.jpg,1\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin1.csv is not UTF-8 text \(invalid .* at byte 24\): save it as a UTF-8 CSV"):
        load_dataset(str(tmp_path / "latin1.csv"))
