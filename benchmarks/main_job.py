"""Wall time of the main job (`bash scripts/run-main.sh`) from an empty work folder, and where it
goes: the job's own stage times (summary.json) split further with MLflow's timestamps (training
run start -> first logged step -> last step -> end; each evaluation child's span, and how much of
it overlapped training).

    python benchmarks/main_job.py [--work-dir /tmp/bitlm-main-bench] [--out results.json]

The install step of run-main.sh is excluded when .venv is already set up (its stamp matches).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def breakdown(work: Path) -> dict:
    from mlflow.tracking import MlflowClient

    summary = json.loads((work / "summary.json").read_text())
    c = MlflowClient(summary["tracking_uri"])
    out = {}
    for name, rid in summary["runs"].items():
        run = c.get_run(rid)
        hist = c.get_metric_history(rid, "loss")
        t_first = min(m.timestamp for m in hist) / 1000
        t_last = max(m.timestamp for m in hist) / 1000
        start, end = run.info.start_time / 1000, run.info.end_time / 1000
        kids = c.search_runs(
            [run.info.experiment_id], f"tags.mlflow.parentRunId = '{rid}'", order_by=["start_time"]
        )
        evals = []
        for k in kids:
            ks, ke = k.info.start_time / 1000, k.info.end_time / 1000
            evals.append(
                {
                    "step": int(k.data.tags["bitlm_eval_step"]),
                    "seconds": round(ke - ks, 1),
                    "metrics_seconds": round(k.data.metrics.get("eval/seconds", 0.0), 1),
                    "overlapping_training_s": round(max(0.0, min(ke, end) - ks), 1),
                    "after_training_end_s": round(max(0.0, ke - max(ks, end)), 1),
                }
            )
        out[name] = {
            "start_to_first_step_s": round(t_first - start, 1),
            "training_steps_s": round(t_last - t_first, 1),
            "last_step_to_run_end_s": round(end - t_last, 1),
            "evals": evals,
            "eval_wait_after_training_s": round(
                max([0.0] + [k.info.end_time / 1000 - end for k in kids]), 1
            ),
        }
    return {"stages_s": summary["seconds"], "runs": out}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work-dir", default="/tmp/bitlm-main-bench")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    work = Path(a.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["bash", "scripts/run-main.sh", "--work-dir", str(work)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"main job failed ({proc.returncode}): {proc.stderr[-2000:]}")
    res = {
        "wall_s": round(wall, 1),
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        **breakdown(work),
    }
    res["process_overhead_s"] = round(wall - res["stages_s"]["total"], 1)
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
