"""uda.report: the direct / adapted / oracle table from run folders, and what it says when a folder is not
the run it should be."""
import json

import pytest

from uda.errors import UdaError
from uda.report import collect


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
