"""The trainer's contract with its callbacks (bitlm/train/trainer.py), in process (world size 1):
the hooks' order, the typed state they see, and on_error instead of post_train when a callback
stops the run."""

from __future__ import annotations

import json

from faults import NanLossAt, StopAfter
from helpers import local_recipe

from bitlm.train.trainer import Callback, FatalTrainingError
from bitlm.train.worker import FATAL_FILE, LocalSession, train_worker


class Recorder(Callback):
    """Every hook call, with the state it saw."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def pre_train(self, trainer):
        self.calls.append(("pre_train", trainer.state.step, trainer.state.stop_at))

    def pre_step(self, trainer, positions):
        self.calls.append(("pre_step", trainer.state.step, positions.tolist()))

    def on_loss(self, trainer, micro, loss):
        self.calls.append(("on_loss", trainer.state.step, micro))
        return loss

    def post_step(self, trainer):
        s = trainer.state
        self.calls.append(("post_step", s.step, s.tokens_seen, s.loss == s.loss))

    def log_metrics(self, trainer, step, metrics):
        self.calls.append(("log_metrics", step, "loss" in metrics))

    def post_train(self, trainer):
        self.calls.append(("post_train", trainer.state.step))

    def on_error(self, trainer, error):
        self.calls.append(("on_error", trainer.state.step, type(error).__name__))


def _recipe(data, storage, *extra):
    return local_recipe(
        data,
        storage,
        "t",
        "mlflow.enabled=false",
        "zero_stage=1",
        "micro_batch_size=2",  # global batch 4 on one worker: 2 micro-batches a step
        "checkpoint.every_steps=0",
        *extra,
    )


def test_hooks_run_in_order_with_the_state_of_each_step(dist_world1, tmp_path, tiny_data):
    storage = tmp_path / "runs"
    rec = Recorder()
    s = LocalSession(str(storage), "t", keep=2)
    train_worker(
        {"recipe": _recipe(tiny_data, storage, "steps=5").to_dict()}, s, [StopAfter(2), rec]
    )
    tokens = 4 * 32  # global batch x seq_len
    assert rec.calls == [
        ("pre_train", 0, 2),  # StopAfter (before it in the list) ended the launch at step 2
        ("pre_step", 0, [0, 1, 2, 3]),
        ("on_loss", 0, 0),
        ("on_loss", 0, 1),
        ("log_metrics", 1, True),  # MetricsCallback runs before the recorder (log_every=1)
        ("post_step", 1, tokens, True),
        ("pre_step", 1, [4, 5, 6, 7]),
        ("on_loss", 1, 0),
        ("on_loss", 1, 1),
        ("log_metrics", 2, True),
        ("post_step", 2, 2 * tokens, True),
        ("post_train", 2),
    ]
    assert [r["step"] for r in s.reports] == [2]  # checkpoint.at_end: the launch's last step

    rec = Recorder()  # the relaunch resumes at 2: the state says so from pre_train on
    s = LocalSession(str(storage), "t", keep=2)
    train_worker({"recipe": _recipe(tiny_data, storage, "steps=3").to_dict()}, s, [rec])
    assert rec.calls[0] == ("pre_train", 2, 3) and rec.calls[1] == ("pre_step", 2, [8, 9, 10, 11])
    assert rec.calls[-1] == ("post_train", 3)


def test_a_fatal_step_calls_on_error_not_post_train(dist_world1, tmp_path, tiny_data):
    storage = tmp_path / "runs"
    rec = Recorder()
    r = _recipe(tiny_data, storage, "steps=5", "failure.max_nonfinite_steps=1")
    train_worker({"recipe": r.to_dict()}, LocalSession(str(storage), "t"), [NanLossAt(2), rec])
    assert "post_train" not in [c[0] for c in rec.calls]
    assert rec.calls[-1] == ("on_error", 2, FatalTrainingError.__name__)
    # step 2: the guard (before the recorder) logged its counts at once, then stopped the run
    assert ("log_metrics", 2, False) in rec.calls
    assert [c for c in rec.calls if c[0] == "post_step"] == [("post_step", 1, 4 * 32, True)]
    fatal = json.loads((storage / "t" / FATAL_FILE).read_text())
    assert "1 steps in a row with a non-finite loss" in fatal["error"]
