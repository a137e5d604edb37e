"""The driver: validate, find the MLflow run, start Ray Train's TorchTrainer, set the final status.

One run identity: ``recipe.name`` is the Ray Train run name, the checkpoint folder
``<storage_path>/<name>`` and the MLflow run name. Relaunching with the same name resumes from
the latest checkpoint (Ray Train V2 finds the run folder).

Training never imports evaluation: what runs beside a run (automatic evaluation) is a companion
the job layer hands to ``run`` as ``on_start`` (jobs/pretrain.py: bitlm.eval's
``start_auto_eval``); the driver starts it once the MLflow run exists, cancels it when training
fails and waits for it after the final status.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from ..checkpoint import latest_complete
from ..dataset_format import DataError, Manifest
from ..tracking import (
    client,
    default_tracking_uri,
    describe_changes,
    find_or_create_run,
    set_final_status,
    split_credentials,
    sync_params,
)
from .config import TrainRecipe
from .data import open_fs, select_version
from .trainer import Callback
from .worker import FATAL_FILE, RunInfo, train_worker

log = logging.getLogger("bitlm.train")

__all__ = ["Companion", "RunResult", "Started", "TrainingAborted", "run"]

# Environment forwarded to the workers through Ray's runtime_env (values never logged, never
# in task arguments: the storage filesystem and the tracking URI carry no credentials).
_FORWARD_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "DS_ACCELERATOR",
    "DS_BUILD_OPS",
    "TORCH_EXTENSIONS_DIR",
    "TRITON_INTERPRET",
)


class TrainingAborted(RuntimeError):
    """A non-retryable stop (NaN/inf loss, loss spike, changed data): see the message."""


@dataclass(frozen=True)
class Started:
    """A training run as the driver started it: what a companion of the run needs."""

    recipe: TrainRecipe
    run_dir: str  # <storage_path>/<name>
    tracking_uri: str  # as the driver uses it (credentials may be inside: never log it)
    mlflow_run_id: str
    env: dict[str, str]  # the workers' runtime_env variables (credentials: never log them)


class Companion(Protocol):
    """What runs beside a training run (automatic evaluation)."""

    def cancel(self) -> None: ...

    def wait(self) -> object: ...


@dataclass
class RunResult:
    name: str
    run_dir: str  # <storage_path>/<name>
    checkpoint: str | None  # the latest checkpoint folder (local path or s3:// URI)
    mlflow_run_id: str | None
    tracking_uri: str | None


def _storage(recipe: TrainRecipe):
    """(RunConfig storage_path, storage_filesystem or None, display root). The S3 filesystem
    is pickled into Ray's task arguments, so it holds no keys: each process finds them in its
    own environment (AWS_* forwarded through runtime_env, a pod's env, an instance role)."""
    sp = recipe.storage_path
    if sp.startswith("s3://"):
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(
            endpoint_override=os.environ.get("AWS_ENDPOINT_URL") or None,
            region=os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1",
        )
        return sp[len("s3://") :].rstrip("/"), fs, sp.rstrip("/")
    path = str(Path(sp).absolute())
    return path, None, path


def _read_fatal(recipe: TrainRecipe, name: str, remove: bool = False) -> dict | None:
    fs, base = open_fs(recipe.storage_path)
    p = f"{base}/{name}/{FATAL_FILE}"
    try:
        with fs.open_input_stream(p) as f:
            d = json.loads(f.read().decode())
    except (FileNotFoundError, OSError):
        return None
    if remove:
        fs.delete_file(p)
    return d


def run(
    recipe: TrainRecipe,
    on_start: Callable[[Started], Companion | None] | None = None,
    callbacks: Sequence[Callback] = (),
) -> RunResult:
    """Train (or resume) the run ``recipe.name``, with ``on_start``'s companion beside it and
    ``callbacks`` added to every worker's trainer (they travel to the workers pickled).
    Raises TrainingAborted on a non-retryable stop, ray.train's TrainingFailedError when the
    failure budget is spent."""
    if not recipe.name:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
        recipe = replace(recipe, name=f"pretrain-{stamp}-{uuid.uuid4().hex[:6]}")
    name = recipe.name
    if recipe.storage_path and "://" not in recipe.storage_path:
        recipe = replace(recipe, storage_path=str(Path(recipe.storage_path).absolute()))
    if recipe.data.path and "://" not in recipe.data.path:
        recipe = replace(
            recipe, data=replace(recipe.data, path=str(Path(recipe.data.path).absolute()))
        )
    if not recipe.data.path:
        raise DataError("data.path is empty: point it at a preprocessed dataset")
    man = Manifest.load(recipe.data.path)
    if recipe.data.vocab_from_manifest and recipe.model.vocab_size != man.vocab_size:
        recipe = replace(recipe, model=replace(recipe.model, vocab_size=man.vocab_size))
    man.check_model(recipe.model.vocab_size, recipe.model.block_size)
    if not man.split(recipe.data.split):
        raise DataError(f"{recipe.data.path}: no shards in split {recipe.data.split!r}")
    select_version(recipe.data.dataset_version, man.version, None)  # a version N must exist

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    env = {k: os.environ[k] for k in _FORWARD_ENV if k in os.environ}
    if not ray.is_initialized():
        # Joins RAY_ADDRESS (a cluster, `ray job submit`) or starts a local Ray. The job's
        # runtime_env takes the environment to every process, Train's controller included:
        # it opens the storage on the driver's node, whose own environment may lack the keys.
        # A submitted job has its own (Ray refuses to merge the same variable twice).
        submitted = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        ray.init(runtime_env={"env_vars": env} if env and not submitted else None)

    storage_path, storage_fs, root = _storage(recipe)
    run_dir = f"{root}/{name}"
    _read_fatal(recipe, name, remove=True)

    tracking_uri, run_id, synced = _start_tracking(recipe, man)
    _warn_node_local(recipe, tracking_uri)
    worker_uri = None
    if tracking_uri:  # credentials in the URI move to the workers' environment (runtime_env)
        worker_uri, user, password = split_credentials(tracking_uri)
        if user:
            env.setdefault("MLFLOW_TRACKING_USERNAME", user)
        if password:
            env.setdefault("MLFLOW_TRACKING_PASSWORD", password)
    info = RunInfo(
        recipe=recipe.to_dict(),
        tracking_uri=worker_uri,
        mlflow_run_id=run_id,
        params_synced=synced,
        dataset_version=man.version,  # every rank (and every restart of this launch) agrees
    )
    loop: Callable[[dict[str, Any]], None] = train_worker
    if callbacks:
        added = tuple(callbacks)

        def loop(info: dict[str, Any]) -> None:
            train_worker(info, callbacks=added)

    trainer = TorchTrainer(
        loop,
        train_loop_config=asdict(info),
        scaling_config=ScalingConfig(
            num_workers=recipe.num_workers,
            use_gpu=recipe.use_gpu,
            resources_per_worker={"CPU": recipe.cpus_per_worker}
            | ({"GPU": 1} if recipe.use_gpu else {}),
            placement_strategy=recipe.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=recipe.failure.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=recipe.checkpoint.keep_last),
            worker_runtime_env={"env_vars": env} if env else None,
        ),
    )
    companion = _start_companion(on_start, recipe, run_dir, tracking_uri, run_id, env)
    try:
        result = trainer.fit()
    except BaseException as e:
        if run_id:
            set_final_status(tracking_uri, run_id, ok=False, error=f"{type(e).__name__}: {e}")
        if companion is not None:
            companion.cancel()
        raise
    fatal = _read_fatal(recipe, name)
    if fatal is not None:
        if companion is not None:
            companion.cancel()
        if run_id or tracking_uri:
            rid = run_id or _lookup(tracking_uri, recipe, name)
            if rid:
                set_final_status(tracking_uri, rid, ok=False, error=fatal["error"])
        raise TrainingAborted(f"run {name} stopped: {fatal['error']}")
    if run_id is None and tracking_uri:
        run_id = _lookup(tracking_uri, recipe, name)
    if run_id:
        set_final_status(tracking_uri, run_id, ok=True)
    if companion is not None:
        log.info("run %s: waiting for the automatic evaluation of its checkpoints", name)
        companion.wait()
    ckpt = latest_complete(run_dir) if result.checkpoint is not None else None
    return RunResult(name, run_dir, ckpt, run_id, tracking_uri)


