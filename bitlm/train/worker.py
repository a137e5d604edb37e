"""The per-worker training loop: one DeepSpeed engine per Ray Train worker.

Exactness: the objective's noise comes from a generator seeded by (seed, step, rank, micro-batch)
and the batch from the data position, so a resumed run recomputes exactly what an uninterrupted
run would. Fatal conditions (NaN/inf loss, loss spike, changed data) are not exceptions for
Ray's retry logic: every rank stops at the same step, rank 0 writes ``_fatal.json`` into the
run folder, and the driver raises ``TrainingAborted`` (see launch.py).

Non-finite steps (a NaN/inf loss or gradient norm) are not fatal by themselves: DeepSpeed skips
their update, so the weights stay finite; ``NonFiniteGuard`` counts them (logged as
``nonfinite_steps``) and stops the run after ``failure.max_nonfinite_steps`` in a row.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

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
    write_state,
)
from ..dataset_format import DataError, Manifest
from ..model import BitLM
from ..recipe import from_dict
from ..safeload import UnsafeCheckpointError, weights_only_loads
from .config import TrainRecipe
from .data import Dataset, open_fs, rank_positions, select_version

log = logging.getLogger("bitlm.train")

__all__ = [
    "FatalTrainingError",
    "LocalSession",
    "NonFiniteGuard",
    "RaySession",
    "deepspeed_config",
    "lr_at",
    "train_worker",
]

FATAL_FILE = "_fatal.json"


class FatalTrainingError(RuntimeError):
    """Stops the run at once with no retry (non-finite steps, loss spike, changed data)."""


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN backward: the test hook for a finite loss with NaN gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


@dataclass
class NonFiniteGuard:
    """Counts optimizer steps whose loss or gradients were NaN/inf (``total``, and ``streak``
    in a row) and stops the run at ``limit`` in a row (0: never). Every rank sees the same
    all-reduced values, so every rank stops at the same step."""

    limit: int
    total: int = 0
    streak: int = 0

    def update(self, step: int, loss: float, grad_norm: float, skipped: bool) -> bool:
        """True if step ``step`` was non-finite (``skipped``: DeepSpeed did not apply its
        update); raises FatalTrainingError at the limit, or when DeepSpeed applied an update
        whose gradients were not finite."""
        bad = skipped or not (math.isfinite(loss) and math.isfinite(grad_norm))
        if not bad:
            self.streak = 0
            return False
        self.total += 1
        self.streak += 1
        what = f"loss {loss:.4g}, grad norm {grad_norm:.4g}"
        if not skipped and not math.isfinite(grad_norm):
            raise FatalTrainingError(
                f"step {step}: DeepSpeed applied an update with non-finite gradients ({what}): "
                "the weights are no longer finite; stopping (no retry), resume from the last "
                "checkpoint"
            )
        if self.limit and self.streak >= self.limit:
            raise FatalTrainingError(
                f"{self.streak} steps in a row with a non-finite loss or gradients (last: step "
                f"{step}, {what}; {self.total} in this run); failure.max_nonfinite_steps="
                f"{self.limit}: stopping (no retry)"
            )
        return True


# ---- pure helpers ----------------------------------------------------------------------------
def lr_at(recipe: TrainRecipe, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to
    lr * min_lr_ratio, or WSD (constant, then a linear decay over the last decay_fraction)."""
    o, s, n = recipe.optim, recipe.schedule, recipe.steps
    if s.warmup_steps and step < s.warmup_steps:
        return o.lr * (step + 1) / s.warmup_steps
    lo = o.lr * o.min_lr_ratio
    if s.kind == "constant":
        return o.lr
    if s.kind == "cosine":
        span = max(1, n - s.warmup_steps)
        frac = min(1.0, (step - s.warmup_steps) / span)
        return lo + (o.lr - lo) * 0.5 * (1 + math.cos(math.pi * frac))
    decay_steps = max(1, round(n * s.decay_fraction))
    start = n - decay_steps
    if step < start:
        return o.lr
    return o.lr + (lo - o.lr) * min(1.0, (step - start + 1) / decay_steps)


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


def noise_seed(seed: int, step: int, rank: int, micro: int) -> int:
    h = hashlib.blake2b(f"{seed}/{step}/{rank}/{micro}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


# ---- sessions: Ray Train, or an in-process stand-in for tests --------------------------------
class Session(Protocol):
    rank: int
    world_size: int
    run_name: str
    run_dir: str  # <storage_path>/<run_name>: local path or s3:// URI

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]: ...
    def report(self, metrics: dict[str, Any], ckpt_dir: str | None, step: int) -> None: ...
    def commit(self, step: int) -> None: ...


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


