"""The main job: preprocess the standard library, pre-train BitLM and the AR baseline on a
local Ray, evaluate both automatically, compare them (README's first command).

    python jobs/main.py [--work-dir runs/main] [--set key=value ...]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bitlm.eval.cli import main_job_main

if __name__ == "__main__":
    sys.exit(main_job_main())
