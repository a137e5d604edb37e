"""The training loop: data -> step -> callbacks (OLMo-core's trainer and callback split).

    Trainer.fit:  pre_train
                  while state.step < state.stop_at:
                      pre_step(positions)  read the batch  forward (on_loss per micro-batch)
                      backward  optimizer step  all-reduce the step's loss  post_step
                  post_train          (on_error instead, when anything raised)

The trainer owns only the step: the batch of a position, the learning rate, the seeded noise of
each micro-batch, DeepSpeed's forward/backward/step, and the all-reduced results in the typed
``TrainerState``. Everything else (the NaN/spike guards, logging, MLflow, evaluation, the
checkpoint policy, and in tests fault injection) is a ``Callback`` (bitlm/train/callbacks.py).

Exactness: the objective's noise comes from a generator seeded by (seed, step, rank, micro-batch)
and the batch from the data position, so a resumed run recomputes exactly what an uninterrupted
run would.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from .config import TrainRecipe
from .data import Dataset, rank_positions

__all__ = [
    "Callback",
    "FatalTrainingError",
    "NonFiniteGuard",
    "Session",
    "Trainer",
    "TrainerState",
    "import_deepspeed",
    "lr_at",
    "noise_seed",
]


class FatalTrainingError(RuntimeError):
    """Stops the run at once with no retry (non-finite steps, loss spike, changed data)."""


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


def noise_seed(seed: int, step: int, rank: int, micro: int) -> int:
    h = hashlib.blake2b(f"{seed}/{step}/{rank}/{micro}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def import_deepspeed() -> Any:
    """deepspeed, with the CPU shared-memory comm op (a 27 s JIT build) switched off."""
    importlib.import_module("deepspeed." + "ops").__compatible_ops__["deepspeed_shm_comm"] = False
    return importlib.import_module("deepspeed")


class Session(Protocol):
    """Where a worker stands in its group and how its checkpoints reach storage (Ray Train's,
    or an in-process stand-in: bitlm/train/worker.py)."""

    rank: int
    world_size: int
    run_name: str
    run_dir: str  # <storage_path>/<run_name>: local path or s3:// URI

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]: ...
    def report(self, metrics: dict[str, Any], ckpt_dir: str | None, step: int) -> None: ...
    def commit(self, step: int) -> None: ...


@dataclass
class TrainerState:
    """Where the run is. ``step``, ``tokens_seen`` and ``nonfinite`` are saved in checkpoints;
    the rest describes the last step (loss and grad norm averaged over ranks)."""

    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    stop_at: int = 0  # this launch ends when step reaches it
    start_step: int = 0  # the step this launch started (or resumed) at
    nonfinite: NonFiniteGuard = field(default_factory=lambda: NonFiniteGuard(0))
    lr: float = 0.0
    loss: float = math.nan
    grad_norm: float = math.nan
    skipped: bool = False  # DeepSpeed skipped the update (a NaN/inf step)
    data_s: float = 0.0  # reading the batch
    step_s: float = 0.0  # the whole step, batch included

    @property
    def started_from_scratch(self) -> bool:
        return self.start_step == 0


class Callback:
    """Hooks the trainer calls on each of its callbacks, in list order; all do nothing here.
    A hook that raises ``FatalTrainingError`` stops the run on every rank at the same step
    (the hooks see the same all-reduced state on every rank)."""

    def pre_train(self, trainer: Trainer) -> None:
        """Before the first step of this launch (``trainer.state`` holds the resumed step)."""

    def pre_step(self, trainer: Trainer, positions: np.ndarray) -> None:
        """Before step ``state.step + 1`` reads the batch of ``positions``."""

    def on_loss(self, trainer: Trainer, micro: int, loss: torch.Tensor) -> torch.Tensor:
        """Each micro-batch's loss before its backward; what it returns is backpropagated."""
        return loss

    def post_step(self, trainer: Trainer) -> None:
        """After an optimizer step; ``trainer.state`` holds its results."""

    def log_metrics(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        """Metrics some callback recorded (``Trainer.log_metrics``)."""

    def log_text(self, trainer: Trainer, text: str, name: str) -> None:
        """A text artifact some callback recorded (``Trainer.log_text``)."""

    def post_train(self, trainer: Trainer) -> None:
        """After the last step of this launch."""

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        """The loop raised ``error`` (re-raised after every callback's on_error)."""


class Trainer:
    """One DeepSpeed engine's loop over the data order (bitlm/train/data.py)."""

    def __init__(
        self,
        recipe: TrainRecipe,
        engine: Any,
        optimizer: torch.optim.Optimizer,
        data: Dataset,
        session: Session,
        device: torch.device,
        state: TrainerState,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.recipe, self.engine, self.optimizer = recipe, engine, optimizer
        self.data, self.session, self.device = data, session, device
        self.state = state
        self.callbacks = list(callbacks)
        self.rank, self.world = session.rank, session.world_size
        self.accum = recipe.global_batch_size // (recipe.micro_batch_size * self.world)
        self.tokens_per_step = recipe.global_batch_size * data.manifest.seq_len

    def fit(self) -> None:
        """This launch's steps, from ``state.step`` to ``state.stop_at``."""
        self.engine.train()
        try:
            for cb in self.callbacks:
                cb.pre_train(self)
            while self.state.step < self.state.stop_at:
                self._step()
                for cb in self.callbacks:
                    cb.post_step(self)
        except BaseException as e:
            for cb in self.callbacks:
                cb.on_error(self, e)
            raise
        for cb in self.callbacks:
            cb.post_train(self)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for cb in self.callbacks:
            cb.log_metrics(self, step, metrics)

    def log_text(self, text: str, name: str) -> None:
        for cb in self.callbacks:
            cb.log_text(self, text, name)

    def _step(self) -> None:
        r, s = self.recipe, self.state
        positions = rank_positions(s.step, self.rank, self.world, r.global_batch_size)
        for cb in self.callbacks:
            cb.pre_step(self, positions)
        t0 = time.perf_counter()
        tokens = self.data.tokens_at(positions).to(self.device)
        t_data = time.perf_counter() - t0
        lr = lr_at(r, s.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        engine = self.engine
        engine.module.set_step(s.step)  # the slot curriculum (model.slot_ramp_*)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        mbs = r.micro_batch_size
        for micro in range(self.accum):
            mb = tokens[micro * mbs : (micro + 1) * mbs]
            gen = torch.Generator(device=self.device)
            gen.manual_seed(noise_seed(r.seed, s.step, self.rank, micro))
            loss = engine(mb, gen)
            for cb in self.callbacks:
                loss = cb.on_loss(self, micro, loss)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float()
        applied = bool(engine.was_step_applied())  # False: DeepSpeed skipped a NaN/inf step
        s.step += 1
        s.tokens_seen += self.tokens_per_step
        stats = torch.tensor(
            [float(loss_sum) / self.accum, t_data, 0.0 if applied else 1.0], device=self.device
        )
        if self.world > 1:
            dist.all_reduce(stats)
            stats /= self.world
        gn = engine.get_global_grad_norm()
        s.lr, s.loss, s.skipped = lr, float(stats[0]), float(stats[2]) > 0
        s.grad_norm = float(gn) if gn is not None else float("nan")
        s.data_s, s.step_s = t_data, time.perf_counter() - t0
