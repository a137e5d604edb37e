"""The entry point and the shipped recipes: every recipe loads; bad recipes exit 2 in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes/preprocess").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_load(path: Path) -> None:
    cfg = load_config(path)
    cfg.validate_for_run()
    assert cfg.seq_len % cfg.block_size == 0


def test_stdlib_recipe_expands_to_stdlib() -> None:
    import sysconfig

    from pipeline.driver import expand_path

    cfg = load_config(REPO / "recipes/preprocess/stdlib-tiny.yaml")
    assert expand_path(cfg.inputs[0].path) == sysconfig.get_paths()["stdlib"]


def _main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("preprocess_job", REPO / "jobs/preprocess.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--set", "seq_len=30", "--set", "block_size=4"], "seq_len=30"),
        (["--set", "nope=1"], "unknown key nope"),
        (["--set", "filters.max_chars=lots"], "filters.max_chars"),
        (["--set", "code_table=huffman"], "code_table"),
        (["--set", "output=x"], "inputs"),
        (["--config", "/does/not/exist.yaml"], "recipe not found"),
    ],
)
def test_bad_config_exit_2_one_line(args: list[str], needle: str, capsys) -> None:
    assert _main()(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


def test_cli_subprocess_bad_config() -> None:
    r = subprocess.run(
        [sys.executable, "jobs/preprocess.py", "--set", "seq_len=0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: bad recipe: seq_len=0")
