"""Strict settings for every test: CPU backend, rank promotion raises, warnings are errors.

Compiled programs are dropped after a test module once the process holds many memory
mappings. On the CPU every compiled XLA program keeps its code in mappings of its own (a
small ResNet zip adds some 2000; tests/test_zip.py alone leaves 22000), and a process may hold
at most vm.max_map_count of them (65530 by default): the whole suite in one process went past
that, and XLA then crashed while compiling (a segfault in test_zip). Programs are kept while
there is room, so modules that share them do not compile them again.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_numpy_rank_promotion", "raise")

_MAX_MAPPINGS_KEPT = 25_000


def _mappings() -> int:
  """How many memory mappings this process holds (0 where /proc is missing)."""
  try:
    with open("/proc/self/maps") as f:
      return sum(1 for _ in f)
  except OSError:
    return 0


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
  yield
  if _mappings() > _MAX_MAPPINGS_KEPT:
    jax.clear_caches()
