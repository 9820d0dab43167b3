"""The benchmarks' parsers and load_dataset (uda.datasets.benchmarks) on small fake trees (empty files: parsers never open images)."""
import re
import shutil
import sys
import types
from pathlib import Path

import pytest

from uda.datasets import load_dataset
from uda.datasets.benchmarks import KNOWN_DATASETS, parse_duke, parse_market, parse_msmt17, resolve_data_root
from uda.errors import DatasetError


def touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def write_market(root: Path, train_ids: tuple[str, ...] = ("0007", "0002", "0010")) -> Path:
    """A Market tree; train gets one image per id in `train_ids` (camera c2) plus two fixed ones of 0002."""
    touch(root / "bounding_box_train", *(f"{pid}_c2s1_000100_01.jpg" for pid in train_ids), "Thumbs.db")
    if "0002" in train_ids:
        touch(root / "bounding_box_train", "0002_c1s1_000451_03.jpg", "0002_c6s2_000010_00.jpg")
    touch(root / "query", "0002_c2s1_000001_00.jpg", "0010_c4s3_000002_00.jpg", "Thumbs.db")
    touch(
        root / "bounding_box_test",
        "-1_c1s1_000401_03.jpg",
        "-1_c5s1_000001_01.jpg",
        "0000_c1s1_000151_01.jpg",
        "0002_c3s1_000001_01.jpg",
        "1488_c1s6_023021_00.jpg.jpg",  # as shipped in Market-1501 v15.09.15
        "._0002_c3s1_000001_01.jpg",  # macOS resource fork: hidden, ignored
        "Thumbs.db",
    )
    return root


def write_duke(root: Path) -> Path:
    touch(root / "bounding_box_train", "0005_c2_f0046985.jpg", "0001_c8_f0000001.jpg", "0005_c1_f0000002.jpg")
    touch(root / "query", "0005_c3_f0000003.jpg", "Thumbs.db")
    touch(root / "bounding_box_test", "0005_c4_f0000004.jpg", "0099_c1_f0000005.jpg")
    return root


def rows(records, root: Path, folder: str) -> list[tuple[str, int, int, int]]:
    """(file name, pid, camid, orig_pid), checking each record lies in root/folder."""
    for r in records:
        assert Path(r.path).parent == root / folder
    return [(Path(r.path).name, r.pid, r.camid, r.orig_pid) for r in records]


def test_market_records_relabel_cameras_junk_and_distractors(tmp_path):
    root = write_market(tmp_path / "Market-1501-v15.09.15")
    dataset = parse_market(root)
    assert dataset.name == "market" and dataset.root == root
    assert rows(dataset.train, root, "bounding_box_train") == [
        ("0002_c1s1_000451_03.jpg", 0, 0, 2),
        ("0002_c2s1_000100_01.jpg", 0, 1, 2),
        ("0002_c6s2_000010_00.jpg", 0, 5, 2),
        ("0007_c2s1_000100_01.jpg", 1, 1, 7),
        ("0010_c2s1_000100_01.jpg", 2, 1, 10),
    ]
    assert rows(dataset.query, root, "query") == [
        ("0002_c2s1_000001_00.jpg", 2, 1, 2),
        ("0010_c4s3_000002_00.jpg", 10, 3, 10),
    ]
    assert rows(dataset.gallery, root, "bounding_box_test") == [
        ("0000_c1s1_000151_01.jpg", 0, 0, 0),
        ("0002_c3s1_000001_01.jpg", 2, 2, 2),
        ("1488_c1s6_023021_00.jpg.jpg", 1488, 0, 1488),
    ]
    assert dataset.dropped == {"gallery_junk": 2}
    assert dataset.num_train_pids == 3 and dataset.num_train_cams == 3


def test_duke_records(tmp_path):
    root = write_duke(tmp_path / "DukeMTMC-reID")
    dataset = parse_duke(root)
    assert rows(dataset.train, root, "bounding_box_train") == [
        ("0001_c8_f0000001.jpg", 0, 7, 1),
        ("0005_c1_f0000002.jpg", 1, 0, 5),
        ("0005_c2_f0046985.jpg", 1, 1, 5),
    ]
    assert rows(dataset.query, root, "query") == [("0005_c3_f0000003.jpg", 5, 2, 5)]
    assert rows(dataset.gallery, root, "bounding_box_test") == [
        ("0005_c4_f0000004.jpg", 5, 3, 5),
        ("0099_c1_f0000005.jpg", 99, 0, 99),
    ]
    assert dataset.dropped == {}


