"""YAML files and ``section.key=value`` overrides into typed dataclasses (what
`cratelm.config.load_config` is made of; nothing here knows cratelm's sections).

Values are coerced to each field's declared type (``int | None``, ``list[str]``, ...), and
every error is a ConfigError naming the key, the value and where it came from.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


def deep_merge(base: dict, new: dict) -> dict:
    """``base`` with ``new`` merged over it, nested dicts merged key by key."""
    out = dict(base)
    for k, v in new.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise naming ``where``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], where)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r} must be a list")
        return [coerce(v, args[0], where) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}={value!r} must be true or false")
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{where}={value!r} must be an integer")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}={value!r} must be a number") from None
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r} must be a string")
        return value
    return value


def build(cls: type, raw: dict[str, Any], section: str, source: dict[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = ", ".join(f"{section}.{k} (from {source.get(f'{section}.{k}', '?')})" for k in unknown)
        raise ConfigError(f"unknown config key(s): {where}; valid keys of '{section}': {sorted(names)}")
    kwargs = {k: coerce(v, hints[k], f"{section}.{k}") for k, v in raw.items()}
    return cls(**kwargs)


def parse_override(text: str, sections: typing.Iterable[str]) -> tuple[list[str], Any]:
    """``model.n_layer=4`` -> (["model", "n_layer"], 4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or parts[0] not in sections:
        raise ConfigError(f"override key {key!r} must be SECTION.FIELD with SECTION in {sorted(sections)}")
    return parts, yaml.safe_load(value) if value.strip() else ""


def read_sections(files: typing.Iterable[str], overrides: typing.Iterable[str],
                  sections: typing.Iterable[str]) -> tuple[dict[str, dict], dict[str, str]]:
    """Merge YAML ``files`` in order, then ``overrides``: (raw values by section, where each
    ``section.key`` came from)."""
    merged: dict[str, dict] = {}
    source: dict[str, str] = {}
    for path in files:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must be a mapping of sections, got {type(data).__name__}")
        for sec, body in data.items():
            if sec not in sections:
                raise ConfigError(f"config file {path}: unknown section {sec!r}; valid: {sorted(sections)}")
            if not isinstance(body, dict):
                raise ConfigError(f"config file {path}: section {sec!r} must be a mapping")
            for k in body:
                source[f"{sec}.{k}"] = path
        merged = deep_merge(merged, data)
    for text in overrides:
        (sec, key), value = parse_override(text, sections)
        merged.setdefault(sec, {})[key] = value
        source[f"{sec}.{key}"] = "command line"
    return merged, source


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring of each field, read from the source (for show-config --docs)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)  # type: ignore[union-attr]
    return docs
