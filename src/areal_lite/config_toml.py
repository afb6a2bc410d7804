"""Config loading: one TOML file + `key=value` overrides -> the `ExperimentConfig` tree, and back.

`load_config("config.toml", ["rollout.agent.mode=subproc"])` returns an
`ExperimentConfig` (the tree lives in `config.py`); `config_to_toml` writes one back as
TOML that reads back equal.

Checking happens in three layers, all reported as `ConfigError` naming the dotted key
and where its value came from (the file, or the command-line override):
1. unknown keys, with a "did you mean" among the valid keys at that level;
2. types, ranges and choices, declared on the fields (`Literal`, `msgspec.Meta`) and
   enforced by `msgspec.convert`;
3. rules between fields, in each section's `__post_init__`, raising `_FieldError` with
   keys relative to that section (the loader prefixes them).
"""

from __future__ import annotations

import datetime
import difflib
import math
import re
import tomllib
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import msgspec

from areal_lite.config import ConfigError, ExperimentConfig, _FieldError

__all__ = [
    "config_to_toml",
    "load_config",
    "loads_config",
    "validate_config",
]

# --------------------------------------------------------------------------- loading

_Part = str | int  # one step of a key path: table key or list index
_Origins = dict[tuple[_Part, ...], "_Source"]


class _Source(msgspec.Struct, frozen=True):
    """Where a value came from, for error messages."""

    short: str  # inside parentheses: "config.toml" / "override 'k=v'"
    long: str  # after "unknown key ...": "in config.toml" / "in command-line override 'k=v'"


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read TOML at `path` (None = defaults only), apply `key=value` overrides, validate.

    Raises ConfigError naming the key and the file or override at fault.
    """
    if path is None:
        return _build({}, None, overrides)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e}") from e
    return loads_config(text, overrides, source=str(path))


def loads_config(
    text: str, overrides: Sequence[str] = (), *, source: str = "<string>"
) -> ExperimentConfig:
    """Like `load_config`, from TOML text; `source` names it in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML in {source}: {e}") from e
    return _build(data, _Source(source, f"in {source}"), overrides)


def validate_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """Re-check a config built or mutated in code; returns a fresh validated copy."""
    data = msgspec.to_builtins(cfg, builtin_types=(datetime.datetime, datetime.date, datetime.time))
    return _build(data, _Source("in code", "in code"), ())


def _build(data: dict, source: _Source | None, overrides: Sequence[str]) -> ExperimentConfig:
    origins: _Origins = {}
    if source is not None:
        _record_origins(data, (), source, origins)
    schema = msgspec.inspect.type_info(ExperimentConfig)
    for text in overrides:
        _apply_override(data, text, schema, origins)
    _check_unknown_keys(data, schema, (), origins)
    try:
        return msgspec.convert(data, ExperimentConfig)
    except msgspec.ValidationError as e:
        raise _translate(e, data, schema, origins) from e


def _record_origins(value: Any, prefix: tuple, source: _Source, origins: _Origins) -> None:
    if prefix:
        origins[prefix] = source
    if isinstance(value, dict):
        for k, v in value.items():
            _record_origins(v, prefix + (k,), source, origins)


def _apply_override(data: dict, text: str, schema: Any, origins: _Origins) -> None:
    """Set `key=value` in `data`; the value is TOML if it parses, else a plain string."""
    source = _Source(f"override {text!r}", f"in command-line override {text!r}")
    key_text, sep, raw = text.partition("=")
    if not sep:
        raise ConfigError(f"override {text!r} must be key=value, e.g. rollout.batch_size=16")
    parts = _parse_key(key_text, text)
    value = _parse_value(raw, _schema_at(schema, parts))
    table = data
    for i, part in enumerate(parts[:-1]):
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(
                f"cannot set {'.'.join(parts)}: {where} is not a table "
                f"(it is {type(table).__name__}) ({source.short})"
            )
    table[parts[-1]] = value
    for key in [k for k in origins if k[: len(parts)] == parts]:
        del origins[key]  # the old value (and everything under it) is gone
    _record_origins(value, parts, source, origins)


