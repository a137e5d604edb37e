"""DeepSpeed's shards are pickles: they are read with weights_only=True (issue 12.5), so a planted
file is refused instead of run, by export/evaluation and by a resuming training alike; real
checkpoints of every ZeRO stage and precision still load (and evaluation lists them).
In-process (world size 1, no Ray)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import local_recipe

from bitlm.train.worker import FATAL_FILE, LocalSession, train_worker


class _Plant:
    """Unpickling this calls open(path, "w"): the file appearing means code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _train(data, storage, name, *extra):
    r = local_recipe(
        data, storage, name, "mlflow.enabled=false", "checkpoint.every_steps=0", *extra
    )
    train_worker({"recipe": r.to_dict()}, LocalSession(str(storage), name, keep=1))
    return storage / name


@pytest.mark.parametrize(("stage", "precision"), [(1, "bf16"), (3, "fp32")])
def test_checkpoints_of_every_layout_are_listed_and_load(
    dist_world1, tmp_path, tiny_data, stage, precision
):
    """bf16 names the optimizer shards bf16_zero_pp_rank_*, ZeRO-3 keeps the model states per
    rank: evaluation used to see neither."""
    from bitlm.eval.evaluate import list_checkpoints
    from bitlm.train.data import Dataset
    from bitlm.train.export import load_checkpoint_model
    from bitlm.train.worker import probe_loss

    run_dir = _train(
        tiny_data,
        tmp_path / "runs",
        "layout",
        f"zero_stage={stage}",
        f"precision={precision}",
        "steps=1",
    )
    ckpts = list_checkpoints(str(run_dir))
    assert [s for s, _ in ckpts] == [1]
    model, recipe, state = load_checkpoint_model(ckpts[0][1])
    if precision == "fp32":  # the export reproduces the trained model (bf16 rounds)
        probe = probe_loss(model, Dataset(tiny_data, "train"), recipe)
        assert probe == pytest.approx(state["probe_loss"], rel=1e-6, abs=1e-7)


def test_a_planted_shard_is_refused_not_run(dist_world1, tmp_path, tiny_data):
    from bitlm.train.export import load_checkpoint_model
    from bitlm.train.safeload import UnsafeCheckpointError

    storage = tmp_path / "runs"
    run_dir = _train(tiny_data, storage, "planted", "zero_stage=1", "steps=1")
    ckpt = run_dir / "checkpoint_00000001"
    shard = ckpt / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker = tmp_path / "code-ran"
    torch.save(_Plant(marker), shard)

    with pytest.raises(UnsafeCheckpointError, match="refusing to load a file that holds more"):
        load_checkpoint_model(str(ckpt))  # export and evaluation
    assert not marker.exists()

    _train(tiny_data, storage, "planted", "zero_stage=1", "steps=2")  # resume
    fatal = json.loads((run_dir / FATAL_FILE).read_text())
    assert "refusing to load a file that holds more than tensors" in fatal["error"]
    assert not marker.exists()

    copy = tmp_path / "copy.pt"  # the payload is live: an unrestricted load runs it
    shutil.copy(shard, copy)
    torch.load(copy, weights_only=False)
    assert marker.exists()
