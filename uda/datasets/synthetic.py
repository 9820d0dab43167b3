"""Synthetic two-domain pedestrian datasets in the exact Market-1501 / DukeMTMC-reID layouts.

    python -m uda.datasets.synthetic --domain market --preset small --seed 0 --out data/synth_market
    python -m uda.datasets.synthetic --preview /tmp/synth_preview.png

`generate()` writes `bounding_box_train/`, `query/` and `bounding_box_test/` with the real file-name
conventions, so the real parsers read them unchanged. The split structure follows the real sets:
disjoint train / test identities, one query per test identity per camera it appears in, the other
test images plus distractors (and Market's junk) in the gallery. Presets `tiny` (tests), `small`
(CPU demo) and `full` (the real counts). The drawing and the per-domain knobs of the domain shift
(`DomainStyle`) live in `uda.datasets.synth_render`.

Deterministic: every image is seeded from (seed, domain, image index) and the plan from (seed,
domain), so the bytes do not depend on the number of worker processes.
"""
from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
import io
import json
import os
from pathlib import Path
import shutil
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

from uda.datasets.synth_render import (STYLES, VIEWS, DomainStyle, camera_of, jpeg_bytes, make_person, person_of,
                                       random_shot, render)
from uda.errors import ConfigError, DatasetError, UdaError

GENERATOR_VERSION = 2
SPLITS = ("bounding_box_train", "query", "bounding_box_test")
IDENTITY, ONE_OFF, JUNK = 0, 1, 2          # what an image shows: a split identity, a '0000' stranger, junk
ONE_OFF_KEYS, JUNK_KEYS = 100_000, 200_000  # person keys of one-off people, above any 4-digit id


@dataclass(frozen=True)
class Counts:
    """The sizes of one generated dataset. Gallery counts include distractors and junk."""

    train_ids: int
    train_images: int
    test_ids: int
    query_images: int          # = sum over test ids of the cameras each appears in
    gallery_images: int
    distractor_images: int     # Market: '0000' images; Duke: images of the distractor ids
    distractor_ids: int        # Duke: gallery-only ids, one camera each; Market: 0
    junk_images: int           # Market: '-1' images; Duke: 0
    id_space: int              # every id is drawn from 1..id_space


PRESET_NAMES = ("tiny", "small", "full")  # each exists for both domains (PRESETS)
PRESETS: dict[tuple[str, str], Counts] = {
    ("market", "tiny"): Counts(train_ids=16, train_images=128, test_ids=16, query_images=40, gallery_images=100,
                               distractor_images=12, distractor_ids=0, junk_images=8, id_space=40),
    ("duke", "tiny"): Counts(train_ids=16, train_images=128, test_ids=16, query_images=40, gallery_images=92,
                             distractor_images=12, distractor_ids=4, junk_images=0, id_space=60),
    ("market", "small"): Counts(train_ids=128, train_images=1792, test_ids=100, query_images=350,
                                gallery_images=1250, distractor_images=150, distractor_ids=0, junk_images=100,
                                id_space=300),
    ("duke", "small"): Counts(train_ids=128, train_images=1792, test_ids=100, query_images=320, gallery_images=1150,
                              distractor_images=120, distractor_ids=30, junk_images=0, id_space=600),
    # The real counts. Market: 2,798 '0000' + 3,819 '-1' among the 19,732 gallery images. Duke: 408
    # distractor ids with 3,463 gallery images, each id in one camera, ids interleaved with the others.
    ("market", "full"): Counts(train_ids=751, train_images=12936, test_ids=750, query_images=3368,
                               gallery_images=19732, distractor_images=2798, distractor_ids=0, junk_images=3819,
                               id_space=1501),
    ("duke", "full"): Counts(train_ids=702, train_images=16522, test_ids=702, query_images=2228, gallery_images=17661,
                             distractor_images=3463, distractor_ids=408, junk_images=0, id_space=7140),
}


def _spread(rng: np.random.Generator, n: int, total: int, low: int, high: int) -> np.ndarray:
    """(n,) int64 counts in [low, high] summing exactly to `total`, unevenly (like real tracklet lengths)."""
    if not n * low <= total <= n * high:
        raise DatasetError(f"cannot split {total} items into {n} groups of {low}..{high}; fix the preset counts")
    counts = np.full(n, low, np.int64)
    weights = rng.gamma(2.0, size=n)
    while (remaining := total - counts.sum()) > 0:
        open_weights = np.where(counts < high, weights, 0.0)
        counts = np.minimum(counts + rng.multinomial(remaining, open_weights / open_weights.sum()), high)
    return counts


