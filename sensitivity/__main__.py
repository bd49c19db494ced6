"""`python -m sensitivity` (also what torchrun launches)."""

import sys

from sensitivity.cli import run

sys.exit(run())
