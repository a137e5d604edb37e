"""compare on three runs (issue 5, point 3): the shared trained run plus two runs logged straight
to MLflow (params, a loss curve, and evaluation child runs) so that no extra fit is needed."""

from __future__ import annotations

import json

import pytest
from eval_helpers import eval_children

from bitlm.eval.cli import compare_main

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _fake_run(client, exp_id: str, name: str, lr: str, scale: float) -> str:
    from mlflow.entities import Metric, Param

    rid = client.create_run(exp_id, run_name=name).info.run_id
    client.log_batch(
        rid,
        params=[Param("optim.lr", lr), Param("model.d_model", "32"), Param("steps", "4")],
        metrics=[
            m
            for s in range(1, 5)
            for m in (Metric("loss", scale / s, 0, s), Metric("tokens_seen", 256.0 * s, 0, s))
        ],
    )
    for step in (2, 4):
        kid = client.create_run(
            exp_id,
            run_name=f"{name}-eval-{step}",
            tags={
                "mlflow.parentRunId": rid,
                "bitlm_kind": "eval",
                "bitlm_eval_step": str(step),
            },
        ).info.run_id
        client.log_batch(
            kid,
            metrics=[
                Metric("val/bits_per_token", scale * 10 / step, 0, step),
                Metric("tokens_seen", 256.0 * step, 0, step),
            ],
        )
        client.set_terminated(kid, "FINISHED")
    client.set_terminated(rid, "FINISHED")
    return rid


def test_compare_three_runs_table_and_plots(trained, tmp_path, capsys):
    from matplotlib.image import imread
    from mlflow.tracking import MlflowClient

    c = MlflowClient(trained.uri)
    a = _fake_run(c, trained.experiment_id, "fake-a", "0.001", 4.0)
    b = _fake_run(c, trained.experiment_id, "fake-b", "0.01", 2.0)
    out = tmp_path / "cmp"
    argv = ["--runs", trained.name, a, "fake-b", "--out", str(out)]
    argv += ["--metric", "loss", "--metric", "val/bits_per_token", "--metric", "gen/distinct_2"]
    assert compare_main(argv) == 0
    printed = capsys.readouterr().out

    md = (out / "table.md").read_text().splitlines()
    assert md[0] == "|  | auto | fake-a | fake-b |"
    rows = {r.split(" | ")[0].strip("| "): r for r in md[2:]}
    assert "optim.lr" in rows and "0.001" in rows["optim.lr"] and "0.01" in rows["optim.lr"]
    assert "model.d_model" not in rows  # equal everywhere: not shown
    assert "loss (final / best, min)" in rows
    assert "1 / 1 @4" in rows["loss (final / best, min)"]  # fake-a: 4/4 at step 4, best 1
    assert "val/bits_per_token (final / best, min)" in rows
    assert (out / "table.txt").read_text().strip() in printed

    series = json.loads((out / "series.json").read_text())
    assert set(series) == {"loss.png", "val_bits_per_token.png", "gen_distinct_2.png"}
    for png in series:
        img = imread(out / "plots" / png)
        assert img.shape[:2] == (400, 640), png  # FIG_SIZE x DPI
        assert img[..., :3].std() > 0.05  # not blank
    loss = series["loss.png"]
    assert loss["x"] == "tokens seen"
    for name, rid in (("auto", trained.run_id), ("fake-a", a), ("fake-b", b)):
        steps_tokens = {m.step: m.value for m in c.get_metric_history(rid, "tokens_seen")}
        logged = sorted((m.step, m.value) for m in c.get_metric_history(rid, "loss"))
        assert loss["lines"][name] == [[steps_tokens[s], v] for s, v in logged], name
    bpt = series["val_bits_per_token.png"]["lines"]
    kids = eval_children(trained.uri, trained)
    want = sorted(
        (k.data.metrics["tokens_seen"], k.data.metrics["val/bits_per_token"]) for k in kids
    )
    assert [tuple(p) for p in bpt["auto"]] == want
    assert bpt["fake-b"] == [[512.0, 10.0], [1024.0, 5.0]]

    cmp_runs = c.search_runs([trained.experiment_id], "tags.bitlm_kind = 'compare'")
    assert len(cmp_runs) == 1
    arts = {f.path for f in c.list_artifacts(cmp_runs[0].info.run_id, "plots")}
    assert "plots/loss.png" in arts


def test_compare_bad_input(trained, capsys):
    assert compare_main(["--runs", "no-such-run", "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "compare: error: unknown run 'no-such-run': no MLflow run with that id or name"
    assert compare_main(["--experiment", "no-such-exp", "--no-mlflow"]) == 2
    assert "unknown experiment" in capsys.readouterr().err
