"""The one config system: YAML recipes, --set overrides, errors that name the key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from bitlm.config import ModelConfig
from bitlm.recipe import RecipeError, from_dict, load_recipe, parse_overrides

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@dataclass
class Inner:
    lr: float = 1e-3
    kind: Literal["cosine", "wsd"] = "cosine"


@dataclass
class Item:
    path: str
    low: int = 0
    high: int = 1

    def __post_init__(self) -> None:  # a check across fields names its keys itself
        if self.low > self.high:
            raise RecipeError(f"items[].low={self.low}: must be <= items[].high={self.high}")


@dataclass
class Outer:
    steps: int = 10
    name: str | None = None
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)


def test_yaml_and_overrides(tmp_path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("steps: 5\ninner:\n  lr: 3e-4\n  kind: wsd\n")
    r = load_recipe(Outer, p, ["inner.lr=0.5", "name=run-1", "tags=[a, b]"])
    assert r == Outer(steps=5, name="run-1", inner=Inner(lr=0.5, kind="wsd"), tags=["a", "b"])
    assert load_recipe(Outer, p).inner.lr == 3e-4  # YAML reads 3e-4 as a string; accepted
    assert load_recipe(Outer, None) == Outer()
    # a YAML integer is a float; a mapping builds a nested dataclass, in a list too
    r = load_recipe(Outer, None, ["inner.lr=1", "items=[{path: a, high: 3}]"])
    assert type(r.inner.lr) is float and r.items == [Item("a", high=3)]


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("stepz: 3\n", [], "unknown key stepz"),
        ("inner:\n  lrr: 1\n", [], "unknown key inner.lrr"),
        ("steps: many\n", [], "steps='many': must be an integer"),
        ("", ["inner.kind=linear"], "inner.kind='linear': must be one of"),
        ("", ["inner.lr=fast"], "inner.lr='fast': must be a number"),
        ("", ["inner.lr=true"], "inner.lr=True: must be a number"),
        ("", ["inner.lr=.nan"], "inner.lr=nan: must be a finite number"),
        ("", ["steps=2.0"], "steps=2.0: must be an integer"),
        ("", ["steps=false"], "steps=False: must be an integer"),
        ("", ["name=7"], "name=7: must be a string"),
        ("", ["tags=[a, 1]"], "tags[1]=1: must be a string"),
        ("", ["inner=3"], "inner=3: must be a mapping"),
        ("items:\n  - {path: a, hihg: 2}\n", [], "unknown key items[0].hihg"),
        ("items:\n  - {path: a}\n  - {path: b, low: x}\n", [], "items[1].low='x'"),
        ("items:\n  - {low: 1}\n", [], "items[0].path: required"),
        ("items:\n  - {path: a, low: 2}\n", [], "items[].low=2: must be <= items[].high=1"),
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


def test_model_config_errors_name_the_dotted_key() -> None:
    """ModelConfig checks the same strict types whether built from a recipe or in Python."""
    with pytest.raises(RecipeError, match=r"model\.head_width=1\.5: must be an integer"):
        from_dict(ModelConfig, {"head_width": 1.5}, "model.")
    with pytest.raises(RecipeError, match=r"unknown key model\.head_widht"):
        ModelConfig.from_dict({"head_widht": 64})
    with pytest.raises(RecipeError, match=r"model\.head_width must be divisible by head_heads"):
        ModelConfig.from_dict({"head_width": 30, "head_heads": 4})
    with pytest.raises(RecipeError, match=r"model\.d_model='x': must be an integer"):
        ModelConfig(d_model="x")  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match=r"model\.qk_norm=1: must be true or false"):
        dataclasses.replace(ModelConfig(), qk_norm=1)
    assert ModelConfig.from_dict(ModelConfig(d_model=64).to_dict()) == ModelConfig(d_model=64)


def test_every_shipped_recipe_folder_is_tested() -> None:
    """tests/train/test_config.py loads every recipes/pretrain/*.yaml and
    tests/pipeline/test_cli.py every recipes/preprocess/*.yaml: a recipe in any other folder
    would go untested."""
    shipped = {p.parent.name for p in RECIPES.rglob("*") if p.suffix in (".yaml", ".yml")}
    assert shipped == {"pretrain", "preprocess"}
