"""Find a dataset under the data root by its usual folder name (or generate a synthetic one) and parse it.

Data root: the `data_root` argument, else $UDA_DATA, else ./data. Under it:

    market        Market-1501-v15.09.15 | Market-1501 | market1501 | market1501/Market-1501-v15.09.15
    duke          DukeMTMC-reID | dukemtmc-reid/DukeMTMC-reID | dukemtmcreid/DukeMTMC-reID
    msmt17        MSMT17_V2 | MSMT17_V1 | msmt17/MSMT17_V2 | msmt17/MSMT17_V1
    synth_market  synth_market_<preset>_seed<seed>   (Market layout; generated on first use)
    synth_duke    synth_duke_<preset>_seed<seed>     (Duke layout; generated on first use)

or, for a real dataset, the data root itself when it directly holds the layout. A name that is a path
(it holds a `/` or ends in .csv) is your own data: see uda.datasets.custom.
"""
from __future__ import annotations

import os
from pathlib import Path

from uda.datasets.base import ReIDDataset
from uda.datasets.custom import is_custom_dataset, parse_custom
from uda.datasets.duke import parse_duke
from uda.datasets.market import parse_market
from uda.datasets.msmt17 import parse_msmt17
from uda.errors import DatasetError

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
