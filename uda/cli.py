"""The command-line surface both stages share: flags, `--opts`, and one-line errors instead of tracebacks."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
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
    parser.add_argument("--output-dir", type=output_folder, help="run folder (config, log, metrics.jsonl, TensorBoard, checkpoints)")
    parser.add_argument("--data-root", help="folder holding the datasets (default: $UDA_DATA, else ./data)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output-dir from last.pth")
    parser.add_argument(
        "--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=1e-3 data.num_workers=2"
    )
    return parser


FLAG_KEYS = {"pretrained": "model.pretrained", "init": "adapt.init", "source": "data.source", "target": "data.target",
             "data_root": "data.root"}  # a stage's flags -> the settings they set


def config_overrides(args: argparse.Namespace) -> list[str]:
    """A stage's flags as config overrides, applied before --opts (so --opts wins)."""
    flags = [f"{key}={getattr(args, flag)}" for flag, key in FLAG_KEYS.items() if getattr(args, flag, None) is not None]
    return flags + list(args.opts)


def positive_int(text: str) -> int:
    """argparse type: a count of at least 1 (0 or less would fail only after minutes of extraction)."""
    value = int(text)  # a ValueError is argparse's own "invalid positive_int value" line
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value}")
    return value


def unwritable(path: Path) -> str | None:
    """Why files cannot be written at `path` (a folder, or a file in one; made later if missing), or None:
    the nearest part of it that exists must be a writable folder (or, for `path` itself, a writable file)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != path and not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | (os.X_OK if existing.is_dir() else 0)):
        read_only = hasattr(os, "statvfs") and os.statvfs(existing).f_flag & os.ST_RDONLY
        return f"{existing} is not writable" + (" (a read-only filesystem)" if read_only else "")
    return None


def output_file(*suffixes: str) -> Callable[[str], Path]:
    """argparse type: a file to write at the end of a command, checked when the command line is read
    (not a folder, one of `suffixes` when given: "" allows none, writable) and its folder made, so the
    work done is not lost to a traceback when the result is written."""

    def check(text: str) -> Path:
        path = Path(text).expanduser()
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{path} is a folder; name the file to write in it")
        if suffixes and path.suffix.lower() not in suffixes:
            named = " or ".join(suffix for suffix in suffixes if suffix)
            raise argparse.ArgumentTypeError(f"{path} must end in {named}" + (" (or have no suffix)" if "" in suffixes else ""))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot make the folder of {path}: {exc.strerror}") from None
        problem = unwritable(path)
        if problem:
            raise argparse.ArgumentTypeError(f"cannot write {path}: {problem}")
        return path

    check.__name__ = "output file"  # argparse names the type in its messages
    return check


def output_folder(text: str) -> Path:
    """argparse type: a folder to write runs into, refused at once when a file holds its name or it cannot
    be written (a read-only folder or filesystem): else the first stage would stop on it, minutes or hours in."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file, not a folder")
    problem = unwritable(path)
    if problem:
        raise argparse.ArgumentTypeError(f"cannot write into {path}: {problem}")
    return path


output_folder.__name__ = "output folder"


def run_main(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run an entry point; a UdaError (bad path, bad config, NaN loss...) is printed as one line, exit 2.
    After a normal end under torchrun, the process group is left cleanly."""
    try:
        main(argv)
        from uda.distributed import leave_process_group  # torch is imported by then; cli itself stays light

        leave_process_group()
    except UdaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; continue with --resume (the last completed epoch is checkpointed)", file=sys.stderr)
        sys.exit(130)
