"""scripts/benchmark.py: the ratio and cell formats, and --quick end to end (CI's smoke test: every row of
the table filled, nothing failed; timings are not checked)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)


def test_ratio_is_how_many_times_better_ours_is():
    assert benchmark.ratio({"seconds": 6.0}, {"seconds": 2.0}, "s") == "3.0x"  # time: usual / ours
    assert benchmark.ratio({"images_per_s": 100.0}, {"images_per_s": 130.0}, "images/s") == "1.30x"  # rate: ours / usual
    assert benchmark.ratio(None, {"seconds": 2.0}, "s") == "-" and benchmark.ratio({"error": "x"}, {"seconds": 1.0}, "s") == "-"
    assert benchmark.cell({"seconds": 0.5, "step_gb": 1.234}, "s") == "0.5 s, +1.23 GB peak"
    assert benchmark.cell({"error": "no compiler"}, "images/s") == "failed: no compiler"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the peak mark is reset through Linux's /proc")
def test_a_steps_peak_memory_counts_even_when_set_up_peaked_higher():
    import numpy as np

    def allocate(gb):  # touched pages, freed at return
        return float(np.ones(int(gb * 1e9) // 8).sum())

    allocate(0.6)  # set-up: the process's peak so far
    mark = benchmark._memory_mark()
    allocate(0.3)  # the step: below the old peak, so the old peak-rise measure said +0.00
    step = benchmark._peak_rss_gb() - mark
    assert 0.28 < step < 0.45


def test_plan_has_every_case_and_full_adds_msmt_size():
    cases = {row["case"] for row in benchmark.plan(quick=False, full=False, device="cpu")}
    assert cases == {"cluster", "evaluate", "rerank", "pipeline", "train", "extract"}
    sizes = [row["size"] for row in benchmark.plan(quick=False, full=True, device="cpu") if row["case"] == "cluster"]
    assert sizes == ["N = 12,936, dim 2048", "N = 16,522, dim 2048", "N = 126,441, dim 2048"]
    rows = benchmark.plan(quick=False, full=False, device="cpu")
    assert len([r for r in rows if r["case"] == "train"]) == 3 * 3  # 3 backbones x (channels_last, bf16, compile) vs fp32
    extract = [r["size"] for r in rows if r["case"] == "extract"]
    assert len(extract) == 3 * 4 and "mobilenet_v2 128x64, folded BN + channels_last vs fp32" in extract  # and folded BN
    quick = [r["size"] for r in benchmark.plan(quick=True, full=False, device="cpu") if r["case"] in ("train", "extract")]
    assert quick == [f"resnet18_w16 64x32, {mode} vs fp32" for mode in ("channels_last", "bf16 + channels_last")] * 2 + [
        "resnet18_w16 64x32, folded BN + channels_last vs fp32"]


def test_pipeline_rows_are_the_demos_images_and_real_jpegs_when_there_are_some(monkeypatch):
    def pipeline_rows():
        return [(r["size"], r["ours"][1]["real"], r["ours"][1]["height"]) for r in benchmark.plan(False, False, "cpu") if r["case"] == "pipeline"]

    monkeypatch.delenv("UDA_REAL_DATA", raising=False)
    assert pipeline_rows() == [("64x32, P x K = 16 x 4, synthetic small (the CPU demo)", False, 64)]
    monkeypatch.setenv("UDA_REAL_DATA", "/data")
    assert [row[1:] for row in pipeline_rows()] == [(False, 64), (True, 128)]
    assert [r["size"] for r in benchmark.plan(True, False, "cpu") if r["case"] == "pipeline"] == ["64x32, P x K = 16 x 4, synthetic tiny (the CPU demo)"]


@pytest.mark.timeout(600)
def test_quick_run_fills_the_whole_table(tmp_path, monkeypatch):
    monkeypatch.delenv("UDA_REAL_DATA", raising=False)  # synthetic images: fast and the same everywhere
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    table = (tmp_path / "benchmark.md").read_text()
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert table.startswith("Machine: ") and report["machine"]["cores"] >= 1 and report["quick"]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| case")]
    assert len(rows) == len(report["rows"]) == 9
    assert not any("failed" in row for row in rows), table
    assert all(row.rstrip(" |").endswith("x") for row in rows), table  # every row has its ratio


def test_bad_flags_are_refused_before_any_measurement(tmp_path):
    from uda.errors import ConfigError, UdaError

    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N, got 'tpu'"):
        benchmark.main(["--device", "tpu", "--out", str(tmp_path / "b")])
    with pytest.raises(UdaError, match="--timeout must be > 0 seconds, got 0.0"):
        benchmark.main(["--device", "cpu", "--timeout", "0", "--out", str(tmp_path / "b")])
    (tmp_path / "file").write_text("")
    with pytest.raises(UdaError, match="cannot make the output folder .*file/b"):
        benchmark.main(["--device", "cpu", "--out", str(tmp_path / "file" / "b")])
