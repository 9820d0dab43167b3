"""uda.data.splits: a run's splits prepared from records."""
import torch
from PIL import Image

from uda import pretrain
from uda.config import load_config
from uda.data import splits
from uda.datasets.base import ImageRecord


def test_training_ids_stay_contiguous_when_corrupt_images_take_a_whole_identity(tmp_path):
    # ids 0, 1, 2; every image of id 1 unreadable: with data.skip_corrupt the kept ids must be 0, 1
    records = []
    for pid in range(3):
        for k in range(2):
            path = tmp_path / f"{pid}_{k}.jpg"
            if pid == 1:
                path.write_bytes(b"not a jpeg")
            else:
                Image.new("RGB", (8, 16), (40 * pid, 10 * k, 0)).save(path)
            records.append(ImageRecord(str(path), pid, k, pid))
    cfg = load_config(pretrain.DEFAULTS, None, ["data.skip_corrupt=true", "data.height=16", "data.width=8"])
    kept, _ = splits.prepare_train_split(records, cfg, torch.device("cpu"))
    assert [r.pid for r in kept] == [0, 0, 1, 1]
    assert [r.orig_pid for r in kept] == [0, 0, 2, 2]
