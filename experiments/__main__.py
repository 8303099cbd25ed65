"""``python -m experiments``: the embedded default experiment (no download); see run.py."""

import sys

from . import run

sys.exit(run.main())
