"""The shipped grids of benchmarks/quality.py name valid variants (checked before any training)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GRIDS = sorted((ROOT / "benchmarks").glob("quality*.yaml"))


def _quality():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks/quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_shipped_grids_are_found() -> None:
    assert {p.name for p in GRIDS} >= {"quality_grid.yaml", "quality_study.yaml"}


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.name)
def test_every_shipped_grid_variant_is_a_valid_model(path: Path) -> None:
    _quality().check_grid(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize(
    ("variant", "why"),
    [
        ({"name": "typo", "model": {"head_widht": 64}}, "variant typo: unknown key model.head_w"),
        ({"name": "bad", "model": {"head_width": "wide"}}, "variant bad: model.head_width"),
        ({"name": "odd", "model": {"head_width": 30, "head_heads": 4}}, "variant odd: .*heads"),
        ({"name": "tbl", "code_table": "semantc"}, "variant tbl: unknown code_table 'semantc'"),
        ({"name": "key", "modle": {}}, "variant key: unknown key modle"),
        ({"name": "lr", "head_lr_scale": 0}, "variant lr: head_lr_scale must be a number > 0"),
    ],
)
def test_a_bad_variant_is_named_before_training(variant: dict, why: str) -> None:
    grid = {"base": {"d_model": 64}, "variants": [{"name": "ok", "model": {}}, variant]}
    with pytest.raises(SystemExit, match=why):
        _quality().check_grid(grid)


def test_variants_need_unique_names() -> None:
    with pytest.raises(SystemExit, match="unique name"):
        _quality().check_grid({"variants": [{"name": "a"}, {"name": "a"}]})