def _parse_key(key_text: str, text: str) -> tuple[str, ...]:
    """A TOML dotted key (bare or quoted parts) -> its parts."""
    try:
        node: Any = tomllib.loads(f"{key_text} = 0")
    except tomllib.TOMLDecodeError:
        raise ConfigError(f"override {text!r}: {key_text.strip()!r} is not a valid key") from None
    parts = []
    while isinstance(node, dict) and len(node) == 1:
        (k, node), = node.items()
        parts.append(k)
    if node != 0 or not parts:
        raise ConfigError(f"override {text!r}: {key_text.strip()!r} is not a valid key")
    return tuple(parts)


def _parse_value(raw: str, field_type: Any) -> Any:
    """TOML value if `raw` is one (and fits a string field's type), else the raw text."""
    raw = raw.strip()
    try:
        parsed = tomllib.loads("v = " + raw)
    except tomllib.TOMLDecodeError:
        return raw
    if set(parsed) != {"v"}:
        return raw
    value = parsed["v"]
    wants_str = isinstance(field_type, msgspec.inspect.StrType) or (
        isinstance(field_type, msgspec.inspect.LiteralType)
        and all(isinstance(v, str) for v in field_type.values)
    )
    return raw if wants_str and not isinstance(value, str) else value


def _schema_at(schema: Any, parts: Sequence[_Part]) -> Any:
    """The msgspec.inspect type at a key path, or None where the path leaves the schema."""
    for part in parts:
        if isinstance(schema, msgspec.inspect.StructType):
            schema = next((f.type for f in schema.fields if f.encode_name == part), None)
        elif isinstance(schema, msgspec.inspect.ListType) and isinstance(part, int):
            schema = schema.item_type
        else:
            return None
    return schema


def _check_unknown_keys(data: Any, schema: Any, prefix: tuple, origins: _Origins) -> None:
    if not isinstance(schema, msgspec.inspect.StructType) or not isinstance(data, dict):
        return  # non-tables are msgspec's to reject
    fields = {f.encode_name: f.type for f in schema.fields}
    for key, value in data.items():
        if key in fields:
            _check_unknown_keys(value, fields[key], prefix + (key,), origins)
            continue
        dotted = ".".join(prefix + (key,))
        where = _origin_of(prefix + (key,), origins)
        close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.6)
        if close:
            hint = "did you mean " + " or ".join(repr(".".join(prefix + (c,))) for c in close) + "?"
        else:
            hint = "valid keys here: " + ", ".join(sorted(fields))
        where_text = where.long if where else "in the config"
        raise ConfigError(f"unknown key {dotted!r} {where_text} ({hint})")


def _origin_of(parts: Sequence[_Part], origins: _Origins) -> _Source | None:
    """Source of the value at `parts`: its own; else that of a value inside it (a table an
    override created implicitly); else that of the nearest enclosing table."""
    parts = tuple(parts)
    if parts in origins:
        return origins[parts]
    inside = next((s for k, s in origins.items() if k[: len(parts)] == parts), None)
    if inside is not None:
        return inside
    enclosing = (parts[:n] for n in range(len(parts) - 1, 0, -1))
    return next((origins[k] for k in enclosing if k in origins), None)


