from pathlib import Path

import pytest

from uda.config import config_changes, dump_config, flatten, load_config, parse_opts, parse_yaml
from uda.errors import ConfigError

DEFAULTS = {
    "seed": 0,
    "optim": {"lr": 3.5e-4, "milestones": [40, 70], "name": "adam"},
    "model": {"backbone": "resnet50", "pretrained": None, "bnneck": True},
}


def test_defaults_yaml_and_opts_override_in_order(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("optim:\n  lr: 0.01\n  milestones: [10, 20]\nseed: 3\n")
    cfg = load_config(DEFAULTS, path, ["optim.lr=1e-3", "model.backbone=resnet18", "model.pretrained=/w.pth"])
    assert cfg.seed == 3
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.optim.milestones == [10, 20]
    assert cfg.model.backbone == "resnet18"
    assert cfg.model.pretrained == "/w.pth"
    assert cfg.model.bnneck is True
    assert DEFAULTS["optim"]["lr"] == 3.5e-4  # defaults untouched


def test_int_accepted_for_float_and_converted():
    cfg = load_config(DEFAULTS, opts=["optim.lr=1"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0


@pytest.mark.parametrize(
    "opt, message",
    [
        ("optim.lrr=0.1", "did you mean 'optim.lr'"),
        ("optim.lr=fast", "expects float"),
        ("model.bnneck=1", "expects bool"),
        ("seed=true", "expects int"),
        ("optim=3", "is a section"),
        ("seed", "key=value"),
    ],
)
def test_bad_overrides_name_the_problem(opt, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEFAULTS, opts=[opt])


def test_unknown_key_in_yaml_and_missing_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  backbone: resnet18\n  dropout: 0.5\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.dropout'"):
        load_config(DEFAULTS, path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(DEFAULTS, tmp_path / "missing.yaml")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("model:\n  backbone: r\xe9snet\n".encode("latin-1"))  # not UTF-8: one line, not a UnicodeDecodeError
    with pytest.raises(ConfigError, match="latin1.yaml is not valid YAML"):
        load_config(DEFAULTS, latin1)
    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        load_config(DEFAULTS, tmp_path)


@pytest.mark.parametrize("text, message", [
    ("optim:\n  lr: 3.5e-3\n  name: sgd\nseed: 1\noptim:\n  milestones: [3]\n", "duplicate key 'optim' at line 1 and again at line 5"),
    ("seed: 1\nmodel:\n  backbone: resnet18\n  backbone: resnet50\n", "duplicate key 'backbone' at line 3 and again at line 4"),
    ("optim: {lr: 0.1, lr: 0.2}\n", "duplicate key 'lr' at line 1 and again at line 1"),
])
def test_a_repeated_key_is_refused_not_silently_replaced(tmp_path, text, message):
    """PyYAML keeps the last of two equal keys: a second `optim:` section would run with the default lr."""
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"config file .*dup.yaml is not valid YAML: {message}"):
        load_config(DEFAULTS, path)


def test_merge_keys_may_still_override_what_they_bring():
    assert parse_yaml("base: &b {lr: 0.1, name: adam}\noptim:\n  <<: *b\n  lr: 0.2\n")["optim"] == {"lr": 0.2, "name": "adam"}


def test_dump_round_trip(tmp_path):
    cfg = load_config(DEFAULTS, opts=["optim.milestones=[5, 9]"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(DEFAULTS, tmp_path / "config.yaml")
    assert again == cfg
    assert parse_opts(["a.b.c=2"]) == {"a": {"b": {"c": 2}}}


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ARCHITECTURE = ["model.backbone", "model.last_stride", "model.pooling", "model.bnneck", "data.height", "data.width"]


def _get(cfg, dotted: str):
    for key in dotted.split("."):
        cfg = getattr(cfg, key)
    return cfg


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("pretrain/**/*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_pretrain_config_loads(path):
    from uda import pretrain

    cfg = load_config(pretrain.DEFAULTS, path)  # an unknown key or a wrong type fails here, not hours into a run
    assert cfg.data.source, f"{path.name} must name its source dataset"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("uda/*.yaml")), ids=lambda p: p.name)
def test_every_uda_config_loads_and_matches_its_source_model(path):
    """The pipeline scripts pair configs/uda/S2T[_V].yaml with configs/pretrain/S[_V].yaml: the adapted
    model must be the source model's architecture at its image size, or its weights load wrongly or not at all."""
    from uda import adapt, pretrain

    cfg = load_config(adapt.DEFAULTS, path)
    source, target = cfg.data.source, cfg.data.target
    assert path.stem.startswith(f"{source}2{target}"), f"{path.name} is not named after {source} -> {target}"
    variant = path.stem[len(f"{source}2{target}"):]
    source_cfg = load_config(pretrain.DEFAULTS, CONFIGS / "pretrain" / f"{source}{variant}.yaml")
    assert source_cfg.data.source == source
    for key in ARCHITECTURE:
        assert _get(cfg, key) == _get(source_cfg, key), f"{path.name}: {key} differs from its source model's config"


def test_config_changes_name_each_leaf_that_differs():
    old = {"seed": 0, "optim": {"lr": 0.1, "milestones": [20, 40]}, "data": {"root": None}}
    new = {"seed": 0, "optim": {"lr": 0.1, "milestones": [20]}, "data": {"root": "x"}, "cluster": {"eps": 0.6}}
    assert flatten(old) == {"seed": 0, "optim.lr": 0.1, "optim.milestones": [20, 40], "data.root": None}
    assert config_changes(old, new) == {"optim.milestones": ([20, 40], [20]), "data.root": (None, "x")}  # keys only one has: not changes
