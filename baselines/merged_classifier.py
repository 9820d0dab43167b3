"""The adaptation loop with ONE classifier over the source ids and the target clusters (the source
documents' "mixed classifier", as SpCL / IDM-style codebases do), against our two separate heads.

    python baselines/merged_classifier.py --config configs/uda/market2duke_mobilenet.yaml --source market --target duke --init M

uda/adapt.py with `adapt.classifier=merged`; every other argument goes through unchanged.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baselines import with_opts  # noqa: E402
from uda import adapt  # noqa: E402
from uda.cli import run_main  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    return adapt.main(with_opts(argv, ["adapt.classifier=merged"]))


if __name__ == "__main__":
    run_main(main)
