"""The worker loop in-process (world size 1, gloo via env://, no Ray): the dataset fingerprint
guards resume, keep-last-k, and the checkpoint layout docs/training.md documents."""

from __future__ import annotations

import json

from faults import StopAfter
from helpers import local_recipe, write_dataset

from bitlm.train.worker import FATAL_FILE, LocalSession, train_worker


def _recipe(data, storage, *extra):
    return local_recipe(data, storage, "local", "mlflow.enabled=false", "zero_stage=1", *extra)


def test_changed_data_refuses_to_resume_unless_overridden(dist_world1, tmp_path, tiny_data):
    storage = tmp_path / "runs"
    r = _recipe(
        tiny_data,
        storage,
        "steps=4",
        "checkpoint.keep_last=1",
        "checkpoint.every_steps=1",
    )
    s = LocalSession(str(storage), "local", keep=1)
    train_worker({"recipe": r.to_dict()}, s, [StopAfter(2)])
    ckpts = sorted(p.name for p in (storage / "local").glob("checkpoint_*"))
    assert ckpts == ["checkpoint_00000002"]  # keep-last-1
    ck = storage / "local" / ckpts[0]
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["tokens_seen"] == 2 * 4 * 32
    assert state["data_position"] == 8 and state["world_size"] == 1
    for name in ("recipe.yaml", "tokenizer.json", "code_table.json", "rng/rank_0.pt", "latest"):
        assert (ck / name).is_file(), name

    other = write_dataset(tmp_path / "other", train_rows=40)  # same shapes, different data
    r2 = _recipe(other, storage, "steps=4")
    train_worker({"recipe": r2.to_dict()}, LocalSession(str(storage), "local", keep=1))
    fatal = json.loads((storage / "local" / FATAL_FILE).read_text())
    assert "dataset changed" in fatal["error"] and "allow_fingerprint_change" in fatal["error"]
    assert sorted(p.name for p in (storage / "local").glob("checkpoint_*")) == ckpts

    r3 = _recipe(other, storage, "steps=4", "data.allow_fingerprint_change=true")
    s3 = LocalSession(str(storage), "local", keep=1)
    train_worker({"recipe": r3.to_dict()}, s3)
    assert [x["step"] for x in s3.reports] == [4]  # resumed at 2, finished at 4


def test_time_policy_checkpoints_and_spike_guard(dist_world1, tmp_path, tiny_data):
    import pytest

    from bitlm.train.callbacks import spike_guard as _guard
    from bitlm.train.trainer import FatalTrainingError

    storage = tmp_path / "runs"
    r = _recipe(
        tiny_data,
        storage,
        "steps=3",
        "checkpoint.every_steps=0",
        "checkpoint.every_minutes=0.00001",
        "checkpoint.at_end=false",
        "checkpoint.keep_last=5",
        "eval.every_steps=2",  # eval loss + generated samples, in-process
    )
    s = LocalSession(str(storage), "local", keep=5)
    train_worker({"recipe": r.to_dict()}, s)
    assert [x["step"] for x in s.reports] == [1, 2, 3]  # the clock, not the step count

    g = _recipe(tiny_data, storage, "failure.spike_ratio=2.0", "failure.spike_warmup_steps=5")
    _guard(g, 10, 1.9, ema=1.0)  # below the threshold
    _guard(g, 3, 5.0, ema=1.0)  # not armed yet
    with pytest.raises(FatalTrainingError, match="loss spike at step 10"):
        _guard(g, 10, 2.5, ema=1.0)
    _guard(g, 10, float("inf"), ema=1.0)  # non-finite steps are NonFiniteGuard's (test_nonfinite)
