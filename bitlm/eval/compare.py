"""Compare training runs from MLflow: one table (terminal + Markdown) of the params that differ
and each metric's final and best value, and PNG plots against tokens seen, one line per run.

Training metrics come from the run itself, evaluation metrics from its evaluation child runs
(bitlm.tracking.eval_children), one point per evaluated checkpoint. Everything is written to a
local folder and logged as the artifacts of a comparison run (tag bitlm_kind=compare).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import tracking
from ..tracking import KIND_TAG, STEP_TAG
from .evaluate import EvalError

log = logging.getLogger("bitlm.eval")

__all__ = ["DEFAULT_METRICS", "CompareResult", "compare"]

DEFAULT_METRICS = (
    "loss",
    "throughput/tokens_per_s_per_device",
    "val/loss",
    "val/bits_per_token",
    "val/perplexity",
    "val/bit_accuracy",
    "val/token_accuracy",
    "val/block_exact_match",
    "val/invalid_code_rate",
    "gen/tokens_per_s_b1",
    "gen/tokens_per_s_b16",
    "gen/ref_perplexity",
    "gen/distinct_2",
    "gen/repetition_rate",
)
_HIGHER = ("accuracy", "exact_match", "tokens_per_s", "distinct", "mfu")
_SKIP_PARAMS = {"name"}
FIG_SIZE = (6.4, 4.0)  # inches; at DPI -> 640 x 400 pixels
DPI = 100


def higher_is_better(metric: str) -> bool:
    return any(h in metric for h in _HIGHER)


@dataclass
class RunData:
    run_id: str
    name: str
    params: dict[str, str]
    # metric -> [(tokens_seen, step, value)] sorted by step
    series: dict[str, list[tuple[float, int, float]]] = field(default_factory=dict)


@dataclass
class CompareResult:
    out_dir: Path
    table: str  # terminal
    markdown: str
    plots: list[Path]
    compare_run_id: str | None


def _history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _collect(client: Any, run: Any, wanted: list[str]) -> RunData:
    rid = run.info.run_id
    rd = RunData(rid, run.info.run_name, dict(run.data.params))
    tokens = dict(_history(client, rid, "tokens_seen"))
    for key in wanted:
        if key in run.data.metrics:
            hist = _history(client, rid, key)
            rd.series[key] = [(tokens.get(s, math.nan), s, v) for s, v in hist]
    for c in tracking.eval_children(client, run.info.experiment_id, rid):
        if c.info.status != "FINISHED":
            continue
        step = int(c.data.tags[STEP_TAG])
        tok = c.data.metrics.get("tokens_seen", math.nan)
        for key in wanted:
            if key in c.data.metrics and key not in run.data.metrics:
                rd.series.setdefault(key, []).append((tok, step, c.data.metrics[key]))
    for pts in rd.series.values():
        pts.sort(key=lambda p: p[1])
    return rd


def _fmt(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3g}"
    return f"{v:.4g}"


def _rows(runs: list[RunData], metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["", *[r.name for r in runs]]
    rows: list[list[str]] = []
    keys = sorted({k for r in runs for k in r.params} - _SKIP_PARAMS)
    for k in keys:
        vals = [r.params.get(k, "-") for r in runs]
        if len(set(vals)) > 1:
            rows.append([k, *vals])
    for m in metrics:
        if not any(r.series.get(m) for r in runs):
            continue
        pick = max if higher_is_better(m) else min
        cells = []
        for r in runs:
            pts = r.series.get(m)
            if not pts:
                cells.append("-")
                continue
            final, best = pts[-1][2], pick(p[2] for p in pts)
            cells.append(f"{_fmt(final)} / {_fmt(best)} @{pts[-1][1]}")
        arrow = "max" if higher_is_better(m) else "min"
        rows.append([f"{m} (final / best, {arrow})", *cells])
    return header, rows


def _terminal(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: s.replace("|", "\\|")
    out = ["| " + " | ".join(esc(h) for h in header) + " |"]
    out.append("|" + "|".join(["---"] * len(header)) + "|")
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _plot(runs: list[RunData], metrics: list[str], plot_dir: Path) -> tuple[list[Path], dict]:
    """One PNG per metric; returns (paths, the plotted data read back from the figure lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    paths, plotted = [], {}
    for m in metrics:
        if not any(r.series.get(m) for r in runs):
            continue
        fig, ax = plt.subplots(figsize=FIG_SIZE, dpi=DPI)
        by_steps = False
        for r in runs:
            pts = r.series.get(m) or []
            if pts and any(math.isnan(p[0]) for p in pts):
                by_steps = True
        for r in runs:
            pts = r.series.get(m) or []
            if not pts:
                continue
            xs = [float(p[1]) if by_steps else p[0] for p in pts]
            ax.plot(xs, [p[2] for p in pts], marker="o" if len(pts) < 20 else None, label=r.name)
        ax.set_xlabel("step" if by_steps else "tokens seen")
        ax.set_ylabel(m)
        ax.set_title(m)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = plot_dir / (m.replace("/", "_") + ".png")
        fig.savefig(path, dpi=DPI)
        plotted[path.name] = {
            "metric": m,
            "x": ax.get_xlabel(),
            "lines": {ln.get_label(): ln.get_xydata().tolist() for ln in ax.get_lines()},
        }
        plt.close(fig)
        paths.append(path)
    return paths, plotted


def _select(client: Any, runs: list[str] | None, experiment: str | None) -> list[Any]:
    if runs:
        found = [tracking.find_run(client, r) for r in runs]
    elif experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise EvalError(f"unknown experiment {experiment!r}")
        found = [
            r
            for r in client.search_runs([exp.experiment_id], order_by=["start_time ASC"])
            if tracking.is_training_run(r)
        ]
        if not found:
            raise EvalError(f"experiment {experiment!r} has no training runs")
    else:
        raise EvalError("give --runs A B ... or --experiment NAME")
    seen, out = set(), []
    for r in found:
        if r.info.run_id not in seen:
            seen.add(r.info.run_id)
            out.append(r)
    return out


def compare(
    runs: list[str] | None = None,
    experiment: str | None = None,
    metrics: list[str] | None = None,
    out_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    log_to_mlflow: bool = True,
) -> CompareResult:
    """Compare runs (ids or names) or every training run of an experiment."""
    uri = tracking_uri or tracking.default_tracking_uri()
    client = tracking.client(uri)
    selected = _select(client, runs, experiment)
    wanted = list(metrics or DEFAULT_METRICS)
    data = [_collect(client, r, wanted) for r in selected]
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    out = Path(out_dir or Path("runs") / "compare" / stamp).absolute()
    out.mkdir(parents=True, exist_ok=True)
    header, rows = _rows(data, wanted)
    table, md = _terminal(header, rows), _markdown(header, rows)
    (out / "table.txt").write_text(table + "\n")
    (out / "table.md").write_text(md + "\n")
    plots, plotted = _plot(data, wanted, out / "plots")
    (out / "series.json").write_text(json.dumps(plotted, indent=1))
    summary = {
        "tracking_uri": uri,
        "runs": {r.name: r.run_id for r in data},
        "series": {r.name: r.series for r in data},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    cid = None
    if log_to_mlflow:
        try:
            exp_id = selected[0].info.experiment_id
            names = ", ".join(r.name for r in data)
            run = client.create_run(
                exp_id,
                run_name=f"compare-{stamp}",
                tags={
                    KIND_TAG: "compare",
                    "bitlm_compare_runs": ",".join(r.run_id for r in data),
                    "mlflow.note.content": f"Comparison of {names}\n\n{md}",
                },
            )
            cid = run.info.run_id
            client.log_artifacts(cid, str(out))
            client.set_terminated(cid, "FINISHED")
        except Exception as e:
            log.warning("MLflow: comparison not logged (%s: %s)", type(e).__name__, e)
            if cid:
                with contextlib.suppress(Exception):
                    client.set_terminated(cid, "FAILED")
            cid = None
    return CompareResult(out, table, md, plots, cid)
