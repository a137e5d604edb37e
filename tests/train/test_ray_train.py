"""Ray Train + DeepSpeed runs with 2 workers (each fit costs ~15-20 s on 2 cores).

Point 1 (ZeRO-1 here; ZeRO-2 in test_mlflow_server, ZeRO-3 in test_s3), 2 (exact resume),
3 (SIGKILL a worker), 4 (NaN guard: failure.max_nonfinite_steps=1 stops at the first)."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch
from faults import IndexLog, KillAt, NanLossAt, StopAfter
from helpers import metric_history, train

from bitlm.train import TrainingAborted
from bitlm.train.export import load_checkpoint_model

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_zero1_trains_and_resumes_bit_identically(ray_local, tiny_data, tmp_path, mlflow_uri):
    common = ["zero_stage=1", "steps=6", "checkpoint.every_steps=0"]
    full = train(tiny_data, tmp_path / "runs", "full", *common)
    first = train(tiny_data, tmp_path / "runs", "split", *common, callbacks=[StopAfter(3)])
    assert first.checkpoint.endswith("checkpoint_00000003")
    rest = train(tiny_data, tmp_path / "runs", "split", *common)  # same name: resumes at 3
    assert rest.checkpoint.endswith("checkpoint_00000006")
    assert rest.mlflow_run_id == first.mlflow_run_id  # one run identity across launches

    a = metric_history(mlflow_uri, full.mlflow_run_id)
    b = metric_history(mlflow_uri, rest.mlflow_run_id)
    assert [s for s, _ in a] == [1, 2, 3, 4, 5, 6] == [s for s, _ in b]
    assert a == b, f"losses differ after resume:\n{a}\n{b}"  # bit-identical (fp32 on CPU)
    assert a[-1][1] < a[0][1] - 0.05  # loss decreases

    ma, _, sa = load_checkpoint_model(full.checkpoint)
    mb, _, sb = load_checkpoint_model(rest.checkpoint)
    for (k, va), (_, vb) in zip(ma.state_dict().items(), mb.state_dict().items(), strict=True):
        assert torch.equal(va, vb), k
    assert sa["step"] == sb["step"] == 6 and sa["tokens_seen"] == sb["tokens_seen"]
    assert sa["fingerprint"] == sb["fingerprint"]

    from mlflow.tracking import MlflowClient

    c = MlflowClient(mlflow_uri)
    run = c.get_run(full.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "full"
    assert run.data.params["zero_stage"] == "1" and run.data.params["model.d_model"] == "32"
    for key in ("grad_norm", "lr", "tokens_seen", "mfu", "time/data_loading_share"):
        assert key in run.data.metrics, key
    arts = {f.path for f in c.list_artifacts(full.mlflow_run_id)}
    assert {"recipe.yaml", "tokenizer.json", "code_table.json"} <= arts


def test_nan_stops_without_retry(ray_local, tiny_data, tmp_path, mlflow_uri):
    log_dir = tmp_path / "idx"
    with pytest.raises(TrainingAborted, match="1 steps in a row with a non-finite loss"):
        train(
            tiny_data,
            tmp_path / "runs",
            "nan",
            "zero_stage=2",
            "steps=6",
            "failure.max_failures=2",
            "failure.max_nonfinite_steps=1",  # stop at the first (default: 10 in a row)
            callbacks=[NanLossAt(2), IndexLog(log_dir)],
        )
    for r in range(2):
        recs = [json.loads(x) for x in (log_dir / f"rank_{r}.jsonl").read_text().splitlines()]
        assert [x["step"] for x in recs] == [1, 2]  # stopped at once, never retried
    from mlflow.tracking import MlflowClient

    c = MlflowClient(mlflow_uri)
    run = c.search_runs(
        [c.get_experiment_by_name("bitlm-pretrain").experiment_id], "tags.mlflow.runName = 'nan'"
    )[0]
    assert run.info.status == "FAILED"
    assert "last: step 2, loss nan" in run.data.tags["error"]


def test_killed_worker_resumes_without_losing_or_repeating_samples(
    ray_local, tiny_data, tmp_path, mlflow_uri
):
    log_dir = tmp_path / "idx"
    res = train(
        tiny_data,
        tmp_path / "runs",
        "kill",
        "zero_stage=2",
        "steps=6",
        "checkpoint.every_steps=2",
        "failure.max_failures=1",
        callbacks=[KillAt(rank=1, step=4), IndexLog(log_dir)],
    )
    assert res.checkpoint.endswith("checkpoint_00000006")
    final: dict[int, list[int]] = defaultdict(list)  # step -> positions of the surviving attempt
    for r in range(2):
        recs = [json.loads(x) for x in (log_dir / f"rank_{r}.jsonl").read_text().splitlines()]
        pids = list(dict.fromkeys(x["pid"] for x in recs))
        assert len(pids) == 2, "the worker group was restarted once"
        second = [x for x in recs if x["pid"] == pids[1]]
        assert second[0]["step"] == 3  # resumed from the step-2 checkpoint, not from scratch
        by_step = {}
        for x in recs:
            if x["step"] in by_step:  # a redone step consumes the same samples
                assert by_step[x["step"]] == x["positions"]
            by_step[x["step"]] = x["positions"]
        for s, pos in by_step.items():
            final[s] += pos
    assert sorted(final) == [1, 2, 3, 4, 5, 6]
    consumed = sorted(p for s in final for p in final[s])
    assert consumed == list(range(6 * 8))  # each sample position exactly once
