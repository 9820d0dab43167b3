"""The synthetic Market / Duke generator: layout, counts, determinism, identity signal, domain gap."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uda.datasets import load_dataset
from uda.datasets import synthetic
from uda.datasets.synth_render import DUKE
from uda.datasets.synthetic import PRESETS, SPLITS, generate, main, write_preview
from uda.errors import DatasetError

NAME = {
    "market": re.compile(r"(-1|\d{4})_c([1-6])s([1-6])_(\d{6})_(\d{2})\.jpg"),
    "duke": re.compile(r"(\d{4})_c([1-8])_f(\d{7})\.jpg"),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Both domains' tiny preset, seed 0, written once for the module (single process)."""
    root = tmp_path_factory.mktemp("synth")
    return {domain: generate(domain, "tiny", 0, root / domain, workers=1) for domain in ("market", "duke")}


def parsed(folder: Path, domain: str) -> dict[str, list[tuple[int, int, Path]]]:
    """split -> [(pid, 1-based camera, path)] read with the per-domain grammar; any other name fails."""
    splits = {}
    for split in SPLITS:
        rows = []
        for path in sorted((folder / split).iterdir()):
            match = NAME[domain].fullmatch(path.name)
            assert match, f"bad name {path.name}"
            rows.append((int(match.group(1)), int(match.group(2)), path))
        splits[split] = rows
    return splits


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("domain", ["market", "duke"])
def test_counts_and_split_structure(tiny, domain):
    counts = PRESETS[(domain, "tiny")]
    splits = parsed(tiny[domain], domain)
    train, query, gallery = (splits[s] for s in SPLITS)
    assert (len(train), len(query), len(gallery)) == (counts.train_images, counts.query_images, counts.gallery_images)
    train_ids, query_ids = {r[0] for r in train}, {r[0] for r in query}
    gallery_ids = {r[0] for r in gallery} - {0, -1}
    assert len(train_ids) == counts.train_ids and len(query_ids) == counts.test_ids
    assert train_ids.isdisjoint(query_ids | gallery_ids)
    # one query per (test id, camera); every query has a true match in another camera
    assert len({(pid, cam) for pid, cam, _ in query}) == len(query)
    gallery_cams = {}
    for pid, cam, _ in gallery:
        gallery_cams.setdefault(pid, set()).add(cam)
    for pid, cam, _ in query:
        assert gallery_cams.get(pid, set()) - {cam}, f"query {pid} c{cam} has no cross-camera match"
    assert len({r[1] for r in train + query + gallery}) >= 4
    # names never repeat across splits (query and gallery of an id are different frames)
    assert len({r[2].name for r in train + query + gallery}) == len(train) + len(query) + len(gallery)
    distractors = gallery_ids - query_ids
    if domain == "market":
        assert sum(r[0] == -1 for r in gallery) == counts.junk_images
        assert sum(r[0] == 0 for r in gallery) == counts.distractor_images
        assert distractors == set()
    else:
        assert len(distractors) == counts.distractor_ids
        assert sum(r[0] in distractors for r in gallery) == counts.distractor_images
        assert all(len(gallery_cams[pid]) == 1 for pid in distractors)


@pytest.mark.parametrize("domain", ["market", "duke"])
def test_images_decode_with_domain_sizes(tiny, domain):
    sizes = []
    for path in sorted(tiny[domain].rglob("*.jpg")):
        with Image.open(path) as image:
            image.load()
            assert image.format == "JPEG" and image.mode == "RGB"
            sizes.append(image.size)
    widths, heights = np.array(sizes).T
    if domain == "market":
        assert set(sizes) == {(64, 128)}
    else:
        (low, high), (thin, wide) = DUKE.height_range, DUKE.aspect_range
        assert heights.min() >= low and heights.max() <= high
        assert np.all((widths / heights >= thin - 0.01) & (widths / heights <= wide + 0.01))
        assert len(set(heights)) > 20 and len(set(widths)) > 10


