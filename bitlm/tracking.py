"""MLflow tracking, the one owner of how this project talks to MLflow (a leaf: imports nothing
of bitlm; MLflow lazily).

- Client settings: ``client()`` is every MLflow client of the project, with ONE definition of
  the HTTP retries and timeout (fail fast; each caller retries at its own level);
  ``default_tracking_uri``, ``split_credentials``.
- Runs: a training run is the run whose ``run_name`` equals the Ray Train run name
  (``find_or_create_run``: a relaunch logs into the same run; ``set_final_status``);
  ``find_run`` resolves an id or a name back to it for evaluation and comparison.
- Evaluation child runs: one per (training run, checkpoint step), tags ``bitlm_kind=eval`` and
  ``bitlm_eval_step=<step>``; ``claim_eval`` creates one unless a FINISHED one exists or a live
  evaluator holds it, ``finish_eval`` logs its results, ``eval_children`` and
  ``evaluated_steps`` read them back.
- Logging: rank 0 logs through ``RunLogger``: every call is queued and a background thread
  sends it; never fatal.

Failures are told apart by asking the server: when a call fails and the server does not answer
either, the server is down (warn once, keep everything, catch up when it returns: transient);
when the server answers, the call itself is bad: a 4xx (a changed param, a bad metric name, a
deleted run) is dropped at once, anything else (a broken artifact store answering 500) after
``MAX_ATTEMPTS`` tries; each is dropped with one warning and never holds up the calls behind it.

MLflow params are immutable, so a relaunch with changed values cannot log them: ``sync_params``
logs the new keys, records each changed one as a tag ``changed.<key>`` = ``"<first> -> <now>"``
and returns the changes, which the driver prints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("bitlm.tracking")

__all__ = [
    "KIND_TAG",
    "MAX_ATTEMPTS",
    "STEP_TAG",
    "RunLogger",
    "RunLookupError",
    "claim_eval",
    "client",
    "default_tracking_uri",
    "describe_changes",
    "eval_children",
    "evaluated_steps",
    "find_or_create_run",
    "find_run",
    "finish_eval",
    "is_permanent",
    "is_training_run",
    "set_final_status",
    "split_credentials",
    "sync_params",
]

# The HTTP settings of every MLflow client here: fail fast against a dead server (MLflow's
# default retries for minutes); the logger's queue, the final status and the evaluation watcher
# retry at their own level. Values set in the environment win.
HTTP_MAX_RETRIES = 0
HTTP_TIMEOUT_S = 5
MAX_ATTEMPTS = 3  # tries of a call that fails while the server answers other requests
PARAM_LIMIT = 6000  # MLflow's longest param value
CHANGED_TAG = "changed."
KIND_TAG = "bitlm_kind"  # train (or absent) | eval | compare
STEP_TAG = "bitlm_eval_step"  # the checkpoint step an eval child run evaluated
OWNER_TAG = "bitlm_eval_owner"  # host:pid of the evaluating process
STALE_CLAIM_S = 1800.0  # a RUNNING eval child older than this is a crashed evaluator's
_OWNER = f"{socket.gethostname()}:{os.getpid()}"


class RunLookupError(ValueError):
    """No run or experiment of that id or name, or a name held in several experiments."""


def client(tracking_uri: str) -> Any:
    """An MlflowClient with this module's HTTP settings."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(HTTP_MAX_RETRIES))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(HTTP_TIMEOUT_S))
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def _http_status(e: BaseException) -> int | None:
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        return e.get_http_status_code()
    return getattr(getattr(e, "response", None), "status_code", None)


