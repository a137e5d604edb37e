"""One config system: typed dataclasses loaded from YAML recipes with ``--set a.b=c`` overrides.

pydantic validates a mapping into the dataclass tree: types are strict (a string or a bool is
not an integer; an integer is a float; NaN and inf are not numbers), an unknown key is an error,
and a mapping builds a nested dataclass. Every failure is a ``RecipeError`` naming the dotted
key. The checks across fields stay in each dataclass's ``__post_init__`` (pydantic calls it)
and name their keys themselves.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic_core import SchemaValidator

__all__ = ["RecipeError", "check_types", "from_dict", "load_recipe", "parse_overrides", "to_dict"]

T = TypeVar("T")

_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class RecipeError(ValueError):
    """A recipe or override is invalid; the message names the key."""


class _Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where ``3e-4`` (no dot) is a string; YAML 1.2 (and every recipe
    author) reads a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: builds plain data only


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """["a.b=3", "c=x"] -> nested dict, values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override {item!r} must look like key.sub=value")
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r} conflicts with an earlier one")
        node[parts[-1]] = _yaml(raw) if raw != "" else ""
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@functools.cache
def _validator(cls: type) -> SchemaValidator:
    """Strict pydantic validation of ``(data,)`` into ``(cls instance,)``, except that a mapping
    may build a dataclass (strict mode alone wants an instance there). The 1-tuple carries the
    config: pydantic takes none for a dataclass itself, and a plain one inherits its parent's."""
    schema = copy.deepcopy(TypeAdapter(tuple[cls], config=_STRICT).core_schema)

    def lax_dataclasses(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "dataclass":
                node["strict"] = False
            for v in node.values():
                lax_dataclasses(v)
        elif isinstance(node, list):
            for v in node:
                lax_dataclasses(v)

    lax_dataclasses(schema)
    return SchemaValidator(schema)


@functools.cache
def _field_adapters(cls: type) -> dict[str, TypeAdapter[Any]]:
    """Field name -> strict validation of ``(value,)`` (the 1-tuple as in ``_validator``)."""
    hints = get_type_hints(cls)
    return {
        f.name: TypeAdapter(tuple[hints[f.name]], config=_STRICT) for f in dataclasses.fields(cls)
    }


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, checking keys and types; ``prefix`` is the
    dotted path of ``cls`` in its recipe (for the messages)."""
    try:
        return _validator(cls).validate_python((data,))[0]
    except ValidationError as e:
        raise RecipeError(_message(cls, e, prefix, skip=1)) from None


def check_types(obj: Any, prefix: str = "") -> None:
    """The same strict type checks for an instance built in Python (``cls(...)``,
    ``dataclasses.replace``); nested dataclasses must be instances already."""
    for name, adapter in _field_adapters(type(obj)).items():
        try:
            adapter.validate_python((getattr(obj, name),))
        except ValidationError as e:
            raise RecipeError(_message(type(obj), e, prefix, at=(name,), skip=1)) from None


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def load_recipe(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Load a YAML recipe (or start from defaults when path is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe not found: {p}")
        try:
            data = _yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{p}: a recipe must be a mapping at the top level")
    return from_dict(cls, merge(data, parse_overrides(overrides)))


# ---- pydantic's errors -> messages naming the dotted key ----------------------------------------
_WHY = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "dataclass_type": "must be a mapping",
}


def _walk(cls: type, loc: tuple[Any, ...]) -> tuple[str, Any]:
    """pydantic's error location -> (dotted key, the type found there). A part that names no
    field is the tag pydantic gives a member of a union, not a key."""
    key, hint = "", cls
    for part in loc:
        members = [a for a in get_args(hint) if a is not type(None)]
        if get_origin(hint) in (typing.Union, types.UnionType) and len(members) == 1:
            hint = members[0]  # X | None
        if isinstance(part, int):
            key += f"[{part}]"
            hint = (get_args(hint) or (Any,))[0]
        elif dataclasses.is_dataclass(hint) and part in {f.name for f in dataclasses.fields(hint)}:
            key += f".{part}" if key else part
            hint = get_type_hints(hint)[part]
    return key, hint


def _message(
    cls: type, error: ValidationError, prefix: str, at: tuple[Any, ...] = (), skip: int = 0
) -> str:
    """The first error; ``at`` + its location minus the first ``skip`` parts is its key in
    ``cls``."""
    errors = [{**e, "loc": at + tuple(e["loc"][skip:])} for e in error.errors()]
    first = errors[0]
    if first["type"] == "value_error":  # raised by a __post_init__ check: it names its keys
        return str(first["ctx"]["error"])
    loc = first["loc"]
    if first["type"] == "unexpected_keyword_argument":
        key, holder = _walk(cls, loc[:-1])
        known = ", ".join(f.name for f in dataclasses.fields(holder))
        return f"unknown key {prefix}{key}{'.' if key else ''}{loc[-1]} (known: {known})"
    key = _walk(cls, loc)[0]
    name = f"{prefix}{key}" or prefix.rstrip(".") or "recipe"
    if first["type"] == "missing":
        return f"{name}: required (it has no default)"
    # a union reports one error per member, all at the same key
    whys = [_why(e) for e in errors if _walk(cls, e["loc"])[0] == key]
    return f"{name}={first['input']!r}: {', or '.join(dict.fromkeys(whys))}"


def _why(e: Any) -> str:
    if e["type"] == "literal_error":
        return f"must be one of {e['ctx']['expected']}"
    return _WHY.get(e["type"]) or e["msg"].replace("Input should be", "must be")
