"""The run folder: resolved config, code version, log.txt, metrics.jsonl, TensorBoard events, checkpoints.

Everything a reader needs to trust or reproduce a number lives in one folder. Only the main process
of a distributed run writes; the others get a RunDir whose writers are silent.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

from uda import checkpoint
from uda.config import Config, config_changes, dump_config, read_yaml
from uda.errors import UdaError
from uda.settings import RESUME_MAY_CHANGE

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


_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: files written through a temporary get the mode a plain open() would give


VECTOR_UNITS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # the ones torch's CPU kernels pick between


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU as /proc/cpuinfo names it, plus what tells apart two machines a virtual machine gives one
    name: family / model, clock and vector units (two 2-core "AMD EPYC" machines ran our adaptation steps
    1.6x apart)."""
    try:
        fields: dict[str, str] = {}
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first processor's entry
        name = fields["model name"]
    except (OSError, KeyError):
        return platform.processor() or platform.machine()
    units = [unit for unit in VECTOR_UNITS if unit in fields.get("flags", "").split()]
    detail = [f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"]
    if "cpu MHz" in fields:
        detail.append(f"{float(fields['cpu MHz']):.0f} MHz")
    detail.append(" ".join(units) or "no AVX2")
    return f"{name} ({', '.join(detail)})"


def machine_record(cfg: Config) -> str:
    """What besides the config decides a run's numbers: the same seed gives other results with another
    thread count (CPU reductions split differently), another GPU, or non-deterministic kernels."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"threads: {torch.get_num_threads()}\ncpu: {cpu_description()}\ngpu: {gpu}\n"
            f"device: {cfg.get('device', 'auto')}\ndeterministic: {cfg.get('deterministic', False)}\n")


PSEUDO_LABELS = "pseudo_labels"  # adapt's per-epoch cluster labels


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """`write(handle)` into a temporary file in the same folder, then rename: a killed run never leaves
    half a file (at most a stale `.<name>.*.tmp`, which RunDir removes at the next start)."""
    atomic_write_all({Path(path): write})


def atomic_write_all(writes: dict[Path, Callable[[BinaryIO], None]]) -> None:
    """atomic_write for files that belong together (features, their image paths, their record): each
    written to its temporary first, then all renamed, so a failure in any leaves none of them."""
    temporaries: dict[Path, str] = {}
    renamed: list[Path] = []
    try:
        for path, write in writes.items():
            fd, temporaries[path] = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.chmod(temporaries[path], 0o666 & ~_UMASK)  # mkstemp makes it 0600
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
        for path, tmp in temporaries.items():
            os.replace(tmp, path)
            renamed.append(path)
    except BaseException:
        for written in [*temporaries.values(), *renamed]:
            Path(written).unlink(missing_ok=True)
        raise


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(exc: BaseException | None) -> OSError | None:
    """The no-space (or over-quota) OSError behind `exc`, or None. torch.save reports a failed write as
    a RuntimeError ('unexpected pos') whose context is the write's OSError."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def disk_full_error(path: Path, exc: OSError) -> UdaError:
    """A full disk while writing `path` of a run folder, in one line: what is left (the file as it was,
    the last checkpoint) and how to go on. Nothing is lost: the run resumes from its last checkpoint."""
    folder = path.parent.parent if path.parent.name == PSEUDO_LABELS else path.parent
    last = folder / LAST_CHECKPOINT
    kept = f"the last good checkpoint, {last}, is intact" if last.is_file() else f"{folder} holds no checkpoint yet"
    return UdaError(f"the disk is full ({exc.strerror}) while writing {path}, which was not changed; {kept}; "
                    "free some space, then run the same command with --resume")


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save, atomically (see atomic_write)."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def _json_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    return value


def previous_checkpoint(path: Path, age: int) -> Path:
    """last.pth's older copies: last.1.pth (the epoch before), last.2.pth, ..."""
    return path.with_name(f"{path.stem}.{age}{path.suffix}")


def check_resumable(path: Path, cfg: Config) -> dict[str, tuple[Any, Any]]:
    """The allowed changes from the run's saved config.yaml to `cfg`; UdaError naming any other."""
    saved = path / "config.yaml"
    if not saved.is_file():
        return {}
    changes = config_changes(read_yaml(saved, "run config") or {}, cfg.to_dict())
    refused = {k: v for k, v in changes.items() if k not in RESUME_MAY_CHANGE}
    if refused:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(refused.items()))
        raise UdaError(
            f"{path} was run with other settings ({listed}); a resumed run must go on with the config it "
            "started with (its config.yaml): resume without these changes, or choose another --output-dir"
        )
    return changes


