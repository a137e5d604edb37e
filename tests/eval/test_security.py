"""What evaluation loads (issue 12.5). Anyone who can create an MLflow run can log any
storage_path: evaluation resolves a name in one experiment only, loads run folders only from
trusted storage roots, an explicit checkpoint only from the run's own folder, and reads
DeepSpeed's pickled shards with weights_only=True. Every "checkpoint" here is planted: its
shards, when unpickled without restriction, create a marker file. No training, no Ray."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bitlm.eval.cli import evaluate_main


class _Plant:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))  # unpickling creates the file


def plant_checkpoint(run_dir: Path, data: str, marker: Path) -> Path:
    """A complete-looking checkpoint_00000002 of the dataset whose shards are payloads."""
    from bitlm.train.config import TrainRecipe
    from bitlm.train.data import Manifest

    ck = run_dir / "checkpoint_00000002"
    (ck / "ds").mkdir(parents=True)
    (ck / "rng").mkdir()
    man = Manifest.load(data)
    state = {"step": 2, "tokens_seen": 0, "world_size": 1, "fingerprint": man.fingerprint("train")}
    (ck / "trainer_state.json").write_text(json.dumps(state))
    (ck / "recipe.yaml").write_text(TrainRecipe().to_yaml())
    for name in ("code_table.json", "tokenizer.json"):
        shutil.copy(Path(data) / name, ck / name)
    torch.save({"torch": torch.get_rng_state()}, ck / "rng" / "rank_0.pt")
    for shard in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save(_Plant(marker), ck / "ds" / shard)
    return ck


def register(uri: str, experiment: str, name: str, storage: Path, data: str) -> str:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else c.create_experiment(experiment)
    run_id = c.create_run(exp_id, run_name=name).info.run_id
    c.log_param(run_id, "storage_path", str(storage))
    c.log_param(run_id, "data.path", data)
    return run_id


def _evaluate(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = evaluate_main([*argv, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return rc, err


@pytest.fixture
def marker(tmp_path) -> Path:
    m = tmp_path / "code-ran"
    yield m
    assert not m.exists(), "a planted pickle was executed"


def test_shards_are_read_weights_only(eval_store, eval_data, tmp_path, marker, capsys):
    """A run under a trusted root: the planted shards are refused, nothing runs."""
    storage = tmp_path / "trusted"
    register(eval_store, "sec-weights", "planted", storage, eval_data)
    ck = plant_checkpoint(storage / "planted", eval_data, marker)
    rc, err = _evaluate(capsys, "--run", "planted", "--storage-root", str(storage))
    assert rc == 1, err  # this checkpoint failed (the others of a run would go on)
    assert "step 2: FAILED: UnsafeCheckpointError" in err
    assert "refusing to load a file that holds more than tensors" in err
    assert not marker.exists()
    torch.load(ck / "ds" / "mp_rank_00_model_states.pt", weights_only=False)  # a live payload
    assert marker.exists()
    marker.unlink()


def test_run_folders_outside_the_storage_roots_are_refused(
    eval_store, eval_data, tmp_path, marker, capsys, monkeypatch
):
    monkeypatch.delenv("BITLM_STORAGE_ROOTS", raising=False)
    storage = tmp_path / "elsewhere"
    register(eval_store, "sec-roots", "stray", storage, eval_data)
    plant_checkpoint(storage / "stray", eval_data, marker)
    rc, err = _evaluate(capsys, "--run", "stray")
    assert rc == 2 and err.count("\n") == 0, err
    assert f"points at {storage / 'stray'}, outside the storage roots" in err
    # a symlink inside a trusted root does not lead out of it
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "stray").symlink_to(storage / "stray")
    register(eval_store, "sec-roots", "stray", trusted, eval_data)
    rc, err = _evaluate(capsys, "--run", "stray", "--storage-root", str(trusted))
    assert rc == 2 and "outside the storage roots" in err, err


def test_names_resolve_in_one_experiment_only(eval_store, eval_data, tmp_path, marker, capsys):
    storage = tmp_path / "trusted"
    root = ["--storage-root", str(storage)]
    register(eval_store, "sec-team-a", "twin", storage, eval_data)
    register(eval_store, "sec-team-b", "twin", storage, eval_data)
    rc, err = _evaluate(capsys, "--run", "twin", *root)
    assert rc == 2 and "run name 'twin' is ambiguous" in err, err
    assert "'sec-team-a'" in err and "pass --experiment" in err
    rc, err = _evaluate(capsys, "--run", "twin", "--experiment", "sec-team-a", *root)
    assert rc == 2 and "has no complete checkpoint" in err, err  # resolved, then nothing there

    # A reference given by name is looked up in the evaluated run's own experiment.
    register(eval_store, "sec-team-a", "good", storage, eval_data)
    plant_checkpoint(storage / "good", eval_data, marker)
    register(eval_store, "sec-team-b", "their-ref", storage, eval_data)
    plant_checkpoint(storage / "their-ref", eval_data, marker)
    args = ["--run", "good", "--experiment", "sec-team-a", "--reference", "their-ref", *root]
    rc, err = _evaluate(capsys, *args)
    assert rc == 2 and "unknown run 'their-ref'" in err and "in experiment" in err, err


def test_an_explicit_checkpoint_must_be_the_runs_own(
    eval_store, eval_data, tmp_path, marker, capsys
):
    storage = tmp_path / "trusted"
    register(eval_store, "sec-own", "mine", storage, eval_data)
    (storage / "mine").mkdir(parents=True)
    other = plant_checkpoint(tmp_path / "somewhere" / "else", eval_data, marker)
    args = ["--run", "mine", "--checkpoint", str(other), "--storage-root", str(storage)]
    rc, err = _evaluate(capsys, *args)
    assert rc == 2 and f"{other} is not a checkpoint of run 'mine'" in err, err
