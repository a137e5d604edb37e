"""MLflow for training runs: never fatal.

The driver finds or creates the run whose ``run_name`` equals the Ray Train run name (so a
relaunch logs into the same run) and sets the final status (FINISHED or FAILED). Rank 0 logs
through ``RunLogger``: every call is queued and a background thread sends it; when the server is
unreachable it warns once, keeps the queue, and catches up when the server returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("bitlm.train")

__all__ = ["RunLogger", "default_tracking_uri", "find_or_create_run", "set_final_status"]


def _quick_http() -> None:
    """Fail fast against a dead server (the default retries for minutes)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def default_tracking_uri(storage_path: str) -> str:
    """MLFLOW_TRACKING_URI, else a sqlite store beside the runs (absolute: workers run with
    another cwd). With s3:// storage the embedded store lives in ./runs."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    local = Path("runs" if "://" in storage_path else storage_path).absolute()
    local.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{local / 'mlflow.db'}"


def _artifact_root(tracking_uri: str) -> str | None:
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None


def find_or_create_run(tracking_uri: str, experiment: str, run_name: str, tags: dict) -> str:
    """The id of the run named ``run_name`` in ``experiment`` (created if absent), RUNNING."""
    _quick_http()
    from mlflow.entities import RunStatus
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        try:
            exp_id = client.create_experiment(experiment, _artifact_root(tracking_uri))
        except Exception:  # created concurrently
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    safe = run_name.replace("'", "")
    runs = client.search_runs(
        [exp_id], f"tags.mlflow.runName = '{safe}'", max_results=1, order_by=["start_time DESC"]
    )
    if runs:
        run_id = runs[0].info.run_id
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    else:
        run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    return run_id


def set_final_status(
    tracking_uri: str, run_id: str, ok: bool, error: str = "", retry_s: float = 30.0
) -> None:
    """FINISHED or FAILED (with the error as a tag), retrying for up to ``retry_s`` while the
    server is unreachable; warns instead of raising."""
    _quick_http()
    from mlflow.tracking import MlflowClient

    deadline = time.monotonic() + retry_s
    while True:
        try:
            client = MlflowClient(tracking_uri)
            if error:
                client.set_tag(run_id, "error", error[:4000])
            client.set_terminated(run_id, "FINISHED" if ok else "FAILED")
            return
        except Exception as e:
            if time.monotonic() > deadline:
                log.warning("MLflow: could not set the final status of run %s: %s", run_id, e)
                return
            time.sleep(1.0)


class RunLogger:
    """Queued, non-fatal MLflow logging for one run (rank 0 only)."""

    def __init__(
        self,
        tracking_uri: str,
        run_id: str | None,
        *,
        experiment: str,
        run_name: str,
        system_metrics: bool,
    ) -> None:
        _quick_http()
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri)
        self._uri = tracking_uri
        self._experiment = experiment
        self._run_name = run_name
        self.run_id = run_id
        self._system_metrics = system_metrics
        self._monitor = None
        self._q: queue.Queue[Callable[[], Any] | None] = queue.Queue()
        self._pending: list[Callable[[], Any]] = []
        self._warned = False
        self._down = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlflow-logger", daemon=True)
        self._thread.start()

    # ---- public API (never raises) -----------------------------------------------------------
    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            chunk = items[i : i + 100]
            self._put(lambda c=chunk: self._client.log_batch(self.run_id, params=c))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import math

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, step) for k, v in metrics.items() if math.isfinite(v)]
        if ms:
            self._put(lambda: self._client.log_batch(self.run_id, metrics=ms))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._put(lambda: self._client.log_text(self.run_id, text, artifact_file))

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self._put(lambda k=k, v=v: self._client.set_tag(self.run_id, k, v))

    def close(self, timeout_s: float) -> bool:
        """Flush (waiting at most timeout_s); True if everything was sent."""
        self._q.put(None)
        self._thread.join(timeout_s)
        self._stop.set()
        if self._monitor is not None:
            with contextlib.suppress(Exception):
                self._monitor.finish()
        done = not self._pending and self._q.empty()
        if not done:
            log.warning("MLflow: %d logging calls could not be sent", len(self._pending))
        return done

    # ---- background sender -------------------------------------------------------------------
    def _put(self, fn: Callable[[], Any]) -> None:
        self._q.put(fn)

    def _ensure_run(self) -> None:
        if self.run_id is None:
            self.run_id = find_or_create_run(self._uri, self._experiment, self._run_name, {})
        if self._system_metrics and self._monitor is None:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=5,
                samples_before_logging=2,
                resume_logging=True,
                tracking_uri=self._uri,
            )
            self._monitor.start()

    def _loop(self) -> None:
        closing = False
        while True:
            try:
                item = self._q.get(timeout=1.0 if self._pending else None)
            except queue.Empty:
                item = ...
            if item is None:
                closing = True
            elif item is not ...:
                self._pending.append(item)
            while not self._q.empty():  # drain without blocking
                nxt = self._q.get_nowait()
                if nxt is None:
                    closing = True
                else:
                    self._pending.append(nxt)
            try:
                self._ensure_run()
                while self._pending:
                    self._pending[0]()
                    self._pending.pop(0)
                if self._down:
                    log.warning("MLflow: server reachable again, logging caught up")
                    self._down = False
            except Exception as e:
                self._down = True
                if not self._warned:
                    log.warning(
                        "MLflow unreachable (%s); training goes on, logging will catch up",
                        type(e).__name__,
                    )
                    self._warned = True
                if self._stop.wait(2.0):
                    return
            if closing and not self._pending:
                return
