"""MLflow failures stay local (issue 12.3), against a real `mlflow server` on loopback whose
artifact store is broken (conftest's mlflow_server: every upload is a 500):

- a call that fails for good (a 4xx, or a 500 while the server answers everything else) is
  dropped with one warning, and the calls behind it are sent;
- an outage is retried, nothing is dropped, logging catches up when the server returns;
- relaunching a run with changed params works and says what changed (Ray, two fits)."""

from __future__ import annotations

import logging
import time
import uuid

import pytest
from faults import NanLossAt
from helpers import metric_history, train

from bitlm.tracking import MAX_ATTEMPTS, RunLogger


@pytest.fixture
def server(mlflow_server):
    return mlflow_server


def _new_run(uri: str) -> str:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.create_experiment(f"t-{uuid.uuid4().hex[:8]}")
    return c.create_run(exp, run_name="r").info.run_id


def _logger(uri: str, run_id: str) -> RunLogger:
    return RunLogger(uri, run_id, experiment="-", run_name="r", system_metrics=False)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_permanent_failures_are_dropped_with_one_warning(server, caplog):
    from mlflow.tracking import MlflowClient

    caplog.set_level(logging.WARNING, logger="bitlm.tracking")
    c = MlflowClient(server.uri)
    run_id = _new_run(server.uri)
    c.log_param(run_id, "optim.lr", "0.003")
    lg = _logger(server.uri, run_id)
    lg.log_metrics({"m": 1.0}, 1)
    lg.log_params({"optim.lr": "0.001"})  # 400: a logged param cannot change
    lg.log_metrics({"bad name!": 1.0}, 2)  # 400: not a metric name
    lg.log_metrics({"bad name!": 1.0}, 3)  # the same failure again: no second warning
    lg.log_text("hello", "notes.txt")  # 500 from the broken artifact store, server answers
    lg.log_metrics({"m": 2.0}, 4)
    lg.set_tags({"after": "yes"})
    t0 = time.monotonic()
    assert lg.close(30)
    assert time.monotonic() - t0 < 20  # nothing waited for a flush timeout

    assert metric_history(server.uri, run_id, "m") == [(1, 1.0), (4, 2.0)]
    run = c.get_run(run_id)
    assert run.data.params["optim.lr"] == "0.003" and run.data.tags["after"] == "yes"
    assert [w for w, _ in lg.dropped] == [
        "log_params",
        "log_metrics(step 2)",
        "log_metrics(step 3)",
        "log_text(notes.txt)",
    ]
    dropped = [w for w in _warnings(caplog) if w.startswith("MLflow: dropped")]
    assert len(dropped) == 3, dropped  # one per kind of failure
    assert "Changing param values is not allowed" in dropped[0]
    assert "after 1 attempt(s)" in dropped[0]  # a 4xx is not retried
    assert f"log_text(notes.txt) after {MAX_ATTEMPTS} attempt(s)" in dropped[2]
    assert "MLflow: 4 logging calls were dropped in all" in _warnings(caplog)
    assert not any("unreachable" in w for w in _warnings(caplog))


def test_an_outage_is_retried_until_the_server_returns(server, caplog):
    caplog.set_level(logging.WARNING, logger="bitlm.tracking")
    run_id = _new_run(server.uri)
    lg = _logger(server.uri, run_id)
    lg.log_metrics({"m": 1.0}, 1)
    deadline = time.monotonic() + 30
    while not metric_history(server.uri, run_id, "m") and time.monotonic() < deadline:
        time.sleep(0.2)
    server.stop()
    try:
        for step in (2, 3):
            lg.log_metrics({"m": float(step)}, step)
        lg.log_params({"p": "1"})
        time.sleep(7)  # several retry rounds: an outage must never count as a bad call
    finally:
        server.start()
    assert lg.close(60)
    assert metric_history(server.uri, run_id, "m") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    from mlflow.tracking import MlflowClient

    assert MlflowClient(server.uri).get_run(run_id).data.params["p"] == "1"
    assert lg.dropped == []
    w = _warnings(caplog)
    assert sum("MLflow unreachable" in x for x in w) == 1, w
    assert sum("reachable again" in x for x in w) == 1, w


@pytest.mark.ray
@pytest.mark.slow
def test_relaunch_with_changed_params(ray_local, tiny_data, tmp_path, server, monkeypatch, caplog):
    """A first launch stops before its first checkpoint (NaN at step 2); the relaunch under the
    same name, with another learning rate, starts from scratch: it logs its params again,
    which MLflow refuses for the changed ones. The run goes on, its metrics arrive, and the
    driver says what changed (also as tags)."""
    from mlflow.tracking import MlflowClient

    from bitlm.train import TrainingAborted

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    caplog.set_level(logging.WARNING, logger="bitlm.train")
    common = ["steps=3", "checkpoint.every_steps=0", "mlflow.flush_timeout_s=20"]
    with pytest.raises(TrainingAborted):
        train(
            tiny_data,
            tmp_path / "runs",
            "relaunch",
            *common,
            "failure.max_nonfinite_steps=1",
            callbacks=[NanLossAt(2)],
        )
    assert not any("changed params" in w for w in _warnings(caplog))  # a first launch
    res = train(tiny_data, tmp_path / "runs", "relaunch", *common, "optim.lr=0.001")

    said = [w for w in _warnings(caplog) if "relaunched with changed params" in w]
    assert len(said) == 1, _warnings(caplog)
    assert "optim.lr: 0.003 -> 0.001" in said[0]
    assert "failure.max_nonfinite_steps: 1 -> 10" in said[0]
    run = MlflowClient(server.uri).get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.003"  # MLflow keeps the first value ...
    assert run.data.tags["changed.optim.lr"] == "0.003 -> 0.001"  # ... and the change is a tag
    steps = [s for s, _ in metric_history(server.uri, res.mlflow_run_id)]
    assert sorted(set(steps)) == [1, 2, 3]  # the relaunch's metrics all arrived