@pytest.mark.parametrize(
    "parse, bad_name",
    [
        (parse_market, "0002_c7s1_000451_03.jpg"),  # Market has cameras 1-6
        (parse_market, "0002_c1s1_000451_03 (copy).jpg"),
        (parse_market, "0005_c2_f0046985.jpg"),  # a Duke name
        (parse_duke, "0005_c9_f0046985.jpg"),  # Duke has cameras 1-8
        (parse_duke, "0002_c1s1_000451_03.jpg"),  # a Market name
    ],
)
def test_unparsable_image_name_is_named(tmp_path, parse, bad_name):
    root = write_market(tmp_path / "m") if parse is parse_market else write_duke(tmp_path / "d")
    touch(root / "query", bad_name)
    with pytest.raises(DatasetError) as error:
        parse(root)
    message = str(error.value)
    assert str(root / "query" / bad_name) in message and "\n" not in message


def test_missing_root_and_split_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        parse_market(tmp_path / "nowhere")
    root = write_market(tmp_path / "m")
    for name in (root / "query").iterdir():
        name.unlink()
    (root / "query").rmdir()
    with pytest.raises(DatasetError, match=re.escape(f"split folder {root / 'query'} is missing")):
        parse_market(root)


def test_empty_split_is_an_error(tmp_path):
    root = write_market(tmp_path / "m")
    for name in (root / "query").iterdir():
        name.unlink()
    touch(root / "query", "Thumbs.db")
    with pytest.raises(DatasetError, match=re.escape(f"split folder {root / 'query'} holds no usable")):
        parse_market(root)
    # A gallery of junk only is empty too.
    root = write_market(tmp_path / "m2")
    for name in (root / "bounding_box_test").glob("0*"):
        name.unlink()
    (root / "bounding_box_test" / "1488_c1s6_023021_00.jpg.jpg").unlink()
    with pytest.raises(DatasetError, match="bounding_box_test holds no usable"):
        parse_market(root)


# MSMT17 ------------------------------------------------------------------------------------------

MSMT_LISTS = {
    # Label 2 is listed before label 0: relabelling follows the sorted id, not the order of appearance.
    "list_train.txt": [
        "0002/0002_000_15_0113afternoon_0200_0_ex.jpg 2",
        "0000/0000_000_01_0303morning_0015_0.jpg 0",
        "0000/0000_001_03_0303noon_0100_1.jpg 0",
    ],
    "list_val.txt": ["0001/0001_000_05_0302morning_0010_0.jpg 1", "0002/0002_002_02_0114noon_0300_2.jpg 2"],
    "list_query.txt": ["0000/0000_000_07_0303morning_0015_0.jpg 0"],
    "list_gallery.txt": [
        "0000/0000_001_08_0303noon_0016_0.jpg 0",
        "0003/0003_000_12_0113morning_0001_3.jpg 3",
    ],
}
MSMT_VERSIONS = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}


def write_msmt(root: Path, version: str, lists: dict[str, list[str]] = MSMT_LISTS) -> Path:
    """An MSMT17 tree: the list files plus an empty image for every line."""
    train_folder, test_folder = MSMT_VERSIONS[version]
    root.mkdir(parents=True)
    for list_name, lines in lists.items():
        (root / list_name).write_text("".join(line + "\n" for line in lines))
        folder = root / (test_folder if list_name in ("list_query.txt", "list_gallery.txt") else train_folder)
        for line in lines:
            relative_path = Path(line.split()[0])
            touch(folder / relative_path.parent, relative_path.name)
    return root


def msmt_rows(records, folder: Path) -> list[tuple[str, int, int, int]]:
    """(path relative to the image folder, pid, camid, orig_pid)."""
    return [(Path(r.path).relative_to(folder).as_posix(), r.pid, r.camid, r.orig_pid) for r in records]


