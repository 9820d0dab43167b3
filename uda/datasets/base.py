"""The records every dataset parser produces, and the checks they share."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from uda.errors import DatasetError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")  # what a folder of your own images may hold
                                                                          # (a custom dataset, uda.extract); any case

NO_CAMERAS_NOTE = "no camera ids: evaluation keeps same-camera matches (not the Market-1501 protocol)"  # beside such figures


@dataclass(frozen=True)
class ImageRecord:
    """One image of a split.

    pid: train split: relabelled 0..N-1 (-1: unlabelled, a custom target); query/gallery: the original
        id (0 = distractor).
    camid: 0-based camera index (-1: unknown, a custom dataset without camera ids).
    orig_pid: the id as written in the file name, kept for diagnostics (e.g. scoring pseudo-labels).
    """

    path: str
    pid: int
    camid: int
    orig_pid: int


@dataclass
class ReIDDataset:
    """A parsed dataset: three splits of records plus what the parser dropped."""

    name: str
    root: Path
    train: list[ImageRecord]
    query: list[ImageRecord]
    gallery: list[ImageRecord]
    dropped: dict[str, int] = field(default_factory=dict)  # e.g. {"gallery_junk": 3819} (Market)

    @property
    def num_train_pids(self) -> int:
        return len({r.pid for r in self.train})

    @property
    def num_train_cams(self) -> int:
        return len({r.camid for r in self.train})

    @property
    def has_cameras(self) -> bool:
        """Camera ids known for every image (custom data may have none: a dataset has all or none)."""
        return all(r.camid >= 0 for split in (self.train, self.query, self.gallery) for r in split)

    @property
    def train_labelled(self) -> bool:
        """Train ids known (every built-in dataset; custom data may be unlabelled: a target only)."""
        return all(r.pid >= 0 for r in self.train)

    def summary(self) -> str:
        rows = [f"{self.name} ({self.root})", "  split   | ids   | images"]
        for split_name in ("train", "query", "gallery"):
            split = getattr(self, split_name)
            unlabelled = split_name == "train" and not self.train_labelled
            ids = "-" if unlabelled else len({r.pid for r in split})
            rows.append(f"  {split_name:<7} | {ids:>5} | {len(split):>6}" + ("  (unlabelled: a target only)" if unlabelled else ""))
        if not self.has_cameras:
            rows.append(f"  {NO_CAMERAS_NOTE}")
        return "\n".join(rows)


def subset_identities(dataset: ReIDDataset, num_ids: int) -> ReIDDataset:
    """A reduced-size copy for development runs on real data (e.g. CI without a GPU): the first
    `num_ids` train identities (relabelled ids 0..num_ids-1 stay as they are) and the first `num_ids`
    query identities with only their own gallery images (distractors and other ids dropped).
    Not the benchmark protocol: its numbers are not comparable with published ones."""
    if num_ids <= 0:
        return dataset
    train = [r for r in dataset.train if r.pid < num_ids]
    test_ids = set(sorted({r.pid for r in dataset.query})[:num_ids])
    return ReIDDataset(
        dataset.name, dataset.root, train,
        [r for r in dataset.query if r.pid in test_ids], [r for r in dataset.gallery if r.pid in test_ids],
        {**dataset.dropped, "subset_ids": num_ids},
    )


NO_SHARED_ID = "no query id appears in the gallery, so no query can be scored"
NO_CROSS_CAMERA_MATCH = ("no query has a gallery image of its id from another camera, and the Market-1501 protocol "
                         "scores only those")


def unscorable_queries(query: list[ImageRecord], gallery: list[ImageRecord], cameras: bool) -> str | None:
    """Why no query could be scored, or None. Evaluation scores a query only against its id in the
    gallery (seen from another camera, under the Market-1501 protocol): a dataset where no query has one
    would fail at its first evaluation, after training, so parsers refuse it when it is loaded."""
    cameras_of: dict[int, set[int]] = {}
    for r in gallery:
        cameras_of.setdefault(r.pid, set()).add(r.camid)
    if not any(q.pid in cameras_of for q in query):  # first: with or without cameras, nothing to score
        return NO_SHARED_ID
    if cameras and not any(cameras_of.get(q.pid, set()) - {q.camid} for q in query):
        return NO_CROSS_CAMERA_MATCH
    return None


def check_test_splits(name: str, root: Path, query: list[ImageRecord], gallery: list[ImageRecord]) -> None:
    """A built-in dataset (cameras always known) whose query and gallery cannot be scored together is
    incomplete or mixed with another dataset's files."""
    problem = unscorable_queries(query, gallery, cameras=True)
    if problem:
        raise DatasetError(f"{name}: {problem}; the query and gallery at {root} do not belong together: re-extract {name}")


def relabel_train(records: list[ImageRecord]) -> list[ImageRecord]:
    """Map training ids to 0..N-1 in sorted order of the id, as classifier targets need.

    The ids of query and gallery are never relabelled: evaluation only compares them for equality.
    """
    new_pid = {pid: index for index, pid in enumerate(sorted({r.pid for r in records}))}
    return [dataclasses.replace(r, pid=new_pid[r.pid]) for r in records]
