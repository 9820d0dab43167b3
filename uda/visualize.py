"""Pictures researchers expect: queries with their top-10 gallery matches, and samples of pseudo-identities.

    python -m uda.visualize ranks --model runs/adapt/market2duke/model_final.pth --dataset duke [--queries 8] [--out ranks.png]
    python -m uda.visualize clusters --run runs/adapt/market2duke --epoch 12 [--clusters 6] [--out clusters.png]

ranks: a row per query (chosen at random, seeded): the query, then its 10 nearest gallery images as the
evaluation ranks them (the same features, metric and same-camera removal), each framed green when it
is a true match and red when not, its camera under it. clusters: a row per pseudo-identity of that
epoch (chosen at random among clusters of 2+ images, seeded), up to 8 of its images, framed green when
the image's true id is the cluster's majority id (red otherwise), with the cluster's size and purity.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python uda/visualize.py`: import the package, not uda/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch
from PIL import Image, ImageDraw

from uda.cli import output_file, positive_int, run_main
from uda.data.images import read_image
from uda.errors import UdaError

TILE = (64, 128)  # width, height of each picture
FRAME = 4
CAPTION = 14  # pixels under each tile for its text
GREEN, RED, GREY, WHITE = (0, 170, 0), (210, 0, 0), (150, 150, 150), (255, 255, 255)


@dataclass
class Tile:
    path: str
    caption: str
    frame: tuple[int, int, int]


def draw_rows(rows: list[tuple[str, list[Tile]]], gap_after: int | None = None) -> Image.Image:
    """A white canvas with one row of framed tiles per (row title, tiles); the title above each row.
    `gap_after`: an empty column's width after that many tiles (the query, set apart from its ranks)."""
    cell_w, cell_h = TILE[0] + 2 * FRAME + 4, TILE[1] + 2 * FRAME + CAPTION
    title_h = CAPTION
    columns = max(len(tiles) for _, tiles in rows)
    gap = cell_w // 2 if gap_after is not None else 0
    width = max(columns * cell_w + gap, 4 + 6 * max(len(title) for title, _ in rows))  # titles fit (~6 px a character)
    canvas = Image.new("RGB", (width, len(rows) * (cell_h + title_h)), WHITE)
    draw = ImageDraw.Draw(canvas)
    for r, (title, tiles) in enumerate(rows):
        top = r * (cell_h + title_h)
        draw.text((2, top), title, fill=(0, 0, 0))
        for c, tile in enumerate(tiles):
            left = c * cell_w + (gap if gap_after is not None and c >= gap_after else 0)
            y = top + title_h
            draw.rectangle([left, y, left + TILE[0] + 2 * FRAME - 1, y + TILE[1] + 2 * FRAME - 1], fill=tile.frame)
            canvas.paste(read_image(tile.path).resize(TILE), (left + FRAME, y + FRAME))  # as the model saw it
            draw.text((left + FRAME, y + TILE[1] + 2 * FRAME), tile.caption, fill=(0, 0, 0))
    return canvas


def rank_rows(dist: torch.Tensor, query, gallery, chosen: list[int], remove_same_camera: bool = True, top: int = 10) -> list[tuple[str, list[Tile]]]:
    """For each chosen query index: the query tile, then its `top` nearest gallery tiles by `dist`
    (num_query, num_gallery), after the protocol's removal of its id seen from its own camera."""
    rows = []
    for q in chosen:
        record = query[q]
        ranked = []
        for g in torch.argsort(dist[q]).tolist():
            item = gallery[g]
            if remove_same_camera and item.pid == record.pid and item.camid == record.camid:
                continue
            ranked.append(Tile(item.path, f"c{item.camid + 1}" if item.camid >= 0 else "", GREEN if item.pid == record.pid else RED))
            if len(ranked) == top:
                break
        query_tile = Tile(record.path, f"c{record.camid + 1}" if record.camid >= 0 else "", GREY)
        matches = sum(t.frame == GREEN for t in ranked)
        rows.append((f"query {q} (id {record.pid}): {matches} of the top {top} are matches", [query_tile, *ranked]))
    return rows


