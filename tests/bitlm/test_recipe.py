"""The one config system: YAML recipes, --set overrides, errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from bitlm.recipe import RecipeError, load_recipe, parse_overrides


@dataclass
class Inner:
    lr: float = 1e-3
    kind: Literal["cosine", "wsd"] = "cosine"


@dataclass
class Outer:
    steps: int = 10
    name: str | None = None
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)


def test_yaml_and_overrides(tmp_path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("steps: 5\ninner:\n  lr: 3e-4\n  kind: wsd\n")
    r = load_recipe(Outer, p, ["inner.lr=0.5", "name=run-1", "tags=[a, b]"])
    assert r == Outer(steps=5, name="run-1", inner=Inner(lr=0.5, kind="wsd"), tags=["a", "b"])
    assert load_recipe(Outer, p).inner.lr == 3e-4  # YAML reads 3e-4 as a string; accepted
    assert load_recipe(Outer, None) == Outer()


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("stepz: 3\n", [], "unknown key stepz"),
        ("inner:\n  lrr: 1\n", [], "unknown key inner.lrr"),
        ("steps: many\n", [], "steps='many': must be an integer"),
        ("", ["inner.kind=linear"], "inner.kind='linear': must be one of"),
        ("", ["inner.lr=fast"], "inner.lr='fast': must be a number"),
        ("- a\n- b\n", [], "mapping at the top level"),
        ("steps: [1\n", [], "not valid YAML"),
    ],
)
def test_errors_name_the_key(tmp_path, text: str, overrides: list[str], message: str) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError, match=message.replace("[", r"\[")):
        load_recipe(Outer, p, overrides)


def test_bad_override_syntax_and_missing_file(tmp_path) -> None:
    with pytest.raises(RecipeError, match=r"key\.sub=value"):
        parse_overrides(["novalue"])
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(Outer, tmp_path / "missing.yaml")
