"""``bitlm <command> ...`` (also ``python -m bitlm``): one entry point for every job.

bitlm preprocess --config recipes/preprocess/stdlib-tiny.yaml
bitlm pretrain   --config recipes/pretrain/cpu-tiny.yaml --name RUN
bitlm evaluate   --run RUN [--checkpoint latest|all|DIR] [--watch] [--reference RUN]
bitlm compare    --runs A B ... | --experiment NAME [--metric M ...]
bitlm main       [--work-dir runs/main]
bitlm generate   --model DIR --prompt "def "
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _job(name: str) -> Callable[[list[str]], int]:
    """``main`` of jobs/<name>.py (the preprocess, pretrain and main jobs live there: they wire
    pipeline, training and evaluation, which bitlm's packages never import from each other)."""

    def run(argv: list[str]) -> int:
        path = ROOT / "jobs" / f"{name}.py"
        if not path.is_file():
            print(f"bitlm: error: {path} not found (use a source checkout)", file=sys.stderr)
            return 2
        spec = importlib.util.spec_from_file_location(f"bitlm_job_{name}", path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return int(mod.main(argv) or 0)

    return run


def _lazy(attr: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        from .eval import cli

        return getattr(cli, attr)(argv)

    return run


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "preprocess": (_job("preprocess"), "preprocess a corpus into a dataset (Ray Data)"),
    "pretrain": (_job("pretrain"), "pre-train with Ray Train + DeepSpeed"),
    "evaluate": (_lazy("evaluate_main"), "evaluate checkpoints into MLflow child runs"),
    "compare": (_lazy("compare_main"), "compare runs: table and plots"),
    "main": (_job("main"), "the end-to-end main job"),
    "generate": (_lazy("generate_main"), "sample text from a model"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {k.ljust(width)}  {h}" for k, (_, h) in COMMANDS.items()]
        print("usage: bitlm <command> [args]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nbitlm: error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
