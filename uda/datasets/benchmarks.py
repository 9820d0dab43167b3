"""The public benchmarks by name: where each lives under the data root, how its folders and file names
parse into records, and `load_dataset(name)`, which also reaches the synthetic domains and your own data.

Data root: the `data_root` argument, else $UDA_DATA, else ./data. Under it:

    market        Market-1501-v15.09.15 | Market-1501 | market1501 | market1501/Market-1501-v15.09.15
    duke          DukeMTMC-reID | dukemtmc-reid/DukeMTMC-reID | dukemtmcreid/DukeMTMC-reID
    msmt17        MSMT17_V2 | MSMT17_V1 | msmt17/MSMT17_V2 | msmt17/MSMT17_V1
    synth_market  synth_market_<preset>_seed<seed>   (Market layout; generated on first use)
    synth_duke    synth_duke_<preset>_seed<seed>     (Duke layout; generated on first use)

or, for a real dataset, the data root itself when it directly holds the layout. A name that is a path
(it holds a `/` or ends in .csv) is your own data: see uda.datasets.custom.

Market-1501, the folder layout DukeMTMC-reID and our synthetic domains share:

    <root>/bounding_box_train/0002_c1s1_000451_03.jpg   id _ c<camera>s<sequence> _ frame _ box
    <root>/query/...
    <root>/bounding_box_test/...                        id -1 = junk (dropped), 0000 = distractor (kept)

DukeMTMC-reID: the same layout with its own file names (the gallery's 408 distractor identities are
ordinary ids that appear in no query, so nothing is dropped):

    <root>/bounding_box_train/0005_c2_f0046985.jpg   id _ c<camera 1-8> _ f<frame>

MSMT17 (V1 and V2): splits are given by list files, not by folders.

    MSMT17_V1/train/0000/0000_000_01_0303morning_0015_0.jpg    MSMT17_V2: mask_train_v2, mask_test_v2
             /test/0000/...
             /list_train.txt  list_val.txt                     images under the train folder
             /list_query.txt  list_gallery.txt                 images under the test folder

A list line is `<relative image path> <label>`, e.g. `0000/0000_000_01_0303morning_0015_0.jpg 0`.
A file name is id _ index _ camera (01-15) _ date+time of day _ frame _ box, sometimes ending `_ex`.
The label is the id; the camera is read from the name, as torchreid and fast-reid do.

Parsing reads file names only, never image bytes, so it takes well under a second on the real sets.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from uda.datasets.base import ImageRecord, ReIDDataset, check_test_splits, relabel_train
from uda.datasets.custom import is_custom_dataset, parse_custom
from uda.errors import DatasetError

# Market-1501 and DukeMTMC-reID
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

DUKE_NAME = re.compile(r"(-1|\d+)_c(\d)_f\d+\.jpg")  # groups: id, camera
DUKE_NUM_CAMS = 8


def parse_duke(root: str | Path, name: str = "duke") -> ReIDDataset:
    """DukeMTMC-reID (8 cameras) at `root` (holding bounding_box_train, query, bounding_box_test)."""
    return parse_bounding_box_layout(root, name, DUKE_NAME, DUKE_NUM_CAMS, "0005_c2_f0046985.jpg")


# MSMT17
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


# A dataset by name
DATASET_FOLDERS = {
    "market": ("Market-1501-v15.09.15", "Market-1501", "market1501", "market1501/Market-1501-v15.09.15"),
    "duke": ("DukeMTMC-reID", "dukemtmc-reid/DukeMTMC-reID", "dukemtmcreid/DukeMTMC-reID"),
    "msmt17": ("MSMT17_V2", "MSMT17_V1", "msmt17/MSMT17_V2", "msmt17/MSMT17_V1"),
}
# What every copy of a layout holds: tells the dataset folder from a wrapper folder of the same name.
LAYOUT_MARKERS = {"market": "bounding_box_train", "duke": "bounding_box_train", "msmt17": "list_train.txt"}
BOUNDING_BOX_PARSERS = {"market": parse_market, "duke": parse_duke}
SYNTHETIC_PARSERS = {"synth_market": parse_market, "synth_duke": parse_duke}
KNOWN_DATASETS = (*DATASET_FOLDERS, *SYNTHETIC_PARSERS)
GENERATE_HINT = "python -m uda.datasets.synthetic --domain market --preset small --out DIR"


def resolve_data_root(data_root: str | Path | None = None) -> Path:
    """The folder datasets live under: `data_root` if given, else $UDA_DATA if set, else ./data (absolute)."""
    if data_root is None:
        data_root = os.environ.get("UDA_DATA") or "data"
    return Path(data_root).expanduser().absolute()


def find_dataset_folder(name: str, data_root: Path) -> Path:
    """The folder under `data_root` that holds real dataset `name`: the root itself or a usual folder name."""
    marker = LAYOUT_MARKERS[name]
    for folder in (data_root, *(data_root / candidate for candidate in DATASET_FOLDERS[name])):
        if (folder / marker).exists():
            return folder
    missing_root = "" if data_root.is_dir() else " (which does not exist)"
    raise DatasetError(
        f"{name} not found under data root {data_root}{missing_root}: looked for "
        f"{', '.join(DATASET_FOLDERS[name])} or the layout itself (each holding {marker}); set the data root "
        f"(argument or $UDA_DATA) to the folder that holds it, or generate synthetic data: {GENERATE_HINT}"
    )


def synthetic_folder(name: str, data_root: Path, preset: str, seed: int) -> Path:
    """Where synthetic dataset `name` ('synth_market' / 'synth_duke') of this preset and seed lives."""
    return data_root / f"{name}_{preset}_seed{seed}"


def load_dataset(
    name: str,
    data_root: str | Path | None = None,
    *,
    synth_preset: str = "small",
    synth_seed: int = 0,
    msmt_train_val: bool = False,
) -> ReIDDataset:
    """Parse dataset `name` (one of KNOWN_DATASETS) found under the data root, or the custom dataset at
    the path `name` (a folder or a CSV; not under the data root unless the path says so).

    synth_*: the synthetic domain's preset and seed; it is generated into its folder when absent.
    msmt_train_val: MSMT17 trains on list_train + list_val (SpCL) instead of list_train only.
    """
    if name not in KNOWN_DATASETS and is_custom_dataset(name):
        dataset = parse_custom(name)
        if dataset.name in KNOWN_DATASETS:
            raise DatasetError(f"{dataset.root}: your dataset's name {dataset.name!r} (its folder or file name) is a built-in "
                               f"dataset's, whose run folders and configs it would take; rename it (e.g. my_{dataset.name})")
        return dataset
    root = resolve_data_root(data_root)
    if name in SYNTHETIC_PARSERS:
        folder = synthetic_folder(name, root, synth_preset, synth_seed)
        if not folder.is_dir():
            from uda.datasets.synthetic import generate  # imported here: needed only to create a domain

            generate(name.removeprefix("synth_"), synth_preset, synth_seed, folder)
        return SYNTHETIC_PARSERS[name](folder, name)
    if name not in DATASET_FOLDERS:
        raise DatasetError(
            f"unknown dataset {name!r}; choose one of {', '.join(KNOWN_DATASETS)}, or give the path of your own "
            f"data (a folder holding train/ query/ gallery/, or a .csv file; e.g. ./{name})"
        )
    folder = find_dataset_folder(name, root)
    if name == "msmt17":
        return parse_msmt17(folder, train_val=msmt_train_val)
    return BOUNDING_BOX_PARSERS[name](folder)
