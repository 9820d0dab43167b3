"""The command-line surface both stages share: flags, `--opts`, and one-line errors instead of tracebacks."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from uda.errors import UdaError


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--source", help="source dataset: market, duke, msmt17, synth_market, synth_duke, or the path of your own "
        "(a folder holding train/ query/ gallery/, or a .csv; see uda/datasets/custom.py)"
    )
    parser.add_argument("--target", help="target dataset (same choices; your own may have unlabelled train images)")
    parser.add_argument("--config", help="YAML config of the experiment (see configs/)")
    parser.add_argument("--output-dir", help="run folder (config, log, metrics.jsonl, TensorBoard, checkpoints)")
    parser.add_argument("--data-root", help="folder holding the datasets (default: $UDA_DATA, else ./data)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output-dir from last.pth")
    parser.add_argument(
        "--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=1e-3 data.num_workers=2"
    )
    return parser


def run_main(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run an entry point; a UdaError (bad path, bad config, NaN loss...) is printed as one line, exit 2."""
    try:
        main(argv)
    except UdaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; continue with --resume (the last completed epoch is checkpointed)", file=sys.stderr)
        sys.exit(130)
