"""Command lines of the evaluation jobs: ``evaluate``, ``compare`` and ``generate``.

Every entry point returns an exit code: 0 ok, 1 a run failed (one line on stderr), 2 bad input
(unknown run, no checkpoints, a checkpoint from another dataset, a bad recipe): never a
traceback for bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from .evaluate import EvalSettings

__all__ = ["compare_main", "evaluate_main", "generate_main"]

_SHOWN = (
    "val/loss",
    "val/bits_per_token",
    "val/token_accuracy",
    "val/block_exact_match",
    "gen/tokens_per_s_b1",
    "gen/ref_perplexity",
)


def _bad_input() -> tuple[type[BaseException], ...]:
    from ..dataset_format import DataError
    from ..pretrained import CheckpointError
    from ..recipe import RecipeError
    from ..tracking import RunLookupError
    from .evaluate import EvalError

    return (EvalError, RunLookupError, RecipeError, DataError, CheckpointError, FileNotFoundError)


def _fail(prog: str, e: BaseException) -> None:
    print(f"{prog}: error: {e}".splitlines()[0], file=sys.stderr)


def _trust_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what may be loaded (docs/evaluation.md, Security)")
    g.add_argument("--experiment", default=None, help="resolve run names in this experiment only")
    g.add_argument(
        "--storage-root",
        dest="storage_roots",
        action="append",
        default=[],
        metavar="DIR_OR_URI",
        help="a storage root run folders may lie in (repeat; also $BITLM_STORAGE_ROOTS); "
        "./runs and the folder of a sqlite tracking store are trusted already",
    )


def _settings_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to compute")
    for f in dataclasses.fields(EvalSettings):
        g.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default)


def evaluate_main(argv: list[str] | None = None) -> int:
    """``evaluate --run RUN [--checkpoint latest|all|PATH] [--reference RUN] [--watch]``."""
    p = argparse.ArgumentParser(
        prog="evaluate",
        description="Evaluate checkpoints of a training run into MLflow child runs.",
    )
    p.add_argument("--run", help="MLflow run id or name of a training run")
    p.add_argument("--checkpoint", default="latest", help="latest (default), all, or a folder")
    p.add_argument(
        "--watch",
        nargs="?",
        const="",
        default=None,
        metavar="RUN",
        help="evaluate each new checkpoint until the run ends (skips evaluated ones)",
    )
    p.add_argument("--every-steps", type=int, default=0, help="--watch: steps that are multiples")
    p.add_argument("--reference", default="", help="run/folder whose model scores the samples")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or runs/")
    _trust_args(p)
    p.add_argument("--no-progress", action="store_true")
    _settings_args(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    run = a.watch or a.run
    if not run:
        p.error("give --run RUN (or --watch RUN)")
    from .evaluate import evaluate_run, settings_from, watch

    def show(o) -> None:
        if o.status == "evaluated":
            vals = ", ".join(f"{k} {o.metrics[k]:.4g}" for k in _SHOWN if k in o.metrics)
            print(f"step {o.step}: evaluated -> child run {o.child_run_id} ({vals})", flush=True)
        elif o.status == "skipped":
            print(f"step {o.step}: already evaluated (skipped)", flush=True)
        elif o.status == "busy":
            print(f"step {o.step}: being evaluated by another process (skipped)", flush=True)
        else:
            print(f"step {o.step}: FAILED: {o.error}", file=sys.stderr, flush=True)

    try:
        settings = settings_from(a)
        kw = dict(
            tracking_uri=a.tracking_uri,
            reference=a.reference,
            settings=settings,
            progress=not a.no_progress,
            on_outcome=show,
            experiment=a.experiment,
            storage_roots=a.storage_roots,
        )
        if a.watch is not None:
            out = watch(run, every_steps=a.every_steps, **kw)
        else:
            out = evaluate_run(run, a.checkpoint, **kw)
    except _bad_input() as e:
        _fail("evaluate", e)
        return 2
    except Exception as e:  # e.g. MLflow unreachable: one line, not a traceback
        _fail("evaluate", RuntimeError(f"{type(e).__name__}: {e}"))
        return 1
    return 1 if any(o.status == "failed" for o in out) else 0


def compare_main(argv: list[str] | None = None) -> int:
    """``compare --runs A B ... | --experiment NAME [--metric M ...] [--out DIR]``."""
    p = argparse.ArgumentParser(
        prog="compare", description="Compare training runs: a table and plots, from MLflow."
    )
    p.add_argument("--runs", nargs="+", help="MLflow run ids or names")
    p.add_argument("--experiment", help="every training run of this MLflow experiment")
    p.add_argument("--metric", action="append", default=None, help="metric to show (repeat)")
    p.add_argument("--out", default=None, help="output folder (default runs/compare/<time>)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--no-mlflow", action="store_true", help="do not log a comparison run")
    a = p.parse_args(argv)
    if not a.runs and not a.experiment:
        p.error("give --runs A B ... or --experiment NAME")
    from .compare import compare

    try:
        res = compare(a.runs, a.experiment, a.metric, a.out, a.tracking_uri, not a.no_mlflow)
    except _bad_input() as e:
        _fail("compare", e)
        return 2
    except Exception as e:  # e.g. MLflow unreachable
        _fail("compare", RuntimeError(f"{type(e).__name__}: {e}"))
        return 1
    print(res.table)
    print(f"\nMarkdown: {res.out_dir / 'table.md'}")
    for png in res.plots:
        print(f"plot: {png}")
    if res.compare_run_id:
        print(f"MLflow comparison run: {res.compare_run_id}")
    return 0


def generate_main(argv: list[str] | None = None) -> int:
    """``generate --model DIR --prompt TEXT``: sample a continuation."""
    p = argparse.ArgumentParser(prog="generate", description="Sample text from a BitLM model.")
    p.add_argument(
        "--model",
        required=True,
        help="consolidated model folder (with tokenizer.json), checkpoint or run folder, or run",
    )
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=None, help="diffusion sampling steps K")
    p.add_argument("--cfg-scale", type=float, default=None)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tracking-uri", default=None)
    _trust_args(p)
    a = p.parse_args(argv)
    import torch

    from ..tracking import default_tracking_uri
    from .evaluate import EvalError, load_any_model

    try:
        model, _, tok_json = load_any_model(
            a.model,
            a.tracking_uri or default_tracking_uri(),
            experiment=a.experiment,
            roots=a.storage_roots,
        )
        if tok_json is None:
            raise EvalError(f"{a.model}: no tokenizer.json beside the model")
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tok_json)
    except _bad_input() as e:
        _fail("generate", e)
        return 2
    ids = tok.encode(a.prompt).ids if a.prompt else []
    prompt = torch.tensor([ids] * a.num_samples, dtype=torch.long).reshape(a.num_samples, -1)
    g = torch.Generator().manual_seed(a.seed)
    out = model.generate(
        prompt,
        a.max_new_tokens,
        steps=a.steps,
        cfg_scale=a.cfg_scale,
        temperature=a.temperature,
        generator=g,
    )
    for row in out.tolist():
        print(a.prompt + tok.decode(row[len(ids) :], skip_special_tokens=False))
        if a.num_samples > 1:
            print("-" * 40)
    return 0
