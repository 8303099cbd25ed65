"""``python -m experiments.benchmarks``: runs the benchmark suite; see suite.py."""

import sys

from ..benchmarks import suite

sys.exit(suite.main())
