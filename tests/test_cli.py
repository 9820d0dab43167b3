"""uda.cli's argparse types: counts and output files are checked when the command line is read, before
minutes of extraction whose result would then be lost."""
import argparse
import importlib.util
import os
from pathlib import Path

import pytest

from uda import adapt, evaluate, export, extract, pretrain, report, visualize
from uda.cli import output_file, output_folder, positive_int
from uda.grid import main as grid_main

THREAD_SPREAD = Path(__file__).resolve().parents[1] / "scripts" / "thread_spread.py"
spec = importlib.util.spec_from_file_location("thread_spread", THREAD_SPREAD)
thread_spread = importlib.util.module_from_spec(spec)
spec.loader.exec_module(thread_spread)


def parser():
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("--queries", type=positive_int)
    p.add_argument("--out", type=output_file(".png", ".jpg"))
    return p


def test_a_count_must_be_at_least_one():
    assert parser().parse_args(["--queries", "3"]).queries == 3
    for bad in ("0", "-3", "two"):
        with pytest.raises(argparse.ArgumentError, match="--queries"):
            parser().parse_args(["--queries", bad])
    with pytest.raises(argparse.ArgumentTypeError, match="must be a whole number >= 1, got 0"):
        positive_int("0")


def test_an_output_file_gets_its_folder_and_a_wrong_suffix_or_a_folder_is_refused(tmp_path):
    out = parser().parse_args(["--out", str(tmp_path / "new" / "deeper" / "ranks.PNG")]).out
    assert out == tmp_path / "new" / "deeper" / "ranks.PNG" and out.parent.is_dir() and not out.exists()
    with pytest.raises(argparse.ArgumentTypeError, match=r"r.txt must end in .png or .jpg"):
        output_file(".png", ".jpg")(str(tmp_path / "r.txt"))
    with pytest.raises(argparse.ArgumentTypeError, match="is a folder; name the file to write in it"):
        output_file()(str(tmp_path))
    (tmp_path / "file").write_text("")
    with pytest.raises(argparse.ArgumentTypeError, match="cannot make the folder of .*file/x.json"):
        output_file(".json")(str(tmp_path / "file" / "x.json"))
    assert output_file()(str(tmp_path / "features")) == tmp_path / "features"  # no suffix asked for: any name


def test_an_output_folder_may_be_new_or_a_folder_but_not_a_file(tmp_path, capsys):
    assert output_folder(str(tmp_path / "runs" / "grid")) == tmp_path / "runs" / "grid"  # made later, by the run
    assert output_folder(str(tmp_path)) == tmp_path
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(argparse.ArgumentTypeError, match="notes.txt is a file, not a folder"):
        output_folder(str(tmp_path / "notes.txt"))
    with pytest.raises(SystemExit) as stop:
        grid_main(["no-such-grid.yaml", "--runs-dir", str(tmp_path / "notes.txt")])  # before reading the grid file
    assert stop.value.code == 2 and "notes.txt is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--seeds", "0"], ["--threads", "1", "0"], ["--threads", "-2"]])
def test_thread_spread_counts_are_refused_before_any_run(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as stop:
        thread_spread.main([*argv, "--runs-dir", str(tmp_path / "runs")])
    assert stop.value.code == 2 and "must be a whole number >= 1" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder no one may write into (chmod 555). Root writes there all the same, so for root os.access is
    made to answer as for anyone else: the check under test asks os.access."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # running as root
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == folder and mode & os.W_OK else access(path, mode, **kw))
    yield folder
    folder.chmod(0o755)


def test_an_output_in_a_read_only_folder_is_refused(read_only, tmp_path):
    with pytest.raises(argparse.ArgumentTypeError, match=r"cannot write .*read_only/x.json: .*read_only is not writable"):
        output_file(".json")(str(read_only / "x.json"))
    with pytest.raises(argparse.ArgumentTypeError, match=r"cannot write into .*read_only/runs: .*read_only is not writable"):
        output_folder(str(read_only / "runs"))  # made later, by the run: its nearest existing folder must be writable
    with pytest.raises(argparse.ArgumentTypeError, match="cannot write into"):
        output_folder(str(read_only))
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(argparse.ArgumentTypeError, match="notes.txt is a file, not a folder"):
        output_folder(str(tmp_path / "notes.txt" / "runs"))


@pytest.mark.parametrize("command, argv", [
    (extract.main, ["--model", "none.pth", "--images", "none", "--out", "{ro}/feats.npy"]),
    (export.main, ["--model", "none.pth", "--out", "{ro}/model.onnx"]),
    (visualize.main, ["ranks", "--model", "none.pth", "--dataset", "none", "--out", "{ro}/ranks.png"]),
    (evaluate.main, ["--model", "none.pth", "--dataset", "none", "--json", "{ro}/scores.json"]),
    (report.main, ["--adapt", "none", "--target", "duke", "--json", "{ro}/results.json"]),
    (pretrain.main, ["--source", "synth_market", "--config", "none.yaml", "--output-dir", "{ro}/run"]),
    (adapt.main, ["--source", "synth_market", "--target", "synth_duke", "--config", "none.yaml", "--output-dir", "{ro}/run"]),
], ids=["extract", "export", "visualize", "evaluate", "report", "pretrain", "adapt"])
def test_every_command_refuses_an_unwritable_output_when_the_command_line_is_read(read_only, capsys, command, argv):
    """Before: each did its work (an extraction, an ONNX graph, a run's setup) and then stopped with a traceback."""
    with pytest.raises(SystemExit) as stop:  # before the missing model, config or dataset is looked at
        command([arg.format(ro=read_only) for arg in argv])
    assert stop.value.code == 2 and f"{read_only} is not writable" in capsys.readouterr().err


def test_a_stage_that_ends_normally_leaves_its_process_group(tmp_path):
    """Under torchrun a process that exits with its Gloo group alive can abort at shutdown (SIGABRT after
    the work is done): run_main destroys the group after a normal end."""
    import torch.distributed as dist

    from uda.cli import run_main

    def stage(argv):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        assert dist.is_initialized()

    run_main(stage, [])
    assert not dist.is_initialized()
