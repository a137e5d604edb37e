"""bitlm.checkpoint, the one owner of the checkpoint layout: every precision x ZeRO stage is
found, consolidated and evaluated; a folder without its commit marker (a save killed between
the rank files and the marker) is never resumed from, evaluated or exported, and the relaunch
continues from the previous checkpoint as an uninterrupted run would. In-process (world size 1,
gloo, no Ray); the kill is injected here, by a session whose commit dies."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from helpers import local_recipe

from bitlm import checkpoint
from bitlm.train.worker import LocalSession, train_worker


class _Killed(BaseException):
    """The process dying between the rank files and the marker (nothing catches it)."""


class _DiesBeforeCommit(LocalSession):
    def __init__(self, *args, die_at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.die_at = die_at

    def commit(self, step: int) -> None:
        if step == self.die_at:
            raise _Killed(step)
        super().commit(step)


def _train(data, storage, name, *extra, session=None) -> LocalSession:
    r = local_recipe(data, storage, name, "mlflow.enabled=false", *extra)
    session = session or LocalSession(str(storage), name)
    train_worker({"recipe": r.to_dict()}, session)
    return session


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_every_layout_is_found_consolidated_and_evaluated(
    dist_world1, tmp_path, tiny_data, stage, precision
):
    """bf16 names the optimizer shards bf16_zero_pp_rank_*, ZeRO-3 keeps the model states per
    rank: evaluation once saw neither."""
    from bitlm.eval.evaluate import EvalSettings, evaluate_model, load_model_dir
    from bitlm.train.callbacks import probe_loss
    from bitlm.train.data import Dataset

    storage = tmp_path / "runs"
    _train(tiny_data, storage, "layout", f"zero_stage={stage}", f"precision={precision}", "steps=1")
    run_dir = str(storage / "layout")
    ckpt = checkpoint.path_of(run_dir, 1)
    assert checkpoint.list_complete(run_dir) == [(1, ckpt)]
    assert checkpoint.latest_complete(run_dir) == ckpt
    marker = json.loads((Path(ckpt) / checkpoint.MARKER).read_text())
    assert marker["step"] == 1 and marker["world_size"] == 1
    assert {checkpoint.STATE_FILE, "rng/rank_0.pt", "recipe.yaml"} <= set(marker["files"])
    shards = [f for f in marker["files"] if f.startswith("ds/") and "optim_states" in f]
    assert shards and all(f.startswith("ds/bf16_") == (precision == "bf16") for f in shards)

    model, state, tok = load_model_dir(checkpoint.consolidate(ckpt, tmp_path / "model"))
    assert state["step"] == 1 and tok
    if precision == "fp32":  # the consolidated weights are the trained ones (bf16 rounds)
        recipe = local_recipe(tiny_data, storage, "layout")
        probe = probe_loss(model, Dataset(tiny_data, "train"), recipe)
        assert probe == pytest.approx(state["probe_loss"], rel=1e-6, abs=1e-7)
    metrics, _ = evaluate_model(
        model, tiny_data, "val", EvalSettings(max_rows=4, new_tokens=4, gen_batch=2, ngram_rows=0)
    )
    assert math.isfinite(metrics["val/loss"])


def test_a_run_killed_during_a_save_resumes_from_the_previous_checkpoint(
    dist_world1, tmp_path, tiny_data, caplog
):
    from bitlm.eval.evaluate import EvalError, load_any_model
    from bitlm.train.export import resolve_checkpoint

    storage = tmp_path / "runs"
    args = ("zero_stage=2", "steps=4", "checkpoint.every_steps=1")
    full = _train(tiny_data, storage, "full", *args)
    killed = _DiesBeforeCommit(str(storage), "killed", die_at=3)
    with pytest.raises(_Killed):
        _train(tiny_data, storage, "killed", *args, session=killed)

    run_dir = str(storage / "killed")
    step3 = checkpoint.path_of(run_dir, 3)
    assert (storage / "killed" / "checkpoint_00000003" / checkpoint.STATE_FILE).is_file()
    assert [s for s, _ in checkpoint.list_steps(run_dir)] == [1, 2, 3]
    assert [s for s, _ in checkpoint.list_complete(run_dir)] == [1, 2]  # what the watcher sees
    caplog.set_level(logging.WARNING, logger="bitlm.checkpoint")
    assert checkpoint.latest_complete(run_dir) == checkpoint.path_of(run_dir, 2)
    assert "checkpoint_00000003: no _COMMITTED.json" in caplog.text
    with pytest.raises(EvalError, match="unfinished checkpoint"):
        load_any_model(step3, "")  # evaluation refuses it
    with pytest.raises(FileNotFoundError, match="unfinished checkpoint"):
        resolve_checkpoint(step3)  # and export
    assert resolve_checkpoint(run_dir) == checkpoint.path_of(run_dir, 2)

    resumed = _train(tiny_data, storage, "killed", *args)
    assert [r["step"] for r in resumed.reports] == [3, 4]  # from step 2, not 3
    losses = [r["loss"] for r in killed.reports + resumed.reports]
    assert losses == [r["loss"] for r in full.reports[:3] + full.reports[2:]]  # 1 2 3 | 3 4
    assert [s for s, _ in checkpoint.list_complete(run_dir)] == [2, 3, 4]  # keep 3


def test_legacy_folders_are_complete_by_the_old_rule(dist_world1, tmp_path, tiny_data, caplog):
    """A folder written before markers (no checkpoint_format in its state) counts when every
    rank's files are there, with a warning; one with checkpoint_format needs its marker."""
    storage = tmp_path / "runs"
    _train(tiny_data, storage, "old", "zero_stage=1", "steps=1")
    ck = storage / "old" / "checkpoint_00000001"
    (ck / checkpoint.MARKER).unlink()
    assert not checkpoint.is_complete(str(ck))
    state = json.loads((ck / checkpoint.STATE_FILE).read_text())
    del state["checkpoint_format"]
    (ck / checkpoint.STATE_FILE).write_text(json.dumps(state))
    caplog.set_level(logging.WARNING, logger="bitlm.checkpoint")
    assert checkpoint.is_complete(str(ck))
    assert "written before commit markers" in caplog.text
    (ck / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    assert not checkpoint.is_complete(str(ck))


def _dies_before_commit(flag: str, step: int):
    """A train loop that SIGKILLs rank 0 once, between step ``step``'s upload and its marker."""

    def loop(info):
        import os
        import signal
        from pathlib import Path

        from bitlm.train import worker

        commit = worker.RaySession.commit

        def dying(self, s):
            if s == step and not Path(flag).exists():
                Path(flag).touch()
                os.kill(os.getpid(), signal.SIGKILL)
            commit(self, s)

        worker.RaySession.commit = dying
        worker.train_worker(info)

    return loop


@pytest.mark.ray
@pytest.mark.slow
def test_a_ray_worker_killed_during_a_save_resumes_from_the_previous_checkpoint(
    ray_local, tiny_data, tmp_path, mlflow_uri, monkeypatch
):
    """2 workers: rank 0 dies after every rank's upload of step 3, before its marker; Ray
    restarts the group, which resumes from step 2 and logs the uninterrupted run's losses."""
    import sys

    import cloudpickle
    from helpers import metric_history, train

    from bitlm.train import launch

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the loop runs in the workers
    common = ["zero_stage=2", "steps=4", "checkpoint.every_steps=1", "failure.max_failures=1"]
    full = train(tiny_data, tmp_path / "runs", "full", *common)
    flag = tmp_path / "killed"
    monkeypatch.setattr(launch, "train_worker", _dies_before_commit(str(flag), 3))
    res = train(tiny_data, tmp_path / "runs", "killed", *common)
    assert flag.exists() and res.checkpoint.endswith(checkpoint.dir_name(4))
    # step 3 committed: saved again by the restarted group, which resumed from step 2
    assert [s for s, _ in checkpoint.list_complete(res.run_dir)] == [2, 3, 4]

    a = dict(metric_history(mlflow_uri, full.mlflow_run_id))
    b = metric_history(mlflow_uri, res.mlflow_run_id)  # the killed attempt's losses too
    assert sorted({s for s, _ in b}) == [1, 2, 3, 4] and all(v == a[s] for s, v in b)
