"""Experiment configuration: defaults in code, one YAML file per experiment, `--opts key=value` overrides.

A config is plain nested data (dicts of scalars and lists). Every key has a default in the stage's
DEFAULTS; a YAML file or an override may only change existing keys, so a typo is an error that names
the closest valid key instead of a silently ignored setting.
"""
from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any, Iterable

import yaml

from uda.errors import ConfigError


class Config(dict):
    """A dict with attribute access (`cfg.optim.lr`), so stage scripts read like the recipe."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Config) else copy.deepcopy(v) for k, v in self.items()}


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key repeated in one mapping. PyYAML keeps the last silently, so a
    second `optim:` section would drop the first's lr, and a grid's second variant `T` the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: the keys it brings may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key}' at line {first_line[key]} and again at line {line}: keep one")
            except TypeError:  # an unhashable key: SafeLoader's own error says so below
                continue
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """yaml.safe_load that refuses duplicate keys (UniqueKeyLoader): how every YAML the project reads is parsed."""
    return yaml.load(text, Loader=UniqueKeyLoader)


def read_yaml(path: Path, what: str) -> Any:
    """The data of the YAML file `path` (None when empty); ConfigError in one line naming `what` and the
    file when it is not UTF-8, not YAML or repeats a key."""
    try:
        return parse_yaml(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0]}") from None


def _wrap(data: dict) -> Config:
    return Config({k: _wrap(v) if isinstance(v, dict) else v for k, v in data.items()})


def _check_type(key: str, default: Any, value: Any) -> Any:
    """Overrides keep the default's type; ints are accepted where floats are expected."""
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, (int, float)):
        return float(value)
    elif isinstance(default, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    elif isinstance(default, (int, str, list)) and isinstance(value, type(default)):
        return value
    raise ConfigError(
        f"config key '{key}' expects {type(default).__name__} (default {default!r}), got {value!r}"
    )


def _merge(base: dict, update: dict, prefix: str = "") -> None:
    for key, value in update.items():
        path = f"{prefix}{key}"
        if key not in base:
            close = difflib.get_close_matches(key, list(base), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys here: {', '.join(base)}"
            raise ConfigError(f"unknown config key '{path}'{hint}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{path}' is a section; set its keys, e.g. '{path}.<key>=...'")
            _merge(base[key], value, prefix=f"{path}.")
        else:
            base[key] = _check_type(path, base[key], value)


def parse_opts(opts: Iterable[str]) -> dict:
    """`["optim.lr=1e-3", "model.backbone=resnet18"]` -> nested dict; values are parsed as YAML."""
    nested: dict = {}
    for opt in opts:
        if "=" not in opt:
            raise ConfigError(f"override '{opt}' must look like key=value, e.g. optim.lr=3.5e-4")
        key, raw = opt.split("=", 1)
        try:
            value = parse_yaml(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def load_config(defaults: dict, path: str | Path | None = None, opts: Iterable[str] = ()) -> Config:
    """Defaults <- YAML file <- command-line overrides, each checked against the defaults' keys and types."""
    cfg = copy.deepcopy(defaults)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is a folder, not a YAML file" if path.is_dir() else "does not exist"
            raise ConfigError(f"config file {path} {what}; see configs/ for the shipped ones")
        data = read_yaml(path, "config file") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
        _merge(cfg, data)
    _merge(cfg, parse_opts(opts))
    return _wrap(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def opt(key: str, value: Any) -> str:
    """`key=value` as --opts takes it in a shell: lists without spaces (data.mean=[0.5,0.5,0.5])."""
    text = json.dumps(value, separators=(",", ":")) if isinstance(value, (list, tuple)) else value
    return f"{key}={text}"


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{'optim.lr': 3.5e-4, ...}: one entry per leaf key, as `--opts` names them."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """{key: (old value, new value)} for the keys both configs have and set differently."""
    before, after = flatten(old), flatten(new)
    return {key: (before[key], after[key]) for key in before.keys() & after.keys() if before[key] != after[key]}
