"""uda.runlog: one run per folder, the last K checkpoints with a fallback, stale temporaries, file modes."""
import errno
import os
import platform
import signal
import stat
import subprocess
import sys
from pathlib import Path

import torch

from uda.config import load_config
from uda.runlog import RunDir, atomic_write, cpu_description, read_metrics


def config(keep=2):
    return load_config({"seed": 1, "optim": {"lr": 0.1}, "train": {"keep_checkpoints": keep}})


def saves(path, epochs, keep=2):
    run = RunDir(path, config(keep), resume=path.exists())
    for epoch in epochs:
        run.log_metrics(epoch, {"set": {"mAP": epoch / 10}})
        run.save_checkpoint({"epoch": epoch})
    run.close()


def test_the_last_k_checkpoints_are_kept_and_a_damaged_newest_one_falls_back(tmp_path):
    saves(tmp_path / "run", [1, 2, 3])
    folder = tmp_path / "run"
    assert sorted(p.name for p in folder.glob("last*.pth")) == ["last.1.pth", "last.pth"]
    assert torch.load(folder / "last.pth")["epoch"] == 3 and torch.load(folder / "last.1.pth")["epoch"] == 2
    (folder / "last.pth").write_bytes(b"torn")  # damaged from outside (the writes themselves are atomic)
    run = RunDir(folder, config(), resume=True)
    assert run.load_checkpoint()["epoch"] == 2
    run.close()
    log = (folder / "log.txt").read_text()
    assert "cannot read the checkpoint" in log and "resuming from" in log and "last.1.pth (epoch 2)" in log
    saves(tmp_path / "three", [1, 2, 3, 4], keep=3)
    assert [torch.load(tmp_path / "three" / n)["epoch"] for n in ("last.pth", "last.1.pth", "last.2.pth")] == [4, 3, 2]
    saves(tmp_path / "three", [5], keep=1)  # a lowered keep_checkpoints removes the extra copies
    assert [p.name for p in (tmp_path / "three").glob("last*.pth")] == ["last.pth"]


def test_a_rerun_into_a_folder_without_checkpoint_starts_it_clean(tmp_path):
    """An attempt that failed after its epoch-0 evaluation, before its first checkpoint, leaves
    metrics.jsonl and no last.pth; a later run into the folder must not append to it."""
    folder = tmp_path / "run"
    first = RunDir(folder, config())
    first.log_metrics(0, {"set": {"mAP": 0.9}})
    first.close()
    second = RunDir(folder, config())
    second.log_metrics(0, {"set": {"mAP": 0.1}})
    second.close()
    assert read_metrics(folder) == [{"epoch": 0, "set": {"mAP": 0.1}}]
    assert "held records of an earlier attempt without a checkpoint (metrics.jsonl, tb): removed" in (folder / "log.txt").read_text()
    # the same when a damaged last.pth was deleted as advised and the run resumed: nothing twice
    saves(tmp_path / "cut", [1, 2])
    for name in ("last.pth", "last.1.pth"):
        (tmp_path / "cut" / name).unlink()
    resumed = RunDir(tmp_path / "cut", config(), resume=True)
    assert resumed.load_checkpoint() is None
    resumed.log_metrics(1, {"set": {"mAP": 0.5}})
    resumed.close()
    assert [r["epoch"] for r in read_metrics(tmp_path / "cut")] == [1]
    assert "--resume: " in (tmp_path / "cut" / "log.txt").read_text()


def test_stale_temporaries_go_and_files_keep_the_users_umask(tmp_path):
    folder = tmp_path / "run"
    saves(folder, [1])
    stale = folder / ".last.pth.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    RunDir(folder, config(), resume=True).close()
    assert not stale.exists()
    atomic_write(folder / "written.txt", lambda handle: handle.write(b"x"))
    expected = 0o666 & ~_umask()
    assert stat.S_IMODE(os.stat(folder / "written.txt").st_mode) == expected
    assert stat.S_IMODE(os.stat(folder / "last.pth").st_mode) == expected


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_version_records_what_besides_the_config_decides_the_numbers(tmp_path):
    RunDir(tmp_path / "run", config()).close()
    version = (tmp_path / "run" / "version.txt").read_text()
    assert f"threads: {torch.get_num_threads()}\n" in version and f"torch: {torch.__version__}" in version
    for key in ("commit: ", "cpu: ", "gpu: ", "device: ", "deterministic: False"):
        assert key in version, key


