"""Non-finite steps (issue 12.4): a NaN/inf loss or gradient is skipped by DeepSpeed (the weights
stay as they were), counted, logged to MLflow at once, and the run stops after
``failure.max_nonfinite_steps`` in a row. In-process (world size 1, no Ray)."""

from __future__ import annotations

import json

import pytest
import torch
from faults import NanGradsAt, NanLossAt
from helpers import local_recipe

from bitlm.train.config import load_train_recipe
from bitlm.train.worker import (
    FATAL_FILE,
    FatalTrainingError,
    LocalSession,
    NonFiniteGuard,
    train_worker,
)


def _recipe(data, storage, name, *extra):
    return local_recipe(data, storage, name, "checkpoint.every_steps=0", *extra)


def test_guard_counts_in_a_row_and_stops_at_the_limit():
    g = NonFiniteGuard(limit=3)
    assert not g.update(1, 1.0, 0.5, skipped=False)
    assert g.update(2, float("nan"), float("inf"), skipped=True)
    assert g.update(3, 1.0, float("inf"), skipped=True)  # finite loss, NaN/inf gradients
    assert not g.update(4, 1.0, 0.5, skipped=False)  # a good step resets the streak
    assert (g.total, g.streak) == (2, 0)
    g.update(5, 1.0, float("nan"), skipped=True)
    g.update(6, 1.0, float("nan"), skipped=True)
    with pytest.raises(
        FatalTrainingError, match=r"3 steps in a row .* failure.max_nonfinite_steps=3"
    ):
        g.update(7, float("inf"), float("inf"), skipped=True)
    assert (g.total, g.streak) == (5, 3)

    never = NonFiniteGuard(limit=0)
    for s in range(100):
        never.update(s, float("nan"), float("nan"), skipped=True)
    assert never.total == 100
    with pytest.raises(FatalTrainingError, match="DeepSpeed applied an update"):
        NonFiniteGuard(limit=10).update(1, 1.0, float("nan"), skipped=False)

    from bitlm.recipe import RecipeError
    from bitlm.train.config import TrainRecipe

    assert TrainRecipe().failure.max_nonfinite_steps == 10
    with pytest.raises(RecipeError, match=r"failure\.max_nonfinite_steps"):
        load_train_recipe(None, ["failure.max_nonfinite_steps=-1"])


@pytest.mark.parametrize(("stage", "precision"), [(1, "bf16"), (2, "fp32"), (3, "fp32")])
def test_skipped_steps_leave_the_weights_as_they_were(
    dist_world1, tmp_path, tiny_data, stage, precision
):
    """Step 1 has NaN gradients with a finite loss, step 2 a NaN loss: DeepSpeed applies
    neither, so the weights after two steps are the initial ones, and the count is saved."""
    from bitlm.model import BitLM
    from bitlm.train.export import load_checkpoint_model

    storage = tmp_path / "runs"
    r = _recipe(
        tiny_data,
        storage,
        "skip",
        f"zero_stage={stage}",
        f"precision={precision}",
        "steps=2",
        "mlflow.enabled=false",
    )
    s = LocalSession(str(storage), "skip", keep=1)
    train_worker({"recipe": r.to_dict()}, s, [NanGradsAt(1), NanLossAt(2)])
    assert not (storage / "skip" / FATAL_FILE).exists()
    ckpt = storage / "skip" / "checkpoint_00000002"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["nonfinite_steps"], state["nonfinite_streak"]) == (2, 2)
    model, recipe, _ = load_checkpoint_model(str(ckpt))
    torch.manual_seed(recipe.seed)
    init = BitLM(recipe.model, model.codec.table)
    if precision == "bf16":  # the fp32 master weights start from the bf16 model's
        init = init.to(torch.bfloat16).float()
    for (k, a), (_, b) in zip(model.state_dict().items(), init.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_nonfinite_steps_logged_to_mlflow_and_fatal_in_a_row(
    dist_world1, tmp_path, tiny_data, mlflow_uri
):
    from mlflow.tracking import MlflowClient

    storage = tmp_path / "runs"
    r = _recipe(
        tiny_data,
        storage,
        "diverge",
        "zero_stage=2",
        "steps=10",
        "failure.max_nonfinite_steps=3",
    )
    s = LocalSession(str(storage), "diverge", keep=1)
    faults = [NanGradsAt(2, 4, 5), NanLossAt(6)]  # step 6: the third in a row, 4, 5, 6
    train_worker({"recipe": r.to_dict(), "tracking_uri": mlflow_uri}, s, faults)
    fatal = json.loads((storage / "diverge" / FATAL_FILE).read_text())
    assert "3 steps in a row with a non-finite loss or gradients" in fatal["error"]
    assert "last: step 6, loss nan" in fatal["error"] and "4 in this run" in fatal["error"]

    c = MlflowClient(mlflow_uri)
    exp = c.get_experiment_by_name("bitlm-pretrain")
    run = c.search_runs([exp.experiment_id], "tags.mlflow.runName = 'diverge'")[0]
    hist = sorted(
        (m.step, m.value) for m in c.get_metric_history(run.info.run_id, "nonfinite_steps")
    )
    assert hist == [(1, 0), (2, 1), (3, 1), (4, 2), (5, 3), (6, 4)]  # once per step, bad ones too
    streak = sorted(
        (m.step, m.value) for m in c.get_metric_history(run.info.run_id, "nonfinite_streak")
    )
    assert streak == [(2, 1), (4, 1), (5, 2), (6, 3)]
    losses = [m.step for m in c.get_metric_history(run.info.run_id, "loss")]
    assert sorted(losses) == [1, 2, 3, 4, 5]  # the NaN loss of step 6 is not a number to plot
