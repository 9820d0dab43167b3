"""uda.build: backends, heads built from the config, the optimizer."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from uda import build, pretrain, settings
from uda.config import load_config
from uda.errors import ConfigError

# A fresh interpreter, as a stage starts: set_backends first, then an elementwise op large enough that
# torch splits it across its worker threads. Every output must be flushed: a thread that did not inherit
# the setting leaves its share of the subnormal products (2 x 1.4e-45) non-zero, and runs slowly on them.
FLUSH_CHECK = """
import torch
from uda import build, pretrain
from uda.config import load_config
if {call_set_backends}:
    build.set_backends(load_config(pretrain.DEFAULTS))
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


def test_every_registry_name_passes_its_check():
    """The tables list what the implementations accept: each accepted name builds."""
    from uda.models import build_backbone, build_head, build_pooling

    for name in settings.BY_KEY["model.backbone"].check.names:
        build_backbone(name, "none")
    for name in settings.BY_KEY["model.pooling"].check.names:
        build_pooling(name)
    for name in settings.BY_KEY["model.head"].check.names:
        build_head(name, 4, 3)
    for name in settings.BY_KEY["optim.name"].check.names:
        build.build_optimizer([torch.nn.Parameter(torch.zeros(1))], load_config(pretrain.DEFAULTS, None, [f"optim.name={name}"]))


def test_deterministic_runs_fix_the_cublas_workspace(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        build.set_backends(load_config(pretrain.DEFAULTS, None, ["deterministic=true"]))
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        build.set_backends(load_config(pretrain.DEFAULTS))
    assert not torch.are_deterministic_algorithms_enabled()


def test_margin_heads_take_their_own_default_margin_unless_one_is_set():
    def head(*opts):
        return build.build_classifier(load_config(pretrain.DEFAULTS, None, list(opts)), 8, 4)

    assert head("model.head=arcface").margin == 0.5 and head("model.head=cosface").margin == 0.35
    assert head("model.head=arcface", "model.margin=0.3").margin == 0.3
    with pytest.raises(ConfigError, match="model.margin must be >= 0 and finite, got 'wide'"):
        settings.check(load_config(pretrain.DEFAULTS, None, ["model.margin=wide"]))


def test_a_device_that_is_misspelt_or_absent_is_refused_before_any_work():
    from uda.distributed import DistInfo, pick_device

    assert pick_device(DistInfo(), "cpu") == torch.device("cpu")
    assert pick_device(DistInfo(), "auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N, got 'tpu'"):
        pick_device(DistInfo(), "tpu")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match=f"device=cuda:{gpus} but torch sees .*: use device=auto or device=cpu"):
        pick_device(DistInfo(), f"cuda:{gpus}")  # one past the last GPU: on a CPU machine, cuda:0
