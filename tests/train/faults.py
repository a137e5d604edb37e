"""The tests' fault injection and tracing, as trainer callbacks (bitlm/train/trainer.py) that a
test adds: ``train_worker(info, session, callbacks=[...])`` in process, or
``helpers.train(..., callbacks=[...])`` through Ray (pickled by value into the workers)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch

from bitlm.train.trainer import Callback


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with NaN gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class NanLossAt(Callback):
    """Makes the loss NaN at optimizer step ``step`` (1-based)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_loss(self, trainer, micro, loss):
        return loss * float("nan") if trainer.state.step + 1 == self.step else loss


class NanGradsAt(Callback):
    """NaN gradients behind a finite loss at the optimizer steps ``steps`` (1-based)."""

    def __init__(self, *steps: int) -> None:
        self.steps = set(steps)

    def on_loss(self, trainer, micro, loss):
        return _NanGrad.apply(loss) if trainer.state.step + 1 in self.steps else loss


class KillAt(Callback):
    """SIGKILLs rank ``rank`` before step ``step`` (1-based), on a launch or restart that
    started from scratch (so the restarted group, resumed from a checkpoint, goes on)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def pre_step(self, trainer, positions):
        s = trainer.state
        if trainer.rank == self.rank and s.step + 1 == self.step and s.started_from_scratch:
            os.kill(os.getpid(), signal.SIGKILL)


class IndexLog(Callback):
    """Each rank appends the sample positions and rows it reads, one JSON line a step, to
    ``<folder>/rank_<r>.jsonl``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = str(folder)
        self.file = None

    def pre_train(self, trainer):
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        self.file = open(Path(self.folder) / f"rank_{trainer.rank}.jsonl", "a")  # noqa: SIM115

    def pre_step(self, trainer, positions):
        rec = {
            "step": trainer.state.step + 1,
            "pid": os.getpid(),
            "rows": trainer.data.rows_at(positions).tolist(),
            "positions": positions.tolist(),
        }
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()

    def post_train(self, trainer):
        self.file.close()

    def on_error(self, trainer, error):
        if self.file is not None:
            self.file.close()


class StopAfter(Callback):
    """Ends this launch after ``steps`` more steps (checkpointing at its end)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def pre_train(self, trainer):
        s = trainer.state
        s.stop_at = min(s.stop_at, s.step + self.steps)