def _start_tracking(recipe: TrainRecipe, man: Manifest) -> tuple[str | None, str | None, bool]:
    """(tracking URI, MLflow run id, params synced): the run named like the Ray Train run,
    found or created, with the recipe's params; a relaunch with changed values says so (MLflow
    params are immutable: the changes become tags ``changed.<key>``). MLflow trouble is a
    warning: rank 0 retries."""
    if not recipe.mlflow.enabled:
        return None, None, False
    tracking_uri = default_tracking_uri(recipe.storage_path)
    try:
        run_id = find_or_create_run(
            tracking_uri,
            recipe.mlflow.experiment,
            recipe.name,
            {"data_fingerprint": man.fingerprint(recipe.data.split)},
        )
    except Exception as e:
        log.warning("MLflow unreachable at start (%s); rank 0 will retry", type(e).__name__)
        return tracking_uri, None, False
    try:
        changed = sync_params(client(tracking_uri), run_id, recipe.flat_params())
    except Exception as e:
        log.warning("MLflow: params not logged at start (%s); rank 0 will retry", type(e).__name__)
        return tracking_uri, run_id, False
    if changed:
        log.warning(
            "run %s relaunched with changed params (MLflow keeps the first value of a param; "
            "each change is the tag changed.<key>): %s",
            recipe.name,
            describe_changes(changed),
        )
    return tracking_uri, run_id, True