def test_cpu_description_tells_apart_machines_sharing_a_name(tmp_path):
    """A virtual machine's CPU name alone ("AMD EPYC") covers generations of other speeds."""
    entry = ("processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: {model}\nmodel name\t: AMD EPYC\n"
             "cpu MHz\t\t: {mhz}\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16\n\n")
    (tmp_path / "genoa").write_text(entry.format(n=0, model=17, mhz="2596.146") + entry.format(n=1, model=99, mhz="1.0"))
    assert cpu_description(tmp_path / "genoa") == "AMD EPYC (family 25 model 17, 2596 MHz, avx2 avx512f avx512_bf16)"
    (tmp_path / "old").write_text("model name\t: Intel(R) Xeon(R) CPU\ncpu family\t: 6\nmodel\t\t: 63\nflags\t\t: fpu sse2\n")
    assert cpu_description(tmp_path / "old") == "Intel(R) Xeon(R) CPU (family 6 model 63, no AVX2)"
    assert cpu_description(tmp_path / "missing") == (platform.processor() or platform.machine())


def test_the_packages_messages_go_to_the_newest_runs_log(tmp_path):
    """e.g. how many corrupt images data.skip_corrupt dropped, or which ImageNet file was used."""
    import logging

    first = RunDir(tmp_path / "a", config())
    logging.getLogger("uda.data.images").warning("skipped 2 corrupt image(s) of 10")
    second = RunDir(tmp_path / "b", config())  # the first failed without close(): its log gets no more
    logging.getLogger("uda.models.backbone").info("ImageNet weights from here")
    second.close()
    logging.getLogger("uda.data.images").warning("after the run")
    first_log, second_log = (tmp_path / "a" / "log.txt").read_text(), (tmp_path / "b" / "log.txt").read_text()
    assert "skipped 2 corrupt image(s) of 10" in first_log and "ImageNet weights" not in first_log
    assert "ImageNet weights from here" in second_log and "skipped" not in second_log
    assert "after the run" not in first_log + second_log
    first.close()


def test_a_kill_between_linking_and_saving_loses_no_older_checkpoint(tmp_path):
    folder = tmp_path / "run"
    saves(folder, [1, 2], keep=3)
    # what a kill leaves while saving epoch 3: rotated, last.pth linked as last.1.pth, not yet replaced
    os.replace(folder / "last.1.pth", folder / "last.2.pth")
    os.link(folder / "last.pth", folder / "last.1.pth")
    saves(folder, [3], keep=3)  # the resumed run saves epoch 3 again
    assert [torch.load(folder / n)["epoch"] for n in ("last.pth", "last.1.pth", "last.2.pth")] == [3, 2, 1]
    assert not list(folder.glob(".*.tmp"))


