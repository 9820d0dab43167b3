"""The redesign's shape: one adaptation batch goes from disk to loss through at most 10 files of uda/,
traced on a real (tiny synthetic) run by scripts/batch_path.py."""
import importlib.util
from pathlib import Path

from tests.test_adapt import TINY

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "batch_path.py"


def load_script():
    spec = importlib.util.spec_from_file_location("batch_path", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_adaptation_batch_passes_through_at_most_ten_files(synth_root, source_model, tmp_path):
    batch_path = load_script()
    files = batch_path.trace_stage("adapt", ["--source", "synth_market", "--target", "synth_duke", "--data-root", str(synth_root),
                                             "--init", str(source_model), "--output-dir", str(tmp_path / "run"),
                                             "--opts", *TINY, "optim.epochs=1", "adapt.iters=1"])
    on_path = [f for f in files if f not in batch_path.NOT_ON_THE_PATH]
    # the pieces a reader expects on the way: parser, decoding, sampler + augmentation, the step, model, heads, loss
    for expected in ("uda/datasets/benchmarks.py", "uda/data/images.py", "uda/data/device_batches.py", "uda/adapt.py",
                     "uda/engine.py", "uda/models/reid.py", "uda/head_policies.py", "uda/losses.py"):
        assert expected in on_path, (expected, on_path)
    assert len(on_path) <= 10, on_path
