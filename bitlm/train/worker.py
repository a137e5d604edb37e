"""Each Ray Train worker's set-up: one DeepSpeed engine, resume, then the trainer's loop
(bitlm/train/trainer.py) with the production callbacks (bitlm/train/callbacks.py) and any the
caller adds (``train_worker(..., callbacks=)``; the tests' fault injection).

Fatal conditions (NaN/inf loss, loss spike, changed data) are not exceptions for Ray's retry
logic: every rank stops at the same step, rank 0 writes ``_fatal.json`` into the run folder, and
the driver raises ``TrainingAborted`` (see launch.py).

Non-finite steps (a NaN/inf loss or gradient norm) are not fatal by themselves: DeepSpeed skips
their update, so the weights stay finite; ``NonFiniteGuard`` counts them (logged as
``nonfinite_steps``) and stops the run after ``failure.max_nonfinite_steps`` in a row.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..checkpoint import (
    DS_TAG,
    commit,
    dir_name,
    latest_complete,
    local_copy,
    path_of,
    prune,
    read_state,
)
from ..dataset_format import DataError, Manifest
from ..model import BitLM
from ..recipe import from_dict
from ..safeload import UnsafeCheckpointError, weights_only_loads
from .callbacks import (
    CheckpointCallback,
    EvalCallback,
    MetricsCallback,
    MLflowCallback,
    NonFiniteCallback,
    SpikeCallback,
)
from .config import TrainRecipe
from .data import Dataset, open_fs, select_version
from .trainer import (
    Callback,
    FatalTrainingError,
    NonFiniteGuard,
    Session,
    Trainer,
    TrainerState,
    import_deepspeed,
    lr_at,
    noise_seed,
)

log = logging.getLogger("bitlm.train")

# FatalTrainingError, NonFiniteGuard, lr_at and noise_seed are the trainer's, re-exported for
# their importers here (benchmarks/train.py among them).
__all__ = [
    "FatalTrainingError",
    "LocalSession",
    "NonFiniteGuard",
    "RaySession",
    "deepspeed_config",
    "lr_at",
    "noise_seed",
    "train_worker",
]

FATAL_FILE = "_fatal.json"


def deepspeed_config(recipe: TrainRecipe, world_size: int) -> dict[str, Any]:
    """DeepSpeed config derived from the recipe (the optimizer is a torch AdamW client)."""
    accum = recipe.global_batch_size // (recipe.micro_batch_size * world_size)
    cfg: dict[str, Any] = {
        "train_batch_size": recipe.global_batch_size,
        "train_micro_batch_size_per_gpu": recipe.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": recipe.optim.grad_clip,
        "zero_optimization": {"stage": recipe.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if recipe.dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if recipe.zero_stage == 3:
        cfg["zero_optimization"].update(
            {"stage3_gather_16bit_weights_on_model_save": False, "contiguous_gradients": True}
        )
    return cfg


# ---- sessions: Ray Train, or an in-process stand-in for tests --------------------------------
class RaySession:
    def __init__(self, storage_path: str) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.run_name = ctx.get_experiment_name()
        self.run_dir = f"{storage_path.rstrip('/')}/{self.run_name}"

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        """The newest committed checkpoint in the run folder (a local copy of an s3:// one).
        Not Ray's registered one: Ray registers a report at its next poll (every 2 s), even
        one whose commit marker was never written."""
        found = latest_complete(self.run_dir)
        if found is None:
            yield None
            return
        with local_copy(found) as d:
            yield str(d)

    def report(self, metrics: dict[str, Any], ckpt_dir: str | None, step: int) -> None:
        """Report ``metrics``; with ``ckpt_dir``, upload it into ``checkpoint_<step>`` first
        (synchronously: Ray merges every rank's folder into that one)."""
        import ray.train
        from ray.train import Checkpoint

        if ckpt_dir is None:
            ray.train.report(metrics)
        else:
            ray.train.report(
                metrics,
                checkpoint=Checkpoint.from_directory(ckpt_dir),
                checkpoint_dir_name=dir_name(step),
            )

    def commit(self, step: int) -> None:
        """The marker (rank 0, once every rank's report returned); Ray keeps keep_last."""
        commit(path_of(self.run_dir, step), step, self.world_size)


class LocalSession:
    """World size 1 without Ray: checkpoints go to ``<storage>/<name>/checkpoint_<step>``."""

    def __init__(self, storage_path: str, run_name: str, keep: int = 3) -> None:
        self.rank, self.world_size, self.run_name = 0, 1, run_name
        self.run_dir = str(Path(storage_path).absolute() / run_name)
        self.keep = keep
        self.reports: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        yield latest_complete(self.run_dir)

    def report(self, metrics: dict[str, Any], ckpt_dir: str | None, step: int) -> None:
        self.reports.append(dict(metrics))
        if ckpt_dir is not None:
            dst = Path(path_of(self.run_dir, step))
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(ckpt_dir, dst)

    def commit(self, step: int) -> None:
        """The marker, then keep the last ``keep`` committed checkpoints."""
        commit(path_of(self.run_dir, step), step, 1)
        prune(self.run_dir, self.keep)


# ---- the loop --------------------------------------------------------------------------------
@dataclass
class RunInfo:
    """What the driver hands to every worker (plain data, picklable)."""

    recipe: dict[str, Any]
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    params_synced: bool = False  # the driver logged the params and said what changed
    dataset_version: int | None = None  # the dataset's newest version at launch (None: read it)


def _device(recipe: TrainRecipe) -> torch.device:
    if recipe.use_gpu and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _write_fatal(recipe: TrainRecipe, run_name: str, message: str, step: int) -> None:
    fs, base = open_fs(recipe.storage_path)
    fs.create_dir(f"{base}/{run_name}", recursive=True)
    with fs.open_output_stream(f"{base}/{run_name}/{FATAL_FILE}") as f:
        f.write(json.dumps({"error": message, "step": step}).encode())


def train_worker(
    info: dict[str, Any], session: Session | None = None, callbacks: Sequence[Callback] = ()
) -> None:
    """Entry point of every worker (Ray Train's train_loop_per_worker); ``callbacks`` run after
    the production ones."""
    run = RunInfo(**info)
    recipe = from_dict(TrainRecipe, run.recipe)
    session = session or RaySession(recipe.storage_path)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        _train(recipe, run, session, callbacks)
    except FatalTrainingError as e:
        log.error("rank %d: run stopped: %s", session.rank, e)
        if session.rank == 0:
            _write_fatal(recipe, session.run_name, str(e), -1)


def _train(recipe: TrainRecipe, run: RunInfo, session: Session, extra: Sequence[Callback]) -> None:
    t_start = time.perf_counter()
    deepspeed = import_deepspeed()
    rank, world = session.rank, session.world_size
    device = _device(recipe)
    if recipe.global_batch_size % (recipe.micro_batch_size * world):
        raise FatalTrainingError(
            f"global_batch_size={recipe.global_batch_size} is not a multiple of "
            f"micro_batch_size * world_size ({recipe.micro_batch_size} * {world})"
        )

    man = Manifest.load(recipe.data.path)  # the codec facts are the same in every version
    if recipe.data.vocab_from_manifest and recipe.model.vocab_size != man.vocab_size:
        recipe = replace(recipe, model=replace(recipe.model, vocab_size=man.vocab_size))
    man.check_model(recipe.model.vocab_size, recipe.model.block_size)
    table = man.code_table()

    torch.manual_seed(recipe.seed)  # identical init on every rank
    model = BitLM(recipe.model, table)
    flops_per_token = model.flops_per_token(man.seq_len)
    o = recipe.optim
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=lr_at(recipe, 0),
        betas=tuple(o.betas),
        eps=o.eps,
        weight_decay=o.weight_decay,
    )
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(recipe, world),
        dist_init_required=not dist.is_initialized(),
    )

    # ---- resume ----
    state = TrainerState(stop_at=recipe.steps)
    state.nonfinite = NonFiniteGuard(recipe.failure.max_nonfinite_steps)
    latest = min(run.dataset_version or man.version, man.version)
    saved: dict[str, Any] | None = None
    with session.latest_checkpoint() as ckpt:
        if ckpt is not None:
            saved = read_state(ckpt)
        version, pinned = _dataset_version(recipe, man, saved, latest)
        data = Dataset(
            recipe.data.path,
            recipe.data.split,
            recipe.data.seed,
            recipe.data.row_group_cache,
            version,
        )
        if saved is not None:
            if saved["world_size"] != world:
                raise FatalTrainingError(
                    f"checkpoint was written by {saved['world_size']} workers, this run has "
                    f"{world}: ZeRO shards do not reshard; export and restart instead"
                )
            try:
                with weights_only_loads(ckpt):  # DeepSpeed's shards are pickles: no code runs
                    engine.load_checkpoint(ckpt, tag=DS_TAG, load_lr_scheduler_states=False)
            except UnsafeCheckpointError as e:
                raise FatalTrainingError(str(e)) from None
            rng = torch.load(Path(ckpt) / "rng" / f"rank_{rank}.pt", weights_only=True)
            torch.set_rng_state(rng["torch"])
            state.step, state.tokens_seen = int(saved["step"]), int(saved["tokens_seen"])
            state.nonfinite.total = int(saved.get("nonfinite_steps", 0))
            state.nonfinite.streak = int(saved.get("nonfinite_streak", 0))
            log.info("rank %d: resumed from step %d (%s)", rank, state.step, ckpt)
    state.start_step = state.step
    if rank == 0:
        _log_version(recipe, data, pinned, latest, state.step)
        log.info(
            "engine ready in %.1f s (ZeRO-%d, %s)",
            time.perf_counter() - t_start,
            recipe.zero_stage,
            recipe.dtype,
        )

    callbacks: list[Callback] = [
        NonFiniteCallback(),
        SpikeCallback(),
        MetricsCallback(flops_per_token),
        EvalCallback(),
        CheckpointCallback(),
    ]
    if rank == 0 and recipe.mlflow.enabled and run.tracking_uri:
        callbacks.append(_mlflow(recipe, run, session, man, data, state, pinned, flops_per_token))
    trainer = Trainer(recipe, engine, optimizer, data, session, device, state, [*callbacks, *extra])
    trainer.fit()


