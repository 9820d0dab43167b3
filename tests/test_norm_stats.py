"""data.mean / data.std: a dataset's own statistics (uda.data.stats), used by every loader, saved with
the model, and part of what a source model's settings must match."""
import numpy as np
import pytest
import torch

from uda import adapt, build, pretrain, settings
from uda.data import splits
from uda.config import load_config
from uda.data.stats import channel_stats
from uda.datasets.base import ImageRecord
from uda.errors import ConfigError

from tests.test_data import write_image


def solid(tmp_path, name, rgb):
    return write_image(tmp_path / name, np.full((8, 4, 3), rgb, dtype=np.uint8), fmt="PNG")


def test_channel_stats_by_hand(tmp_path):
    paths = [solid(tmp_path, "a.png", (0, 255, 51)), solid(tmp_path, "b.png", (255, 255, 153))]
    mean, std = channel_stats(paths)
    assert mean == pytest.approx([0.5, 1.0, 0.4], abs=1e-4)  # R: 0 and 1; G: 1; B: 0.2 and 0.6
    assert std == pytest.approx([0.5, 0.0, 0.2], abs=1e-4)


@pytest.mark.parametrize("pipeline", ["device", "loader"])
def test_every_loader_normalises_with_the_configs_statistics(tmp_path, pipeline):
    records = [ImageRecord(solid(tmp_path, f"{i}.png", (102, 153, 204)), 0, 0, 0) for i in range(2)]
    cfg = load_config(pretrain.DEFAULTS, None, [f"data.pipeline={pipeline}", "data.height=8", "data.width=4", "data.num_workers=0",
                                                "data.mean=[0.2,0.4,0.6]", "data.std=[0.5,0.25,0.125]"])
    kept, images = splits.prepare_split(records, cfg, torch.device("cpu"))
    batch = next(iter(splits.make_plain_loader(kept, cfg, images)))[0]
    expected = torch.tensor([(0.4 - 0.2) / 0.5, (0.6 - 0.4) / 0.25, (0.8 - 0.6) / 0.125])  # 102/255 = 0.4 ...
    assert torch.allclose(batch.mean(dim=(0, 2, 3)), expected, atol=1e-3)


def test_models_saved_before_a_setting_existed_load_with_its_default(tmp_path):
    cfg = load_config(pretrain.DEFAULTS, None, ["model.backbone=resnet18_w16", "model.pretrained=none"]).to_dict()
    del cfg["data"]["mean"], cfg["data"]["std"], cfg["model"]["embedding_dim"]
    model = build.build_reid_model(load_config(pretrain.DEFAULTS, None, ["model.backbone=resnet18_w16", "model.pretrained=none"]))
    torch.save({"model": model.state_dict(), "config": cfg}, tmp_path / "old.pth")
    _, loaded = build.load_trained_model(tmp_path / "old.pth")
    assert loaded.data.mean == [0.485, 0.456, 0.406] and loaded.model.embedding_dim == 0


def test_a_source_model_trained_with_other_statistics_is_refused():
    saved = {"config": load_config(pretrain.DEFAULTS, None, ["data.mean=[0.5,0.5,0.5]"]).to_dict()}
    with pytest.raises(Exception, match=r"data.mean=\[0.5, 0.5, 0.5\] \(here \[0.485, 0.456, 0.406\]\)"):
        build.check_model_settings(load_config(adapt.DEFAULTS), saved, "m.pth")


@pytest.mark.parametrize("opt, message", [("data.std=[0,1,1]", "data.std must be 3 numbers > 0"), ("data.mean=[0.5]", "data.mean must be 3 numbers")])
def test_statistics_are_range_checked(opt, message):
    with pytest.raises(ConfigError, match=message):
        settings.check(load_config(pretrain.DEFAULTS, None, [opt]))


def test_a_model_saved_before_the_statistics_existed_was_trained_with_imagenets():
    old = load_config(pretrain.DEFAULTS).to_dict()
    del old["data"]["mean"], old["data"]["std"]
    cfg = load_config(adapt.DEFAULTS, None, ["data.mean=[0.5,0.5,0.5]"])
    with pytest.raises(Exception, match=r"--opts data.mean=\[0.485,0.456,0.406\]"):  # pasteable: no spaces in the list
        build.check_model_settings(cfg, {"config": old}, "m.pth")