def _start_companion(
    on_start: Callable[[Started], Companion | None] | None,
    recipe: TrainRecipe,
    run_dir: str,
    tracking_uri: str | None,
    run_id: str | None,
    env: dict[str, str],
) -> Companion | None:
    """``on_start``'s companion once the MLflow run exists (it needs one); never fatal."""
    if on_start is None:
        if recipe.eval.auto:
            log.warning(
                "eval.auto is set but nothing evaluates this launch (bitlm.train.run without "
                "on_start; jobs/pretrain.py wires it): no automatic evaluation"
            )
        return None
    if not (tracking_uri and run_id):
        return None
    try:
        return on_start(Started(recipe, run_dir, tracking_uri, run_id, dict(env)))
    except Exception as e:
        log.warning("automatic evaluation not started: %s: %s", type(e).__name__, e)
        return None


def _lookup(tracking_uri: str, recipe: TrainRecipe, name: str) -> str | None:
    try:
        return find_or_create_run(tracking_uri, recipe.mlflow.experiment, name, {})
    except Exception:
        return None


def _warn_node_local(recipe: TrainRecipe, tracking_uri: str | None) -> list[str]:
    """On a cluster of several nodes, warn about (and return) each path local to one node that
    the workers would read or write: the workers of another node see their own disk there."""
    import ray

    if sum(1 for n in ray.nodes() if n["Alive"]) < 2:
        return []
    found = [
        f"{key}={value}"
        for key, value in (("storage_path", recipe.storage_path), ("data.path", recipe.data.path))
        if "://" not in value
    ]
    if tracking_uri and not tracking_uri.startswith(("http://", "https://", "databricks")):
        found.append(f"MLflow {tracking_uri} (set MLFLOW_TRACKING_URI to an mlflow server)")
    if found:
        log.warning(
            "the Ray cluster has several nodes and these paths are local to each: %s; unless "
            "they are one shared mount on every node, use s3:// (docs/cluster.md)",
            "; ".join(found),
        )
    return found