def _mlflow(
    recipe: TrainRecipe,
    run: RunInfo,
    session: Session,
    man: Manifest,
    data: Dataset,
    state: TrainerState,
    pinned: int | None,
    flops_per_token: float,
) -> MLflowCallback:
    """Rank 0's MLflow callback: a fresh run logs its recipe, tokenizer and code table and tags
    its data; a resumed one that moved to another dataset version tags the switch."""
    texts: dict[str, str] = {}
    tags: dict[str, str] = {}
    if state.started_from_scratch:
        texts = {
            "recipe.yaml": recipe.to_yaml(),
            "tokenizer.json": man.tokenizer_json(),
            "code_table.json": data.codec.table.to_json(),
        }
        tags = {
            "data_fingerprint": data.fingerprint,
            "dataset_version": str(data.version),
            "tokenizer_hash": man.tokenizer_hash,
            "flops_per_token": f"{flops_per_token:.6g}",
        }
    elif pinned is not None and pinned != data.version:
        tags = {
            "data_fingerprint": data.fingerprint,
            "dataset_version": str(data.version),
            f"dataset_switch.step_{state.step}": f"{pinned} -> {data.version}",
        }
    return MLflowCallback(
        recipe,
        run.tracking_uri or "",
        run.mlflow_run_id,
        session.run_name,
        announce=not run.params_synced,
        texts=texts,
        tags=tags,
    )


