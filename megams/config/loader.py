"""Load the typed config from YAML plus `--set key.sub=value` overrides, with readable errors."""
from __future__ import annotations

import os
from typing import Any, Iterable, Optional

import yaml
from pydantic import BaseModel, ValidationError

from megams.config.schema import Config


class ConfigError(ValueError):
    """A configuration problem, already phrased for the user (field path + what was expected)."""


def _model_at(path: tuple) -> Optional[type]:
    """The pydantic model class that owns the field at `path` (for listing accepted keys)."""
    cls: Any = Config
    for part in path[:-1]:
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        else:
            return None
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        where = ".".join(loc)  # empty for cross-section checks: their message names the fields
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc)
            accepted = ", ".join(owner.model_fields) if owner else "?"
            lines.append(f"{where}: unknown key (accepted keys here: {accepted})")
            continue
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        got = e.get("input")
        if e["type"] not in ("value_error", "missing") and not isinstance(got, (dict, list)):
            msg += f" (got {got!r})"
        lines.append(f"{where}: {msg}" if where else msg)
    return f"invalid {source}: " + "; ".join(lines)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override --set {dotted}: '{p}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def read_yaml(path: str) -> dict:
    if not os.path.exists(path):
        raise ConfigError(f"config file {path}: not found")
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections at top level, got {type(data).__name__}")
    return data


def config_from_dict(tree: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_config(path: Optional[str] = None, overrides: Iterable[str] = ()) -> Config:
    """Read `path` (YAML; None = all defaults), apply `key.sub=value` overrides, validate."""
    tree = read_yaml(path) if path else {}
    for ov in overrides:
        k, v = parse_override(ov)
        _set_path(tree, k, v)
    return config_from_dict(tree, source=f"config {path}" if path else "config")


def dump_config(cfg: Config) -> dict:
    return cfg.model_dump(mode="json")