_AT = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>[^`]*)`$", re.S)
_PATH_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_TYPE_NAMES = {"object": "table", "array": "array", "null": "nothing"}


def _parse_path(text: str) -> tuple[_Part, ...]:
    """`.rollout.sglang.urls[0]` -> ("rollout", "sglang", "urls", 0)."""
    return tuple(m[1] if m[1] is not None else int(m[2]) for m in _PATH_PART.finditer(text))


def _dotted(parts: Sequence[_Part]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else ("." if out else "") + p
    return out


def _value_at(data: Any, parts: Sequence[_Part]) -> Any:
    for p in parts:
        data = data[p]
    return data


def _where(parts_list: Sequence[Sequence[_Part]], origins: _Origins) -> str:
    """Suffix naming where the values at these keys came from, e.g. " (config.toml)"."""
    found = [s.short for p in parts_list if (s := _origin_of(p, origins))]
    return " (" + (", ".join(dict.fromkeys(found)) or "defaults") + ")"


def _literal_choices(schema: Any, parts: tuple[_Part, ...]) -> tuple:
    """Allowed values of a Literal field, in declared order; () for other fields."""
    parent = _schema_at(schema, parts[:-1]) if parts else None
    if not isinstance(parent, msgspec.inspect.StructType):
        return ()
    hint = typing.get_type_hints(parent.cls).get(parts[-1])
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def _translate(
    err: msgspec.ValidationError, data: dict, schema: Any, origins: _Origins
) -> ConfigError:
    """msgspec's `Expected ... - at `$.a.b`` -> a ConfigError with dotted key and source."""
    m = _AT.match(str(err))
    msg, parts = (m["msg"], _parse_path(m["path"])) if m else (str(err), ())
    cause = err.__cause__
    if isinstance(cause, _FieldError):  # a rule between fields, keys relative to `parts`
        keys = [parts + _parse_path("." + k) for k in cause.keys]
        text = cause.template.format(*(_dotted(k) for k in keys), **cause.values)
        return ConfigError(text + _where(keys, origins))
    key, where = _dotted(parts) or "config", _where([parts], origins)
    choices = _literal_choices(schema, parts)
    if choices and (msg.startswith("Invalid enum") or msg.startswith("Expected")):
        got = _value_at(data, parts)
        allowed = ", ".join(repr(c) for c in choices)
        return ConfigError(f"{key} must be one of {allowed}, got {got!r}{where}")
    if t := re.match(r"^Expected `([^`]+)`, got `([^`]+)`$", msg):
        exp, got = (_TYPE_NAMES.get(x, x) for x in t.groups())
        return ConfigError(f"{key}: expected {exp}, got {got}{where}")
    if c := re.match(r"^Expected `[^`]+` (.+)$", msg):
        return ConfigError(f"{key} must be {c[1]}, got {_value_at(data, parts)!r}{where}")
    return ConfigError(f"{key}: {msg}{where}")


# --------------------------------------------------------------------------- writing

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")  # \Z: "$" would accept a trailing newline
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r",
            "\b": "\\b", "\f": "\\f"}


def config_to_toml(cfg: msgspec.Struct) -> str:
    """The resolved config as TOML that `loads_config` reads back to an equal config."""
    lines = ["# areal-lite resolved config"]
    _emit_table(cfg, (), lines)
    return "\n".join(lines) + "\n"


def _emit_table(obj: msgspec.Struct, prefix: tuple[str, ...], lines: list[str]) -> None:
    """Plain fields as `key = value` under `[prefix]`, then each sub-section's table."""
    sections = []
    if prefix:
        lines += ["", "[" + ".".join(_toml_key(p) for p in prefix) + "]"]
    for name in obj.__struct_fields__:
        value = getattr(obj, name)
        if isinstance(value, msgspec.Struct):
            sections.append((name, value))
        else:
            lines.append(f"{_toml_key(name)} = {_toml_value(value, prefix + (name,))}")
    for name, value in sections:
        _emit_table(value, prefix + (name,), lines)


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_str(key)


def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        elif 0xD800 <= ord(ch) <= 0xDFFF:
            raise ConfigError(f"cannot write string {s!r} as TOML: lone surrogate")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any, key: tuple) -> str:
    """Inline TOML for the value types a config holds (tables and arrays nest inline)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (datetime.date, datetime.time)):  # datetime is a date
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v, key) for v in value) + "]"
    if isinstance(value, Mapping):
        items = (f"{_toml_key(str(k))} = {_toml_value(v, key + (k,))}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise ConfigError(f"cannot write {_dotted(key)} = {value!r} as TOML ({type(value).__name__})")
