"""DeepSpeed's shards are pickles: they are read with weights_only=True (issue 12.5), so a planted
file is refused instead of run, by export/evaluation and by a resuming training alike (real
checkpoints of every ZeRO stage and precision load: test_checkpoint.py). In-process (world size
1, no Ray)."""

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


def test_a_planted_shard_is_refused_not_run(dist_world1, tmp_path, tiny_data):
    from bitlm.safeload import UnsafeCheckpointError
    from bitlm.train.export import load_checkpoint_model

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
