"""Compare runs from MLflow: table (terminal + Markdown) and PNG plots (docs/evaluation.md).

python jobs/compare.py --runs A B ... | --experiment NAME [--metric M ...] [--out DIR]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bitlm.eval.cli import compare_main

if __name__ == "__main__":
    sys.exit(compare_main())
