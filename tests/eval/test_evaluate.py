"""Evaluation jobs (issue 5, points 1, 2 and 5), on one shared 4-step training run whose
checkpoints (steps 2 and 4) were evaluated automatically by the training driver's watcher."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from eval_helpers import ROOT, eval_children, write_dataset

from bitlm.eval.cli import evaluate_main

pytestmark = [pytest.mark.ray, pytest.mark.slow]

METRICS = {
    "val/loss",
    "val/bits_per_token",
    "val/perplexity",
    "val/bit_accuracy",
    "val/token_accuracy",
    "val/token_accuracy_slot0",
    "val/token_accuracy_slot3",
    "val/token_accuracy_freq0",
    "val/block_exact_match",
    "val/invalid_code_rate",
    "gen/tokens_per_s_b1",
    "gen/tokens_per_s_b16",
    "gen/ms_per_token_b1",
    "gen/ref_perplexity",
    "gen/distinct_1",
    "gen/distinct_2",
    "gen/repetition_rate",
    "tokens_seen",
}


def test_automatic_evaluation_of_every_checkpoint(trained):
    """Point 2: training with two checkpoints ends with two evaluation child runs."""
    assert [s for s, _ in trained.checkpoints] == [2, 4]
    kids = eval_children(trained.uri, trained, finished_only=False)
    assert sorted(int(k.data.tags["bitlm_eval_step"]) for k in kids) == [2, 4]
    assert all(k.info.status == "FINISHED" for k in kids)


def test_metrics_logged_at_the_checkpoint_step_and_never_duplicated(trained, capsys):
    """Point 1: every metric, at the right step, samples as artifacts; evaluating again (the
    CLI, --checkpoint all) does not duplicate; a removed evaluation is redone at its step."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(trained.uri)
    kids = {int(k.data.tags["bitlm_eval_step"]): k for k in eval_children(trained.uri, trained)}
    for step, kid in kids.items():
        missing = METRICS - set(kid.data.metrics)
        assert not missing, f"step {step}: {sorted(missing)}"
        for key in ("val/bits_per_token", "gen/ref_perplexity", "tokens_seen"):
            hist = c.get_metric_history(kid.info.run_id, key)
            assert [m.step for m in hist] == [step], key
        assert kid.data.metrics["tokens_seen"] == step * 8 * 32
        assert 0 <= kid.data.metrics["val/token_accuracy"] <= 1
        assert kid.data.metrics["val/perplexity"] > 1
        assert kid.data.params["eval.reference"] == trained.reference
        arts = {a.path for a in c.list_artifacts(kid.info.run_id, "samples")}
        assert {"samples/samples.txt", "samples/samples.jsonl"} <= arts

    argv = ["--run", trained.name, "--checkpoint", "all", "--no-progress"]
    assert evaluate_main(argv) == 0
    assert capsys.readouterr().out.count("already evaluated (skipped)") == 2
    assert len(eval_children(trained.uri, trained)) == 2

    c.delete_run(kids[4].info.run_id)
    argv = ["--run", trained.run_id, "--reference", trained.reference, "--no-progress"]
    assert evaluate_main(argv) == 0  # latest = step 4
    assert "step 4: evaluated" in capsys.readouterr().out
    assert evaluate_main(argv) == 0
    assert "step 4: already evaluated" in capsys.readouterr().out
    kids = eval_children(trained.uri, trained)
    assert sorted(int(k.data.tags["bitlm_eval_step"]) for k in kids) == [2, 4]
    new = next(k for k in kids if k.data.tags["bitlm_eval_step"] == "4")
    assert [m.step for m in c.get_metric_history(new.info.run_id, "val/token_accuracy")] == [4]


def test_watch_returns_at_once_on_a_finished_run(trained, capsys):
    """A restarted watcher skips what is evaluated and stops: the run is no longer RUNNING."""
    assert evaluate_main(["--watch", trained.name, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "evaluated ->" not in out


def _one_line_error(capsys, argv: list[str], match: str) -> None:
    assert evaluate_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith("evaluate: error:") and match in err, err


def test_bad_input_is_one_clear_line(trained, tmp_path, capsys):
    """Point 5: unknown run, a run without checkpoints, a checkpoint from another dataset."""
    from mlflow.tracking import MlflowClient

    _one_line_error(capsys, ["--run", "no-such-run"], "unknown run 'no-such-run'")

    c = MlflowClient(trained.uri)
    root = ["--storage-root", str(tmp_path)]  # a folder of ours (test_security: others')
    empty = c.create_run(trained.experiment_id, run_name="empty-run").info.run_id
    c.log_param(empty, "storage_path", str(tmp_path / "nothing"))
    c.log_param(empty, "data.path", trained.data)
    _one_line_error(capsys, ["--run", "empty-run", *root], "has no complete checkpoint")

    other = write_dataset(tmp_path / "other", train_rows=40)
    o = c.create_run(trained.experiment_id, run_name="other-data").info.run_id
    c.log_param(o, "storage_path", str(tmp_path))
    c.log_param(o, "data.path", other)
    ckpt = shutil.copytree(trained.checkpoints[-1][1], tmp_path / "other-data" / "checkpoint_4")
    _one_line_error(
        capsys,
        ["--run", "other-data", "--checkpoint", str(ckpt), *root],
        "trained on another dataset",
    )
    assert not eval_children(trained.uri, trained, finished_only=False)[2:]

    # The job script itself: exit code 2 and one line, no traceback.
    p = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "evaluate.py"), "--run", "no-such-run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("evaluate: error: unknown run")
    assert "Traceback" not in p.stderr


def test_live_claims_are_respected_and_abandoned_ones_redone(trained, capsys):
    """Two evaluators never both evaluate a step; a crashed evaluator's claim is taken over."""
    import os
    import socket

    from mlflow.tracking import MlflowClient

    c = MlflowClient(trained.uri)
    kid2 = next(
        k for k in eval_children(trained.uri, trained) if k.data.tags["bitlm_eval_step"] == "2"
    )
    c.delete_run(kid2.info.run_id)
    dead = subprocess.Popen(["true"])
    dead.wait()
    ckpt2 = dict(trained.checkpoints)[2]

    def claim(owner: str) -> str:
        tags = {
            "mlflow.parentRunId": trained.run_id,
            "bitlm_kind": "eval",
            "bitlm_eval_step": "2",
            "bitlm_eval_owner": owner,
        }
        return c.create_run(trained.experiment_id, run_name="claim", tags=tags).info.run_id

    live = claim(f"{socket.gethostname()}:{os.getpid()}")
    argv = ["--run", trained.name, "--checkpoint", ckpt2, "--no-progress"]
    assert evaluate_main(argv) == 0
    assert "step 2: being evaluated by another process" in capsys.readouterr().out
    c.delete_run(live)

    claim(f"{socket.gethostname()}:{dead.pid}")
    assert evaluate_main(argv) == 0
    assert "step 2: evaluated" in capsys.readouterr().out
    kids = eval_children(trained.uri, trained, finished_only=False)
    assert sorted(k.data.tags["bitlm_eval_step"] for k in kids) == ["2", "4"]
    assert all(k.info.status == "FINISHED" for k in kids)
