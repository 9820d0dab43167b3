"""The lower bound: a source model on a target's test set, without and with k-reciprocal re-ranking.

    python baselines/direct_transfer.py --model runs/pretrain/market_mobilenet/model_final.pth --target duke [--json out.json]

uda/evaluate.py with `eval.rerank=true` (the model's own image size, flip and metric from its saved config):
the same numbers as epoch 0 of an adaptation run from that model.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from uda import evaluate  # noqa: E402
from uda.cli import run_main  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a source model: pretrain.py's model_final.pth")
    parser.add_argument("--target", required=True, help="the target dataset whose test set scores it")
    parser.add_argument("--data-root", help="folder holding the datasets")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    forwarded = ["--model", args.model, "--dataset", args.target] + (["--data-root", args.data_root] if args.data_root else [])
    forwarded += ["--json", args.json] if args.json else []
    return evaluate.main(forwarded + ["--opts", "eval.rerank=true", *args.opts])


if __name__ == "__main__":
    run_main(main)