LOCK_FILE = ".lock"  # in the run folder: flock-ed by the process writing it, holding its pid


class FolderLock:
    """An open <run>/.lock holding an exclusive flock, for as long as this object lives. The kernel frees
    the lock when the process ends, however it ends (kill -9 included): no stale lock to delete."""

    def __init__(self, fd: int):
        self.fd = fd

    def __del__(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)


_HELD_LOCKS: weakref.WeakValueDictionary[str, FolderLock] = weakref.WeakValueDictionary()  # this process's, by folder


def lock_run_folder(path: Path) -> FolderLock | None:
    """Lock the run folder `path` (made if needed) for this process, or UdaError naming the process
    holding it: two processes in one folder (a second `--resume` while the first still runs) would both
    train, write every metrics line twice and interleave checkpoints. RunDirs of one process share one
    lock. None (unlocked, with a warning) where the file system has no flock."""
    key = str(path.resolve())
    held = _HELD_LOCKS.get(key)
    if held is not None:
        return held
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UdaError(f"{path} is in use by another process (pid {holder}): a folder holds one run; wait for that "
                       "one to end (or stop it), or choose another --output-dir") from None
    except OSError as exc:
        os.close(fd)
        LIBRARY_LOG.warning(f"warning: cannot lock {path} ({exc.strerror}): nothing stops a second run into it")
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    lock = _HELD_LOCKS[key] = FolderLock(fd)
    return lock


