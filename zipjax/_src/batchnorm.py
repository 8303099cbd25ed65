"""BatchNorm reset: the statistics of a model's BatchNorm layers, recomputed over data.

Every BatchNorm layer normalises with the statistics of the current batch during the pass (as
in training), and the stored mean and variance become the cumulative average of the batch
statistics over the pass, weighted by batch size (not an exponential moving average).
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import jax
import jax.numpy as jnp

from zipjax._src import data as data_lib
from zipjax._src import spec as spec_lib
from zipjax._src.errors import DataError, SpecError, fmt_path


@functools.partial(jax.jit, static_argnums=0)
def _batch_stats(spec, variables, x):
  return spec.batchnorm_stats(variables, x)


def _batch_size(x: Any) -> int:
  leaves = jax.tree_util.tree_leaves(x)
  if not leaves or not getattr(leaves[0], "shape", ()):
    raise DataError("A calibration batch has no leading batch axis.")
  return int(leaves[0].shape[0])


def reset_batchnorm(spec: spec_lib.Spec, variables: Any, data: Iterable[Any], *,
                    progress: bool = False) -> dict:
  """Returns ``variables`` with every BatchNorm mean/var recomputed over ``data``.

  A model without BatchNorm comes back unchanged. The input is not modified.
  """
  flat = spec_lib.validate(spec, variables)
  stored = {p for p in flat if p[0] == "batch_stats"}
  if not stored:
    return spec_lib.unflatten(flat)
  sums: dict = {}
  total = 0
  batches = data_lib.iterate(data, what="BatchNorm reset")
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    batches = tqdm.tqdm(batches, desc="BatchNorm reset", leave=False)
  for x in batches:
    size = _batch_size(x)
    stats = _batch_stats(spec, variables, x)
    total += size
    for path, value in stats.items():
      sums[path] = sums.get(path, 0.0) + value * size
  missing = sorted(fmt_path(p) for p in stored if p not in sums)
  unknown = sorted(fmt_path(p) for p in sums if p not in stored)
  if missing or unknown:
    raise SpecError(
        "BatchNorm reset found batch statistics that do not line up with the variables.\n"
        f"  stored but computed by no nn.BatchNorm call: {missing}\n"
        f"  computed but not stored: {unknown}")
  for path in stored:
    value = sums[path] / total
    if not bool(jnp.all(jnp.isfinite(value))):
      raise DataError(f"BatchNorm statistics {fmt_path(path)} are not finite after the reset; "
                      "check the calibration inputs and the model's parameters.")
    flat[path] = value.astype(jnp.asarray(flat[path]).dtype)
  return spec_lib.unflatten(flat)