def test_manifest_records_the_dataset(tiny):
    manifest = json.loads((tiny["duke"] / "manifest.json").read_text())
    assert (manifest["domain"], manifest["preset"], manifest["seed"]) == ("duke", "tiny", 0)
    assert manifest["version"] == synthetic.GENERATOR_VERSION
    assert manifest["counts"]["query"] == {"images": 40, "ids": 16}
    assert "--domain duke --preset tiny --seed 0" in (tiny["duke"] / "README.txt").read_text()


@pytest.mark.parametrize("domain", ["market", "duke"])
def test_same_seed_same_bytes_any_workers(tiny, tmp_path, domain):
    reference = hashes(tiny[domain])
    assert hashes(generate(domain, "tiny", 0, tmp_path / "again", workers=2)) == reference
    other = hashes(generate(domain, "tiny", 1, tmp_path / "other", workers=1))
    assert len(set(other) - set(reference)) > 100                 # another seed: other ids, frames...
    assert all(other[name] != reference[name] for name in set(other) & set(reference) if name.endswith(".jpg"))


def identity_means(folder: Path, domain: str) -> dict[int, np.ndarray]:
    """pid -> (n, 3) mean RGB of the centre of each training image (where the body is)."""
    means = {}
    for pid, _, path in parsed(folder, domain)["bounding_box_train"]:
        pixels = np.asarray(Image.open(path), np.float32)
        h, w = pixels.shape[:2]
        centre = pixels[int(0.2 * h):int(0.75 * h), int(0.35 * w):int(0.65 * w)].reshape(-1, 3).mean(0)
        means.setdefault(pid, []).append(centre)
    return {pid: np.array(rows) for pid, rows in means.items()}


@pytest.mark.parametrize("domain", ["market", "duke"])
def test_identity_colours_are_consistent_and_distinct(tiny, domain):
    means = identity_means(tiny[domain], domain)
    pids = sorted(means)
    centroids = np.array([means[p].mean(0) for p in pids])
    within = np.mean([np.linalg.norm(means[p] - means[p].mean(0), axis=1).mean() for p in pids])
    between = np.mean([np.linalg.norm(a - b) for i, a in enumerate(centroids) for b in centroids[i + 1:]])
    assert within < 0.6 * between, (within, between)
    # leave-one-out nearest centroid on mean colour alone: far above chance (1/16)
    hits = total = 0
    for p in pids:
        for k, row in enumerate(means[p]):
            rest = {q: (np.delete(means[q], k, 0) if q == p else means[q]).mean(0) for q in pids}
            hits += min(rest, key=lambda q: np.linalg.norm(rest[q] - row)) == p
            total += 1
    assert hits / total > 0.4, hits / total


def test_domains_differ_in_colour_statistics(tiny):
    stats = {}
    for domain, folder in tiny.items():
        pixels = np.concatenate([np.asarray(Image.open(p), np.float32).reshape(-1, 3)
                                 for p in sorted((folder / "bounding_box_train").glob("*.jpg"))])
        stats[domain] = pixels.mean(0)
    market_mean, duke_mean = stats["market"], stats["duke"]
    assert np.linalg.norm(market_mean - duke_mean) > 30          # measured ~43 (seed 0, generator v2)
    assert market_mean.mean() - duke_mean.mean() > 8             # Market: sunny; Duke: dim winter (~15)
    assert (market_mean[0] - market_mean[2]) - (duke_mean[0] - duke_mean[2]) > 25   # warm vs cold cast (~41)


def test_output_appears_only_complete(tmp_path, monkeypatch):
    out = tmp_path / "market"
    seen = []
    real_write = synthetic._write_entries

    def write_then_fail(domain, seed, root, indexed):
        seen.append((out.exists(), Path(root).name))
        real_write(domain, seed, root, indexed[:5])
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_write_entries", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        generate("market", "tiny", 0, out, workers=1)
    assert seen and seen[0] == (False, f"market.tmp-{os.getpid()}")
    assert list(tmp_path.iterdir()) == []                        # no dataset, no half-written temp folder


