"""uda.report: the direct / adapted / oracle table from run folders, and what it says when a folder is not
the run it should be."""
import json

import pytest

from uda.errors import UdaError
from uda.report import collect, main


def write_metrics(folder, records):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def scores(m):
    return {"mAP": m, "rank1": m + 0.1, "rank5": m + 0.2, "rank10": m + 0.3}


def test_direct_adapted_and_oracle_rows_and_folders_that_are_not_those_runs(tmp_path):
    write_metrics(tmp_path / "adapt", [{"epoch": 0, "duke": scores(0.1)}, {"epoch": 4, "duke": scores(0.3)}])
    write_metrics(tmp_path / "oracle", [{"epoch": 60, "duke": scores(0.5)}])
    write_metrics(tmp_path / "source", [{"epoch": 60, "market": scores(0.6)}])
    results = collect(tmp_path / "adapt", "duke", tmp_path / "oracle")
    assert {name: (row["epoch"], row["mAP"]) for name, row in results.items()} == {
        "direct": (0, 0.1), "adapted": (4, 0.3), "oracle": (60, 0.5)}
    with pytest.raises(UdaError, match=r"adapt has no epoch-0 .* of 'market' \(it evaluated duke\): an adapt.py run's folder"):
        collect(tmp_path / "adapt", "market")
    with pytest.raises(UdaError, match=r"source has no evaluation of 'duke' \(it evaluated market\): the oracle is a pretrain.py run"):
        collect(tmp_path / "adapt", "duke", tmp_path / "source")  # a source model's run given as the oracle: not left out silently


def write_run(folder, records, epochs, final=True):
    """A run folder as a stage leaves it: metrics.jsonl, config.yaml (optim.epochs) and, once done, model_final.pth."""
    write_metrics(folder, records)
    (folder / "config.yaml").write_text(f"optim:\n  epochs: {epochs}\n")
    if final:
        (folder / "model_final.pth").write_bytes(b"")


def test_a_finished_run_is_reported_with_its_epoch(tmp_path, capsys):
    write_run(tmp_path / "adapt", [{"epoch": 0, "duke": scores(0.1)}, {"epoch": 3, "duke": scores(0.3)}], epochs=3)
    results = main(["--adapt", str(tmp_path / "adapt"), "--target", "duke", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert "| duke (target test) | mAP | rank-1 | rank-5 | rank-10 | epoch |" in out
    assert "| direct | 10.0 | 20.0 | 30.0 | 40.0 | 0 |" in out and "| adapted | 30.0 | 40.0 | 50.0 | 60.0 | 3 |" in out
    assert json.loads((tmp_path / "r.json").read_text()) == results and "unfinished" not in results["adapted"]


@pytest.mark.parametrize("last, final, oracle_epochs, reason", [
    (1, False, 60, r"adapt has not finished \(epoch 1 of 3 \(no model_final.pth\)\)"),  # cut at epoch 1 of 3
    (1, True, 60, r"adapt has not finished \(epoch 1 of 3\)"),
    (3, False, 60, r"adapt has not finished \(epoch 3 of 3 \(no model_final.pth\)\)"),  # the last epoch's checkpoint not yet written
    (3, True, 80, r"oracle has not finished \(epoch 60 of 80\)"),
])
def test_an_unfinished_run_is_refused_or_shown_marked_with_allow_partial(tmp_path, capsys, last, final, oracle_epochs, reason):
    """Its last evaluation is not the result: the table gave epoch 1's mAP as "adapted", with no epoch and no warning."""
    write_run(tmp_path / "adapt", [{"epoch": 0, "duke": scores(0.1)}, {"epoch": last, "duke": scores(0.3)}], epochs=3, final=final)
    write_run(tmp_path / "oracle", [{"epoch": 60, "duke": scores(0.5)}], epochs=oracle_epochs)
    argv = ["--adapt", str(tmp_path / "adapt"), "--target", "duke", "--oracle", str(tmp_path / "oracle")]
    with pytest.raises(UdaError, match=reason + ": its last evaluation is not a result; .* or pass --allow-partial"):
        main(argv)
    results = main([*argv, "--allow-partial", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    marked = [line for line in out.splitlines() if "**UNFINISHED: epoch" in line]
    assert len(marked) == 1 and marked[0].startswith("| oracle |" if oracle_epochs == 80 else "| adapted |")
    row = results["oracle" if oracle_epochs == 80 else "adapted"]
    assert json.loads((tmp_path / "r.json").read_text()) == results and row["unfinished"].startswith(f"epoch {row['epoch']} of ")
    assert "unfinished" not in results["direct"]
