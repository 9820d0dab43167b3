"""Real kills: a run in a subprocess is SIGKILLed at a chosen point (mid-epoch, during clustering, while
a checkpoint is being written), then resumed with the same command plus --resume; it must end with the
metrics and weights of a run that was never interrupted. Each point is reached by wrapping one function
in the child process (tests/fault_driver.py), so the package carries no test hooks."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from uda.runlog import read_metrics

DRIVER = Path(__file__).with_name("fault_driver.py")
REPO = Path(__file__).resolve().parents[1]
TINY = ["device=cpu", "data.synth_preset=tiny", "data.num_workers=0", "model.backbone=resnet18_w16", "data.height=64",
        "data.width=32", "eval.batch_size=64"]
ADAPT = [*TINY, "data.num_pids=4", "cluster.k1=10", "cluster.min_samples=2", "cluster.eps=0.4", "adapt.iters=4",
         "optim.epochs=3", "train.eval_every=2", "cluster.camera_normalize=true"]
PRETRAIN = [*TINY, "model.pretrained=none", "optim.lr=3.5e-3", "optim.warmup_epochs=1", "optim.warmup_from=3.5e-4",
            "optim.milestones=[20]", "optim.epochs=3", "train.eval_every=2", "data.num_pids=4"]


def run(stage: str, argv: list[str], kill_at: str = "none", nth: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # one thread count for every run
    return subprocess.run([sys.executable, str(DRIVER), stage, kill_at, str(nth), *argv], env=env, capture_output=True, text=True, timeout=600)


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "model_final.pth", weights_only=False)["model"]


def assert_same_run(a: Path, b: Path) -> None:
    assert read_metrics(a) == read_metrics(b)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def killed_then_resumed(stage: str, argv: list[str], kill_at: str, nth: int) -> None:
    killed = run(stage, argv, kill_at, nth)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL, at the point asked for
    resumed = run(stage, argv + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]


@pytest.fixture(scope="module")
def straight_adapt(synth_root, source_model, tmp_path_factory) -> tuple[list[str], Path]:
    folder = tmp_path_factory.mktemp("straight") / "adapt"
    common = ["--source", "synth_market", "--target", "synth_duke", "--data-root", str(synth_root), "--init", str(source_model)]
    done = run("adapt", common + ["--output-dir", str(folder), "--opts", *ADAPT])
    assert done.returncode == 0, done.stderr[-2000:]
    return common, folder


@pytest.mark.parametrize("kill_at, nth", [
    ("step", 6),          # the 2nd of epoch 2's 4 optimizer steps
    ("clustering", 3),    # epoch 3's pseudo-label round, after epoch 2's evaluation and checkpoint
    ("checkpoint", 2),    # half of epoch 2's last.pth written
])
def test_adapt_killed_resumes_to_the_uninterrupted_result(straight_adapt, tmp_path, kill_at, nth):
    common, straight = straight_adapt
    argv = common + ["--output-dir", str(tmp_path / "run"), "--opts", *ADAPT]
    killed_then_resumed("adapt", argv, kill_at, nth)
    assert_same_run(straight, tmp_path / "run")
    assert not list((tmp_path / "run").glob(".*.tmp"))  # the torn temporary is gone


def test_pretrain_killed_mid_epoch_resumes_to_the_uninterrupted_result(synth_root, tmp_path):
    common = ["--source", "synth_market", "--data-root", str(synth_root)]
    straight = run("pretrain", common + ["--output-dir", str(tmp_path / "straight"), "--opts", *PRETRAIN])
    assert straight.returncode == 0, straight.stderr[-2000:]
    argv = common + ["--output-dir", str(tmp_path / "run"), "--opts", *PRETRAIN]
    killed_then_resumed("pretrain", argv, "step", 2 * 4 + 2)  # tiny at P = 4: 4 steps an epoch; killed in epoch 3
    assert_same_run(tmp_path / "straight", tmp_path / "run")
