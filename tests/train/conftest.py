"""Fixtures for the training tests: a tiny dataset written per docs/dataset-format.md and the
tiny model/recipe overrides every run uses."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import MlflowServer, free_port, write_dataset


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="session")
def dist_world1():
    """An in-process gloo process group of world size 1 (env://), kept for the session:
    DeepSpeed caches its groups, so it is created once and never torn down."""
    import torch.distributed as dist

    if not dist.is_initialized():
        for k, v in {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
        }.items():
            os.environ.setdefault(k, v)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        dist.init_process_group("gloo")
    yield


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty, migrated MLflow sqlite store (creating one costs ~16 s; copies are free)."""
    from bitlm.tracking import find_or_create_run

    db = tmp_path_factory.mktemp("mlflow") / "template.db"
    find_or_create_run(f"sqlite:///{db}", "warmup", "warmup", {})
    return db


@pytest.fixture
def mlflow_uri(mlflow_template, tmp_path, monkeypatch) -> str:
    """A fresh sqlite tracking store for one test, exported as MLFLOW_TRACKING_URI."""
    import shutil

    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_template, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, mlflow_template):
    """A real `mlflow server` on loopback for the session, its artifact store broken on purpose
    (the destination lies under a regular file: every upload answers 500)."""
    import shutil

    base = tmp_path_factory.mktemp("mlflow-server")
    shutil.copy(mlflow_template, base / "server.db")
    (base / "not-a-dir").write_text("")
    srv = MlflowServer(base / "server.db", base / "not-a-dir" / "artifacts")
    srv.start()
    yield srv
    srv.stop()