@pytest.mark.parametrize("version", sorted(MSMT_VERSIONS))
@pytest.mark.parametrize("train_val", [False, True])
def test_msmt17_records_both_versions_with_and_without_val(tmp_path, version, train_val):
    root = write_msmt(tmp_path / "msmt17" / version, version)
    dataset = load_dataset("msmt17", tmp_path, msmt_train_val=train_val)
    train_folder, test_folder = (root / folder for folder in MSMT_VERSIONS[version])
    assert dataset.root == root
    train_rows = [
        ("0002/0002_000_15_0113afternoon_0200_0_ex.jpg", 1, 14, 2),
        ("0000/0000_000_01_0303morning_0015_0.jpg", 0, 0, 0),
        ("0000/0000_001_03_0303noon_0100_1.jpg", 0, 2, 0),
    ]
    if train_val:  # ids {0, 1, 2} -> 0, 1, 2
        train_rows = [(path, orig_pid, camid, orig_pid) for path, _, camid, orig_pid in train_rows] + [
            ("0001/0001_000_05_0302morning_0010_0.jpg", 1, 4, 1),
            ("0002/0002_002_02_0114noon_0300_2.jpg", 2, 1, 2),
        ]
    assert msmt_rows(dataset.train, train_folder) == train_rows
    assert msmt_rows(dataset.query, test_folder) == [("0000/0000_000_07_0303morning_0015_0.jpg", 0, 6, 0)]
    assert msmt_rows(dataset.gallery, test_folder) == [
        ("0000/0000_001_08_0303noon_0016_0.jpg", 0, 7, 0),
        ("0003/0003_000_12_0113morning_0001_3.jpg", 3, 11, 3),
    ]
    assert dataset.dropped == {}


@pytest.mark.parametrize(
    "bad_line",
    [
        "0000/0000_000_01_0303morning_0015_0.jpg",  # no label
        "0000/0000_000_01_0303morning_0015_0.jpg zero",
        "0000/0000_000_16_0303morning_0015_0.jpg 0",  # MSMT17 has cameras 01-15
        "0000/picture.jpg 0",
    ],
)
def test_msmt17_unparsable_list_line_names_file_and_line(tmp_path, bad_line):
    lists = dict(MSMT_LISTS, **{"list_gallery.txt": [MSMT_LISTS["list_gallery.txt"][0], bad_line]})
    root = write_msmt(tmp_path / "MSMT17_V1", "MSMT17_V1", lists)
    with pytest.raises(DatasetError) as error:
        parse_msmt17(root)
    message = str(error.value)
    assert f"cannot parse {root / 'list_gallery.txt'} line 2: {bad_line!r}" in message and "\n" not in message


def test_msmt17_missing_image_list_file_and_folders(tmp_path):
    root = write_msmt(tmp_path / "a" / "MSMT17_V2", "MSMT17_V2")
    missing = root / "mask_test_v2" / "0003" / "0003_000_12_0113morning_0001_3.jpg"
    missing.unlink()
    with pytest.raises(DatasetError, match=re.escape(f"line 2 names {missing}, which is missing")):
        parse_msmt17(root)

    root = write_msmt(tmp_path / "b" / "MSMT17_V2", "MSMT17_V2")
    (root / "list_val.txt").unlink()
    assert len(parse_msmt17(root).train) == 3  # list_val is read only for train+val
    with pytest.raises(DatasetError, match="list_val.txt is missing"):
        parse_msmt17(root, train_val=True)
    shutil.rmtree(root / "mask_test_v2")
    with pytest.raises(DatasetError, match=re.escape(f"split folder {root / 'mask_test_v2'} is missing")):
        parse_msmt17(root)
    with pytest.raises(DatasetError, match=re.escape("holds no image folders (train+test or mask_train_v2+")):
        parse_msmt17(tmp_path)


def test_msmt17_pid_is_the_label_orig_pid_the_file_name_id(tmp_path):
    lists = dict(MSMT_LISTS, **{"list_query.txt": ["0000/0000_000_07_0303morning_0015_0.jpg 5"],
                                "list_gallery.txt": ["0000/0000_001_08_0303noon_0016_0.jpg 5"]})
    dataset = parse_msmt17(write_msmt(tmp_path / "MSMT17_V1", "MSMT17_V1", lists))
    assert [(r.pid, r.camid, r.orig_pid) for r in dataset.query] == [(5, 6, 0)]


