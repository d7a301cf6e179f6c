"""YAML files and dotted command-line overrides -> a typed :class:`Config`.

Loading is strict: an unknown key, a value of the wrong type or a literal outside its allowed set
raises :class:`ConfigError` naming the dotted key, so a typo never silently trains the default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from megatron_vwn.config.errors import ConfigError
from megatron_vwn.config.schema import Config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = "tiny"


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a config shipped in ``configs/`` (``tiny``, ``gpt_125m``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(str(p.relative_to(CONFIG_DIR).with_suffix(""))
                   for p in CONFIG_DIR.rglob("*.yaml"))
    raise ConfigError(f"config file {name_or_path!r} not found; shipped configs: {names}")


def split_config_and_overrides(args: list[str]) -> tuple[str, list[str]]:
    """A command's ``[CONFIG] [key=value ...]`` arguments: the config (the default when the first
    argument is already an override) and the overrides."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return DEFAULT_CONFIG, args


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config (None: the tiny default) and apply ``key=value`` overrides."""
    raw = _load_yaml(resolve_config_path(str(path))) if path is not None else {}
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    return from_dict(raw)


def _load_yaml(file: Path, seen: tuple[Path, ...] = ()) -> dict:
    """One YAML file; a top-level ``base: other.yaml`` (relative to this file, or a shipped
    config name) is loaded first and this file's sections are merged over it."""
    if file.resolve() in seen:
        raise ConfigError(f"{file}: 'base' chain loops back to {file.name}")
    try:
        with open(file, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        raise ConfigError(f"{file}: not valid YAML: {_one_line(exc)}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{file}: top level must be a mapping of sections, got {loaded!r}")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    relative = file.parent / str(base)
    base_file = relative if relative.is_file() else resolve_config_path(str(base))
    return _merge(_load_yaml(base_file, (*seen, file.resolve())), loaded)


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(item: str) -> tuple[str, Any]:
    """``train.lr=1e-3`` -> ("train.lr", 0.001); values are parsed as YAML scalars or lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except (yaml.YAMLError, RecursionError) as exc:
        raise ConfigError(f"{key}: cannot parse value {text!r}: {_one_line(exc)}") from None
    return key.strip(), value


def _one_line(exc: BaseException) -> str:
    """A parser's multi-line message (YAML marks, carets) as one line."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(raw: dict, cls: type = Config, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from nested mappings, checking keys and types on the way."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted((key for key in raw if key not in fields), key=str)  # YAML keys: any type
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; allowed keys"
            f"{' in ' + prefix.rstrip('.') if prefix else ''}: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(value if value is not None else {}, hint, key + ".")
        else:
            kwargs[name] = _coerce(key, value, hint)
    return cls(**kwargs)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a type hint, allowing the lossless int -> float widening."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        message = errors[0] if len(errors) == 1 else f"{key}: {value!r} is not {_name(hint)}"
        raise ConfigError(message)
    if origin is Literal:
        if isinstance(value, bool) and ("off" if value is False else "on") in args:
            value = "off" if value is False else "on"  # YAML 1.1 reads off/on as booleans
        if value not in args:
            raise ConfigError(f"{key} ({value!r}) must be one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_hint,) = args
        return [_coerce(f"{key}[{i}]", v, item_hint) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-3" as a string
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if hint in (int, float, str, bool) and (
        not isinstance(value, hint) or (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{key}: expected {_name(hint)}, got {value!r}")
    return value


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain data, for ``config.yaml`` and wandb."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
