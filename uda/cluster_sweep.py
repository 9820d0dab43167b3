"""How DBSCAN's eps (and min_samples) would group a target train set under one model, before a run.

    python -m uda.cluster_sweep --model runs/pretrain/duke_mobilenet/model_final.pth --dataset market \
        [--eps 0.4 0.45 0.5 0.55 0.6] [--min-samples 4] [--k1 30] [--k2 6] [--camera-normalize] [--out sweep.json]

The clustering step of adapt.py, once per setting, on the dataset's train split as the model sees it
(its saved preprocessing, eval.flip, eval.scales; adapt's own `memory_features`): the features and the Jaccard distances are computed once, then
DBSCAN runs for each eps x min_samples. It prints a row per setting: the cluster count, the outlier
fraction, and, when the train split has ids, agreement with them (NMI, ARI, pairwise precision and
recall; `uda.cluster.cluster_stats`). Pick settings on a validation pair (one whose labels you may
look at), then carry them to the pair you report: ids feed these diagnostics only, never a label.
A model mid-adaptation (a run's last.pth) shows how the clusters drift as the features tighten.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python uda/cluster_sweep.py`: import the package, not uda/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch

from uda import build, settings
from uda.data import splits
from uda.adapt import memory_features
from uda.cli import output_file, run_main
from uda.cluster import cluster_stats, jaccard_distance, pseudo_labels, remove_camera_means
from uda.errors import ClusteringError, UdaError


def sweep(features: torch.Tensor, camids: torch.Tensor | None, true_ids: np.ndarray | None, *, eps: list[float],
          min_samples: list[int], k1: int = 30, k2: int = 6, device: torch.device | None = None) -> list[dict]:
    """One row per (eps, min_samples): the settings and `cluster_stats` of the DBSCAN labels.

    features: (N, D) target memory; camids: (N,) to remove each camera's mean first (None: as given).
    A setting under which DBSCAN finds no cluster gets a row with num_clusters 0 instead of stopping the sweep.
    """
    check_sweep(eps, min_samples, k1, k2)
    grouped = remove_camera_means(features, camids) if camids is not None else features
    distances = jaccard_distance(grouped, k1=k1, k2=k2, device=device, max_distance=max(eps))
    rows = []
    for e in eps:
        for m in min_samples:
            try:
                stats = cluster_stats(pseudo_labels(distances, eps=e, min_samples=m), true_ids)
            except ClusteringError:
                stats = {"num_clusters": 0, "outlier_fraction": 1.0}
            rows.append({"eps": e, "min_samples": m, **stats})
    return rows


def check_sweep(eps: list[float], min_samples: list[int], k1: int, k2: int) -> None:
    """adapt's own bounds for the swept settings, checked before any feature is extracted (and so that a
    caught ClusteringError in the sweep means "no cluster", not a bad setting)."""
    if not eps or not min_samples:
        raise UdaError("the sweep needs at least one eps and one min_samples")
    eps_ok, min_samples_ok = settings.BY_KEY["cluster.eps"].check.test, settings.BY_KEY["cluster.min_samples"].check.test
    if not all(map(eps_ok, eps)) or not all(map(min_samples_ok, min_samples)):
        raise UdaError(f"--eps values must lie in (0, 1) (Jaccard distances) and --min-samples be >= 1, got eps {eps}, min_samples {min_samples}")
    if k1 < 1 or k2 < 1:
        raise UdaError(f"--k1 and --k2 must be >= 1, got k1 {k1}, k2 {k2}")


def format_rows(rows: list[dict], num_ids: int | None) -> str:
    header = f"{'eps':>5} {'min_s':>5} {'clusters':>8} {'outliers':>8}"
    scored = any("ari" in r for r in rows)  # a setting without any cluster has no agreement to show
    if scored:
        header += f" {'NMI':>6} {'ARI':>6} {'prec':>6} {'recall':>6}"
    lines = [header + (f"   (true ids: {num_ids})" if num_ids else "")]
    for r in rows:
        line = f"{r['eps']:>5.3g} {r['min_samples']:>5d} {r['num_clusters']:>8d} {r['outlier_fraction']:>8.3f}"
        if scored and "ari" in r:
            line += f" {r['nmi']:>6.3f} {r['ari']:>6.3f} {r['pairwise_precision']:>6.3f} {r['pairwise_recall']:>6.3f}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model_final.pth or a run's last.pth")
    parser.add_argument("--dataset", required=True, help="whose train split to cluster (a name or your own data's path)")
    parser.add_argument("--data-root")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.4, 0.45, 0.5, 0.55, 0.6])
    parser.add_argument("--min-samples", type=int, nargs="+", default=[4])
    parser.add_argument("--k1", type=int, default=30)
    parser.add_argument("--k2", type=int, default=6)
    parser.add_argument("--camera-normalize", action="store_true", help="remove each camera's mean feature first (cluster.camera_normalize=true)")
    parser.add_argument("--out", type=output_file(".json"), help="also write the rows as JSON")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. data.num_workers=2")
    args = parser.parse_args(argv)
    check_sweep(args.eps, args.min_samples, args.k1, args.k2)

    model, cfg, device = build.inference_model(args.model, args.opts, args.data_root)
    dataset = splits.load_named_dataset(args.dataset, cfg, "target")
    if args.camera_normalize and not dataset.has_cameras:
        raise UdaError(f"--camera-normalize needs camera ids, and {dataset.name} has none")
    records, images = splits.prepare_train_split(dataset.train, cfg, device)
    features = memory_features(model, splits.make_plain_loader(records, cfg, images), cfg, device, f"{dataset.name} train")
    camids = torch.tensor([r.camid for r in records]) if args.camera_normalize else None
    true_ids = np.array([r.orig_pid for r in records]) if dataset.train_labelled else None
    rows = sweep(features, camids, true_ids, eps=args.eps, min_samples=args.min_samples, k1=args.k1, k2=args.k2, device=device)
    num_ids = len(np.unique(true_ids)) if true_ids is not None else None
    print(f"{args.model} on {dataset.name} train ({len(records)} images), k1={args.k1} k2={args.k2}, "
          f"camera means {'removed' if args.camera_normalize else 'kept'}")
    print(format_rows(rows, num_ids))
    if args.out:
        args.out.write_text(json.dumps({"model": str(args.model), "dataset": dataset.name, "k1": args.k1, "k2": args.k2,
                                        "camera_normalize": args.camera_normalize, "rows": rows}, indent=2) + "\n")
    return rows


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