def test_a_torn_last_metrics_line_is_dropped_and_a_bad_one_elsewhere_named(tmp_path):
    """A run killed while appending its evaluation leaves half a line: resume and the report go on
    without it; a damaged line in the middle is an error naming the file and line, not a JSON traceback."""
    import pytest

    from uda.errors import UdaError

    path = tmp_path / "run"
    saves(path, [1, 2, 3])
    metrics = path / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"epoch": 4, "set": {"mA')  # no newline: the write was cut
    assert [r["epoch"] for r in read_metrics(path)] == [1, 2, 3]
    run = RunDir(path, config(), resume=True)
    run.drop_metrics_after(2)
    run.close()
    assert [r["epoch"] for r in read_metrics(metrics)] == [1, 2] and metrics.read_text().endswith("}\n")
    lines = whole.splitlines(keepends=True)
    metrics.write_text(lines[0] + "garbage\n" + lines[1])
    with pytest.raises(UdaError, match=r"metrics.jsonl line 2 is not an evaluation record \('garbage'\)"):
        read_metrics(path)
    metrics.write_text(whole + '{"epoch": 4, "set": {"mA\n')  # cut, but ending in a newline: not a torn append
    with pytest.raises(UdaError, match="line 4 is not an evaluation record"):
        read_metrics(path)



def test_a_run_folder_that_is_a_file_is_named(tmp_path):
    import pytest

    from uda.errors import UdaError

    (tmp_path / "run").write_text("")
    with pytest.raises(UdaError, match="the run folder .*run is a file; choose another --output-dir"):
        RunDir(tmp_path / "run", config())


REPO = Path(__file__).resolve().parents[1]
# A run in progress: its first records written, no checkpoint yet, and a forked child (what a DataLoader
# worker is) holding copies of its open files.
HOLDER = """
import os, sys, time
from uda.config import load_config
from uda.runlog import RunDir
run = RunDir(sys.argv[1], load_config({"seed": 1}))
run.log_metrics(0, {"set": {"mAP": 0.5}})
worker = os.fork()
if worker == 0:
    time.sleep(300)
    os._exit(0)
print("worker", worker, flush=True)
time.sleep(300)
"""
START = """
import sys
from uda.cli import run_main
from uda.config import load_config
from uda.runlog import RunDir
run_main(lambda argv: RunDir(sys.argv[1], load_config({"seed": 1}), resume=sys.argv[2] == "resume").close())
"""


def python(code: str, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True, **popen)


def start_in_another_process(folder, mode: str) -> subprocess.CompletedProcess:
    """RunDir(folder) in a new process (mode "resume": with --resume), as an entry point runs it."""
    process = python(START, str(folder), mode, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_a_folder_in_use_is_refused_to_a_second_process_until_its_holder_is_killed(tmp_path):
    """A second start (fresh: it would clean the first's records; or --resume) while the first runs is
    refused in one line naming the first's pid, before it touches the folder; kill -9 frees the folder,
    even while a forked worker of the killed run lives on."""
    folder = tmp_path / "run"
    holder = python(HOLDER, str(folder), stdout=subprocess.PIPE)
    worker = None
    try:
        line = holder.stdout.readline()
        assert line.startswith("worker "), line
        worker = int(line.split()[1])
        for mode in ("fresh", "resume"):
            second = start_in_another_process(folder, mode)
            assert second.returncode == 2 and second.stderr == (
                f"error: {folder} is in use by another process (pid {holder.pid}): a folder holds one run; wait for that "
                "one to end (or stop it), or choose another --output-dir\n"), second.stderr
        assert read_metrics(folder) == [{"epoch": 0, "set": {"mAP": 0.5}}]  # the refused starts changed nothing
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)
        assert start_in_another_process(folder, "fresh").returncode == 0  # the worker still lives
    finally:
        for pid in (holder.pid, worker):
            try:
                os.kill(pid, signal.SIGKILL) if pid else None
            except ProcessLookupError:
                pass
        holder.wait(timeout=60)


def test_close_frees_the_folder_and_runs_of_one_process_share_it(tmp_path):
    """A grid or a test runs stages one after another in one process, some opening one folder twice."""
    folder = tmp_path / "run"
    first = RunDir(folder, config())
    second = RunDir(folder, config(), resume=True)
    first.close()
    assert "is in use by another process" in start_in_another_process(folder, "resume").stderr  # second holds it
    second.close()
    assert start_in_another_process(folder, "resume").returncode == 0



def fail_with(error_number: int):
    """A function that fails as a write to a full disk (ENOSPC) or over a quota (EDQUOT) does."""
    def fail(*args):
        raise OSError(error_number, os.strerror(error_number))
    return fail


class FullDisk:
    """An open file whose writes fail as on a full disk."""

    def __init__(self, handle):
        self.handle = handle
        self.write = fail_with(errno.ENOSPC)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_naming_the_checkpoint_left(tmp_path, monkeypatch):
    """The write fails inside torch.save (which reports it as a RuntimeError) or at the fsync (an
    OSError, here a quota's); either way the previous checkpoint is intact and resume goes on from it."""
    import pytest

    from uda.errors import UdaError

    folder = tmp_path / "run"
    run = RunDir(folder, config())
    run.save_checkpoint({"epoch": 1, "w": torch.ones(3)})
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(UdaError) as info:
        run.save_checkpoint({"epoch": 2, "w": torch.zeros(3)})
    assert str(info.value) == (
        f"the disk is full (No space left on device) while writing {folder / 'last.pth'}, which was not changed; "
        f"the last good checkpoint, {folder / 'last.pth'}, is intact; free some space, then run the same command with --resume")
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    monkeypatch.setattr(os, "fsync", fail_with(errno.EDQUOT))
    with pytest.raises(UdaError, match=r"the disk is full \(Disk quota exceeded\) .*last.pth.*--resume"):
        run.save_checkpoint({"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    run.close()
    assert not list(folder.glob(".*.tmp"))
    resumed = RunDir(folder, config(), resume=True)
    assert resumed.load_checkpoint()["epoch"] == 1 and torch.equal(torch.load(folder / "last.pth")["w"], torch.ones(3))
    resumed.close()
    first = RunDir(tmp_path / "first", config())
    monkeypatch.setattr(torch, "save", fail_with(errno.ENOSPC))
    with pytest.raises(UdaError, match=r"writing .*first.last.pth, which was not changed; .*first holds no checkpoint yet"):
        first.save_checkpoint({"epoch": 1})
    first.close()
