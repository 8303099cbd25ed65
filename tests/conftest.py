"""Strict settings for every test: CPU backend, rank promotion raises, warnings are errors.

Compiled programs are dropped after each test module. On the CPU every compiled XLA program
keeps its code in memory mappings of its own (a small ResNet zip adds some 2000), and a
process may hold at most vm.max_map_count of them (65530 by default): the whole suite in one
process went past that, and XLA then crashed while compiling (a segfault in test_zip).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
  yield
  jax.clear_caches()
