"""The upper bound: the source recipe trained on the TARGET's true labels (what adaptation could reach
if the clusters were the identities), scored on the target's test set at the last epoch.

    python baselines/oracle.py --config configs/pretrain/duke_mobilenet.yaml --target duke [--output-dir DIR] [--opts ...]

uda/pretrain.py with the target as its labelled source: for a pair, the oracle of X -> Y is the source
model of Y -> X (e.g. Market -> Duke's oracle is configs/pretrain/duke_mobilenet.yaml's run).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from uda import pretrain  # noqa: E402
from uda.cli import run_main  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="the source stage's config (the recipe); its data.source is replaced")
    parser.add_argument("--target", required=True, help="the dataset whose train labels the oracle learns")
    parser.add_argument("--data-root", help="folder holding the datasets")
    parser.add_argument("--output-dir", help="run folder (default runs/oracle/<target>)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    forwarded = ["--source", args.target, "--output-dir", args.output_dir or str(Path("runs") / "oracle" / args.target)]
    forwarded += (["--config", args.config] if args.config else []) + (["--data-root", args.data_root] if args.data_root else [])
    forwarded += ["--resume"] if args.resume else []
    return pretrain.main(forwarded + ["--opts", *args.opts])


if __name__ == "__main__":
    run_main(main)
