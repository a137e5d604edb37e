"""Pre-train BitLM with Ray Train + DeepSpeed (docs/training.md).

    python jobs/pretrain.py --config recipes/pretrain/cpu-tiny.yaml [--set a.b=c ...] [--name RUN]
    python jobs/pretrain.py export --run RUN_OR_DIR --out DIR [--storage-path runs]

The same command runs on a laptop (embedded local Ray) and under `ray job submit`.
Relaunching with the same --name resumes from its latest checkpoint. With eval.auto, the
evaluation watcher (bitlm.eval) runs beside the run: this job wires it, training never imports
evaluation.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        p = argparse.ArgumentParser(prog="pretrain.py export")
        p.add_argument("--run", required=True, help="checkpoint dir, run dir, or run name")
        p.add_argument("--out", required=True)
        p.add_argument("--storage-path", default="runs")
        a = p.parse_args(argv[1:])
        from bitlm.train.export import export_checkpoint

        print(export_checkpoint(a.run, a.out, a.storage_path))
        return 0
    p = argparse.ArgumentParser(prog="pretrain.py")
    p.add_argument("--config", default="recipes/pretrain/cpu-tiny.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--name", default=None, help="run name (reuse it to resume)")
    a = p.parse_args(argv)
    from bitlm.eval.evaluate import start_auto_eval
    from bitlm.recipe import RecipeError
    from bitlm.train import DataError, TrainingAborted, load_train_recipe, run

    try:
        recipe = load_train_recipe(a.config, a.overrides, a.name)
        result = run(recipe, on_start=start_auto_eval)
    except (RecipeError, DataError) as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        return 2
    except TrainingAborted as e:
        print(f"pretrain: {e}", file=sys.stderr)
        return 3
    print(f"run {result.name} finished: {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
