"""Point 8: every shipped recipe loads and validates; bad input is a clear error."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitlm.model import BitLM
from bitlm.recipe import RecipeError
from bitlm.train.config import TrainRecipe, load_train_recipe
from bitlm.train.trainer import lr_at
from bitlm.train.worker import deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes" / "pretrain").glob("*.yaml"))


def test_expected_recipes_ship():
    names = {p.stem for p in RECIPES}
    assert {"cpu-tiny", "cpu-tiny-ar", "gpu-125m-8x", "gpu-1b-8x"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_validates(path):
    r = load_train_recipe(path)
    ds = deepspeed_config(r, r.num_workers)
    assert ds["train_batch_size"] == (
        ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * r.num_workers
    )
    assert ds["zero_optimization"]["stage"] == r.zero_stage
    assert ("bf16" in ds) == r.use_gpu  # bf16 on GPU, fp32 on CPU
    assert r.grad_accum >= 1
    with torch.device("meta"):  # the model builds (sizes only)
        m = BitLM(r.model)
    if path.stem.startswith("gpu-125m"):
        assert 60e6 < m.num_params() < 200e6
    if path.stem.startswith("gpu-1b"):
        assert 0.7e9 < m.num_params() < 1.5e9 and r.zero_stage == 3
    # the resolved recipe round-trips through YAML (it is stored in every checkpoint)
    import yaml

    from bitlm.recipe import from_dict

    assert from_dict(TrainRecipe, yaml.safe_load(r.to_yaml())) == r


def test_ar_variant_is_one_field_group():
    bit = load_train_recipe(ROOT / "recipes/pretrain/cpu-tiny.yaml")
    ar = load_train_recipe(ROOT / "recipes/pretrain/cpu-tiny-ar.yaml")
    assert (ar.model.block_size, ar.model.input, ar.model.output_head) == (
        1,
        "embedding",
        "softmax",
    )
    assert (ar.model.d_model, ar.model.n_layers) == (bit.model.d_model, bit.model.n_layers)
    assert ar.steps == bit.steps and ar.global_batch_size == bit.global_batch_size


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["optimm.lr=1"], "unknown key optimm"),
        (["optim.lrr=1"], "unknown key optim.lrr"),
        (["zero_stage=4"], "zero_stage=4"),
        (["zero_stage=two"], "zero_stage='two'"),
        (["global_batch_size=10"], "global_batch_size=10"),
        (["precision=fp16"], "precision='fp16'"),
        (["schedule.kind=linear"], "schedule.kind='linear'"),
        (["model.n_heads=3"], "model"),
        (["model.output_head=mlp"], "model.output_head='mlp'"),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last=0"),
        (["name=bad name"], "name='bad name'"),
        (["data.dataset_version=newest"], "data.dataset_version='newest'"),
        (["data.dataset_version=0"], "data.dataset_version=0"),
        (["data.dataset_version=true"], "data.dataset_version=True"),
        # a wrong type, an unknown key and a check across fields, each deep in the tree
        (["model.head_width=1.5"], "model.head_width=1.5: must be an integer"),
        (["optim.betas=[0.9, fast]"], "optim.betas[1]='fast': must be a number"),
        (["mlflow.enabled=yes please"], "mlflow.enabled='yes please': must be true or false"),
        (["model.head_widht=64"], "unknown key model.head_widht"),
        (["model.n_heads=3"], "model.d_model must be divisible by n_heads"),
        (["model.slot_mixer=1"], "model.slot_mixer needs slot_prefix"),
        (["micro_batch_size=3"], "global_batch_size=16: must be a multiple of micro_batch_size"),
    ],
)
def test_bad_values_are_named(overrides, needle):
    with pytest.raises(RecipeError, match=None) as e:
        load_train_recipe(ROOT / "recipes/pretrain/cpu-tiny.yaml", overrides)
    assert needle in str(e.value)


def test_yaml_numbers_are_numbers():
    r = load_train_recipe(None, ["optim.lr=1", "optim.eps=1e-6", "model.rope_theta=5e5"])
    assert (r.optim.lr, r.optim.eps, r.model.rope_theta) == (1.0, 1e-6, 5e5)
    assert type(r.optim.lr) is float  # a YAML integer is a float; 1e-6 is not a string


def test_cli_bad_config_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 10\nmystery: 1\n")
    p = subprocess.run(
        [sys.executable, str(ROOT / "jobs/pretrain.py"), "--config", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown key mystery" in lines[0], p.stderr


def test_lr_schedules():
    r = load_train_recipe(None, ["steps=100", "schedule.warmup_steps=10", "optim.lr=1.0"])
    lrs = [lr_at(r, s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))  # cosine decays
    assert lrs[-1] == pytest.approx(r.optim.min_lr_ratio, abs=1e-3)
    w = load_train_recipe(
        None, ["steps=100", "schedule.kind=wsd", "schedule.warmup_steps=10", "optim.lr=1.0"]
    )
    wl = [lr_at(w, s) for s in range(100)]
    assert wl[50] == 1.0 and wl[79] == 1.0 and wl[99] == pytest.approx(w.optim.min_lr_ratio)
