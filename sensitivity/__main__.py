"""`python -m sensitivity` (also what torchrun launches)."""

import sys

from sensitivity.cli.main import run

sys.exit(run())
