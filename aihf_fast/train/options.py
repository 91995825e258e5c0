"""Options of a trainer as one dataclass: read from a YAML/JSON file, overridden by flags (one
flag per field), values coerced to the field's type with named errors. Shared by the trainers."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os


class ConfigError(ValueError):
    """A configuration that cannot run, with the option and what was expected."""


def _parse_bool(s):
    if isinstance(s, bool):
        return s
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def load_file(path: str) -> dict:
    """A YAML (.yaml/.yml) or JSON file of options -> dict, or ConfigError naming the file."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file not found: {path!r}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - yaml.YAMLError / json.JSONDecodeError, with line numbers
        raise ConfigError(f"--config {path!r}: cannot parse: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path!r}: expected a mapping of options, got {type(data).__name__}")
    return data


def from_dict(cls, data: dict):
    """An instance of the dataclass ``cls`` from a mapping: unknown keys and wrong types are errors."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; known: {sorted(fields)}")
    return cls(**{k: coerce(k, _type_name(fields[k]), v) for k, v in data.items()})


def _type_name(f) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")


def coerce(name, typ, v):
    """A config value as its option's type (YAML reads 1e-5 as a string), or ConfigError."""
    if v is None:
        if "None" in typ:
            return None
        raise ConfigError(f"{name} must not be null")
    try:
        if typ.startswith("bool"):
            return _parse_bool(v) if isinstance(v, (str, bool)) else bool({0: False, 1: True}[v])
        if typ.startswith("int"):
            if isinstance(v, bool) or float(v) != int(float(v)):
                raise ValueError
            return int(float(v))
        if typ.startswith("float"):
            if isinstance(v, bool):
                raise ValueError
            return float(v)
        if typ == "tuple":
            t = tuple(float(x) for x in v)
            if len(t) != 2:
                raise ValueError
            return t
        if typ.startswith("str"):
            if not isinstance(v, str):
                raise ValueError
            return v
        return v  # dict | str | None: checked where used
    except (ValueError, TypeError, KeyError, argparse.ArgumentTypeError):
        raise ConfigError(f"{name} must be of type {typ}, got {v!r}") from None


def build_parser(cls, prog: str, description: str) -> argparse.ArgumentParser:
    """``--config FILE`` plus one flag per field of ``cls`` (``--w-P 0.5``); unset flags are absent
    from the namespace, so they do not override the file."""
    p = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                usage=f"{prog} [--config FILE] [--option VALUE ...]")
    p.add_argument("--config", help="YAML or JSON file of options (flags override it)")
    p.add_argument("--debug", action="store_true", help="on an error, show the full traceback, not one line")
    for f in dataclasses.fields(cls):
        # the default is shown, not set: an unset flag must not override the --config file
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        text = f.metadata.get("help", "")
        text = text if "default" in text else f"{text} (default: {shown})"  # some say what None means
        kw = dict(default=argparse.SUPPRESS, help=text.replace("%", "%%"))
        t = _type_name(f)
        if t.startswith("bool"):
            kw.update(type=_parse_bool, nargs="?", const=True)
        elif t.startswith("int"):
            kw.update(type=int)
        elif t.startswith("float"):
            kw.update(type=float)
        elif t == "tuple":
            kw.update(type=float, nargs=2)
        else:
            kw.update(type=str)
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)
    return p


def parse_args(cls, parser: argparse.ArgumentParser, argv=None, preset: dict | None = None):
    """Flags over the --config file over ``preset`` -> (instance of cls, namespace)."""
    ns = parser.parse_args(argv)
    data = dict(preset or {})
    data.update(load_file(ns.config) if ns.config else {})
    names = {f.name for f in dataclasses.fields(cls)}
    data.update({k: v for k, v in vars(ns).items() if k in names})
    return from_dict(cls, data), ns
