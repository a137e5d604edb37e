"""Fixtures of the evaluation tests: one tiny dataset, one MLflow store and ONE short training run
(two checkpoints, automatic evaluation on) shared by the whole session: each Ray Train fit costs
15-20 s on 2 cores."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from eval_helpers import TINY, write_dataset


@dataclass
class Trained:
    uri: str
    data: str
    storage: Path
    name: str
    run_id: str
    experiment_id: str
    checkpoints: list[tuple[int, str]]
    reference: str  # a consolidated AR model folder (softmax head) that scores samples


@pytest.fixture(scope="session")
def eval_store(tmp_path_factory) -> str:
    """One sqlite MLflow store for the session, exported as MLFLOW_TRACKING_URI."""
    from bitlm.tracking import find_or_create_run

    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    uri = f"sqlite:///{db}"
    find_or_create_run(uri, "warmup", "warmup", {})  # creates the tables once (~15 s)
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="session")
def eval_data(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("data") / "tiny")


def make_reference(data: str, out: Path) -> str:
    """An (untrained) AR model on the dataset's vocabulary, as a consolidated folder."""
    import torch

    from bitlm.config import ModelConfig
    from bitlm.model import BitLM
    from bitlm.train.data import Manifest

    man = Manifest.load(data)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=man.vocab_size,
        block_size=1,
        input="embedding",
        output_head="softmax",
        d_model=32,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
    )
    BitLM(cfg, man.code_table()).save_pretrained(out)
    shutil.copy(Path(data) / "tokenizer.json", out / "tokenizer.json")
    return str(out)


@pytest.fixture(scope="session")
def trained(ray_local, eval_store, eval_data, tmp_path_factory) -> Trained:
    """A 4-step run checkpointing at steps 2 and 4 with eval.auto on, wired as jobs/pretrain.py
    wires it: the driver starts the watcher and waits for it, so its evaluations exist when
    training returns."""
    from mlflow.tracking import MlflowClient

    from bitlm.checkpoint import list_complete
    from bitlm.eval.evaluate import start_auto_eval
    from bitlm.train import load_train_recipe, run

    base = tmp_path_factory.mktemp("eval")
    ref = make_reference(eval_data, base / "reference")
    storage = base / "runs"
    os.environ["BITLM_STORAGE_ROOTS"] = str(storage)  # evaluation loads from trusted roots only
    recipe = load_train_recipe(
        None,
        [
            *TINY,
            f"data.path={eval_data}",
            f"storage_path={storage}",
            "steps=4",
            "checkpoint.every_steps=2",
            "checkpoint.keep_last=3",
            "eval.auto=true",
            f"eval.reference_run={ref}",
        ],
        "auto",
    )
    res = run(recipe, on_start=start_auto_eval)
    run_ = MlflowClient(eval_store).get_run(res.mlflow_run_id)
    yield Trained(
        uri=eval_store,
        data=eval_data,
        storage=storage,
        name="auto",
        run_id=res.mlflow_run_id,
        experiment_id=run_.info.experiment_id,
        checkpoints=list_complete(str(storage / "auto")),
        reference=ref,
    )
    os.environ.pop("BITLM_STORAGE_ROOTS", None)
