"""Pseudo-labels from k-means with a given cluster count (MMT-style), the classic alternative to DBSCAN.

    python baselines/kmeans.py --num-clusters 700 --config configs/uda/market2duke_mobilenet.yaml --source market --target duke --init M

uda/adapt.py with `cluster.method=kmeans cluster.num_clusters=N` (k-means on the [camera-normalised]
feature memory; every image labelled, no outliers); every other argument goes through unchanged.
MMT uses 500 for Market -> Duke and 700 for Duke -> Market (Duke has 702 train ids, Market 751).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baselines import with_opts  # noqa: E402
from uda import adapt  # noqa: E402
from uda.cli import run_main  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Every other argument is uda/adapt.py's (see its --help).")
    parser.add_argument("--num-clusters", type=int, required=True, help="k, the number of pseudo-identities")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    switch = ["cluster.method=kmeans", f"cluster.num_clusters={args.num_clusters}"]
    return adapt.main(with_opts(rest, switch))


if __name__ == "__main__":
    run_main(main)
