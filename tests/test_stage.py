import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from uda import pretrain, stage
from uda.config import load_config
from uda.datasets.base import ImageRecord
from uda.errors import ConfigError

# A fresh interpreter, as a stage starts: set_backends first, then an elementwise op large enough that
# torch splits it across its worker threads. Every output must be flushed: a thread that did not inherit
# the setting leaves its share of the subnormal products (2 x 1.4e-45) non-zero, and runs slowly on them.
FLUSH_CHECK = """
import torch
from uda import pretrain, stage
from uda.config import load_config
if {call_set_backends}:
    stage.set_backends(load_config(pretrain.DEFAULTS))
subnormal = torch.ones(1 << 22, dtype=torch.int32).view(torch.float32)  # bit pattern 1: the smallest subnormal
print(int((subnormal * 2.0 != 0).sum()))
"""


@pytest.mark.parametrize("call_set_backends, expected_nonzero", [(True, 0), (False, 1 << 22)], ids=["set_backends", "torch_default"])
def test_set_backends_flushes_subnormals_in_every_cpu_thread(call_set_backends, expected_nonzero):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-c", FLUSH_CHECK.format(call_set_backends=call_set_backends)],
                            cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) == expected_nonzero


@pytest.mark.parametrize("opt, message", [
    ("train.eval_every=0", "train.eval_every must be a whole number of epochs >= 1"),
    ("eval.metric=l1", "eval.metric must be one of euclidean, sqeuclidean, cosine, got 'l1'"),
    ("data.pipeline=gpu", "data.pipeline must be one of device, loader"),
    ("model.backbone=resnet51", "model.backbone must be one of .*mobilenet_v2, got 'resnet51'; did you mean 'resnet50'"),
    ("model.head=cosin", "model.head must be one of linear, cosine, arcface, cosface, got 'cosin'; did you mean 'cosine'"),
    ("model.pooling=max", "model.pooling must be one of avg, gem"),
    ("optim.name=adamw", "optim.name must be one of adam, sgd, got 'adamw'; did you mean 'adam'"),
    ("optim.schedule=poly", "optim.schedule must be one of step, cosine"),
    ("eval.ap=sklearn", "eval.ap must be one of noninterp, trapezoid"),
    ("optim.lr=-1", r"optim.lr must be > 0 and finite, got -1"),
    ("optim.lr=.inf", r"optim.lr must be > 0 and finite, got inf"),
    ("optim.weight_decay=.nan", r"optim.weight_decay must be >= 0 and finite, got nan"),
    ("data.mean=[a,b,c]", r"data.mean must be 3 numbers \(R, G, B\), got \['a', 'b', 'c'\]"),
    ("optim.epochs=0", "optim.epochs must be a whole number >= 1, got 0"),
    ("data.height=-5", "data.height must be at least 8 pixels, got -5"),
    ("eval.batch_size=0", "eval.batch_size must be a whole number >= 1"),
    ("data.num_pids=1", "data.num_pids must be a whole number >= 2"),
    ("data.erasing_p=1.5", r"data.erasing_p must be in \[0, 1\]"),
    ("loss.label_smoothing=1", r"loss.label_smoothing must be in \[0, 1\)"),
    ("optim.milestones=[0, 5]", "optim.milestones must be a list of epochs >= 1"),
    ("model.last_stride=3", "model.last_stride must be 1"),
    ("loss.center_lr=0", "loss.center_lr must be > 0"),
    ("eval.scales=[]", r"eval.scales must be a non-empty list of numbers > 0, got \[\]"),
    ("eval.scales=[0.5,0]", r"eval.scales must be a non-empty list of numbers > 0, got \[0.5, 0\]"),
    ("eval.scales=[1.0,-1]", "eval.scales must be a non-empty list"),
    ("eval.scales=[1.0,.inf]", "eval.scales must be a non-empty list"),
    ("eval.scales=[a]", "eval.scales must be a non-empty list"),
    ("eval.scales=[true]", "eval.scales must be a non-empty list"),
    ("eval.scales=0.5", "config key 'eval.scales' expects list"),
])
def test_settings_that_would_fail_late_are_refused_at_once(opt, message):
    stage.check_settings(load_config(pretrain.DEFAULTS))  # the defaults pass
    with pytest.raises(ConfigError, match=message):
        stage.check_settings(load_config(pretrain.DEFAULTS, None, [opt]))


