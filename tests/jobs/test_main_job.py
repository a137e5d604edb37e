"""The main job end to end (issue 5, point 4): exactly the README's first command,
`bash scripts/run-main.sh`, with a work folder under tmp; then a rerun that does nothing new."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _run_main(work: Path) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "TRITON_INTERPRET")
    }
    return subprocess.run(
        ["bash", "scripts/run-main.sh", "--work-dir", str(work)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )


def test_main_job_end_to_end(tmp_path):
    from matplotlib.image import imread
    from mlflow.tracking import MlflowClient

    work = tmp_path / "main"
    p = _run_main(work)
    assert p.returncode == 0, p.stderr[-4000:]
    summary = json.loads((work / "summary.json").read_text())
    uri = f"sqlite:///{work / 'mlflow.db'}"
    assert summary["tracking_uri"] == uri
    assert f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1" in p.stdout

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("bitlm-main")
    for name in ("main-ar", "main-bitlm"):
        run = c.get_run(summary["runs"][name])
        assert run.info.run_name == name and run.info.status == "FINISHED"
        kids = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        assert sorted(int(k.data.tags["bitlm_eval_step"]) for k in kids) == [20, 40], name
        assert all(k.info.status == "FINISHED" for k in kids)
        assert all("val/bits_per_token" in k.data.metrics for k in kids)
    bitlm_kids = c.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{summary['runs']['main-bitlm']}'"
    )
    assert all("gen/ref_perplexity" in k.data.metrics for k in bitlm_kids)  # scored by main-ar

    md = Path(summary["table_md"]).read_text()
    assert md.splitlines()[0] == "|  | main-ar | main-bitlm |"
    assert "val/bits_per_token" in md and "model.output_head" in md
    table = (Path(summary["compare_dir"]) / "table.txt").read_text().strip()
    assert table in p.stdout
    loss_png = Path(summary["compare_dir"]) / "plots" / "loss.png"
    assert str(loss_png) in summary["plots"] and str(loss_png) in p.stdout
    assert imread(loss_png).shape[:2] == (400, 640)
    assert (Path(summary["model"]) / "model.safetensors").is_file()

    bitlm = str(ROOT / ".venv" / "bin" / "bitlm")
    g = subprocess.run(
        [bitlm, "generate", "--model", summary["model"], "--prompt", "def ", "--max-new-tokens=8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert g.returncode == 0 and g.stdout.startswith("def "), g.stderr[-2000:]

    # A rerun finds everything done: no training, no new evaluation, a fresh comparison.
    p2 = _run_main(work)
    assert p2.returncode == 0, p2.stderr[-4000:]
    assert "already trained" in p2.stderr and "0 new evaluations" in p2.stderr
    n_eval = len(c.search_runs([exp.experiment_id], "tags.bitlm_kind = 'eval'"))
    assert n_eval == 4