def _file_name(style: DomainStyle, pid: int, cam: int, frame: int, seq: int, box: int) -> str:
    """Market: 0002_c1s1_000451_03.jpg (id -1: junk, 0000: distractor); Duke: 0005_c2_f0046985.jpg."""
    person = f"{pid:04d}" if pid >= 0 else "-1"
    if style.name == "market":
        return f"{person}_c{cam + 1}s{seq}_{frame:06d}_{box:02d}.jpg"
    return f"{person}_c{cam + 1}_f{frame:07d}.jpg"


def plan(domain: str, preset: str, seed: int) -> list[tuple[str, int, int, int]]:
    """Every image to write, as (relative path, kind, person key, 0-based camera), in a fixed order.

    The list index of an entry is the image index its pixels are seeded from.
    """
    style, counts = STYLES[domain], PRESETS[(domain, preset)]
    rng = np.random.default_rng(np.random.SeedSequence([seed, style.code, 0]))
    ncam = style.num_cameras
    popularity = rng.dirichlet(np.full(ncam, 4.0))                  # some cameras see more people
    num_ids = counts.train_ids + counts.test_ids + counts.distractor_ids
    ids = np.sort(rng.choice(np.arange(1, counts.id_space + 1), num_ids, replace=False))
    role = rng.permutation(np.repeat([0, 1, 2], [counts.train_ids, counts.test_ids, counts.distractor_ids]))
    train_ids, test_ids, distractor_ids = ids[role == 0], ids[role == 1], ids[role == 2]
    cams_per_id = counts.query_images / counts.test_ids

    entries: list[tuple[str, int, int, int]] = []

    def frames(n: int) -> list[tuple[int, int, int]]:
        """n distinct (frame, sequence, box) of one tracklet, increasing in time."""
        step = (1, 30) if style.name == "market" else (1, 120)
        start = int(rng.integers(0, 150_000 if style.name == "market" else 300_000))
        seq, frame_no = int(rng.integers(1, 7)), start + np.cumsum(rng.integers(*step, size=n))
        return [(int(f), seq, int(rng.integers(1, 9))) for f in frame_no]

    def tracklets(pids: np.ndarray, num_cams: np.ndarray, images: int, low: int) -> list[tuple[int, int, int]]:
        """(pid, camera, number of images) for each identity's cameras; `images` in all, >= low each."""
        slots = [(int(pid), int(cam)) for pid, k in zip(pids, num_cams)
                 for cam in np.sort(rng.choice(ncam, int(k), replace=False, p=popularity))]
        sizes = _spread(rng, len(slots), images, low, 10**9)
        return [(pid, cam, int(n)) for (pid, cam), n in zip(slots, sizes)]

    train_cams = _spread(rng, len(train_ids), round(len(train_ids) * cams_per_id), 2, ncam)
    for pid, cam, n in tracklets(train_ids, train_cams, counts.train_images, 1):
        entries += [(f"{SPLITS[0]}/{_file_name(style, pid, cam, *f)}", IDENTITY, pid, cam) for f in frames(n)]
    test_cams = _spread(rng, len(test_ids), counts.query_images, 2, ncam)
    identity_gallery = counts.gallery_images - counts.distractor_images - counts.junk_images
    for pid, cam, n in tracklets(test_ids, test_cams, counts.query_images + identity_gallery, 2):
        names = [_file_name(style, pid, cam, *f) for f in frames(n)]
        query = int(rng.integers(n))
        entries += [(f"{SPLITS[1] if i == query else SPLITS[2]}/{name}", IDENTITY, pid, cam)
                    for i, name in enumerate(names)]
    if counts.distractor_ids:       # Duke: whole identities, one camera each, gallery only
        for pid, cam, n in tracklets(distractor_ids, np.ones(len(distractor_ids), int), counts.distractor_images, 1):
            entries += [(f"{SPLITS[2]}/{_file_name(style, pid, cam, *f)}", IDENTITY, pid, cam) for f in frames(n)]
    else:                           # Market: '0000' false alarms, each a stranger seen once
        for cam, n in enumerate(rng.multinomial(counts.distractor_images, popularity)):
            entries += [(f"{SPLITS[2]}/{_file_name(style, 0, cam, *f)}", ONE_OFF, 0, cam) for f in frames(int(n))]
    for cam, n in enumerate(rng.multinomial(counts.junk_images, popularity)):
        entries += [(f"{SPLITS[2]}/{_file_name(style, -1, cam, *f)}", JUNK, 0, cam) for f in frames(int(n))]
    entries.sort(key=lambda e: e[0])
    return entries


