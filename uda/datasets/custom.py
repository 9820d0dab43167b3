"""Your own data, as source or target: a folder layout or one CSV file.

Folder (`--target /data/mycams`):

    <root>/train/<image>            unlabelled (a target), or
    <root>/train/<id>/<image>       labelled (a source; a target uses the ids for diagnostics only)
    <root>/query/<id>/<image>
    <root>/gallery/<id>/<image>     an id no query has is a distractor

An image is a file ending in one of base.IMAGE_SUFFIXES (.jpg .jpeg .png .bmp .webp .tif .tiff, any
case, as uda.extract reads); other files are skipped, with a warning that counts them.

CSV (`--target /data/mycams.csv`): a header naming `split,path` and optionally `pid` and `camid`
columns, one image per row; split is train, query or gallery; a relative path is relative to the
CSV's folder; an empty pid is an unlabelled train image. An image is listed once (a repeat is refused,
even with the same id).

Ids are any names (folder names or pid cells); they are mapped to integers in sorted order over all
splits. Cameras are optional: in a folder layout an image name starting `c<N>_` (e.g. `c3_0001.jpg`)
gives camera N; in a CSV, the camid column. Either every image has a camera or none has. Without
cameras, evaluation keeps same-camera matches (the Market-1501 protocol removes them) and camera
normalisation of the clusters is refused.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import re
from pathlib import Path

from uda.datasets.base import IMAGE_SUFFIXES, NO_CROSS_CAMERA_MATCH, ImageRecord, ReIDDataset, relabel_train, unscorable_queries
from uda.errors import DatasetError

log = logging.getLogger(__name__)

SPLITS = ("train", "query", "gallery")
CAMERA_PREFIX = re.compile(r"c(\d+)_")
NO_CAMERA = -1  # ImageRecord.camid of an image without a camera id (pid -1: an unlabelled train image)


def is_custom_dataset(name: str) -> bool:
    """A dataset named by a path (it holds a separator, or names a CSV file) rather than a known name."""
    return "/" in name or os.sep in name or name.startswith("~") or name.lower().endswith(".csv")


def parse_custom(location: str | Path) -> ReIDDataset:
    """The dataset at `location`: a CSV file (`*.csv`) or a folder holding train/, query/, gallery/."""
    path = Path(location).expanduser().absolute()
    if path.suffix.lower() == ".csv":
        if not path.is_file():
            raise DatasetError(f"dataset list {path} does not exist; give the path of a CSV with columns split,path[,pid,camid]")
        rows, skipped = _csv_rows(path), []
        name = path.stem
    else:
        if not path.is_dir():
            raise DatasetError(
                f"dataset folder {path} does not exist; a custom dataset folder holds train/, query/ and gallery/ "
                f"(or name a CSV file ending in .csv)"
            )
        rows, skipped = _folder_rows(path)
        name = path.name
    dataset = _dataset(name, path, rows)
    if skipped:
        log.warning("%s: skipped %d file(s) that are not images (%s), e.g. %s", name, len(skipped), " ".join(IMAGE_SUFFIXES), skipped[0])
        dataset.dropped["not_images"] = len(skipped)
    return dataset


# A row: (split, image path, id name or None (unlabelled), camera name or None (no camera)).
Row = tuple[str, str, "str | None", "str | None"]


def _file_names(folder: Path) -> tuple[list[str], list[str]]:
    """(image names, names of other files) in `folder`, sorted; hidden files (.DS_Store) in neither."""
    files = sorted(n for n in os.listdir(folder) if not n.startswith(".") and (folder / n).is_file())
    images = [n for n in files if n.lower().endswith(IMAGE_SUFFIXES)]
    return images, [n for n in files if not n.lower().endswith(IMAGE_SUFFIXES)]


def _camera_of(file_name: str) -> str | None:
    match = CAMERA_PREFIX.match(file_name)
    return match.group(1) if match else None


def _folder_rows(root: Path) -> tuple[list[Row], list[Path]]:
    """The rows of a folder layout, and the files in it that are not images (skipped)."""
    rows: list[Row] = []
    skipped: list[Path] = []
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            raise DatasetError(
                f"{root.name}: split folder {folder} is missing; a custom dataset folder holds "
                f"{', '.join(s + '/' for s in SPLITS)} (images of one identity in one subfolder each; train/ may hold "
                f"images directly when unlabelled)"
            )
        loose, others = _file_names(folder)
        skipped += [folder / n for n in others]
        id_folders = sorted(d for d in os.listdir(folder) if (folder / d).is_dir() and not d.startswith("."))
        if loose and (split != "train" or id_folders):
            raise DatasetError(
                f"{root.name}: {folder} holds images directly ({loose[0]}, ...)"
                + (" and identity subfolders; put every image in its identity's subfolder, or (unlabelled) none"
                   if split == "train" else f"; {split} images go into one subfolder per identity ({split}/<id>/<image>)")
            )
        rows += [(split, str(folder / n), None, _camera_of(n)) for n in loose]
        for pid in id_folders:
            images, others = _file_names(folder / pid)
            rows += [(split, str(folder / pid / n), pid, _camera_of(n)) for n in images]
            skipped += [folder / pid / n for n in others]
    return rows, skipped


def _csv_rows(path: Path) -> list[Row]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a spreadsheet's byte-order mark is not a column name
            text = f.read()
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as a UTF-8 CSV file") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [c.strip() for c in reader.fieldnames or ()]
    missing = [c for c in ("split", "path") if c not in columns]
    if missing:
        raise DatasetError(
            f"{path}: the header must name the columns split,path and optionally pid,camid; "
            f"got {','.join(columns) or 'an empty file'} (missing {', '.join(missing)})"
        )
    rows: list[Row] = []
    for line, raw in enumerate(reader, start=2):
        if None in raw:  # DictReader's key for the fields past the header's columns
            raise DatasetError(f"{path}:{line}: {len(columns) + len(raw[None])} fields for the header's {len(columns)} columns "
                               f"({','.join(columns)}); quote a path that holds a comma")
        row = {k.strip(): (v or "").strip() for k, v in raw.items()}
        split = row["split"]
        if split not in SPLITS:
            raise DatasetError(f"{path}:{line}: split must be one of {', '.join(SPLITS)}, got {split!r}")
        if not row["path"]:
            raise DatasetError(f"{path}:{line}: empty path")
        image = Path(row["path"]).expanduser()
        image = image if image.is_absolute() else path.parent / image
        rows.append((split, str(image), row.get("pid") or None, row.get("camid") or None))
    return rows



def _dataset(name: str, root: Path, rows: list[Row]) -> ReIDDataset:
    for split in SPLITS:
        if not any(r[0] == split for r in rows):
            raise DatasetError(f"{name}: the {split} split holds no images ({root}); every split needs at least one")
    for split in ("query", "gallery"):
        unlabelled = next((r for r in rows if r[0] == split and r[2] is None), None)
        if unlabelled:
            raise DatasetError(f"{name}: {split} image {unlabelled[1]} has no id; evaluation needs the id of every query and gallery image")
    labelled_train = {r[2] is not None for r in rows if r[0] == "train"}
    if len(labelled_train) > 1:
        raise DatasetError(f"{name}: some train images have ids and some do not; label all of them or none")
    with_camera = {r[3] is not None for r in rows}
    if len(with_camera) > 1:
        example = next(r[1] for r in rows if r[3] is None)
        raise DatasetError(
            f"{name}: some images have a camera id and some do not (e.g. {example}); give every image one "
            f"(file names starting c<N>_, or the camid column) or none"
        )
    _check_train_listed_once(name, [r for r in rows if r[0] == "train"])
    missing = next((r[1] for r in rows if not os.path.isfile(r[1])), None)
    if missing:
        raise DatasetError(f"{name}: image {missing} does not exist")
    duplicated = _same_image_twice([r[1] for r in rows if r[0] != "train"])
    if duplicated:
        first, again = duplicated
        raise DatasetError(f"{name}: {first} is listed twice among query and gallery"
                           + (f" (again as {again})" if again != first else "") + "; a query must not be its own match")

    id_index = {pid: i for i, pid in enumerate(sorted({r[2] for r in rows if r[2] is not None}, key=_natural))}
    cam_index = {cam: i for i, cam in enumerate(sorted({r[3] for r in rows if r[3] is not None}, key=_natural))}

    def record(row: Row) -> ImageRecord:
        pid = -1 if row[2] is None else id_index[row[2]]
        return ImageRecord(row[1], pid, NO_CAMERA if row[3] is None else cam_index[row[3]], pid)

    splits = {split: [record(r) for r in rows if r[0] == split] for split in SPLITS}
    _check_query_matches(name, splits["query"], splits["gallery"], cameras=True in with_camera)
    train = relabel_train(splits["train"]) if True in labelled_train else splits["train"]
    return ReIDDataset(name, root, train, splits["query"], splits["gallery"])


def _check_train_listed_once(name: str, train: list[Row]) -> None:
    """A train image listed twice (a CSV can) is refused, not kept: with two ids it would teach both; with
    one it would be sampled twice as often, which no one asked for."""
    id_of: dict[str, str | None] = {}
    for _, path, pid, _ in train:
        if path in id_of:
            if pid != id_of[path]:
                ids = f"ids {id_of[path]} and {pid}"
            else:
                ids = f"id {pid} both times" if pid else "unlabelled"
            raise DatasetError(f"{name}: train image {path} is listed twice ({ids}); list each image once, with its one id")
        id_of[path] = pid


def _check_query_matches(name: str, query: list[ImageRecord], gallery: list[ImageRecord], cameras: bool) -> None:
    problem = unscorable_queries(query, gallery, cameras)
    if problem == NO_CROSS_CAMERA_MATCH:
        raise DatasetError(
            f"{name}: {problem} (one camera?); drop the camera ids (no c<N>_ name prefix, no camid column) to "
            f"evaluate with the no-camera protocol, which keeps same-camera matches"
        )
    if problem:
        raise DatasetError(f"{name}: {problem}; query/<id>/ and gallery/<id>/ must share ids")


def _natural(name: str) -> tuple:
    """'2' before '10'; names that are not numbers after the numbers, alphabetically."""
    return (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name)


def _same_image_twice(paths: list[str]) -> tuple[str, str] | None:
    """The first image listed twice, as (its first listing, the next): one file however it is named
    (img/../img/q.jpg, a symbolic or hard link), told by device and inode. Without cameras nothing else
    removes a query's own copy from its gallery, and it ranks first: rank-1 100%, mAP inflated."""
    seen: dict[tuple[int, int], str] = {}
    for path in paths:
        status = os.stat(path)
        key = (status.st_dev, status.st_ino)
        if key in seen:
            return seen[key], path
        seen[key] = path
    return None
