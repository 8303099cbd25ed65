"""``python -m experiments.benchmarks``: runs the benchmark suite; see suite.py."""

import sys

from . import suite

sys.exit(suite.main())
