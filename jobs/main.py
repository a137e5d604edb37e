"""The main job: the whole product on the embedded default, end to end (README's first command,
`bash scripts/run-main.sh`). The job layer's one orchestration: it wires preprocessing
(pipeline), training (bitlm.train) and evaluation (bitlm.eval), which never import each other.

    python jobs/main.py [--work-dir runs/main] [--set key=value ...]

    1. preprocess the Python standard library (recipes/preprocess/stdlib-tiny.yaml)  -> data/
    2. pre-train the AR baseline, then a tiny BitLM, through Ray Train + DeepSpeed on a local
       Ray (recipes/pretrain/cpu-tiny-ar.yaml, cpu-tiny.yaml); each run's checkpoints are
       evaluated automatically (eval.auto) into MLflow child runs; BitLM's samples are scored
       by the AR baseline (eval.reference_run)
    3. compare the two runs: table, plots, and how to open the MLflow UI

Every stage is resumable: finished data, runs and evaluations are skipped on a rerun.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bitlm import tracking

log = logging.getLogger("bitlm.main")

__all__ = ["main", "run_main"]

ROOT = Path(__file__).resolve().parents[1]
RUNS = (("main-ar", "cpu-tiny-ar.yaml", ""), ("main-bitlm", "cpu-tiny.yaml", "main-ar"))
ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "DS_BUILD_OPS": "0",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "TOKENIZERS_PARALLELISM": "false",
}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Progress:
    """A progress bar for one training run, fed from its MLflow metrics (the workers run in
    other processes) until stopped."""

    def __init__(self, uri: str, experiment: str, name: str, steps: int) -> None:
        self.uri, self.experiment, self.name, self.steps = uri, experiment, name, steps
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> _Progress:
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join(5)

    def _loop(self) -> None:
        from tqdm import tqdm

        bar = tqdm(total=self.steps, desc=f"train {self.name}", unit="step", file=sys.stderr)
        evals = 0
        try:
            client = tracking.client(self.uri)
            while not self._stop.wait(2.0):
                try:
                    exp = client.get_experiment_by_name(self.experiment)
                    runs = client.search_runs(
                        [exp.experiment_id], f"tags.mlflow.runName = '{self.name}'"
                    )
                    if not runs:
                        continue
                    run = runs[0]
                    pct = run.data.metrics.get("progress/pct_steps", 0.0)
                    bar.n = round(pct * self.steps / 100)
                    kids = client.search_runs(
                        [exp.experiment_id],
                        f"tags.mlflow.parentRunId = '{run.info.run_id}' and "
                        "tags.bitlm_kind = 'eval' and attributes.status = 'FINISHED'",
                    )
                    evals = len(kids)
                    loss = run.data.metrics.get("loss")
                    bar.set_postfix_str(
                        (f"loss {loss:.3f}, " if loss is not None else "") + f"evaluated {evals}"
                    )
                except Exception:
                    continue
        finally:
            bar.close()


def _finished(uri: str, experiment: str, name: str, run_dir: str, steps: int) -> bool:
    from bitlm.checkpoint import list_complete

    try:
        client = tracking.client(uri)
        exp = client.get_experiment_by_name(experiment)
        runs = exp and client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{name}'")
    except Exception:
        return False
    if not runs or runs[0].info.status != "FINISHED":
        return False
    ckpts = list_complete(run_dir)
    return bool(ckpts) and ckpts[-1][0] >= steps


def run_main(work_dir: str | Path = "runs/main", overrides: list[str] | None = None) -> dict:
    """Run the main job in ``work_dir``; returns a summary (also written to summary.json)."""
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    work = Path(work_dir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    recipes = ROOT / "recipes"
    if not (recipes / "pretrain").is_dir():
        from bitlm.eval import EvalError

        raise EvalError(f"{recipes}: recipes not found (run from a source checkout)")
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    import ray

    if ray.is_initialized():
        pass
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)  # a cluster (`ray job submit`)
    else:  # the embedded default: its workers inherit this environment
        ray.init(
            address="local",
            num_cpus=max(2, os.cpu_count() or 2),
            include_dashboard=False,
            object_store_memory=256 * 1024 * 1024,
            log_to_driver=False,
        )
    times["ray_start"] = time.perf_counter() - t0

    # 1. data
    t0 = time.perf_counter()
    from pipeline import load_config, run_preprocess

    data = work / "data"
    _say(f"[1/3] preprocess the Python standard library -> {data}")
    pcfg = load_config(recipes / "preprocess" / "stdlib-tiny.yaml", [f"output={data}"])
    summary = run_preprocess(pcfg)
    times["preprocess"] = time.perf_counter() - t0
    _say(f"      {summary.get('message') or 'done'} ({times['preprocess']:.0f} s)")

    # 2. training with automatic evaluation
    from bitlm.eval.evaluate import start_auto_eval, watch
    from bitlm.train import load_train_recipe, run

    run_ids: dict[str, str] = {}
    for name, recipe_file, reference in RUNS:
        t0 = time.perf_counter()
        sets = [
            f"data.path={data}",
            f"storage_path={work}",
            "mlflow.experiment=bitlm-main",
            "mlflow.system_metrics=false",
            "eval.auto=true",
            f"eval.reference_run={reference}",
            *(overrides or []),
        ]
        recipe = load_train_recipe(recipes / "pretrain" / recipe_file, sets, name)
        _say(
            f"[2/3] pre-train {name} ({recipe_file}, {recipe.steps} steps, ZeRO-"
            f"{recipe.zero_stage}, {recipe.num_workers} workers) + automatic evaluation"
        )
        run_dir = str(work / name)
        if _finished(uri, recipe.mlflow.experiment, name, run_dir, recipe.steps):
            _say(f"      {name}: already trained; checking its evaluations")
            outs = watch(
                name,
                tracking_uri=uri,
                reference=reference,
                final_step=recipe.steps,
                experiment=recipe.mlflow.experiment,
                storage_roots=[str(work)],
            )
            n_new = sum(o.status == "evaluated" for o in outs)
            _say(f"      {n_new} new evaluations")
        else:
            with _Progress(uri, recipe.mlflow.experiment, name, recipe.steps):
                run(recipe, on_start=start_auto_eval)
        found = tracking.find_run(tracking.client(uri), name, recipe.mlflow.experiment)
        run_ids[name] = found.info.run_id
        times[f"train+eval {name}"] = time.perf_counter() - t0
        _say(f"      {name}: {times[f'train+eval {name}']:.0f} s")

    # 3. compare
    t0 = time.perf_counter()
    from bitlm.eval.compare import compare

    _say("[3/3] compare")
    res = compare(list(run_ids.values()), out_dir=work / "compare", tracking_uri=uri)
    times["compare"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - t_all
    models = sorted((work / "main-bitlm" / "eval").glob("checkpoint_*/model"))
    model = models[-1] if models else work / "main-bitlm" / "eval" / "<checkpoint>" / "model"
    out = {
        "work_dir": str(work),
        "model": str(model),
        "tracking_uri": uri,
        "runs": run_ids,
        "compare_dir": str(res.out_dir),
        "table_md": str(res.out_dir / "table.md"),
        "plots": [str(p) for p in res.plots],
        "compare_run_id": res.compare_run_id,
        "seconds": times,
    }
    (work / "summary.json").write_text(json.dumps(out, indent=1))
    print(res.table)
    print(f"\nMarkdown table: {res.out_dir / 'table.md'}")
    print("Plots:")
    for p in res.plots:
        print(f"  {p}")
    print("\nTimes (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    print("\nOpen the MLflow UI on these runs:")
    print(f"  .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    print("Sample from the trained BitLM:")
    print(f'  .venv/bin/bitlm generate --model {model} --prompt "def "')
    return out


def main(argv: list[str] | None = None) -> int:
    """``main [--work-dir runs/main] [--set key=value ...]`` (overrides apply to both runs)."""
    p = argparse.ArgumentParser(
        prog="main",
        description="Preprocess, pre-train BitLM and the AR baseline, evaluate, compare.",
    )
    p.add_argument("--work-dir", default="runs/main")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    from bitlm.eval import EvalError
    from bitlm.pretrained import CheckpointError
    from bitlm.recipe import RecipeError
    from bitlm.train import DataError, TrainingAborted

    try:
        run_main(a.work_dir, a.overrides)
    except (RecipeError, DataError, EvalError, tracking.RunLookupError, CheckpointError) as e:
        print(f"main: error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    except TrainingAborted as e:
        print(f"main: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
