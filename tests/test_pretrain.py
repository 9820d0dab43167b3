"""The source stage end to end on the tiny synthetic preset: it learns, it resumes exactly, it fails clearly."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from uda import pretrain
from uda.runlog import read_metrics

# device=cpu: thresholds calibrated on the CPU; exact resume needs deterministic kernels (see test_adapt.py)
TINY = [
    "device=cpu", "data.synth_preset=tiny", "data.num_workers=0", "model.backbone=resnet18_w16", "model.pretrained=none",
    "data.height=64", "data.width=32", "eval.batch_size=64",
]


def run_pretrain(synth_root, out, *extra, resume=False, target=None):
    argv = ["--source", "synth_market", "--data-root", str(synth_root), "--output-dir", str(out)]
    if target:
        argv += ["--target", target]
    if resume:
        argv.append("--resume")
    return pretrain.main(argv + ["--opts", *TINY, *extra])


def test_pretrain_learns_the_source(synth_root, tmp_path):
    schedule = ["optim.lr=3.5e-3", "optim.warmup_from=3.5e-4", "optim.warmup_epochs=2", "optim.milestones=[40]"]
    run_pretrain(synth_root, tmp_path / "untrained", *schedule, "optim.epochs=1", "optim.lr=1e-12", "optim.warmup_from=1e-12")
    before = read_metrics(tmp_path / "untrained")[-1]["synth_market"]["mAP"]
    final = run_pretrain(synth_root, tmp_path / "run", *schedule, "optim.epochs=48", "train.eval_every=24", target="synth_duke")
    after = final["synth_market"]["mAP"]
    assert after > before + 0.10, (before, after)
    records = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in records] == [24, 48]
    assert set(records[-1]) == {"epoch", "synth_market", "synth_duke"}
    assert records[-1]["synth_market"]["mAP"] == pytest.approx(after)
    folder = tmp_path / "run"
    for name in ("config.yaml", "version.txt", "log.txt", "metrics.jsonl", "last.pth", "model_final.pth"):
        assert (folder / name).is_file(), name
    assert list((folder / "tb").iterdir())
    final_model = torch.load(folder / "model_final.pth", weights_only=False)
    assert set(final_model) == {"model", "config"} and final_model["model"]["bnneck.weight"].shape == (128,)


def test_resume_equals_uninterrupted(synth_root, tmp_path):
    common = ["optim.milestones=[2]", "optim.warmup_epochs=1", "train.eval_every=5"]
    run_pretrain(synth_root, tmp_path / "straight", *common, "optim.epochs=3")
    run_pretrain(synth_root, tmp_path / "cut", *common, "optim.epochs=2")  # killed after epoch 2 ...
    (tmp_path / "cut" / "model_final.pth").unlink()
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as metrics:  # ... in epoch 3, after a record of it was written ...
        metrics.write('{"epoch": 3, "synth_market": {"mAP": 0.0}}\n')
    run_pretrain(synth_root, tmp_path / "cut", *common, "optim.epochs=3", resume=True)  # ... and resumed
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=False)
    b = torch.load(tmp_path / "cut" / "last.pth", weights_only=False)
    assert a["epoch"] == b["epoch"] == 3
    for key, value in a["net"].items():
        assert torch.equal(value, b["net"][key]), key
    assert torch.equal(a["center"]["centers"], b["center"]["centers"])
    assert read_metrics(tmp_path / "straight")[-1] == read_metrics(tmp_path / "cut")[-1]
    assert [r["epoch"] for r in read_metrics(tmp_path / "cut")] == [2, 3]  # the killed run's epoch-3 record is gone


def recording_losses(monkeypatch) -> list[dict]:
    """Every training step's losses, detached, as compute_losses returned them (pretrain.train_steps wrapped)."""
    from uda import engine

    steps = []

    def train_steps(loader, compute_losses, *args, **kwargs):
        def recorded(batch):
            losses = compute_losses(batch)
            steps.append({name: value.detach().clone() for name, value in losses.items()})
            return losses

        return engine.train_steps(loader, recorded, *args, **kwargs)

    monkeypatch.setattr(pretrain, "train_steps", train_steps)
    return steps


