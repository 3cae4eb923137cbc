"""Reading the environment into a config tree: the only place pdmesh reads PDMESH_* variables.

`from_env(SchedulerConfig, "scheduler")` reads PDMESH_SCHEDULER_<FIELD> for the root's own fields,
and every sub-config from the section named after its field, wherever it sits: `server` from
PDMESH_SERVER_*, `channel` from PDMESH_CHANNEL_*, `cache` from PDMESH_CACHE_*. Each value is
converted to the field's type; an error names the variable. Unset variables keep the defaults. A
variable of a section being loaded that names no field is refused, naming it (a misspelt or stale
setting must not be ignored silently). A field may name its own variable instead (`setting`:
PDMESH_API_KEYS belongs to no one section), and a renamed setting keeps its old variable as a
field marked deprecated, which `deprecated_settings` lists for a warning at start. This module
knows no particular config; the dataclasses live beside it, one module per service.

Field types understood: str, int, float, bool, Path, enum members (by name), `X | None` (an
empty value means None), tuple[str, ...] / tuple[int, ...] (comma-separated) and dataclasses
(a sub-config).
"""

from __future__ import annotations

import dataclasses
import enum
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from engine.errors import InvalidRequest

PREFIX = "PDMESH_"
MiB = 1 << 20

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting is malformed or inconsistent. `field` is the field, or the variable when the
    value came from the environment; the message is "<field>: <problem>; <fix>"."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


def check_positive(config: object, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value <= 0:
            raise ConfigError(name, f"is {value}; use a positive value")



def env_name(section: str, field: str) -> str:
    """The variable that sets `field` of `section`: env_name("server", "port") == "PDMESH_SERVER_PORT"."""
    return PREFIX + "_".join(p for p in (section, field) if p).upper()


def from_env(
    cls: type[T], section: str = "", environ: Mapping[str, str] | None = None, **overrides: Any
) -> T:
    """Build the dataclass tree `cls` from PDMESH_<SECTION>_<FIELD> variables.

    `overrides` (e.g. from command-line flags) win over the environment; fields set by neither
    keep their defaults. An override of a sub-config is a dataclass (used as it is) or a dict of
    overrides for it. Raises ConfigError naming the variable when a value does not convert, or
    when a variable of the section names no field.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass type")
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    _check_known(cls, section, {variable_of(section, f) for f in fields.values() if not _is_config(hints[f.name])}, env)
    values: dict[str, Any] = {}
    given = set(overrides)
    for f in fields.values():
        name, tp = variable_of(section, f), hints[f.name]
        override = overrides.pop(f.name, None) if f.name in overrides else _UNSET
        if _is_config(tp) and not dataclasses.is_dataclass(override):
            values[f.name] = from_env(tp, f.name, env, **(override if isinstance(override, dict) else {}))
        elif override is not _UNSET:
            values[f.name] = override
        elif name in env:
            values[f.name] = _convert(env[name], tp, name)
    if overrides:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(sorted(overrides))}")
    try:
        return cls(**values)
    except (ConfigError, InvalidRequest) as e:
        if e.field in values and e.field not in given:
            raise ConfigError(variable_of(section, fields[e.field]), e.problem) from None
        raise


def setting(variable: str | None = None, replaced_by: str | None = None) -> dict[str, str]:
    """Field metadata. `variable`: the field is set by this variable rather than
    PDMESH_<SECTION>_<FIELD> (a setting of no one section, such as PDMESH_API_KEYS).
    `replaced_by`: the field's variable is deprecated in favour of that one; it still works, and
    `deprecated_settings` names it so that a service can warn at start."""
    return {k: v for k, v in ((_VARIABLE, variable), (_REPLACED_BY, replaced_by)) if v is not None}


_VARIABLE, _REPLACED_BY = "pdmesh.variable", "pdmesh.replaced_by"


def variable_of(section: str, f: dataclasses.Field[Any]) -> str:
    """The variable that sets field `f` of `section`."""
    return f.metadata.get(_VARIABLE) or env_name(section, f.name)


def deprecated_settings(
    cls: type, section: str = "", environ: Mapping[str, str] | None = None
) -> list[tuple[str, str]]:
    """(variable, its replacement) for each deprecated variable of the tree `cls` set to a value."""
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    found: list[tuple[str, str]] = []
    for f in dataclasses.fields(cls):
        if _is_config(hints[f.name]):
            found += deprecated_settings(hints[f.name], f.name, env)
        elif _REPLACED_BY in f.metadata and env.get(variable_of(section, f), "").strip():
            found.append((variable_of(section, f), f.metadata[_REPLACED_BY]))
    return found


def read_variable(variable: str, tp: Any, extra: Mapping[str, str] = {}) -> Any:  # noqa: B006 (never mutated)
    """One variable converted to `tp` (None when unset), `extra` (e.g. the settings `pdmesh up`
    gives its processes) over the environment: for a process that starts another and must know
    what it will read."""
    env = {**os.environ, **extra}
    return _convert(env[variable], tp, variable) if variable in env else None


_UNSET = object()


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _check_known(cls: type, section: str, variables: set[str], env: Mapping[str, str]) -> None:
    if not section:
        return
    head = env_name(section, "") + "_"
    for variable in env:
        if variable.startswith(head) and variable not in variables:
            names = sorted(v[len(head) :].lower() for v in variables if v.startswith(head))
            others = ", ".join(f"{env_name(s, '')}_*" for s in _sections(cls))
            hint = f"; the rest are in {others}" if others else ""
            raise ConfigError(variable, f"is not a setting; {section} has {', '.join(names)}{hint}")


def _sections(cls: type) -> list[str]:
    """The sections of the sub-configs under `cls`, depth first."""
    hints = typing.get_type_hints(cls)
    found: list[str] = []
    for f in dataclasses.fields(cls):
        if _is_config(hints[f.name]):
            found += [f.name, *_sections(hints[f.name])]
    return found


def _convert(raw: str, tp: Any, name: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"{name}: unions other than `X | None` are not supported")
        return None if raw.strip() == "" else _convert(raw, inner[0], name)
    if origin is tuple:
        item = args[0] if args else str
        return tuple(_convert(p.strip(), item, name) for p in raw.split(",") if p.strip())
    value = raw.strip()
    try:
        if tp is bool:
            return _BOOLS[value.lower()]
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return tp[value.upper()]
        if tp in (int, float, str, Path):
            return tp(value)
    except (KeyError, ValueError):
        raise ConfigError(name, f"is {raw!r}; expected {_describe(tp)}") from None
    raise TypeError(f"{name}: fields of type {tp!r} cannot be read from the environment")


_BOOLS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}


def _describe(tp: Any) -> str:
    if tp is bool:
        return "a boolean (1/0, true/false, yes/no, on/off)"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(m.name.lower() for m in tp)
    return {int: "an integer", float: "a number"}.get(tp, f"a {getattr(tp, '__name__', tp)}")
