"""The trainer's production callbacks (bitlm/train/trainer.py), in the order a worker runs them:

NonFiniteCallback   counts NaN/inf steps (DeepSpeed skipped them), stops at the limit
SpikeCallback       the loss-spike guard on finite steps
MetricsCallback     the windowed step metrics: a log line every log_every, to MLflow every
                    mlflow.log_every (through Trainer.log_metrics)
EvalCallback        eval loss and samples every eval.every_steps
CheckpointCallback  the checkpoint policy (every_steps, every_minutes, at_end) and the save
MLflowCallback      rank 0: the run's params, artifacts and tags, then every metric and text
                    logged; closed at the end or on error
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..checkpoint import DS_TAG, write_state
from ..dataset_format import DataError
from ..model import BitLM
from .config import TrainRecipe
from .data import Dataset
from .trainer import Callback, FatalTrainingError, Trainer, import_deepspeed, noise_seed

log = logging.getLogger("bitlm.train")

__all__ = [
    "CheckpointCallback",
    "EvalCallback",
    "MLflowCallback",
    "MetricsCallback",
    "NonFiniteCallback",
    "SpikeCallback",
    "probe_loss",
    "spike_guard",
]


class NonFiniteCallback(Callback):
    """``state.nonfinite`` (a NonFiniteGuard) over every step; its counts go to the metrics at
    once while a streak lasts (and on the step that stops the run)."""

    def post_step(self, trainer: Trainer) -> None:
        s = trainer.state
        g = s.nonfinite
        try:
            bad = g.update(s.step, s.loss, s.grad_norm, s.skipped)
        finally:
            if g.streak:  # at once, not every log_every
                counts = {"nonfinite_steps": float(g.total), "nonfinite_streak": float(g.streak)}
                trainer.log_metrics(counts, s.step)
        if bad and trainer.rank == 0:
            log.warning(
                "step %d: non-finite loss or gradients (loss %.4g, grad norm %.4g): "
                "update skipped (%d in a row, %d in this run; the run stops at %s)",
                s.step,
                s.loss,
                s.grad_norm,
                g.streak,
                g.total,
                g.limit or "never",
            )


def spike_guard(recipe: TrainRecipe, step: int, loss: float, ema: float | None) -> None:
    """Raises at a loss spike: ``loss`` > failure.spike_ratio x the running mean ``ema``, past
    failure.spike_warmup_steps (finite losses; non-finite steps are NonFiniteGuard's)."""
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


class SpikeCallback(Callback):
    """The spike guard over the running mean (failure.spike_ema) of finite steps' losses."""

    def __init__(self) -> None:
        self.ema: float | None = None

    def post_step(self, trainer: Trainer) -> None:
        s = trainer.state
        if s.nonfinite.streak:  # this step was non-finite: NonFiniteCallback's
            return
        spike_guard(trainer.recipe, s.step, s.loss, self.ema)
        a = trainer.recipe.failure.spike_ema
        self.ema = s.loss if self.ema is None else a * self.ema + (1 - a) * s.loss


class MetricsCallback(Callback):
    """Step metrics over the window since the last ones (throughput, MFU, time shares)."""

    def __init__(self, flops_per_token: float) -> None:
        self.flops_per_token = flops_per_token
        self._reset()

    def _reset(self) -> None:
        self.t = self.data = 0.0
        self.tokens = self.steps = 0

    def post_step(self, trainer: Trainer) -> None:
        r, s = trainer.recipe, trainer.state
        self.t += s.step_s
        self.data += s.data_s
        self.tokens += trainer.tokens_per_step // trainer.world
        self.steps += 1
        if s.step % r.log_every and s.step % r.mlflow.log_every:
            return
        tps = self.tokens / max(self.t, 1e-9)
        metrics = {
            "loss": s.loss,
            "grad_norm": s.grad_norm,
            "lr": s.lr,
            "tokens_seen": float(s.tokens_seen),
            "throughput/tokens_per_s_per_device": tps,
            "mfu": tps * self.flops_per_token / r.peak_flops,
            "time/data_loading_share": self.data / max(self.t, 1e-9),
            "time/step_s": self.t / self.steps,
            "progress/pct_steps": 100.0 * s.step / r.steps,
        }
        if not s.nonfinite.streak:  # else logged at once (NonFiniteCallback)
            metrics["nonfinite_steps"] = float(s.nonfinite.total)
        if trainer.rank == 0 and s.step % r.log_every == 0:
            log.info(
                "step %d/%d loss %.4f gnorm %.3f lr %.2e tok/s/dev %.0f mfu %.2f%%",
                s.step,
                r.steps,
                s.loss,
                s.grad_norm,
                s.lr,
                tps,
                100 * metrics["mfu"],
            )
        if s.step % r.mlflow.log_every == 0:
            trainer.log_metrics(metrics, s.step)
        self._reset()


class EvalCallback(Callback):
    """Every eval.every_steps: the eval loss on the eval split (same order rule), the head's
    condition gain and (rank 0) a few generated samples."""

    def post_step(self, trainer: Trainer) -> None:
        every = trainer.recipe.eval.every_steps
        if every and trainer.state.step % every == 0:
            _evaluate(trainer)


def _evaluate(trainer: Trainer) -> None:
    recipe, rank, world, device = trainer.recipe, trainer.rank, trainer.world, trainer.device
    man, step = trainer.data.manifest, trainer.state.step
    model: BitLM = trainer.engine.module
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
            gathered = import_deepspeed().zero.GatheredParameters(
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
                trainer.log_text(_decode_samples(man, out.cpu()), f"samples/step_{step:08d}.txt")
        if total[1] > 0:
            trainer.log_metrics({"eval/loss": float(total[0] / total[1]), **gains}, step)
    finally:
        model.train()


def _decode_samples(man: Any, ids: torch.Tensor) -> str:
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


class CheckpointCallback(Callback):
    """Saves every checkpoint.every_steps, every checkpoint.every_minutes (rank 0's clock
    decides for all) and at the end of the launch (checkpoint.at_end)."""

    def pre_train(self, trainer: Trainer) -> None:
        self.last = time.monotonic()

    def post_step(self, trainer: Trainer) -> None:
        c, s = trainer.recipe.checkpoint, trainer.state
        due = c.every_steps and s.step % c.every_steps == 0
        timed = c.every_minutes > 0 and time.monotonic() - self.last > 60 * c.every_minutes
        at_end = s.step == s.stop_at and c.at_end
        flag = torch.tensor(float(bool(due) or at_end or timed), device=trainer.device)
        if trainer.world > 1:
            dist.broadcast(flag, 0)  # rank 0's clock decides the time policy
        if flag.item():
            save(trainer)
            self.last = time.monotonic()


def save(trainer: Trainer) -> None:
    """Every rank writes its DeepSpeed shard + RNG state; rank 0 adds the run state, recipe,
    tokenizer and code table. Ray merges the ranks' folders into one checkpoint; once every
    rank's upload is done, rank 0 commits it (bitlm.checkpoint)."""
    recipe, engine, session, data = trainer.recipe, trainer.engine, trainer.session, trainer.data
    s, rank = trainer.state, trainer.rank
    gathered = contextlib.nullcontext()
    if recipe.zero_stage == 3:  # model.loss reads top-level parameters directly: gather them
        gathered = import_deepspeed().zero.GatheredParameters(
            list(engine.module.parameters()), modifier_rank=None
        )
    with gathered:
        probe = probe_loss(engine.module, data, recipe)  # collective under ZeRO-3
    if not math.isfinite(probe):  # the same on every rank: all stop, nothing corrupt is saved
        raise FatalTrainingError(
            f"step {s.step}: the weights are no longer finite (probe loss {probe}); no "
            "checkpoint written; stopping (no retry)"
        )
    tmp = tempfile.mkdtemp(prefix=f"bitlm-ckpt-{s.step}-r{rank}-")
    try:
        engine.save_checkpoint(tmp, tag=DS_TAG)
        (Path(tmp) / "rng").mkdir(exist_ok=True)
        torch.save({"torch": torch.get_rng_state()}, Path(tmp) / "rng" / f"rank_{rank}.pt")
        if rank == 0:
            state = {
                "step": s.step,
                "tokens_seen": s.tokens_seen,
                "data_position": s.step * recipe.global_batch_size,
                "data_seed": recipe.data.seed,
                "fingerprint": data.fingerprint,
                "dataset_version": data.version,
                "world_size": session.world_size,
                "zero_stage": recipe.zero_stage,
                "run_name": session.run_name,
                "probe_loss": probe,
                "nonfinite_steps": s.nonfinite.total,
                "nonfinite_streak": s.nonfinite.streak,
                "time": time.time(),
            }
            write_state(tmp, state)
            (Path(tmp) / "recipe.yaml").write_text(recipe.to_yaml())
            (Path(tmp) / "tokenizer.json").write_text(data.manifest.tokenizer_json())
            (Path(tmp) / "code_table.json").write_text(data.codec.table.to_json())
        metrics = {"step": s.step, "loss": s.loss, "tokens_seen": s.tokens_seen}
        session.report(metrics, tmp, s.step)
        if session.world_size > 1:
            dist.barrier()  # every rank's files are in storage
        if rank == 0:
            session.commit(s.step)
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


class MLflowCallback(Callback):
    """Rank 0's MLflow run (bitlm.tracking.RunLogger): at the start the params (every launch:
    a relaunch may add keys or change values), ``texts`` and ``tags``; then every metric and
    text the other callbacks log; closed at the end or on error."""

    def __init__(
        self,
        recipe: TrainRecipe,
        tracking_uri: str,
        run_id: str | None,
        run_name: str,
        announce: bool,
        texts: dict[str, str],
        tags: dict[str, str],
    ) -> None:
        self.recipe, self.tracking_uri, self.run_id = recipe, tracking_uri, run_id
        self.run_name, self.announce, self.texts, self.tags = run_name, announce, texts, tags
        self.tracker: Any = None

    def pre_train(self, trainer: Trainer) -> None:
        from ..tracking import RunLogger

        m = self.recipe.mlflow
        self.tracker = RunLogger(
            self.tracking_uri,
            self.run_id,
            experiment=m.experiment,
            run_name=self.run_name,
            system_metrics=m.system_metrics,
        )
        self.tracker.sync_params(self.recipe.flat_params(), announce=self.announce)
        for name, text in self.texts.items():
            self.tracker.log_text(text, name)
        if self.tags:
            self.tracker.set_tags(self.tags)

    def log_metrics(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step)

    def log_text(self, trainer: Trainer, text: str, name: str) -> None:
        if self.tracker is not None:
            self.tracker.log_text(text, name)

    def post_train(self, trainer: Trainer) -> None:
        self._close()

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.tracker is not None:
            self.tracker.close(self.recipe.mlflow.flush_timeout_s)
            self.tracker = None