def test_mixup_alpha_zero_is_the_plain_step_to_the_bit(synth_root, tmp_path, monkeypatch):
    common = ["optim.milestones=[2]", "optim.warmup_epochs=1", "train.eval_every=5", "optim.epochs=2"]
    plain = recording_losses(monkeypatch)
    run_pretrain(synth_root, tmp_path / "plain", *common)

    def no_mixup(*args, **kwargs):
        raise AssertionError("train.mixup_alpha=0 took the mixup path")

    monkeypatch.setattr(pretrain, "mixup_losses", no_mixup)
    zero = recording_losses(monkeypatch)
    run_pretrain(synth_root, tmp_path / "zero", *common, "train.mixup_alpha=0")
    assert len(zero) == len(plain) > 0 and set(zero[0]) == {"ce", "triplet", "center"}
    for step_zero, step_plain in zip(zero, plain):
        assert all(torch.equal(step_zero[name], step_plain[name]) for name in step_plain)
    a, b = (torch.load(tmp_path / run / "last.pth", weights_only=False)["net"] for run in ("plain", "zero"))
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_mixup_trains_on_either_pipeline_and_resumes_exactly(synth_root, tmp_path, monkeypatch):
    common = ["optim.milestones=[2]", "optim.warmup_epochs=1", "train.eval_every=5", "train.mixup_alpha=0.4"]
    steps = recording_losses(monkeypatch)
    run_pretrain(synth_root, tmp_path / "straight", *common, "optim.epochs=2")
    assert set(steps[0]) == {"ce", "triplet", "center"} and all(torch.isfinite(v).all() for step in steps for v in step.values())
    run_pretrain(synth_root, tmp_path / "cut", *common, "optim.epochs=1")
    (tmp_path / "cut" / "model_final.pth").unlink()
    run_pretrain(synth_root, tmp_path / "cut", *common, "optim.epochs=2", resume=True)
    a, b = (torch.load(tmp_path / run / "last.pth", weights_only=False)["net"] for run in ("straight", "cut"))
    assert all(torch.equal(a[key], b[key]) for key in a)  # the mixup draws repeat after a resume
    run_pretrain(synth_root, tmp_path / "plain", "optim.milestones=[2]", "optim.warmup_epochs=1", "train.eval_every=5", "optim.epochs=2")
    plain = torch.load(tmp_path / "plain" / "last.pth", weights_only=False)["net"]
    assert not all(torch.equal(a[key], plain[key]) for key in a)  # mixup changed the training
    final = run_pretrain(synth_root, tmp_path / "loader", *common, "optim.epochs=1", "data.pipeline=loader")
    assert 0 <= final["synth_market"]["mAP"] <= 1


def test_an_ibn_source_model_trains_resumes_exactly_and_is_saved_with_its_units(synth_root, tmp_path):
    common = ["optim.milestones=[2]", "optim.warmup_epochs=1", "train.eval_every=5", "model.ibn_blocks=2"]
    run_pretrain(synth_root, tmp_path / "straight", *common, "optim.epochs=2")
    run_pretrain(synth_root, tmp_path / "cut", *common, "optim.epochs=1")
    (tmp_path / "cut" / "model_final.pth").unlink()
    run_pretrain(synth_root, tmp_path / "cut", *common, "optim.epochs=2", resume=True)
    a, b = (torch.load(tmp_path / run / "last.pth", weights_only=False)["net"] for run in ("straight", "cut"))
    assert all(torch.equal(a[key], b[key]) for key in a)
    saved = torch.load(tmp_path / "straight" / "model_final.pth", weights_only=False)
    assert saved["config"]["model"]["ibn_blocks"] == 2
    assert sum(key.endswith(".IN.weight") for key in saved["model"]) == 4  # layer1 and layer2, two units each


def test_refuses_to_overwrite_a_run_and_reports_bad_input_in_one_line(synth_root, tmp_path):
    repo = Path(__file__).resolve().parents[1]

    def cli(*args):
        return subprocess.run([sys.executable, "uda/pretrain.py", *args], cwd=repo, capture_output=True, text=True, timeout=300)

    result = cli("--source", "market", "--data-root", str(tmp_path / "nowhere"), "--pretrained", "none")
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert "Market-1501" in result.stderr
    result = cli("--source", "synth_market", "--data-root", str(synth_root), "--opts", "optim.lrr=1")
    assert result.returncode == 2 and "did you mean 'optim.lr'" in result.stderr
    assert "--opts" in cli("--help").stdout


def test_torchrun_two_processes_on_cpu(synth_root, tmp_path):
    """DistributedDataParallel over gloo: each process trains on its share of the P x K batches,
    the main one evaluates and writes the run folder."""
    repo = Path(__file__).resolve().parents[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    args = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29533", "uda/pretrain.py", "--source", "synth_market",
            "--data-root", str(synth_root), "--output-dir", str(tmp_path / "ddp"), "--opts", *TINY,
            "data.num_pids=4", "optim.epochs=2", "train.eval_every=1"]
    result = subprocess.run(args, cwd=repo, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["epoch"] for r in read_metrics(tmp_path / "ddp")] == [1, 2]
    assert (tmp_path / "ddp" / "model_final.pth").is_file()


def _market2duke(*args: str) -> subprocess.CompletedProcess:
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", "scripts/market2duke.sh", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("variant", [[], ["--variant", "cpu"]], ids=["recipe", "cpu"])
def test_market2duke_script_stops_with_the_missing_dataset_message(tmp_path, variant):
    result = _market2duke(*variant, "--data-root", str(tmp_path / "nowhere"), "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode != 0
    assert "error: market not found under data root" in result.stderr and "Market-1501-v15.09.15" in result.stderr
    assert "Traceback" not in result.stderr


def test_market2duke_script_names_a_missing_variant_config():
    result = _market2duke("--variant", "tpu")
    assert result.returncode == 2
    assert "no config configs/pretrain/market_tpu.yaml" in result.stderr


def test_a_diverging_run_stops_before_its_checkpoint_with_a_message(synth_root, tmp_path):
    from uda.errors import UdaError

    with pytest.raises(UdaError, match=r"diverging.*lower optim.lr \(this step's lr: 1e\+06\)"):
        run_pretrain(synth_root, tmp_path / "run", "optim.lr=1e6", "optim.warmup_epochs=0", "optim.epochs=2")
    assert not (tmp_path / "run" / "last.pth").exists() and not (tmp_path / "run" / "model_final.pth").exists()