def _dataset_version(
    recipe: TrainRecipe, man: Manifest, state: dict[str, Any] | None, latest: int
) -> tuple[int, int | None]:
    """(the dataset version this launch reads, the checkpoint's version: None for a fresh run or
    when no version matches the checkpoint's fingerprint). A checkpoint without a recorded
    version (written before versions) is matched by its fingerprint; one that matches no version
    stops the run unless data.allow_fingerprint_change."""
    d = recipe.data
    pinned = None
    if state is not None:
        pinned = man.version_of(d.split, state["fingerprint"], state.get("dataset_version"))
        if pinned is None:
            now = man.at_version(latest).fingerprint(d.split)
            if not d.allow_fingerprint_change:
                raise FatalTrainingError(
                    f"the dataset changed since the checkpoint (fingerprint "
                    f"{state['fingerprint'][:12]} -> {now[:12]}, no version of {d.path} has the "
                    f"checkpoint's shards); set data.allow_fingerprint_change=true to resume anyway"
                )
            log.warning("resuming on changed data (data.allow_fingerprint_change)")
    try:
        return select_version(d.dataset_version, latest, pinned), pinned
    except DataError as e:
        raise FatalTrainingError(str(e)) from None


def _log_version(
    recipe: TrainRecipe,
    data: Dataset,
    pinned: int | None,
    latest: int,
    step: int,
) -> None:
    """Rank 0 says which dataset version this launch reads, and why when it is not the newest
    or not the checkpoint's."""
    where = (
        f"dataset {recipe.data.path}: version {data.version} ({data.num_rows} {data.split} rows)"
    )
    if pinned is not None and pinned != data.version:
        log.warning(
            "%s: the checkpoint was trained on version %d; data.dataset_version=%s moves the run "
            "to version %d: from step %d on, samples follow a new permutation of its rows",
            where,
            pinned,
            recipe.data.dataset_version,
            data.version,
            step,
        )
    elif pinned is not None and latest > data.version:
        log.info(
            "%s, the checkpoint's; the dataset has grown to version %d since, which this run does "
            "not read (data.dataset_version=latest moves it there)",
            where,
            latest,
        )
    else:
        log.info("%s", where)
