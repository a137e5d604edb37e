"""tests/infra: offline checks of infra/ (manifests, cluster launcher, images, versions)."""

import sys
from pathlib import Path

# infra_lib.py sits beside this file; tests import it by name.
sys.path.insert(0, str(Path(__file__).parent))