def cluster_rows(labels: np.ndarray, paths: list[str], true_ids: np.ndarray, chosen: list[int], per_cluster: int = 8) -> list[tuple[str, list[Tile]]]:
    """For each chosen cluster id: up to `per_cluster` of its images, framed by agreement with the
    cluster's majority true id (grey when true ids are unknown, all -1), titled with size and purity."""
    rows = []
    known = bool((true_ids >= 0).any())
    for cluster in chosen:
        members = np.flatnonzero(labels == cluster)
        if known:
            ids, counts = np.unique(true_ids[members], return_counts=True)
            majority, purity = ids[counts.argmax()], counts.max() / len(members)
            title = f"cluster {cluster}: {len(members)} images, purity {purity:.2f} ({len(ids)} true ids)"
        else:
            majority, title = None, f"cluster {cluster}: {len(members)} images (true ids unknown)"
        tiles = [Tile(paths[i], "" if majority is None else f"id {true_ids[i]}",
                      GREY if majority is None else (GREEN if true_ids[i] == majority else RED)) for i in members[:per_cluster]]
        rows.append((title, tiles))
    return rows


def ranks(args: argparse.Namespace) -> Path:
    from uda import build
    from uda.evaluation import protocol
    from uda.data import splits
    from uda.evaluation.distance import pairwise_distance

    model, cfg, device = build.inference_model(args.model, args.opts, args.data_root)
    dataset = splits.load_named_dataset(args.dataset, cfg, "test")
    test_set = protocol.make_test_set(dataset, cfg, device)
    qf, gf = protocol.test_set_features(model, test_set, cfg, build.amp_dtype(cfg, device))
    dist = pairwise_distance(qf, gf, metric=cfg.eval.metric, device=device).cpu()
    rng = np.random.default_rng(args.seed)
    chosen = sorted(rng.choice(len(test_set.query), size=min(args.queries, len(test_set.query)), replace=False).tolist())
    rows = rank_rows(dist, test_set.query, test_set.gallery, chosen, test_set.remove_same_camera)
    out = Path(args.out or f"ranks_{dataset.name}.png")
    draw_rows(rows, gap_after=1).save(out)
    return out


def clusters(args: argparse.Namespace) -> Path:
    folder = Path(args.run) / "pseudo_labels"
    labels_file = folder / f"epoch_{args.epoch:03d}.npy"
    if not labels_file.is_file():
        have = sorted(int(p.stem.split("_")[1]) for p in folder.glob("epoch_*.npy"))
        raise UdaError(f"{labels_file} does not exist: {args.run} has pseudo-labels of epochs {have or 'none'} (adapt.py writes them)")
    index = folder / "images.tsv"
    if not index.is_file():
        raise UdaError(f"{index} does not exist: {args.run} is not a complete adapt.py run folder (adapt.py writes it with the first pseudo-labels)")
    try:
        labels = np.load(labels_file, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UdaError(f"cannot read {labels_file} ({type(exc).__name__}: {str(exc)[:120]})") from None
    lines = index.read_text().splitlines()
    paths = [line.rsplit("\t", 1)[0] for line in lines]
    true_ids = np.array([int(line.rsplit("\t", 1)[1]) for line in lines])
    ids, sizes = np.unique(labels[labels >= 0], return_counts=True)
    candidates = ids[sizes >= 2]
    if len(candidates) == 0:
        raise UdaError(f"epoch {args.epoch} of {args.run} has no cluster of 2 or more images")
    rng = np.random.default_rng(args.seed)
    chosen = sorted(rng.choice(candidates, size=min(args.clusters, len(candidates)), replace=False).tolist())
    out = Path(args.out or f"clusters_epoch{args.epoch}.png")
    draw_rows(cluster_rows(labels, paths, true_ids, chosen)).save(out)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    r = commands.add_parser("ranks", help="queries and their top-10 gallery matches")
    r.add_argument("--model", required=True, help="model_final.pth or last.pth")
    r.add_argument("--dataset", required=True, help="whose test set (a name or your own data's path)")
    r.add_argument("--data-root")
    r.add_argument("--queries", type=positive_int, default=8)
    r.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE")
    c = commands.add_parser("clusters", help="sample images of a few pseudo-identities")
    c.add_argument("--run", required=True, help="an adapt.py run folder")
    c.add_argument("--epoch", type=int, required=True)
    c.add_argument("--clusters", type=positive_int, default=6)
    for sub in (r, c):
        sub.add_argument("--out", type=output_file(".png", ".jpg", ".jpeg"), help="picture to write, .png or .jpg (default ranks_<dataset>.png / clusters_epoch<E>.png)")
        sub.add_argument("--seed", type=int, default=0, help="which queries / clusters are drawn")
    args = parser.parse_args(argv)
    out = ranks(args) if args.command == "ranks" else clusters(args)
    print(f"wrote {out}")
    return out


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