def render_entry(style: DomainStyle, seed: int, index: int, kind: int, pid: int, cam: int) -> bytes:
    """The JPEG bytes of image `index`: a pure function of its arguments."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, style.code, 3, index]))
    camera = camera_of(style.name, seed, cam)
    if kind == IDENTITY:
        person = person_of(style.name, seed, pid)
        track = np.random.default_rng(np.random.SeedSequence([seed, style.code, 2, pid, cam]))
    else:   # a stranger: drawn fresh from this image's own seed
        key = (ONE_OFF_KEYS if kind == ONE_OFF else JUNK_KEYS) + index
        person = make_person(style, np.random.default_rng(np.random.SeedSequence([seed, style.code, 1, key])))
        track = rng
    track_view = VIEWS[track.choice(len(VIEWS), p=camera.view_weights)]   # a tracklet mostly keeps it
    base_height = track.uniform(*style.height_range)
    aspect = float(track.uniform(*style.aspect_range))
    view = track_view if rng.random() < 0.7 else None
    shot = random_shot(rng, camera, view=view, junk=kind == JUNK)
    height = int(np.clip(round(base_height * rng.uniform(0.95, 1.05)), *style.height_range))
    width = round(height * aspect)
    if kind == JUNK and rng.random() < 0.3:
        person = None                                           # a box on the background alone
    image = render(person, camera, shot, width, height, rng, style)
    return jpeg_bytes(image, int(rng.integers(style.jpeg_quality[0], style.jpeg_quality[1] + 1)))


def _write_entries(domain: str, seed: int, root: str, indexed: list[tuple[int, tuple[str, int, int, int]]]) -> int:
    """Render and write a chunk of the plan (runs in a worker process)."""
    style = STYLES[domain]
    for index, (rel_path, kind, pid, cam) in indexed:
        Path(root, rel_path).write_bytes(render_entry(style, seed, index, kind, pid, cam))
    return len(indexed)


def _manifest(domain: str, preset: str, seed: int, entries: list[tuple[str, int, int, int]]) -> dict:
    per_split = {split: [e for e in entries if e[0].startswith(split + "/")] for split in SPLITS}
    return {
        "generator": "uda.datasets.synthetic", "version": GENERATOR_VERSION,
        "domain": domain, "preset": preset, "seed": seed,
        "counts": {split: {"images": len(rows), "ids": len({r[0].split("/")[1].split("_")[0] for r in rows})}
                   for split, rows in per_split.items()},
        "preset_counts": asdict(PRESETS[(domain, preset)]),
    }


def _check_args(domain: str, preset: str, workers: int | None) -> None:
    if domain not in STYLES:
        raise DatasetError(f"unknown synthetic domain {domain!r}; use one of {sorted(STYLES)}")
    if (domain, preset) not in PRESETS:
        raise DatasetError(f"unknown synthetic preset {preset!r}; use one of {', '.join(PRESET_NAMES)}")
    if workers is not None and workers < 1:
        raise DatasetError(f"workers must be >= 1, got {workers}")


def generate(domain: str, preset: str, seed: int, out: Path, workers: int | None = None) -> Path:
    """Write the dataset (domain, preset, seed) to `out` and return `out`.

    Atomic: images go to `out.tmp-<pid>`, renamed to `out` only when complete, so an interrupted run
    never leaves a folder that looks like a dataset. An existing `out` holding the same dataset is
    returned as is; any other existing `out` is an error. workers=None uses every CPU.
    """
    _check_args(domain, preset, workers)
    out = Path(out)
    entries = plan(domain, preset, seed)
    manifest = _manifest(domain, preset, seed, entries)
    if out.exists():
        if _same_dataset(out, manifest):
            return out
        raise DatasetError(f"{out} already exists and is not synthetic {domain}/{preset} seed {seed}; "
                           "delete it or choose another --out")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for split in SPLITS:
            (tmp / split).mkdir(parents=True)
        indexed = list(enumerate(entries))
        workers = min(workers or os.cpu_count() or 1, max(1, len(indexed) // 50))
        if workers == 1:
            _write_entries(domain, seed, str(tmp), indexed)
        else:
            chunk = max(25, len(indexed) // (workers * 8))
            with ProcessPoolExecutor(max_workers=workers) as pool:
                jobs = [pool.submit(_write_entries, domain, seed, str(tmp), indexed[i:i + chunk])
                        for i in range(0, len(indexed), chunk)]
                for job in jobs:
                    job.result()
        (tmp / "README.txt").write_text(
            f"Synthetic {domain} re-id dataset (uda-reid generator v{GENERATOR_VERSION}), preset {preset}, "
            f"seed {seed}.\nRegenerate: python -m uda.datasets.synthetic --domain {domain} --preset {preset} "
            f"--seed {seed} --out <dir>\n")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        try:
            tmp.rename(out)
        except OSError as error:
            if not _same_dataset(out, manifest):    # losing a race to an identical dataset is fine
                raise DatasetError(f"cannot move the finished dataset to {out} ({error}); "
                                   "delete that folder or choose another --out") from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _same_dataset(folder: Path, manifest: dict) -> bool:
    try:
        return json.loads((folder / "manifest.json").read_text()) == manifest
    except (OSError, ValueError):
        return False


def write_preview(path: Path, seed: int = 0, rows: int = 4) -> Path:
    """A contact sheet PNG: `rows` identities (rows) x cameras (columns) in each domain, labelled."""
    cell_h, pad, label_w, title_h = 256, 4, 56, 16
    blocks = []
    for style in STYLES.values():
        scale = cell_h / style.height_range[1]            # the tallest image of the domain fills a cell
        cell_w = round(style.height_range[1] * style.aspect_range[1] * scale)
        sheet = Image.new("RGB", (label_w + style.num_cameras * (cell_w + pad), title_h * 2 + rows * (cell_h + pad)),
                          (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        draw.text((4, 2), f"{style.name}: {style.num_cameras} cameras", fill=(0, 0, 0))
        for cam in range(style.num_cameras):
            draw.text((label_w + cam * (cell_w + pad) + cell_w // 2 - 6, title_h), f"c{cam + 1}", fill=(0, 0, 0))
        for row in range(rows):
            y = title_h * 2 + row * (cell_h + pad)
            draw.text((4, y + cell_h // 2), f"id {row + 1}", fill=(0, 0, 0))
            for cam in range(style.num_cameras):
                jpeg = render_entry(style, seed, 1000 * row + cam, IDENTITY, row + 1, cam)
                img = Image.open(io.BytesIO(jpeg))
                img = img.resize((round(img.width * scale), round(img.height * scale)), Image.NEAREST)
                sheet.paste(img, (label_w + cam * (cell_w + pad), y + cell_h - img.height))
        blocks.append(sheet)
    out = Image.new("RGB", (max(b.width for b in blocks), sum(b.height for b in blocks) + pad), (255, 255, 255))
    y = 0
    for block in blocks:
        out.paste(block, (0, y))
        y += block.height + pad
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uda.datasets.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--domain", choices=sorted(STYLES))
    parser.add_argument("--preset", default="small", choices=PRESET_NAMES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    parser.add_argument("--preview", type=Path, help="write a contact sheet of both domains to this PNG instead")
    args = parser.parse_args(argv)
    try:
        start = time.perf_counter()
        if args.preview is not None:
            if args.domain is not None or args.out is not None:
                raise ConfigError("--preview takes no --domain / --out; run it on its own")
            print(f"wrote {write_preview(args.preview, args.seed)}")
            return 0
        if args.domain is None or args.out is None:
            raise ConfigError("give --domain market|duke and --out DIR (or --preview PNG)")
        out = generate(args.domain, args.preset, args.seed, args.out, args.workers)
        counts = json.loads((out / "manifest.json").read_text())["counts"]
        summary = ", ".join(f"{split} {c['images']} images / {c['ids']} ids" for split, c in counts.items())
        print(f"wrote {out}: {summary} in {time.perf_counter() - start:.1f} s")
        return 0
    except UdaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
