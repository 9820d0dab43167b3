"""uda.cli's argparse types: counts and output files are checked when the command line is read, before
minutes of extraction whose result would then be lost."""
import argparse
import importlib.util
from pathlib import Path

import pytest

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