def test_msmt17_empty_list_is_an_error(tmp_path):
    root = write_msmt(tmp_path / "MSMT17_V1", "MSMT17_V1", dict(MSMT_LISTS, **{"list_query.txt": []}))
    with pytest.raises(DatasetError, match="list_query.txt names no images"):
        parse_msmt17(root)


def query_folder_of_another_dataset(root: Path) -> None:
    """Market's query images replaced by one whose id its gallery does not hold."""
    shutil.rmtree(root / "query")
    touch(root / "query", "0777_c1s1_000001_00.jpg")


@pytest.mark.parametrize("name, make, problem", [
    # Duke's query 0005 (camera 3) keeps only a gallery image from its own camera
    ("duke", lambda root: (root / "bounding_box_test" / "0005_c4_f0000004.jpg").rename(
        root / "bounding_box_test" / "0005_c3_f0000004.jpg"), "no query has a gallery image of its id from another camera"),
    ("market", lambda root: (root / "bounding_box_test" / "0002_c3s1_000001_01.jpg").unlink(),
     "no query id appears in the gallery"),
    ("market", query_folder_of_another_dataset, "no query id appears in the gallery"),
])
def test_built_in_test_splits_that_cannot_be_scored_are_refused_when_parsed(tmp_path, name, make, problem):
    """The check custom data gets: such a folder would fail at the first evaluation, after training."""
    write, parse = (write_market, parse_market) if name == "market" else (write_duke, parse_duke)
    root = write(tmp_path / name)
    make(root)
    with pytest.raises(DatasetError, match=f"{name}: {problem}.* do not belong together: re-extract {name}"):
        parse(root)


def test_msmt17_test_lists_that_cannot_be_scored_are_refused(tmp_path):
    lists = dict(MSMT_LISTS, **{"list_gallery.txt": ["0003/0003_000_12_0113morning_0001_3.jpg 3"]})
    with pytest.raises(DatasetError, match="msmt17: no query id appears in the gallery"):
        parse_msmt17(write_msmt(tmp_path / "MSMT17_V1", "MSMT17_V1", lists))
    lists = dict(MSMT_LISTS, **{"list_gallery.txt": ["0000/0000_000_07_0303morning_0016_0.jpg 0"]})  # query's camera 07
    with pytest.raises(DatasetError, match="msmt17: no query has a gallery image of its id from another camera"):
        parse_msmt17(write_msmt(tmp_path / "b" / "MSMT17_V1", "MSMT17_V1", lists))


# Factory -----------------------------------------------------------------------------------------


def test_unknown_dataset_lists_known_names(tmp_path):
    with pytest.raises(DatasetError) as error:
        load_dataset("market1501", tmp_path)
    assert "'market1501'" in str(error.value)
    for name in KNOWN_DATASETS:
        assert name in str(error.value)
    assert set(KNOWN_DATASETS) == {"market", "duke", "msmt17", "synth_market", "synth_duke"}


@pytest.mark.parametrize(
    "name, folders",
    [
        (
            "market",
            ["Market-1501-v15.09.15", "Market-1501", "market1501", "market1501/Market-1501-v15.09.15"],
        ),
        ("duke", ["DukeMTMC-reID", "dukemtmc-reid/DukeMTMC-reID", "dukemtmcreid/DukeMTMC-reID"]),
        ("msmt17", ["MSMT17_V2", "MSMT17_V1", "msmt17/MSMT17_V2", "msmt17/MSMT17_V1"]),
    ],
)
def test_missing_dataset_lists_every_folder_looked_for(tmp_path, name, folders):
    (tmp_path / "market1501").mkdir()  # a wrapper folder without the layout is not the dataset
    with pytest.raises(DatasetError) as error:
        load_dataset(name, tmp_path)
    message = str(error.value)
    assert f"{name} not found under data root {tmp_path}:" in message and "\n" not in message
    assert f"looked for {', '.join(folders)} or the layout itself" in message
    assert "python -m uda.datasets.synthetic --domain market --preset small --out DIR" in message
    with pytest.raises(DatasetError, match="which does not exist"):
        load_dataset(name, tmp_path / "nowhere")


