"""uda.visualize: rank lists with frames by match, pseudo-identity samples with purity, both CLIs."""
import numpy as np
import pytest
import torch
from PIL import Image

from uda import visualize
from uda.datasets.base import ImageRecord
from uda.errors import UdaError

from tests.test_adapt import run_adapt

CELL_W, ROW_H = 64 + 8 + 4, 128 + 8 + 14 + 14


def write_images(tmp_path, n):
    paths = []
    for i in range(n):
        path = tmp_path / f"{i}.jpg"
        Image.new("RGB", (32, 64), (40 * i % 256, 90, 200)).save(path)
        paths.append(str(path))
    return paths


def frame_colour(image, row, column, gap=0):
    """The frame's top-left pixel of tile (row, column)."""
    return image.getpixel((column * CELL_W + gap, row * ROW_H + 14))


def test_rank_list_removes_same_camera_matches_and_frames_by_identity(tmp_path):
    paths = write_images(tmp_path, 4)
    query = [ImageRecord(paths[0], 1, 0, 1)]
    gallery = [ImageRecord(paths[1], 1, 0, 1), ImageRecord(paths[2], 2, 1, 2), ImageRecord(paths[3], 1, 1, 1)]
    dist = torch.tensor([[0.1, 0.2, 0.3]])  # the same-camera match ranks first and is removed
    rows = visualize.rank_rows(dist, query, gallery, [0], top=2)
    assert [t.path for t in rows[0][1]] == [paths[0], paths[2], paths[3]]
    assert rows[0][0] == "query 0 (id 1): 1 of the top 2 are matches"
    image = visualize.draw_rows(rows, gap_after=1)
    gap = CELL_W // 2
    assert image.size == (3 * CELL_W + gap, ROW_H)
    assert frame_colour(image, 0, 0) == visualize.GREY
    assert frame_colour(image, 0, 1, gap) == visualize.RED and frame_colour(image, 0, 2, gap) == visualize.GREEN
    kept = visualize.rank_rows(dist, query, gallery, [0], remove_same_camera=False, top=2)
    assert [t.frame for t in kept[0][1][1:]] == [visualize.GREEN, visualize.RED]  # no camera ids: nothing removed


def test_cluster_rows_frame_the_majority_id_and_give_purity(tmp_path):
    paths = write_images(tmp_path, 5)
    labels, true_ids = np.array([0, 0, 0, 1, -1]), np.array([7, 7, 9, 3, 3])
    rows = visualize.cluster_rows(labels, paths, true_ids, [0])
    assert rows[0][0] == "cluster 0: 3 images, purity 0.67 (2 true ids)"
    assert [t.frame for t in rows[0][1]] == [visualize.GREEN, visualize.GREEN, visualize.RED]
    unknown = visualize.cluster_rows(labels, paths, np.full(5, -1), [0])
    assert unknown[0][0] == "cluster 0: 3 images (true ids unknown)" and {t.frame for t in unknown[0][1]} == {visualize.GREY}


def test_both_commands_on_the_tiny_preset(synth_root, source_model, tmp_path):
    out = visualize.main(["ranks", "--model", str(source_model), "--dataset", "synth_duke", "--data-root", str(synth_root),
                          "--queries", "3", "--out", str(tmp_path / "ranks.png"), "--opts", "data.num_workers=0"])
    assert Image.open(out).size == (11 * CELL_W + CELL_W // 2, 3 * ROW_H)
    run_adapt(synth_root, source_model, tmp_path / "run", "optim.epochs=1")
    labels = np.load(tmp_path / "run" / "pseudo_labels" / "epoch_001.npy")
    assert len((tmp_path / "run" / "pseudo_labels" / "images.tsv").read_text().splitlines()) == len(labels)
    out = visualize.main(["clusters", "--run", str(tmp_path / "run"), "--epoch", "1", "--clusters", "2", "--out", str(tmp_path / "c.png")])
    assert Image.open(out).size[1] == 2 * ROW_H
    with pytest.raises(UdaError, match=r"epoch_002.npy does not exist: .* has pseudo-labels of epochs \[1\]"):
        visualize.main(["clusters", "--run", str(tmp_path / "run"), "--epoch", "2"])
    (tmp_path / "run" / "pseudo_labels" / "epoch_001.npy").write_bytes(b"junk")
    with pytest.raises(UdaError, match=r"cannot read .*epoch_001.npy \(ValueError"):
        visualize.main(["clusters", "--run", str(tmp_path / "run"), "--epoch", "1"])
    (tmp_path / "run" / "pseudo_labels" / "images.tsv").unlink()
    with pytest.raises(UdaError, match="images.tsv does not exist: .* is not a complete adapt.py run folder"):
        visualize.main(["clusters", "--run", str(tmp_path / "run"), "--epoch", "1"])
