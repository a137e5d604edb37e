"""Evaluate checkpoints of a training run into MLflow child runs (docs/evaluation.md).

    python jobs/evaluate.py --run RUN [--checkpoint latest|all|DIR] [--reference RUN]
    python jobs/evaluate.py --watch RUN      # every new checkpoint, once, until the run ends

Exit codes: 0 ok, 1 an evaluation failed, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bitlm.eval.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
