"""Benchmarks of zipjax, each against a baseline run in the same process.

``python -m experiments.benchmarks [--quick] [--only NAME] [--out DIR]`` runs them, prints a
Markdown table and writes ``results.json`` and ``results.md`` (default: runs/benchmarks).

- ``greedy``: greedy matching vs the plain loop of the paper's algorithm, with the growth
  exponent of its time in the width.
- ``stats``: feature statistics vs plain forward passes.
- ``apply_merges``: applying merges vs a jitted copy of the same trees.
- ``batchnorm``: BatchNorm reset vs train-mode forward passes.
- ``zip_stages``: ``zipjax.zip`` stage by stage vs forward passes.
- ``zip_memory``: peak memory of ``zipjax.zip`` vs the bytes of the models and statistics.
- ``first_zip``: the first ``zipjax.zip`` in a fresh process vs the same zip repeated.
- ``official_zip``: the whole zip of two ResNet-20s in zipjax's reference mode vs the official
  PyTorch code (gstoica27/ZipIt), each in a fresh process; needs torch and a checkout named by
  ``ZIPIT_OFFICIAL``.
- ``head_pairing``: a ViT's whole zip with heads paired on attention maps vs paired on their
  features, each in a fresh process.
"""

from .suite import BENCHMARKS
from .suite import main
from .suite import run_suite
from .suite import to_markdown
from .suite import write

__all__ = ("BENCHMARKS", "main", "run_suite", "to_markdown", "write")