@pytest.mark.parametrize(
    "name, folder, write",
    [
        ("market", "Market-1501", write_market),
        ("market", "market1501/Market-1501-v15.09.15", write_market),
        ("market", ".", write_market),  # the data root holds the layout itself
        ("duke", "dukemtmcreid/DukeMTMC-reID", write_duke),
        ("duke", ".", write_duke),
    ],
)
def test_dataset_found_under_usual_folder_names(tmp_path, name, folder, write):
    (tmp_path / "market1501").mkdir()  # the wrapper alone must not be taken for the dataset
    root = write((tmp_path / folder).resolve())
    dataset = load_dataset(name, tmp_path)
    assert dataset.root == root and dataset.name == name
    assert Path(dataset.train[0].path).parent == root / "bounding_box_train"


def test_data_root_argument_then_env_then_dot_data(tmp_path, monkeypatch):
    for folder, train_id in (("arg", "0001"), ("env", "0002"), ("cwd/data", "0003")):
        write_market(tmp_path / folder / "Market-1501", train_ids=(train_id,))
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("UDA_DATA", str(tmp_path / "env"))
    assert load_dataset("market", tmp_path / "arg").train[0].orig_pid == 1
    assert load_dataset("market", str(tmp_path / "arg")).train[0].orig_pid == 1
    assert load_dataset("market").train[0].orig_pid == 2
    assert resolve_data_root() == tmp_path / "env"
    monkeypatch.delenv("UDA_DATA")
    assert load_dataset("market").train[0].orig_pid == 3
    assert resolve_data_root() == tmp_path / "cwd" / "data"  # absolute, so later chdirs do not matter
    assert load_dataset("market").root == tmp_path / "cwd" / "data" / "Market-1501"


@pytest.fixture
def fake_generator(monkeypatch):
    """Replace uda.datasets.synthetic with a module whose generate() writes a tiny tree and logs the call."""
    calls = []

    def generate(domain: str, preset: str, seed: int, out: Path) -> Path:
        calls.append((domain, preset, seed, out))
        return write_market(out) if domain == "market" else write_duke(out)

    module = types.ModuleType("uda.datasets.synthetic")
    module.generate = generate
    monkeypatch.setitem(sys.modules, "uda.datasets.synthetic", module)
    return calls


def test_synthetic_generated_once_then_parsed(tmp_path, fake_generator):
    dataset = load_dataset("synth_market", tmp_path)
    folder = tmp_path / "synth_market_small_seed0"
    assert fake_generator == [("market", "small", 0, folder)]
    assert dataset.name == "synth_market" and dataset.root == folder
    assert [r.orig_pid for r in dataset.train] == [2, 2, 2, 7, 10] and dataset.dropped == {"gallery_junk": 2}
    again = load_dataset("synth_market", tmp_path)
    assert len(fake_generator) == 1 and again.train == dataset.train

    duke = load_dataset("synth_duke", tmp_path, synth_preset="tiny", synth_seed=3)
    assert fake_generator[1] == ("duke", "tiny", 3, tmp_path / "synth_duke_tiny_seed3")
    assert duke.name == "synth_duke" and [(r.pid, r.camid) for r in duke.train] == [(0, 7), (1, 0), (1, 1)]


def test_synthetic_folder_present_is_not_regenerated(tmp_path, fake_generator):
    write_duke(tmp_path / "synth_duke_small_seed1")
    dataset = load_dataset("synth_duke", tmp_path, synth_seed=1)
    assert fake_generator == [] and dataset.root == tmp_path / "synth_duke_small_seed1"


def test_subset_identities_keeps_the_first_ids_and_their_gallery():
    from uda.datasets.base import ImageRecord, ReIDDataset, subset_identities

    train = [ImageRecord(f"t{i}", pid, 0, pid + 10) for i, pid in enumerate([0, 0, 1, 2, 2, 3])]
    query = [ImageRecord(f"q{pid}", pid, 0, pid) for pid in (5, 7, 9)]
    gallery = [ImageRecord(f"g{i}", pid, 1, pid) for i, pid in enumerate([0, 5, 7, 7, 9, 11])]
    full = ReIDDataset("x", Path("."), train, query, gallery, {"gallery_junk": 2})
    sub = subset_identities(full, 2)
    assert [r.pid for r in sub.train] == [0, 0, 1]
    assert [r.pid for r in sub.query] == [5, 7]
    assert [r.path for r in sub.gallery] == ["g1", "g2", "g3"]  # distractors and other ids dropped
    assert sub.dropped == {"gallery_junk": 2, "subset_ids": 2}
    assert subset_identities(full, 0) is full
