"""The run folder: resolved config, code version, log.txt, metrics.jsonl, TensorBoard events, checkpoints.

Everything a reader needs to trust or reproduce a number lives in one folder. Only the main process
of a distributed run writes; the others get a RunDir whose writers are silent.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
import yaml

from uda import checkpoint
from uda.config import Config, config_changes, dump_config
from uda.errors import UdaError

LAST_CHECKPOINT = "last.pth"
FINAL_MODEL = "model_final.pth"


def code_version() -> str:
    """The git commit of the checkout (with '+dirty' when it has local changes), or 'unknown'."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """`write(handle)` into a temporary file in the same folder, then rename: a killed run never leaves
    half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save, atomically (see atomic_write)."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def _json_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    return value


# Settings a resumed run may change: where things are and how fast they run, how long it trains and how
# often it evaluates. Any other change would make one run of two experiments.
RESUME_MAY_CHANGE = frozenset({
    "data.root", "data.num_workers", "data.cache", "eval.batch_size", "eval.rerank", "device", "adapt.init",
    "optim.epochs", "train.eval_every",
})


def check_resumable(path: Path, cfg: Config) -> dict[str, tuple[Any, Any]]:
    """The allowed changes from the run's saved config.yaml to `cfg`; UdaError naming any other."""
    saved = path / "config.yaml"
    if not saved.is_file():
        return {}
    changes = config_changes(yaml.safe_load(saved.read_text()) or {}, cfg.to_dict())
    refused = {k: v for k, v in changes.items() if k not in RESUME_MAY_CHANGE}
    if refused:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(refused.items()))
        raise UdaError(
            f"{path} was run with other settings ({listed}); a resumed run must go on with the config it "
            "started with (its config.yaml): resume without these changes, or choose another --output-dir"
        )
    return changes


class RunDir:
    """One experiment's folder. `resume=False` refuses to overwrite a folder that already holds a run.
    `provenance` adds lines to version.txt for inputs the config names only loosely (which weights file
    `pretrained: imagenet` resolved to)."""

    def __init__(self, path: str | Path, cfg: Config, resume: bool = False, is_main: bool = True,
                 provenance: dict[str, str] | None = None):
        self.path = Path(path)
        self.is_main = is_main
        self.logger = logging.getLogger(f"uda.run.{self.path}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self.writer = None
        if not is_main:
            return
        if (self.path / LAST_CHECKPOINT).exists() and not resume:
            raise UdaError(
                f"{self.path} already holds a run; pass --resume to continue it or choose another --output-dir"
            )
        changes = check_resumable(self.path, cfg) if resume else {}
        self.path.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, self.path / "config.yaml")
        (self.path / "version.txt").write_text(
            f"commit: {code_version()}\ntorch: {torch.__version__}\npython: {sys.version.split()[0]}\n"
            f"command: {' '.join(sys.argv)}\n" + "".join(f"{k}: {v}\n" for k, v in (provenance or {}).items())
        )
        if not self.logger.handlers:
            fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
            for handler in (logging.FileHandler(self.path / "log.txt"), logging.StreamHandler(sys.stdout)):
                handler.setFormatter(fmt)
                self.logger.addHandler(handler)
        from tensorboardX import SummaryWriter  # imported here: only the main process writes events

        self.writer = SummaryWriter(str(self.path / "tb"))
        for key, value in (provenance or {}).items():
            self.log(f"{key}: {value}")
        if changes:
            self.log("resumed with changed settings: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(changes.items())))

    def log(self, message: str) -> None:
        if self.is_main:
            self.logger.info(message)

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        """TensorBoard scalars, e.g. losses per epoch under 'train/'."""
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}{name}", float(value), step)
        self.writer.flush()

    def log_metrics(self, epoch: int, metrics: dict[str, dict[str, Any]]) -> None:
        """One JSON line per evaluation: {"epoch": e, "<set>": {"mAP": .., "rank1": ..}, ...}, plus TensorBoard."""
        if not self.is_main:
            return
        record = {"epoch": epoch}
        for set_name, values in metrics.items():
            record[set_name] = {k: _json_value(v) for k, v in values.items()}
            scalar = {k: v for k, v in values.items() if isinstance(v, (int, float))}
            self.scalars(scalar, epoch, prefix=f"{set_name}/")
        with open(self.path / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def drop_metrics_after(self, epoch: int) -> None:
        """On resume from a checkpoint at `epoch`: forget the records a killed run wrote after it (that
        epoch is trained again), so metrics.jsonl ends as an uninterrupted run's would."""
        path = self.path / "metrics.jsonl"
        if not self.is_main or not path.is_file():
            return
        kept = "".join(json.dumps(r) + "\n" for r in read_metrics(path) if r["epoch"] <= epoch)
        atomic_write(path, lambda handle: handle.write(kept.encode()))

    def save_checkpoint(self, state: dict, name: str = LAST_CHECKPOINT) -> None:
        if self.is_main:
            atomic_save(state, self.path / name)

    def save_final_model(self, state: dict) -> None:
        """The trained model for the next stage or for deployment (the checkpoint holds more)."""
        if self.is_main:
            atomic_save(state, self.path / FINAL_MODEL)
            self.log(f"final model: {self.path / FINAL_MODEL}")

    def load_checkpoint(self, name: str = LAST_CHECKPOINT) -> dict | None:
        """The checkpoint to resume from, or None when the folder has none yet (a fresh start)."""
        path = self.path / name
        if not path.exists():
            return None
        # written atomically, so an unreadable one is outside damage
        return checkpoint.read(path, "checkpoint", advice="; delete it to restart the run")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        for handler in list(self.logger.handlers):
            handler.close()
            self.logger.removeHandler(handler)


def read_metrics(path: str | Path) -> list[dict]:
    """All evaluation records of a run folder's metrics.jsonl, in order."""
    path = Path(path)
    file = path / "metrics.jsonl" if path.is_dir() else path
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