def _import_deepspeed():
    """deepspeed, with the CPU shared-memory comm op (a 27 s JIT build) switched off."""
    importlib.import_module("deepspeed." + "ops").__compatible_ops__["deepspeed_shm_comm"] = False
    return importlib.import_module("deepspeed")


def train_worker(info: dict[str, Any], session: Session | None = None) -> None:
    """Entry point of every worker (Ray Train's train_loop_per_worker)."""
    run = RunInfo(**info)
    recipe = from_dict(TrainRecipe, run.recipe)
    session = session or RaySession(recipe.storage_path)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        _train(recipe, run, session)
    except FatalTrainingError as e:
        log.error("rank %d: run stopped: %s", session.rank, e)
        if session.rank == 0:
            _write_fatal(recipe, session.run_name, str(e), -1)


def _train(recipe: TrainRecipe, run: RunInfo, session: Session) -> None:
    t_start = time.perf_counter()
    deepspeed = _import_deepspeed()
    rank, world = session.rank, session.world_size
    device = _device(recipe)
    if recipe.global_batch_size % (recipe.micro_batch_size * world):
        raise FatalTrainingError(
            f"global_batch_size={recipe.global_batch_size} is not a multiple of "
            f"micro_batch_size * world_size ({recipe.micro_batch_size} * {world})"
        )
    accum = recipe.global_batch_size // (recipe.micro_batch_size * world)

    man = Manifest.load(recipe.data.path)  # the codec facts are the same in every version
    if recipe.data.vocab_from_manifest and recipe.model.vocab_size != man.vocab_size:
        recipe = replace(recipe, model=replace(recipe.model, vocab_size=man.vocab_size))
    man.check_model(recipe.model.vocab_size, recipe.model.block_size)
    table = man.code_table()
    seq_len = man.seq_len

    torch.manual_seed(recipe.seed)  # identical init on every rank
    model = BitLM(recipe.model, table)
    flops_per_token = model.flops_per_token(seq_len)
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
    step, tokens_seen = 0, 0
    nonfinite = NonFiniteGuard(recipe.failure.max_nonfinite_steps)
    latest = min(run.dataset_version or man.version, man.version)
    state: dict[str, Any] | None = None
    with session.latest_checkpoint() as ckpt:
        if ckpt is not None:
            state = read_state(ckpt)
        version, pinned = _dataset_version(recipe, man, state, latest)
        data = Dataset(
            recipe.data.path,
            recipe.data.split,
            recipe.data.seed,
            recipe.data.row_group_cache,
            version,
        )
        if state is not None:
            if state["world_size"] != world:
                raise FatalTrainingError(
                    f"checkpoint was written by {state['world_size']} workers, this run has "
                    f"{world}: ZeRO shards do not reshard; export and restart instead"
                )
            try:
                with weights_only_loads(ckpt):  # DeepSpeed's shards are pickles: no code runs
                    engine.load_checkpoint(ckpt, tag=DS_TAG, load_lr_scheduler_states=False)
            except UnsafeCheckpointError as e:
                raise FatalTrainingError(str(e)) from None
            rng = torch.load(Path(ckpt) / "rng" / f"rank_{rank}.pt", weights_only=True)
            torch.set_rng_state(rng["torch"])
            step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
            nonfinite.total = int(state.get("nonfinite_steps", 0))
            nonfinite.streak = int(state.get("nonfinite_streak", 0))
            log.info("rank %d: resumed from step %d (%s)", rank, step, ckpt)
    started_from_scratch = step == 0
    switched = pinned is not None and pinned != version
    if rank == 0:
        _log_version(recipe, data, pinned, latest, step)
        log.info(
            "engine ready in %.1f s (ZeRO-%d, %s)",
            time.perf_counter() - t_start,
            recipe.zero_stage,
            recipe.dtype,
        )

    tracker = None
    if rank == 0 and recipe.mlflow.enabled and run.tracking_uri:
        from ..tracking import RunLogger

        tracker = RunLogger(
            run.tracking_uri,
            run.mlflow_run_id,
            experiment=recipe.mlflow.experiment,
            run_name=session.run_name,
            system_metrics=recipe.mlflow.system_metrics,
        )
        # Every launch: a relaunch may add keys (a newer recipe) or change values (tags).
        tracker.sync_params(recipe.flat_params(), announce=not run.params_synced)
        if started_from_scratch:
            tracker.log_text(recipe.to_yaml(), "recipe.yaml")
            tracker.log_text(man.tokenizer_json(), "tokenizer.json")
            tracker.log_text(table.to_json(), "code_table.json")
            tracker.set_tags(
                {
                    "data_fingerprint": data.fingerprint,
                    "dataset_version": str(version),
                    "tokenizer_hash": man.tokenizer_hash,
                    "flops_per_token": f"{flops_per_token:.6g}",
                }
            )
        elif switched:
            tracker.set_tags(
                {
                    "data_fingerprint": data.fingerprint,
                    "dataset_version": str(version),
                    f"dataset_switch.step_{step}": f"{pinned} -> {version}",
                }
            )

    index_log = None
    if recipe.test.index_log:
        Path(recipe.test.index_log).mkdir(parents=True, exist_ok=True)
        index_log = open(Path(recipe.test.index_log) / f"rank_{rank}.jsonl", "a")  # noqa: SIM115

    # ---- train ----
    last_ckpt_time = time.monotonic()
    ema = None
    win = {"t": 0.0, "data": 0.0, "tokens": 0, "steps": 0}
    tokens_per_step = recipe.global_batch_size * seq_len
    stop_at = recipe.steps
    if recipe.test.stop_after_steps:
        stop_at = min(stop_at, step + recipe.test.stop_after_steps)
    engine.train()
    try:
        while step < stop_at:
            if (
                recipe.test.kill_at_step
                and step + 1 == recipe.test.kill_at_step
                and rank == recipe.test.kill_rank
                and started_from_scratch
            ):
                os.kill(os.getpid(), signal.SIGKILL)
            t0 = time.perf_counter()
            positions = rank_positions(step, rank, world, recipe.global_batch_size)
            tokens = data.tokens_at(positions).to(device)
            t_data = time.perf_counter() - t0
            if index_log is not None:
                index_log.write(
                    json.dumps(
                        {
                            "step": step + 1,
                            "pid": os.getpid(),
                            "rows": data.rows_at(positions).tolist(),
                            "positions": positions.tolist(),
                        }
                    )
                    + "\n"
                )
                index_log.flush()
            lr = lr_at(recipe, step)
            for g in optimizer.param_groups:
                g["lr"] = lr
            engine.module.set_step(step)  # the slot curriculum (model.slot_ramp_*)
            loss_sum = torch.zeros((), dtype=torch.float32, device=device)
            for micro in range(accum):
                mb = tokens[micro * recipe.micro_batch_size : (micro + 1) * recipe.micro_batch_size]
                gen = torch.Generator(device=device)
                gen.manual_seed(noise_seed(recipe.seed, step, rank, micro))
                loss = engine(mb, gen)
                if recipe.test.nan_at_step and step + 1 == recipe.test.nan_at_step:
                    loss = loss * float("nan")
                if step + 1 in recipe.test.nan_grad_steps:
                    loss = _NanGrad.apply(loss)
                engine.backward(loss)
                engine.step()
                loss_sum += loss.detach().float()
            applied = bool(engine.was_step_applied())  # False: DeepSpeed skipped a NaN/inf step
            step += 1
            tokens_seen += tokens_per_step
            stats = torch.tensor(
                [float(loss_sum) / accum, t_data, 0.0 if applied else 1.0], device=device
            )
            if world > 1:
                dist.all_reduce(stats)
                stats /= world
            loss_val, skipped = float(stats[0]), float(stats[2]) > 0
            gn = engine.get_global_grad_norm()
            grad_norm = float(gn) if gn is not None else float("nan")
            try:
                bad = nonfinite.update(step, loss_val, grad_norm, skipped)
            finally:
                if tracker is not None and nonfinite.streak:  # at once, not every log_every
                    tracker.log_metrics(
                        {
                            "nonfinite_steps": float(nonfinite.total),
                            "nonfinite_streak": float(nonfinite.streak),
                        },
                        step,
                    )
            if bad:
                if rank == 0:
                    log.warning(
                        "step %d: non-finite loss or gradients (loss %.4g, grad norm %.4g): "
                        "update skipped (%d in a row, %d in this run; the run stops at %s)",
                        step,
                        loss_val,
                        grad_norm,
                        nonfinite.streak,
                        nonfinite.total,
                        nonfinite.limit or "never",
                    )
            else:
                _guard(recipe, step, loss_val, ema)
                a = recipe.failure.spike_ema
                ema = loss_val if ema is None else a * ema + (1 - a) * loss_val
            dt = time.perf_counter() - t0
            win["t"] += dt
            win["data"] += t_data
            win["tokens"] += tokens_per_step // world
            win["steps"] += 1

            if step % recipe.log_every == 0 or step % recipe.mlflow.log_every == 0:
                tps = win["tokens"] / max(win["t"], 1e-9)
                metrics = {
                    "loss": loss_val,
                    "grad_norm": grad_norm,
                    "lr": lr,
                    "tokens_seen": float(tokens_seen),
                    "throughput/tokens_per_s_per_device": tps,
                    "mfu": tps * flops_per_token / recipe.peak_flops,
                    "time/data_loading_share": win["data"] / max(win["t"], 1e-9),
                    "time/step_s": win["t"] / win["steps"],
                    "progress/pct_steps": 100.0 * step / recipe.steps,
                }
                if not nonfinite.streak:  # else logged at once above
                    metrics["nonfinite_steps"] = float(nonfinite.total)
                if rank == 0 and step % recipe.log_every == 0:
                    log.info(
                        "step %d/%d loss %.4f gnorm %.3f lr %.2e tok/s/dev %.0f mfu %.2f%%",
                        step,
                        recipe.steps,
                        loss_val,
                        grad_norm,
                        lr,
                        tps,
                        100 * metrics["mfu"],
                    )
                if tracker is not None and step % recipe.mlflow.log_every == 0:
                    tracker.log_metrics(metrics, step)
                win = {"t": 0.0, "data": 0.0, "tokens": 0, "steps": 0}

            if recipe.eval.every_steps and step % recipe.eval.every_steps == 0:
                _evaluate(
                    recipe, engine, data.manifest, data.codec, step, rank, world, device, tracker
                )

            due = recipe.checkpoint.every_steps and step % recipe.checkpoint.every_steps == 0
            minutes = recipe.checkpoint.every_minutes
            timed = minutes > 0 and time.monotonic() - last_ckpt_time > 60 * minutes
            at_end = step == stop_at and recipe.checkpoint.at_end
            flag = torch.tensor(float(bool(due) or at_end or timed), device=device)
            if world > 1:
                dist.broadcast(flag, 0)  # rank 0's clock decides the time policy
            if flag.item():
                _save(recipe, engine, session, data, step, tokens_seen, loss_val, rank, nonfinite)
                last_ckpt_time = time.monotonic()
    except FatalTrainingError:
        if tracker is not None:
            tracker.close(recipe.mlflow.flush_timeout_s)
            tracker = None
        raise
    finally:
        if index_log is not None:
            index_log.close()
        if tracker is not None:
            tracker.close(recipe.mlflow.flush_timeout_s)


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


