"""Corpus preprocessing (docs/preprocessing.md).

    python jobs/preprocess.py --config recipes/preprocess/stdlib-tiny.yaml [--set key=value ...]
    python jobs/preprocess.py verify <dataset>

Exit codes: 0 ok, 1 run/verify failure (one line on stderr), 2 bad recipe or arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from bitlm.recipe import RecipeError
    from pipeline import load_config, run_preprocess, verify
    from pipeline.driver import PreprocessError
    from pipeline.storage import StorageError

    if argv[:1] == ["verify"]:
        p = argparse.ArgumentParser(prog="preprocess.py verify")
        p.add_argument("dataset")
        p.add_argument("--sample-units", type=int, default=2)
        a = p.parse_args(argv[1:])
        try:
            report = verify(a.dataset, a.sample_units)
        except (StorageError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(json.dumps(report, indent=1))
        return 0 if report["ok"] else 1
    p = argparse.ArgumentParser(prog="preprocess.py")
    p.add_argument("--config", help="recipe YAML (recipes/preprocess/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
        cfg.validate_for_run()
    except RecipeError as e:
        print(f"error: bad recipe: {e}", file=sys.stderr)
        return 2
    try:
        summary = run_preprocess(cfg)
    except (PreprocessError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in summary.items() if k != "stages"}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