def test_existing_output(tiny, tmp_path):
    before = hashes(tiny["market"])
    assert generate("market", "tiny", 0, tiny["market"]) == tiny["market"]     # same dataset: kept as is
    assert hashes(tiny["market"]) == before
    with pytest.raises(DatasetError, match="already exists"):
        generate("market", "tiny", 5, tiny["market"])
    (tmp_path / "other").mkdir()
    with pytest.raises(DatasetError, match="already exists"):
        generate("duke", "tiny", 0, tmp_path / "other")


@pytest.mark.parametrize("args, message", [
    (("mars", "tiny", 0), "unknown synthetic domain"),
    (("market", "huge", 0), "unknown synthetic preset"),
])
def test_bad_arguments(tmp_path, args, message):
    with pytest.raises(DatasetError, match=message):
        generate(*args, tmp_path / "x")
    with pytest.raises(DatasetError, match="workers"):
        generate("market", "tiny", 0, tmp_path / "x", workers=0)


def test_spread_hits_totals_within_bounds():
    rng = np.random.default_rng(0)
    counts = synthetic._spread(rng, 750, 3368, 2, 6)
    assert counts.sum() == 3368 and counts.min() >= 2 and counts.max() <= 6
    assert np.array_equal(synthetic._spread(rng, 3, 6, 2, 6), [2, 2, 2])
    with pytest.raises(DatasetError, match="cannot split"):
        synthetic._spread(rng, 3, 19, 2, 6)


@pytest.mark.parametrize("domain, preset", sorted(PRESETS))
def test_plans_have_the_preset_counts(domain, preset):
    counts = PRESETS[(domain, preset)]
    entries = synthetic.plan(domain, preset, 0)
    per_split = {s: [e[0] for e in entries if e[0].startswith(s + "/")] for s in SPLITS}
    assert [len(per_split[s]) for s in SPLITS] == [counts.train_images, counts.query_images, counts.gallery_images]
    assert len({e[0] for e in entries}) == len(entries)
    assert all(NAME[domain].fullmatch(e[0].split("/")[1]) for e in entries)
    gallery_ids = {name.split("/")[1].split("_")[0] for name in per_split["bounding_box_test"]}
    assert len(gallery_ids - {"0000", "-1"}) == counts.test_ids + counts.distractor_ids


def test_parsed_by_the_real_parsers(tiny, tmp_path):
    (tmp_path / "synth_market_tiny_seed0").symlink_to(tiny["market"])
    market = load_dataset("synth_market", tmp_path, synth_preset="tiny", synth_seed=0)
    assert (len(market.train), len(market.query)) == (128, 40)
    assert len(market.gallery) == 100 - 8 and market.dropped == {"gallery_junk": 8}
    assert sorted({r.pid for r in market.train}) == list(range(16))
    duke = load_dataset("synth_duke", tmp_path, synth_preset="tiny", synth_seed=0)   # generated on demand
    assert (tmp_path / "synth_duke_tiny_seed0" / "manifest.json").exists()
    assert hashes(tmp_path / "synth_duke_tiny_seed0") == hashes(tiny["duke"])
    assert (len(duke.train), len(duke.query), len(duke.gallery)) == (128, 40, 92)
    assert {r.camid for r in duke.query + duke.gallery} <= set(range(8))


def test_cli_and_preview(tmp_path, capsys):
    assert main(["--domain", "duke", "--preset", "tiny", "--out", str(tmp_path / "d"), "--workers", "1"]) == 0
    assert "query 40 images / 16 ids" in capsys.readouterr().out
    assert main(["--preview", str(tmp_path / "p.png"), "--domain", "duke"]) == 2
    assert "--preview takes no --domain" in capsys.readouterr().err
    preview = Image.open(write_preview(tmp_path / "sheet.png", seed=0, rows=2))
    pixels = np.asarray(preview.convert("RGB"), np.float32)
    assert preview.width > 8 * 100 and (pixels < 250).mean() > 0.3                # eight Duke columns of images


def test_the_preset_names_the_config_checks_are_the_presets_that_exist():
    from uda.datasets.synthetic import PRESET_NAMES, PRESETS, STYLES

    assert set(PRESETS) == {(domain, preset) for domain in STYLES for preset in PRESET_NAMES}