def _guard(recipe: TrainRecipe, step: int, loss: float, ema: float | None) -> None:
    """The loss-spike guard (finite losses; non-finite steps are NonFiniteGuard's)."""
    if not math.isfinite(loss):
        return
    f = recipe.failure
    if (
        f.spike_ratio
        and ema is not None
        and step > f.spike_warmup_steps
        and loss > f.spike_ratio * ema
    ):
        raise FatalTrainingError(
            f"loss spike at step {step}: {loss:.4f} > {f.spike_ratio} x running mean "
            f"{ema:.4f}: stopping (no retry)"
        )


def _save(recipe, engine, session, data, step, tokens_seen, loss, rank, nonfinite) -> None:
    """Every rank writes its DeepSpeed shard + RNG state; rank 0 adds the run state, recipe,
    tokenizer and code table. Ray merges the ranks' folders into one checkpoint; once every
    rank's upload is done, rank 0 commits it (bitlm.checkpoint)."""
    gathered = contextlib.nullcontext()
    if recipe.zero_stage == 3:  # model.loss reads top-level parameters directly: gather them
        gathered = _import_deepspeed().zero.GatheredParameters(
            list(engine.module.parameters()), modifier_rank=None
        )
    with gathered:
        probe = probe_loss(engine.module, data, recipe)  # collective under ZeRO-3
    if not math.isfinite(probe):  # the same on every rank: all stop, nothing corrupt is saved
        raise FatalTrainingError(
            f"step {step}: the weights are no longer finite (probe loss {probe}); no checkpoint "
            "written; stopping (no retry)"
        )
    tmp = tempfile.mkdtemp(prefix=f"bitlm-ckpt-{step}-r{rank}-")
    try:
        engine.save_checkpoint(tmp, tag=DS_TAG)
        (Path(tmp) / "rng").mkdir(exist_ok=True)
        torch.save({"torch": torch.get_rng_state()}, Path(tmp) / "rng" / f"rank_{rank}.pt")
        if rank == 0:
            state = {
                "step": step,
                "tokens_seen": tokens_seen,
                "data_position": step * recipe.global_batch_size,
                "data_seed": recipe.data.seed,
                "fingerprint": data.fingerprint,
                "dataset_version": data.version,
                "world_size": session.world_size,
                "zero_stage": recipe.zero_stage,
                "run_name": session.run_name,
                "probe_loss": probe,
                "nonfinite_steps": nonfinite.total,
                "nonfinite_streak": nonfinite.streak,
                "time": time.time(),
            }
            write_state(tmp, state)
            (Path(tmp) / "recipe.yaml").write_text(recipe.to_yaml())
            (Path(tmp) / "tokenizer.json").write_text(data.manifest.tokenizer_json())
            (Path(tmp) / "code_table.json").write_text(data.codec.table.to_json())
        session.report({"step": step, "loss": loss, "tokens_seen": tokens_seen}, tmp, step)
        if session.world_size > 1:
            dist.barrier()  # every rank's files are in storage
        if rank == 0:
            session.commit(step)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def probe_loss(model: BitLM, data: Dataset, recipe: TrainRecipe) -> float:
    """The eval-mode loss of the first rows with fixed noise: a fingerprint of the weights
    (export checks reproduce it)."""
    import numpy as np

    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        tokens = data.codec.from_codewords(
            torch.from_numpy(data.read_rows(np.arange(min(2, data.num_rows))))
        ).to(device)
        gen = torch.Generator(device=device)
        gen.manual_seed(recipe.seed + 7)
        with torch.no_grad():
            return float(model.loss(tokens, gen))
    finally:
        model.train(was_training)


