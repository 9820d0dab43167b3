"""DukeMTMC-reID: Market-1501's folder layout with its own file names.

    <root>/bounding_box_train/0005_c2_f0046985.jpg   id _ c<camera 1-8> _ f<frame>

The gallery's 408 distractor identities are ordinary ids that appear in no query, so nothing is dropped.
"""
from __future__ import annotations

import re
from pathlib import Path

from uda.datasets.base import ReIDDataset
from uda.datasets.market import parse_bounding_box_layout

DUKE_NAME = re.compile(r"(-1|\d+)_c(\d)_f\d+\.jpg")  # groups: id, camera
DUKE_NUM_CAMS = 8


def parse_duke(root: str | Path, name: str = "duke") -> ReIDDataset:
    """DukeMTMC-reID (8 cameras) at `root` (holding bounding_box_train, query, bounding_box_test)."""
    return parse_bounding_box_layout(root, name, DUKE_NAME, DUKE_NUM_CAMS, "0005_c2_f0046985.jpg")
