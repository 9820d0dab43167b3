"""MSMT17 (V1 and V2): splits are given by list files, not by folders.

    MSMT17_V1/train/0000/0000_000_01_0303morning_0015_0.jpg    MSMT17_V2: mask_train_v2, mask_test_v2
             /test/0000/...
             /list_train.txt  list_val.txt                     images under the train folder
             /list_query.txt  list_gallery.txt                 images under the test folder

A list line is `<relative image path> <label>`, e.g. `0000/0000_000_01_0303morning_0015_0.jpg 0`.
A file name is id _ index _ camera (01-15) _ date+time of day _ frame _ box, sometimes ending `_ex`.
The label is the id; the camera is read from the name, as torchreid and fast-reid do.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from uda.datasets.base import ImageRecord, ReIDDataset, check_test_splits, relabel_train
from uda.errors import DatasetError

# Image folders (train, test) of each release; V2 blurs faces, the lists are the same.
VERSION_FOLDERS = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}
# Groups: relative path, id from the file name, camera, label.
LIST_LINE = re.compile(r"((?:[^/\s]+/)*(\d+)_\d+_(\d+)_\w+\.jpg)\s+(\d+)")
MSMT17_NUM_CAMS = 15


def image_folders(root: Path, name: str) -> tuple[Path, Path]:
    """The (train, test) image folders of whichever release `root` holds."""
    for train_folder, test_folder in VERSION_FOLDERS.values():
        if (root / train_folder).is_dir():
            if not (root / test_folder).is_dir():
                raise DatasetError(f"{name}: split folder {root / test_folder} is missing; re-extract MSMT17")
            return root / train_folder, root / test_folder
    looked_for = " or ".join(f"{train}+{test}" for train, test in VERSION_FOLDERS.values())
    raise DatasetError(
        f"{name}: {root} holds no image folders ({looked_for}); re-extract MSMT17_V1 or MSMT17_V2"
    )


def image_files(folder: Path) -> set[str]:
    """Every file under `folder`, relative and '/'-separated as in the list files (one walk, no stat)."""
    files = set()
    for directory, _, file_names in os.walk(folder):
        prefix = Path(directory).relative_to(folder).as_posix()
        files.update(name if prefix == "." else f"{prefix}/{name}" for name in file_names)
    return files


def parse_list_file(list_file: Path, image_folder: Path, existing: set[str], name: str) -> list[ImageRecord]:
    """Records of one list file: pid = label, camid = camera - 1, orig_pid = id in the file name."""
    if not list_file.is_file():
        raise DatasetError(
            f"{name}: list file {list_file} is missing; re-extract MSMT17 (lists sit beside image folders)"
        )
    records, folder_path = [], str(image_folder)
    with open(list_file, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            match = LIST_LINE.fullmatch(line.strip())
            if match is None or not 1 <= int(match.group(3)) <= MSMT17_NUM_CAMS:
                raise DatasetError(
                    f"{name}: cannot parse {list_file} line {line_number}: {line.strip()!r}; expected "
                    f"'<id>/<image>.jpg <label>' like '0000/0000_000_01_0303morning_0015_0.jpg 0' "
                    f"(cameras 01-{MSMT17_NUM_CAMS}); fix the line or re-extract the list file"
                )
            relative_path, file_pid, camera, label = match.groups()
            if relative_path not in existing:
                raise DatasetError(
                    f"{name}: {list_file} line {line_number} names {image_folder / relative_path}, "
                    f"which is missing; re-extract MSMT17 so that the images and the list files match"
                )
            path = os.path.join(folder_path, relative_path)
            records.append(ImageRecord(path, int(label), int(camera) - 1, int(file_pid)))
    if not records:
        raise DatasetError(f"{name}: list file {list_file} names no images; re-extract MSMT17")
    return records


def parse_msmt17(root: str | Path, name: str = "msmt17", *, train_val: bool = False) -> ReIDDataset:
    """MSMT17_V1 or MSMT17_V2 at `root` (the folder holding the list files).

    train_val=False trains on list_train only (the published protocol); True adds list_val, as SpCL
    does. Either way training ids are relabelled 0..N-1 over the union of the lists used.
    """
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DatasetError(
            f"{name}: dataset folder {root} does not exist; point the data root at MSMT17_V1 or MSMT17_V2"
        )
    train_folder, test_folder = image_folders(root, name)
    train_files, test_files = image_files(train_folder), image_files(test_folder)
    train = parse_list_file(root / "list_train.txt", train_folder, train_files, name)
    if train_val:
        train += parse_list_file(root / "list_val.txt", train_folder, train_files, name)
    query = parse_list_file(root / "list_query.txt", test_folder, test_files, name)
    gallery = parse_list_file(root / "list_gallery.txt", test_folder, test_files, name)
    check_test_splits(name, root, query, gallery)
    return ReIDDataset(name, root, relabel_train(train), query, gallery)
