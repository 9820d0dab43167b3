"""The files of uda/ one training batch passes through, from disk to loss, measured by tracing a real run.

    python scripts/batch_path.py adapt --source market --target duke --init runs/pretrain/market/model_final.pth \
        --opts data.subset_ids=30 optim.epochs=1 adapt.iters=2
    python scripts/batch_path.py pretrain --source market --opts data.subset_ids=30 optim.epochs=1

Runs the stage as `python uda/<stage>.py <args>` would, under a profiler (every thread), and lists:
  - the files on the call stack whenever a dataset is parsed or an image file is read (disk -> records,
    pixels), and
  - the files whose code runs inside the first train step, from `engine.train_steps` to the return of
    the step's losses (sampler -> augmentation -> model -> heads -> loss), plus the files on the stack there.
The entry wrapper (uda/cli.py) and the config object's attribute lookups (uda/config.py) are listed
apart: the batch never passes through them. The redesign asked for at most 10 files.
"""
from __future__ import annotations

import os
import runpy
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = str(REPO / "uda")
NOT_ON_THE_PATH = {"uda/cli.py": "the entry wrapper", "uda/config.py": "config attribute lookups"}
READS_DISK = {"parse_bounding_box_split", "parse_list_file", "parse_custom", "read_image", "_decode"}
STEP_STARTS, STEP_ENDS = "train_steps", {"step_losses"}


class BatchTrace:
    """A profile function that collects the files, stopping at the end of the first step."""

    def __init__(self):
        self.files: set[str] = set()
        self.in_step = self.done = False

    def add_stack(self, frame) -> None:
        while frame is not None:
            self.add(frame.f_code.co_filename)
            frame = frame.f_back

    def add(self, filename: str) -> None:
        if filename.startswith(PACKAGE):
            self.files.add(os.path.relpath(filename, REPO))

    def __call__(self, frame, event, arg):
        code = frame.f_code
        if self.done or event not in ("call", "return") or not code.co_filename.startswith(PACKAGE):
            return
        if event == "return":
            self.done = self.in_step and code.co_name in STEP_ENDS
            return
        if code.co_name in READS_DISK:
            self.add_stack(frame)
        self.in_step = self.in_step or code.co_name == STEP_STARTS
        if self.in_step:
            self.add_stack(frame)


def trace_stage(stage: str, argv: list[str]) -> list[str]:
    """The sorted files one batch of `python uda/<stage>.py argv` passes through (NOT_ON_THE_PATH included)."""
    trace = BatchTrace()
    saved_argv = sys.argv
    sys.argv = [str(REPO / "uda" / f"{stage}.py"), *argv]
    threading.setprofile(trace)
    sys.setprofile(trace)
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exit_:
        if exit_.code:
            raise
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
        sys.argv = saved_argv
    return sorted(trace.files)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("pretrain", "adapt"):
        sys.exit(__doc__)
    sys.path.insert(0, str(REPO))
    files = trace_stage(sys.argv[1], sys.argv[2:])
    on_path = [f for f in files if f not in NOT_ON_THE_PATH]
    print(f"\none {sys.argv[1]} batch from disk to loss: {len(on_path)} files")
    for name in on_path:
        print(f"  {name}")
    for name in sorted(set(files) & set(NOT_ON_THE_PATH)):
        print(f"  ({name}: {NOT_ON_THE_PATH[name]}, not counted)")


if __name__ == "__main__":
    main()
