"""uda.extract: users' feature extraction equals the run's own evaluation features; the CLI's files."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import uda
from uda import build, extract
from uda.data import splits
from uda.datasets import load_dataset
from uda.errors import UdaError
from uda.evaluation.features import extract_features


@pytest.fixture(scope="module")
def query_paths(synth_root):
    return [r.path for r in load_dataset("synth_duke", synth_root, synth_preset="tiny").query[:10]]


@pytest.mark.parametrize("pipeline", ["loader", "device"])
def test_extraction_equals_the_stages_features_of_the_same_images(source_model, synth_root, query_paths, pipeline):
    model, cfg = build.load_trained_model(source_model, ["device=cpu", f"data.pipeline={pipeline}", "eval.batch_size=4"])
    records = load_dataset("synth_duke", synth_root, synth_preset="tiny").query[:10]
    kept, images = splits.prepare_split(records, cfg, torch.device("cpu"))
    expected = extract_features(model, splits.make_plain_loader(kept, cfg, images), flip=cfg.eval.flip, normalize=True)
    extractor = uda.load_model(source_model, device="cpu", batch_size=3)
    got = extractor(query_paths)
    assert got.shape == (10, 128) and torch.allclose(got.norm(dim=1), torch.ones(10), atol=1e-5)
    assert torch.allclose(got, expected, atol=1e-5)
    pil = [Image.open(p) for p in query_paths[:4]]  # PIL images give the same rows as their paths
    assert torch.allclose(extractor(pil), got[:4], atol=1e-6)


def test_extraction_follows_the_runs_test_time_scales(source_model, synth_root, query_paths):
    opts = ["eval.scales=[0.5,1.0]"]
    model, cfg = build.load_trained_model(source_model, ["device=cpu", *opts])
    records = load_dataset("synth_duke", synth_root, synth_preset="tiny").query[:10]
    kept, images = splits.prepare_split(records, cfg, torch.device("cpu"))
    expected = extract_features(model, splits.make_plain_loader(kept, cfg, images), flip=cfg.eval.flip, scales=[0.5, 1.0])
    extractor = uda.load_model(source_model, device="cpu", opts=opts)
    got = extractor(query_paths)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, uda.load_model(source_model, device="cpu")(query_paths), atol=1e-3)
    assert extractor.settings["scales"] == [0.5, 1.0]


def test_cli_writes_features_paths_and_settings(source_model, query_paths, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(query_paths[:5]) + "\n")
    out = tmp_path / "out" / "feats.npy"
    features = extract.main(["--model", str(source_model), "--images", str(listing), "--out", str(out), "--device", "cpu"])
    saved = np.load(out)
    assert saved.shape == (5, 128) and np.array_equal(saved, features)
    assert out.with_suffix(".paths.txt").read_text().split() == query_paths[:5]
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["images"] == 5 and record["feature_dim"] == 128 and (record["height"], record["width"]) == (64, 32)


def test_folder_listing_and_bad_input(tmp_path, query_paths):
    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    for i, path in enumerate(query_paths[:3]):
        Image.open(path).save(images / ("sub" if i == 0 else "") / f"{i}.png")
    (images / "notes.txt").write_text("not an image")
    assert [p.name for p in extract.list_images(images)] == ["1.png", "2.png", "0.png"]  # sorted by full path
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UdaError, match="holds no image"):
        extract.list_images(empty)
    with pytest.raises(UdaError, match="no such folder or list file"):
        extract.list_images(tmp_path / "nowhere")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{query_paths[0]}\n{tmp_path / 'missing.jpg'}\n")
    with pytest.raises(UdaError, match="1 of the 2 images listed .* do not exist"):
        extract.list_images(listing)


def test_a_file_name_that_is_not_utf8_is_written_whole_and_read_back(source_model, query_paths, tmp_path):
    """Before: feats.npy written, feats.paths.txt empty, no .json, and a UnicodeEncodeError."""
    images = tmp_path / "imgs"
    images.mkdir()
    cafe = images / os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes, as an old camera or a Windows share names files
    shutil.copy(query_paths[0], cafe)
    shutil.copy(query_paths[1], images / "plain.jpg")
    out = tmp_path / "feats"  # no suffix: .npy is added
    features = extract.main(["--model", str(source_model), "--images", str(images), "--out", str(out), "--device", "cpu"])
    assert np.array_equal(np.load(tmp_path / "feats.npy"), features) and (tmp_path / "feats.json").is_file()
    paths = tmp_path / "feats.paths.txt"
    assert paths.read_bytes() == os.fsencode(cafe) + b"\n" + os.fsencode(images / "plain.jpg") + b"\n"
    assert extract.list_images(paths) == [cafe, images / "plain.jpg"]  # the list reads back as the names on disk


def test_the_three_outputs_are_written_all_or_none(source_model, query_paths, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(query_paths[:2]) + "\n")
    monkeypatch.setattr(extract.json, "dumps", fail)  # the last of the three files fails
    out = tmp_path / "out" / "feats.npy"
    with pytest.raises(OSError, match="No space left"):
        extract.main(["--model", str(source_model), "--images", str(listing), "--out", str(out), "--device", "cpu"])
    assert list(out.parent.iterdir()) == []  # neither the features, nor their paths, nor a temporary


def test_an_out_suffix_other_than_npy_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:  # before: o6.txt wrote o6.npy
        extract.main(["--model", "none.pth", "--images", "none", "--out", "o6.txt"])
    assert stop.value.code == 2 and "o6.txt must end in .npy (or have no suffix)" in capsys.readouterr().err
