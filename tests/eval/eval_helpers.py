"""Helpers shared by the evaluation and main-job tests (imported by name: no clash with the
`conftest` modules of other test folders)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _train_helpers():
    """tests/train/helpers.py (the tiny dataset writer), under a private module name."""
    spec = importlib.util.spec_from_file_location(
        "_bitlm_train_helpers", ROOT / "tests" / "train" / "helpers.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TINY: list[str] = _train_helpers().TINY


def write_dataset(root: Path, **kw) -> str:
    return _train_helpers().write_dataset(root, **kw)


def eval_children(uri: str, t: Any, finished_only: bool = True) -> list:
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(uri).search_runs(
        [t.experiment_id],
        f"tags.mlflow.parentRunId = '{t.run_id}' and tags.bitlm_kind = 'eval'",
    )
    return [r for r in runs if r.info.status == "FINISHED" or not finished_only]