def _evaluate(recipe, engine, man, codec, step, rank, world, device, tracker) -> None:
    """Eval loss on the eval split (same order rule) and a few generated samples (rank 0)."""
    model: BitLM = engine.module
    model.eval()
    try:
        ev = None
        if recipe.data.eval_split and recipe.data.eval_split in man.splits:
            with contextlib.suppress(DataError):  # e.g. an empty val split: no eval loss
                ev = Dataset(
                    recipe.data.path, recipe.data.eval_split, recipe.data.seed, version=man.version
                )
        total = torch.zeros(2, device=device)
        gains: dict[str, float] = {}
        gathered = contextlib.nullcontext()
        if recipe.zero_stage == 3:
            gathered = _import_deepspeed().zero.GatheredParameters(
                list(model.parameters()), modifier_rank=None
            )
        with gathered, torch.no_grad():
            if ev is not None:
                mbs = recipe.micro_batch_size
                for b in range(recipe.eval.batches):
                    start = (b * world + rank) * mbs
                    pos = torch.arange(start, start + mbs).numpy()
                    toks = ev.tokens_at(pos).to(device)
                    gen = torch.Generator(device=device)
                    gen.manual_seed(noise_seed(recipe.seed + 1, b, rank, 0))
                    total[0] += model.loss(toks, gen).float()
                    total[1] += 1
                    if b == 0 and model.is_diffusion:  # how much the head uses the context
                        for t, (true, null) in model.condition_gain(toks, (0.5, 0.9), gen).items():
                            gains[f"eval/cond_gain_t{t:g}"] = null - true
            if world > 1:
                dist.all_reduce(total)
            if rank == 0 and recipe.eval.num_samples and ev is not None:
                n = recipe.eval.num_samples
                prompt = ev.tokens_at(torch.arange(n).numpy())[:, : recipe.eval.prompt_tokens]
                gen = torch.Generator(device=device)
                gen.manual_seed(recipe.seed)
                out = model.generate(prompt.to(device), recipe.eval.new_tokens, generator=gen)
                text = _decode_samples(man, out.cpu())
                if tracker is not None:
                    tracker.log_text(text, f"samples/step_{step:08d}.txt")
        if tracker is not None and total[1] > 0:
            tracker.log_metrics({"eval/loss": float(total[0] / total[1]), **gains}, step)
    finally:
        model.train()


def _decode_samples(man, ids: torch.Tensor) -> str:
    lines = []
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(man.tokenizer_json())
    except Exception:
        tok = None
    for row in ids.tolist():
        text = ""
        if tok is not None:
            with contextlib.suppress(Exception):
                text = tok.decode(row)
        lines.append(f"{row}\n{text!r}\n")
    return "\n".join(lines)
