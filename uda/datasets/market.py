"""Market-1501: the folder layout DukeMTMC-reID and our synthetic domains share.

    <root>/bounding_box_train/0002_c1s1_000451_03.jpg   id _ c<camera>s<sequence> _ frame _ box
    <root>/query/...
    <root>/bounding_box_test/...                        id -1 = junk (dropped), 0000 = distractor (kept)

Parsing reads file names only, never image bytes, so it takes well under a second on the real sets.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from uda.datasets.base import ImageRecord, ReIDDataset, check_test_splits, relabel_train
from uda.errors import DatasetError

SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
JUNK_PID = -1  # boxes the annotators could not assign: the protocol ignores them

# Groups: id, camera. Market-1501 v15.09.15 ships 24 ordinary images named `*.jpg.jpg` (ids 1488,
# 0000 and -1 in query and bounding_box_test), so a doubled suffix is accepted.
MARKET_NAME = re.compile(r"(-1|\d+)_c(\d)s\d+_\d+_\d+\.jpg(?:\.jpg)?")
MARKET_NUM_CAMS = 6


def parse_bounding_box_split(
    folder: Path, dataset: str, name_pattern: re.Pattern[str], num_cams: int, example: str
) -> tuple[list[ImageRecord], int]:
    """Records of one split folder, sorted by file name, and how many junk (id -1) images it dropped.

    Only `*.jpg` files count as images (`Thumbs.db` and hidden files such as macOS `._x.jpg` are
    skipped); an image whose name does not match `name_pattern` (groups: id, 1-based camera) is an error.
    """
    if not folder.is_dir():
        raise DatasetError(
            f"{dataset}: split folder {folder} is missing; a {dataset} folder holds "
            f"{', '.join(SPLIT_FOLDERS.values())}: point the data root at the right folder or re-extract it"
        )
    records, num_junk = [], 0
    folder_path = str(folder)  # os.path.join: pathlib's `/` would be most of the parse time
    for file_name in sorted(os.listdir(folder)):
        if not file_name.endswith(".jpg") or file_name.startswith("."):
            continue
        match = name_pattern.fullmatch(file_name)
        if match is None or not 1 <= int(match.group(2)) <= num_cams:
            raise DatasetError(
                f"{dataset}: cannot parse image name {folder / file_name}: expected a name like {example} "
                f"(cameras c1-c{num_cams}); rename or remove the file"
            )
        pid = int(match.group(1))
        if pid == JUNK_PID:
            num_junk += 1
            continue
        records.append(ImageRecord(os.path.join(folder_path, file_name), pid, int(match.group(2)) - 1, pid))
    if not records:
        raise DatasetError(
            f"{dataset}: split folder {folder} holds no usable .jpg images; "
            f"re-extract or regenerate the dataset"
        )
    return records, num_junk


def parse_bounding_box_layout(
    root: str | Path, name: str, name_pattern: re.Pattern[str], num_cams: int, example: str
) -> ReIDDataset:
    """Parse a Market-style folder: train ids relabelled 0..N-1, cameras 0-based, junk counted in dropped."""
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DatasetError(
            f"{name}: dataset folder {root} does not exist; point the data root at the folder that holds "
            f"{', '.join(SPLIT_FOLDERS.values())}"
        )
    splits, dropped = {}, {}
    for split, folder_name in SPLIT_FOLDERS.items():
        splits[split], num_junk = parse_bounding_box_split(
            root / folder_name, name, name_pattern, num_cams, example
        )
        if num_junk:
            dropped[f"{split}_junk"] = num_junk
    check_test_splits(name, root, splits["query"], splits["gallery"])
    train = relabel_train(splits["train"])
    return ReIDDataset(name, root, train, splits["query"], splits["gallery"], dropped)


def parse_market(root: str | Path, name: str = "market") -> ReIDDataset:
    """Market-1501 (6 cameras) at `root` (holding bounding_box_train, query, bounding_box_test)."""
    return parse_bounding_box_layout(root, name, MARKET_NAME, MARKET_NUM_CAMS, "0002_c1s1_000451_03.jpg")