def test_multi_scale_lists_pass():
    for scales in ("[1.0]", "[0.75,1,1.25]", "[2]"):
        stage.check_settings(load_config(pretrain.DEFAULTS, None, [f"eval.scales={scales}"]))


def test_loss_weights_are_checked_once_at_config_load():
    with pytest.raises(ConfigError, match="both 0: nothing to train"):
        stage.check_settings(load_config(pretrain.DEFAULTS, None, ["loss.ce_weight=0", "loss.triplet_weight=0"]))


@pytest.mark.parametrize("opt, message", [
    ("cluster.eps=10", r"cluster.eps must be in \(0, 1\): Jaccard distances lie in \[0, 1\], got 10"),
    ("cluster.k1=0", "cluster.k1 must be a whole number >= 1, got 0"),
    ("cluster.knn_backend=annoy", "cluster.knn_backend must be one of torch, faiss"),
    ("adapt.iters=0", "adapt.iters must be a whole number >= 1"),
    ("loss.target_weight=-1", "loss.target_weight must be >= 0"),
])
def test_adaptation_settings_are_checked_by_the_same_table(opt, message):
    from uda import adapt

    stage.check_settings(load_config(adapt.DEFAULTS))
    with pytest.raises(ConfigError, match=message):
        stage.check_settings(load_config(adapt.DEFAULTS, None, [opt]))


def test_every_registry_name_passes_its_check():
    """The tables list what the implementations accept: each accepted name builds."""
    from uda.models import build_backbone, build_head, build_pooling

    for name in stage.CHOICES["model.backbone"]:
        build_backbone(name, "none")
    for name in stage.CHOICES["model.pooling"]:
        build_pooling(name)
    for name in stage.CHOICES["model.head"]:
        build_head(name, 4, 3)
    for name in stage.CHOICES["optim.name"]:
        stage.build_optimizer([torch.nn.Parameter(torch.zeros(1))], load_config(pretrain.DEFAULTS, None, [f"optim.name={name}"]))


def test_deterministic_runs_fix_the_cublas_workspace(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        stage.set_backends(load_config(pretrain.DEFAULTS, None, ["deterministic=true"]))
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        stage.set_backends(load_config(pretrain.DEFAULTS))
    assert not torch.are_deterministic_algorithms_enabled()


def test_training_ids_stay_contiguous_when_corrupt_images_take_a_whole_identity(tmp_path):
    # ids 0, 1, 2; every image of id 1 unreadable: with data.skip_corrupt the kept ids must be 0, 1
    records = []
    for pid in range(3):
        for k in range(2):
            path = tmp_path / f"{pid}_{k}.jpg"
            if pid == 1:
                path.write_bytes(b"not a jpeg")
            else:
                Image.new("RGB", (8, 16), (40 * pid, 10 * k, 0)).save(path)
            records.append(ImageRecord(str(path), pid, k, pid))
    cfg = load_config(pretrain.DEFAULTS, None, ["data.skip_corrupt=true", "data.height=16", "data.width=8"])
    kept, _ = stage.prepare_train_split(records, cfg, torch.device("cpu"))
    assert [r.pid for r in kept] == [0, 0, 1, 1]
    assert [r.orig_pid for r in kept] == [0, 0, 2, 2]


def test_margin_heads_take_their_own_default_margin_unless_one_is_set():
    def head(*opts):
        return stage.build_classifier(load_config(pretrain.DEFAULTS, None, list(opts)), 8, 4)

    assert head("model.head=arcface").margin == 0.5 and head("model.head=cosface").margin == 0.35
    assert head("model.head=arcface", "model.margin=0.3").margin == 0.3
    with pytest.raises(ConfigError, match="model.margin must be >= 0 and finite, got 'wide'"):
        stage.check_settings(load_config(pretrain.DEFAULTS, None, ["model.margin=wide"]))


def test_a_device_that_is_misspelt_or_absent_is_refused_before_any_work():
    from uda.distributed import DistInfo, pick_device

    assert pick_device(DistInfo(), "cpu") == torch.device("cpu")
    assert pick_device(DistInfo(), "auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N, got 'tpu'"):
        pick_device(DistInfo(), "tpu")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match=f"device=cuda:{gpus} but torch sees .*: use device=auto or device=cpu"):
        pick_device(DistInfo(), f"cuda:{gpus}")  # one past the last GPU: on a CPU machine, cuda:0