def _forget_locks_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copies: a run killed with -9 frees its folder at
    once, not when its last worker notices."""
    for lock in list(_HELD_LOCKS.values()):
        os.close(lock.fd)
        lock.fd = -1
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


class RunDir:
    """One experiment's folder, holding one run. `resume=False` refuses a folder that already holds a
    run's checkpoint. A run that starts without a checkpoint to continue from (a first start, a
    `--resume` with nothing to resume, an earlier attempt that failed before its first checkpoint)
    starts the folder clean, saying so in the log: metrics.jsonl never holds two runs.
    The last `train.keep_checkpoints` checkpoints are kept (last.pth, last.1.pth, ...); an unreadable
    newest one is reported and the one before it used.
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
        self.keep_checkpoints = int(cfg.get("train", {}).get("keep_checkpoints", 2))
        self.lock = None
        if is_main:
            self._refuse_another_run(resume)
        self.resuming = resume and self.path.is_dir() and bool(self.checkpoint_files())  # a checkpoint to go on from
        if not is_main:
            return
        changes = check_resumable(self.path, cfg) if resume else {}
        self.path.mkdir(parents=True, exist_ok=True)
        earlier = self._clear_unfinished_attempt()
        self._write_provenance(cfg, provenance or {})
        self._open_log()
        if resume and not self.resuming:
            self.log(f"--resume: {self.path} holds no checkpoint yet, so the run starts from the beginning")
        if earlier:
            self.log(f"{self.path} held records of an earlier attempt without a checkpoint ({', '.join(earlier)}): "
                     "removed, so the folder holds this run alone")
        for key, value in (provenance or {}).items():
            self.log(f"{key}: {value}")
        if changes:
            self.log("resumed with changed settings: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(changes.items())))

    def _refuse_another_run(self, resume: bool) -> None:
        """A file in the folder's place, a folder another process is writing (its lock, held from here on), or
        a folder holding a run's checkpoint without --resume, is refused."""
        if self.path.exists() and not self.path.is_dir():
            raise UdaError(f"the run folder {self.path} is a file; choose another --output-dir")
        self.lock = lock_run_folder(self.path)  # before anything here is read or changed
        if self.checkpoint_files() and not resume:
            raise UdaError(
                f"{self.path} already holds a run; pass --resume to continue it or choose another --output-dir"
            )

    def _clear_unfinished_attempt(self) -> list[str]:
        """Remove what a killed process left: temporary files, and the records of an earlier attempt that
        never reached a checkpoint (not part of this run). Returns the names of those records."""
        for stale in self.path.glob(".*.tmp"):
            stale.unlink()
        if self.checkpoint_files():
            return []
        earlier = [name for name in ("metrics.jsonl", "tb", FINAL_MODEL, PSEUDO_LABELS) if (self.path / name).exists()]
        for name in earlier:
            target = self.path / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        return earlier

    def _write_provenance(self, cfg: Config, provenance: dict[str, str]) -> None:
        """config.yaml (the resolved config) and version.txt (commit, torch, command, machine, `provenance`)."""
        dump_config(cfg, self.path / "config.yaml")
        (self.path / "version.txt").write_text(
            f"commit: {code_version()}\ntorch: {torch.__version__}\npython: {sys.version.split()[0]}\n"
            f"command: {' '.join(sys.argv)}\n{machine_record(cfg)}" + "".join(f"{k}: {v}\n" for k, v in provenance.items())
        )

    def _open_log(self) -> None:
        """log.txt and stdout for this run's and the package's messages; TensorBoard events under tb/."""
        if not self.logger.handlers:
            fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
            for handler in (logging.FileHandler(self.path / "log.txt"), logging.StreamHandler(sys.stdout)):
                handler.setFormatter(fmt)
                self.logger.addHandler(handler)
        route_library_log(self.logger.handlers)
        from tensorboardX import SummaryWriter  # imported here: only the main process writes events

        self.writer = SummaryWriter(str(self.path / "tb"))

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
        self._saving(path, lambda: atomic_write(path, lambda handle: handle.write(kept.encode())))

    def checkpoint_files(self) -> list[Path]:
        """This folder's checkpoints, newest first: last.pth, last.1.pth, ... (those that exist)."""
        last = self.path / LAST_CHECKPOINT
        older = [p for p in self.path.glob(f"{last.stem}.*{last.suffix}") if _age(p, last) is not None]
        return [p for p in [last, *sorted(older, key=lambda p: _age(p, last))] if p.is_file()]

    def save_checkpoint(self, state: dict) -> None:
        """last.pth, atomically; the one it replaces becomes last.1.pth (and so on up to keep_checkpoints).
        last.pth exists at every instant: the older copies are hard links (or copies) made before."""
        if not self.is_main:
            return
        last = self.path / LAST_CHECKPOINT
        previous = previous_checkpoint(last, 1)
        # After a kill between linking last.1.pth and replacing last.pth, the two are one file: it is
        # already the previous checkpoint, so nothing rotates (a rotation would drop the older ones).
        rotate = last.is_file() and not (previous.is_file() and os.path.samefile(last, previous))
        if self.keep_checkpoints > 1 and rotate:
            for age in range(self.keep_checkpoints - 1, 1, -1):
                if previous_checkpoint(last, age - 1).is_file():
                    os.replace(previous_checkpoint(last, age - 1), previous_checkpoint(last, age))
            link = self.path / f".{last.stem}.1.link.tmp"
            try:
                os.link(last, link)
            except OSError:  # a file system without hard links
                shutil.copyfile(last, link)
            os.replace(link, previous)
        self._saving(last, lambda: atomic_save(state, last))
        for extra in self.checkpoint_files()[self.keep_checkpoints:]:  # keep_checkpoints was lowered
            extra.unlink()

    def save_pseudo_labels(self, epoch: int, labels: np.ndarray, images: list[str], true_ids: np.ndarray | None) -> None:
        """pseudo_labels/epoch_<E>.npy (int64, -1 = outlier), one per epoch, in the order of
        pseudo_labels/images.tsv (path, true id or -1: diagnostics), written once: what
        `python -m uda.visualize clusters` shows. ~8 bytes an image an epoch."""
        if not self.is_main:
            return
        folder = self.path / PSEUDO_LABELS
        folder.mkdir(exist_ok=True)
        index = folder / "images.tsv"
        if not index.is_file():
            ids = true_ids if true_ids is not None else np.full(len(images), -1)
            text = "".join(f"{path}\t{int(pid)}\n" for path, pid in zip(images, ids))
            self._saving(index, lambda: atomic_write(index, lambda handle: handle.write(text.encode())))
        path = folder / f"epoch_{epoch:03d}.npy"
        self._saving(path, lambda: atomic_write(path, lambda handle: np.save(handle, np.asarray(labels, dtype=np.int64))))

    @staticmethod
    def _saving(path: Path, save: Callable[[], None]) -> None:
        """`save()` (an atomic write of `path` in the run folder); a full disk is one line saying what is left and how to go on."""
        try:
            save()
        except BaseException as exc:
            full = _disk_full(exc)
            if full is None:
                raise
            raise disk_full_error(path, full) from None

    def save_final_model(self, state: dict) -> None:
        """The trained model for the next stage or for deployment (the checkpoint holds more)."""
        if self.is_main:
            self._saving(self.path / FINAL_MODEL, lambda: atomic_save(state, self.path / FINAL_MODEL))
            self.log(f"final model: {self.path / FINAL_MODEL}")

    def load_checkpoint(self) -> dict | None:
        """The newest readable checkpoint to resume from (logged), or None when the folder has none (a
        fresh start). An unreadable one (torn, damaged from outside) is reported and the previous used."""
        failures = []
        for path in self.checkpoint_files():
            try:
                state = checkpoint.read(path, "checkpoint")
            except UdaError as exc:
                self.log(f"warning: {exc}; trying the checkpoint before it")
                failures.append(path.name)
                continue
            self.log(f"resuming from {path} (epoch {state.get(checkpoint.EPOCH)})")
            return state
        if failures:
            raise UdaError(f"no readable checkpoint in {self.path} ({', '.join(failures)}); delete them to restart the run")
        return None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        route_library_log([])
        for handler in list(self.logger.handlers):
            handler.close()
            self.logger.removeHandler(handler)
        self.lock = None  # frees the folder, unless another RunDir of this process still holds it


LIBRARY_LOG = logging.getLogger("uda")  # the package's own messages: weights used, images skipped, cache sizes


def route_library_log(handlers: list[logging.Handler]) -> None:
    """Send the package's messages (uda.* loggers) to these handlers (the newest run's log.txt and
    stdout) instead of the previous run's: a process may run several stages, or fail in one."""
    for handler in [h for h in LIBRARY_LOG.handlers if getattr(h, "uda_run", False)]:
        LIBRARY_LOG.removeHandler(handler)
    for handler in handlers:
        handler.uda_run = True
        LIBRARY_LOG.addHandler(handler)
    LIBRARY_LOG.setLevel(logging.INFO)


def _age(path: Path, last: Path) -> int | None:
    """0 for last.pth, N for last.N.pth, None for any other file."""
    if path == last:
        return 0
    middle = path.name[len(last.stem) + 1 : -len(last.suffix)]
    return int(middle) if middle.isdigit() else None


def read_metrics(path: str | Path) -> list[dict]:
    """All evaluation records of a run folder's metrics.jsonl, in order. A last line cut short (no newline
    after it: a run killed while appending it) is left out, so the run resumes and its report reads; any
    other line that is not a JSON record is an error naming the file and line."""
    path = Path(path)
    file = path / "metrics.jsonl" if path.is_dir() else path
    text = file.read_text(errors="replace")
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or "epoch" not in record:
            if number == len(lines) and not text.endswith("\n"):
                break  # the torn last write of a killed run: that evaluation is run again on resume
            raise UdaError(f"{file} line {number} is not an evaluation record ({line[:80]!r}): "
                           "a metrics.jsonl holds one JSON object with an 'epoch' per line")
        records.append(record)
    return records
