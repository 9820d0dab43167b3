import os
import subprocess
import sys
from pathlib import Path

import pytest

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
