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
