"""uda.settings: one table holds every key; the defaults, checks, resume rules and model keys come from it."""
import subprocess
import sys
from pathlib import Path

import pytest

from uda import adapt, pretrain, settings
from uda.config import flatten, load_config
from uda.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("opt, message", [
    ("train.eval_every=0", "train.eval_every must be a whole number of epochs >= 1"),
    ("eval.metric=l1", "eval.metric must be one of euclidean, sqeuclidean, cosine, got 'l1'"),
    ("data.pipeline=gpu", "data.pipeline must be one of device, loader"),
    ("model.backbone=resnet51", "model.backbone must be one of .*mobilenet_v2, got 'resnet51'; did you mean 'resnet50'"),
    ("model.head=cosin", "model.head must be one of linear, cosine, arcface, cosface, got 'cosin'; did you mean 'cosine'"),
    ("model.pooling=max", "model.pooling must be one of avg, gem"),
    ("optim.name=adamw", "optim.name must be one of adam, sgd, got 'adamw'; did you mean 'adam'"),
    ("optim.schedule=poly", "optim.schedule must be one of step, cosine"),
    ("eval.ap=sklearn", "eval.ap must be one of noninterp, trapezoid"),
    ("optim.lr=-1", r"optim.lr must be > 0 and finite, got -1"),
    ("optim.lr=.inf", r"optim.lr must be > 0 and finite, got inf"),
    ("optim.weight_decay=.nan", r"optim.weight_decay must be >= 0 and finite, got nan"),
    ("data.mean=[a,b,c]", r"data.mean must be 3 numbers \(R, G, B\), got \['a', 'b', 'c'\]"),
    ("optim.epochs=0", "optim.epochs must be a whole number >= 1, got 0"),
    ("data.height=-5", "data.height must be at least 8 pixels, got -5"),
    ("eval.batch_size=0", "eval.batch_size must be a whole number >= 1"),
    ("data.num_pids=1", "data.num_pids must be a whole number >= 2"),
    ("data.erasing_p=1.5", r"data.erasing_p must be in \[0, 1\]"),
    ("loss.label_smoothing=1", r"loss.label_smoothing must be in \[0, 1\)"),
    ("optim.milestones=[0, 5]", "optim.milestones must be a list of epochs >= 1"),
    ("model.last_stride=3", "model.last_stride must be 1"),
    ("loss.center_lr=0", "loss.center_lr must be > 0"),
    ("eval.scales=[]", r"eval.scales must be a non-empty list of numbers > 0, got \[\]"),
    ("eval.scales=[0.5,0]", r"eval.scales must be a non-empty list of numbers > 0, got \[0.5, 0\]"),
    ("eval.scales=[1.0,-1]", "eval.scales must be a non-empty list"),
    ("eval.scales=[1.0,.inf]", "eval.scales must be a non-empty list"),
    ("eval.scales=[a]", "eval.scales must be a non-empty list"),
    ("eval.scales=[true]", "eval.scales must be a non-empty list"),
    ("eval.scales=0.5", "config key 'eval.scales' expects list"),
])
def test_settings_that_would_fail_late_are_refused_at_once(opt, message):
    settings.check(load_config(pretrain.DEFAULTS))  # the defaults pass
    with pytest.raises(ConfigError, match=message):
        settings.check(load_config(pretrain.DEFAULTS, None, [opt]))


def test_multi_scale_lists_pass():
    for scales in ("[1.0]", "[0.75,1,1.25]", "[2]"):
        settings.check(load_config(pretrain.DEFAULTS, None, [f"eval.scales={scales}"]))


def test_loss_weights_are_checked_once_at_config_load():
    with pytest.raises(ConfigError, match="both 0: nothing to train"):
        settings.check(load_config(pretrain.DEFAULTS, None, ["loss.ce_weight=0", "loss.triplet_weight=0"]))


