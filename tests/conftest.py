"""Fixtures shared by several test modules."""
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The folder $UDA_REAL_DATA names (holding Market-1501-v15.09.15, DukeMTMC-reID); skip when absent."""
    value = os.environ.get("UDA_REAL_DATA")
    if not value:
        pytest.skip("UDA_REAL_DATA is not set: it names the folder that holds the real datasets")
    root = Path(value)
    if not root.is_dir():
        pytest.skip(f"UDA_REAL_DATA={value} is not a folder")
    return root


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A data root holding the tiny synthetic Market-like and Duke-like domains (generated once per session)."""
    from uda.datasets import load_dataset

    root = tmp_path_factory.mktemp("data")
    for name in ("synth_market", "synth_duke"):
        load_dataset(name, root, synth_preset="tiny")
    return root


@pytest.fixture(scope="session")
def source_model(synth_root, tmp_path_factory) -> Path:
    """A small synth_market source model (tiny preset, 12 epochs; its run folder holds the metrics it recorded)."""
    from uda import pretrain

    out = tmp_path_factory.mktemp("pretrain") / "run"
    pretrain.main(["--source", "synth_market", "--data-root", str(synth_root), "--output-dir", str(out), "--opts", "device=cpu",
                   "data.synth_preset=tiny", "data.num_workers=0", "model.backbone=resnet18_w16", "model.pretrained=none",
                   "data.height=64", "data.width=32", "eval.batch_size=64", "optim.lr=3.5e-3", "optim.warmup_epochs=2",
                   "optim.warmup_from=3.5e-4", "optim.milestones=[20]", "optim.epochs=12", "train.eval_every=12"])
    return out / "model_final.pth"