def is_permanent(e: BaseException) -> bool:
    """A 4xx answer (bad request, conflict, not found, forbidden): retrying cannot help.
    Timeouts (408) and rate limits (429) are transient."""
    status = _http_status(e)
    return status is not None and 400 <= status < 500 and status not in (408, 429)


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def sync_params(client: Any, run_id: str, params: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Log the params the run does not have yet; a param logged before with another value
    (a relaunch with a changed recipe) becomes the tag ``changed.<key>`` = ``"old -> new"``.
    Returns {key: (logged value, new value)} of the changed ones."""
    from mlflow.entities import Param, RunTag

    logged = client.get_run(run_id).data.params
    values = {k: str(v)[:PARAM_LIMIT] for k, v in params.items()}
    new = [Param(k, v) for k, v in values.items() if k not in logged]
    changed = {k: (logged[k], v) for k, v in values.items() if k in logged and logged[k] != v}
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i : i + 100])
    tags = [
        RunTag(f"{CHANGED_TAG}{k}", f"{a} -> {b}"[:PARAM_LIMIT]) for k, (a, b) in changed.items()
    ]
    for i in range(0, len(tags), 100):
        client.log_batch(run_id, tags=tags[i : i + 100])
    return changed


def describe_changes(changed: dict[str, tuple[str, str]]) -> str:
    return "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in sorted(changed.items()))


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """``http://user:secret@host/...`` -> (``http://host/...``, user, secret): the URI may
    travel (to Ray workers, into logs), the credentials only in the environment
    (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, which MLflow reads)."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if "@" not in parts.netloc or parts.scheme not in ("http", "https"):
        return uri, None, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    clean = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return clean, unquote(user) or None, unquote(password) or None


def default_tracking_uri(storage_path: str = "runs") -> str:
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
    from mlflow.entities import RunStatus

    c = client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        try:
            exp_id = c.create_experiment(experiment, _artifact_root(tracking_uri))
        except Exception:  # created concurrently
            exp = c.get_experiment_by_name(experiment)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    safe = run_name.replace("'", "")
    runs = c.search_runs(
        [exp_id], f"tags.mlflow.runName = '{safe}'", max_results=1, order_by=["start_time DESC"]
    )
    if runs:
        run_id = runs[0].info.run_id
        c.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    else:
        run_id = c.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    return run_id


def set_final_status(
    tracking_uri: str, run_id: str, ok: bool, error: str = "", retry_s: float = 30.0
) -> None:
    """FINISHED or FAILED (with the error as a tag), retrying for up to ``retry_s`` while the
    server is unreachable; warns instead of raising."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            c = client(tracking_uri)
            if error:
                c.set_tag(run_id, "error", error[:4000])
            c.set_terminated(run_id, "FINISHED" if ok else "FAILED")
            return
        except Exception as e:
            if is_permanent(e) or time.monotonic() > deadline:
                log.warning("MLflow: could not set the final status of run %s: %s", run_id, e)
                return
            time.sleep(1.0)


def is_training_run(run: Any) -> bool:
    """A training run, not an evaluation child or a comparison."""
    tags = run.data.tags
    return tags.get(KIND_TAG) in (None, "train") and "mlflow.parentRunId" not in tags


def find_run(
    c: Any,
    run: str,
    experiment: str | None = None,
    *,
    experiment_id: str | None = None,
    unique: bool = False,
) -> Any:
    """An MLflow run by id, else the newest training run with that name: in ``experiment``
    (a name) or ``experiment_id`` when given, else in any experiment; with ``unique``, a name
    held by training runs of several experiments is an error (which one to load is not ours
    to guess: anyone who can write to another experiment could plant a run of that name)."""
    import mlflow.exceptions

    if experiment is not None:
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            raise RunLookupError(f"unknown experiment {experiment!r}")
        experiment_id = exp.experiment_id
    if len(run) == 32 and all(ch in "0123456789abcdef" for ch in run):
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            r = c.get_run(run)
            if experiment_id is not None and r.info.experiment_id != experiment_id:
                raise RunLookupError(
                    f"run {run} is not in experiment {experiment or experiment_id}"
                )
            return r
    safe = run.replace("'", "")
    if experiment_id is not None:
        exps = [experiment_id]
    else:
        exps = [e.experiment_id for e in c.search_experiments()]
    found = [
        r
        for r in c.search_runs(
            exps, f"tags.mlflow.runName = '{safe}'", order_by=["start_time DESC"]
        )
        if is_training_run(r)
    ]
    if not found:
        where = f" in experiment {experiment or experiment_id}" if experiment_id else ""
        raise RunLookupError(f"unknown run {run!r}: no MLflow run with that id or name{where}")
    holders = sorted({r.info.experiment_id for r in found})
    if unique and len(holders) > 1:
        names = ", ".join(repr(c.get_experiment(e).name) for e in holders)
        raise RunLookupError(
            f"run name {run!r} is ambiguous: training runs of that name are in experiments "
            f"{names}; pass --experiment NAME (or the run id)"
        )
    return found[0]


# ---- evaluation child runs -------------------------------------------------------------------
def eval_children(c: Any, experiment_id: str, parent_id: str, step: int | None = None) -> list:
    """The evaluation child runs of a training run (of one checkpoint step), oldest first."""
    where = f"tags.mlflow.parentRunId = '{parent_id}' and tags.{KIND_TAG} = 'eval'"
    if step is not None:
        where += f" and tags.{STEP_TAG} = '{step}'"
    return c.search_runs([experiment_id], where, max_results=5000, order_by=["start_time ASC"])


def evaluated_steps(c: Any, experiment_id: str, parent_id: str) -> set[int]:
    """Steps of a training run with a FINISHED evaluation child run."""
    runs = eval_children(c, experiment_id, parent_id)
    return {int(r.data.tags[STEP_TAG]) for r in runs if r.info.status == "FINISHED"}


def _owner_alive(owner: str) -> bool:
    """False only when the claiming process ran on this host and is gone."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def claim_eval(
    c: Any, experiment_id: str, parent_id: str, parent_name: str, step: int, ckpt: str
) -> tuple[str | None, str]:
    """Create the RUNNING child run for (parent, step) unless one is FINISHED ("skipped") or
    another live evaluator holds it ("busy"). Returns (child run id or None, why not)."""
    now = time.time() * 1000
    for r in eval_children(c, experiment_id, parent_id, step):
        if r.info.status == "FINISHED":
            return None, "skipped"
        live = now - r.info.start_time < STALE_CLAIM_S * 1000
        if r.info.status == "RUNNING" and live and _owner_alive(r.data.tags.get(OWNER_TAG, "")):
            return None, "busy"
        c.delete_run(r.info.run_id)  # failed or abandoned attempt
    child = c.create_run(
        experiment_id,
        run_name=f"{parent_name}-eval-{step:08d}",
        tags={
            "mlflow.parentRunId": parent_id,
            KIND_TAG: "eval",
            STEP_TAG: str(step),
            OWNER_TAG: _OWNER,
            "bitlm_eval_checkpoint": ckpt,
        },
    )
    cid = child.info.run_id
    first = eval_children(c, experiment_id, parent_id, step)[0]  # concurrent: the older wins
    if first.info.run_id != cid and first.info.status == "RUNNING":
        c.delete_run(cid)
        return None, "busy"
    return cid, ""