@pytest.mark.parametrize("opt, message", [
    ("cluster.eps=10", r"cluster.eps must be in \(0, 1\): Jaccard distances lie in \[0, 1\], got 10"),
    ("cluster.k1=0", "cluster.k1 must be a whole number >= 1, got 0"),
    ("cluster.knn_backend=annoy", "cluster.knn_backend must be one of torch, faiss"),
    ("adapt.iters=0", "adapt.iters must be a whole number >= 1"),
    ("loss.target_weight=-1", "loss.target_weight must be >= 0"),
])
def test_adaptation_settings_are_checked_by_the_same_table(opt, message):
    from uda import adapt

    settings.check(load_config(adapt.DEFAULTS))
    with pytest.raises(ConfigError, match=message):
        settings.check(load_config(adapt.DEFAULTS, None, [opt]))


def test_every_key_has_a_default_a_doc_and_a_check_that_its_default_passes():
    assert len(settings.BY_KEY) == len(settings.SETTINGS)  # each key once
    for s in settings.SETTINGS:
        assert s.doc and s.check.rule and set(s.stages) <= set(settings.STAGES), s.key
        for stage in s.stages:
            default = s.default_for(stage)
            assert default is None or s.check.passes(default), (s.key, default)
    for stage in settings.STAGES:  # every key a stage reads is in the table, and only those
        assert set(flatten(settings.defaults(stage))) == {s.key for s in settings.SETTINGS if stage in s.stages}


def test_the_stages_defaults_rules_and_model_keys_come_from_the_table():
    assert pretrain.DEFAULTS == settings.defaults("pretrain") and adapt.DEFAULTS == settings.defaults("adapt")
    assert settings.defaults("adapt")["optim"]["epochs"] == 50 and settings.defaults("pretrain")["optim"]["epochs"] == 120
    assert "loss" in settings.defaults("pretrain") and "center_weight" not in settings.defaults("adapt")["loss"]
    assert "adapt" not in settings.defaults("pretrain") and "cluster" not in settings.defaults()
    assert set(settings.MODEL_SETTINGS) == {"model.backbone", "model.last_stride", "model.pooling", "model.bnneck", "model.embedding_dim",
                                            "model.ibn_blocks", "data.height", "data.width", "data.mean", "data.std"}
    assert "optim.epochs" in settings.RESUME_MAY_CHANGE and "optim.lr" not in settings.RESUME_MAY_CHANGE
    assert set(settings.CHANGE_RESULTS) == {"optim.epochs", "train.eval_every", "eval.rerank"} <= settings.RESUME_MAY_CHANGE


@pytest.mark.parametrize("stage, opt, message", [
    ("pretrain", "optim.lrr=1", "unknown config key 'optim.lrr'; did you mean 'optim.lr'"),
    ("pretrain", "cluster.eps=0.5", "unknown config key 'cluster'"),  # an adaptation key in the source stage
    ("adapt", "loss.center_weight=1", "unknown config key 'loss.center_weight'"),
    ("adapt", "cluster.min_samples=0", "cluster.min_samples must be a whole number >= 1, got 0"),
    ("pretrain", "device=gpu", "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
])
def test_an_unknown_key_or_a_bad_value_is_refused_naming_the_key(stage, opt, message):
    with pytest.raises(ConfigError, match=message):
        settings.load(stage, None, [opt])


@pytest.mark.parametrize("stage", [None, "pretrain", "adapt"])
def test_python_m_uda_settings_prints_every_key_with_its_default_and_doc(stage):
    argv = [sys.executable, "-m", "uda.settings"] + (["--stage", stage] if stage else [])
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, check=True).stdout
    keys = [s for s in settings.SETTINGS if stage is None or stage in s.stages]
    for s in keys:
        assert f"{s.key} = {s.default_for(stage or 'pretrain')!r}" in out and s.doc in out, s.key
    assert len([line for line in out.splitlines() if not line.startswith(" ")]) == len(keys)
    if stage == "adapt":
        assert "optim.epochs = 50" in out and "loss.center_weight" not in out
    if stage is None:
        assert "optim.epochs = 120 (adapt: 50)" in out