def finish_eval(
    c: Any,
    cid: str,
    step: int,
    metrics: dict[str, float],
    params: dict[str, Any],
    texts: dict[str, str],
) -> None:
    """Log an evaluation's metrics (at ``step``), params and text artifacts (path -> text,
    plus metrics.json) into its child run, then mark it FINISHED."""
    from mlflow.entities import Metric, Param

    ts = int(time.time() * 1000)
    ms = [Metric(k, float(v), ts, step) for k, v in metrics.items() if math.isfinite(v)]
    ps = [Param(k, str(v)[:PARAM_LIMIT]) for k, v in params.items()]
    c.log_batch(cid, metrics=ms, params=ps)
    for path, text in texts.items():
        c.log_text(cid, text, path)
    c.log_text(cid, json.dumps(metrics, indent=1, sort_keys=True), "metrics.json")
    c.set_terminated(cid, "FINISHED")


class _Call:
    """One queued MLflow call: what it is (for the warning) and how often it failed while the
    server was answering."""

    __slots__ = ("attempts", "fn", "what")

    def __init__(self, what: str, fn: Callable[[], Any]) -> None:
        self.what, self.fn, self.attempts = what, fn, 0


class _Down(Exception):
    """The tracking server does not answer: keep everything and wait."""


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
        self._client = client(tracking_uri)
        self._uri = tracking_uri
        self._experiment = experiment
        self._run_name = run_name
        self.run_id = run_id
        self._system_metrics = system_metrics
        self._monitor = None
        self._q: queue.Queue[_Call | None] = queue.Queue()
        self._pending: list[_Call] = []
        self._warned = False
        self._down = False
        self.dropped: list[tuple[str, str]] = []  # (call, reason) of every dropped call
        self._told: set[tuple[str, str]] = set()
        self.changed: dict[str, tuple[str, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlflow-logger", daemon=True)
        self._thread.start()

    # ---- public API (never raises) -----------------------------------------------------------
    def log_params(self, params: dict[str, str]) -> None:
        """Log params as they are (a value that differs from a logged one is a 400: dropped)."""
        from mlflow.entities import Param

        items = [Param(k, str(v)[:PARAM_LIMIT]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            chunk = items[i : i + 100]
            self._put("log_params", lambda c=chunk: self._client.log_batch(self.run_id, params=c))

    def sync_params(self, params: dict[str, str], announce: bool = True) -> None:
        """``sync_params`` in the background: new keys logged, changed ones tagged (and,
        with ``announce``, one warning naming them)."""

        def send() -> None:
            self.changed = sync_params(self._client, self.run_id, params)
            if self.changed and announce:
                log.warning(
                    "MLflow run %s: params changed since the first launch (kept as tags "
                    "changed.<key>): %s",
                    self._run_name,
                    describe_changes(self.changed),
                )

        self._put("sync_params", send)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import math

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, step) for k, v in metrics.items() if math.isfinite(v)]
        if ms:
            self._put(
                f"log_metrics(step {step})",
                lambda: self._client.log_batch(self.run_id, metrics=ms),
            )

    def log_text(self, text: str, artifact_file: str) -> None:
        self._put(
            f"log_text({artifact_file})",
            lambda: self._client.log_text(self.run_id, text, artifact_file),
        )

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self._put(f"set_tag({k})", lambda k=k, v=v: self._client.set_tag(self.run_id, k, v))

    def close(self, timeout_s: float) -> bool:
        """Flush (waiting at most timeout_s); True if everything was sent or dropped."""
        self._q.put(None)
        self._thread.join(timeout_s)
        self._stop.set()
        if self._monitor is not None:
            with contextlib.suppress(Exception):
                self._monitor.finish()
        done = not self._pending and self._q.empty()
        if not done:
            log.warning("MLflow: %d logging calls could not be sent", len(self._pending))
        if self.dropped:
            log.warning("MLflow: %d logging calls were dropped in all", len(self.dropped))
        return done

    # ---- background sender -------------------------------------------------------------------
    def _put(self, what: str, fn: Callable[[], Any]) -> None:
        self._q.put(_Call(what, fn))

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

    def _answers(self) -> bool:
        """Does the tracking server answer at all? (Twice: a failed upload can leave a reset
        connection in the pool, which only the first request after it finds.)"""
        for _ in range(2):
            try:
                self._client.search_experiments(max_results=1)
                return True
            except Exception:
                continue
        return False

    def _drop(self, call: _Call, e: BaseException) -> None:
        reason = _reason(e)
        self.dropped.append((call.what, reason))
        kind = (call.what.split("(", 1)[0], reason[:120])
        if kind in self._told:  # one warning per kind of failure, not one per step
            log.debug("MLflow: dropped %s: %s", call.what, reason)
            return
        self._told.add(kind)
        log.warning(
            "MLflow: dropped %s after %d attempt(s), the calls behind it go on: %s",
            call.what,
            call.attempts,
            reason,
        )

    def _send(self) -> None:
        """Send what is pending, in order; raises _Down (keeping the rest) when the server is
        down. A call that fails while the server answers is dropped (4xx) or kept for a later
        round (at most MAX_ATTEMPTS tries), behind the others."""
        try:
            self._ensure_run()
        except Exception as e:
            raise _Down(e) from e
        retry: list[_Call] = []
        while self._pending:
            call = self._pending.pop(0)
            try:
                call.fn()
            except Exception as e:
                if is_permanent(e):
                    call.attempts += 1
                    self._drop(call, e)
                    continue
                if not self._answers():
                    self._pending[:0] = [*retry, call]
                    raise _Down(e) from e
                call.attempts += 1
                if call.attempts >= MAX_ATTEMPTS:
                    self._drop(call, e)
                else:
                    retry.append(call)
        self._pending = retry

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
                self._send()
                if self._down:
                    log.warning("MLflow: server reachable again, logging caught up")
                    self._down = False
            except _Down as e:
                self._down = True
                if not self._warned:
                    log.warning(
                        "MLflow unreachable (%s); training goes on, logging will catch up",
                        type(e.__cause__).__name__,
                    )
                    self._warned = True
                if self._stop.wait(2.0):
                    return
            if closing and not self._pending:
                return
