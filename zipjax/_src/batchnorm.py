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
from zipjax._src import multihead
from zipjax._src import spec as spec_lib
from zipjax._src.errors import DataError, SpecError, fmt_path


@functools.partial(jax.jit, static_argnums=(0, 1))
def _batch_stats(spec, stacked, variables, x):
  if not stacked:
    return spec.batchnorm_stats(variables, x)
  axes = multihead.in_axes(variables, stacked)
  stats = jax.vmap(spec.batchnorm_stats, in_axes=(axes, None))(variables, x)
  # vmap stacks every output; a trunk layer's statistics are the same for every head.
  return {p: (v if p in stacked else v[0]) for p, v in stats.items()}


def _batch_size(x: Any) -> int:
  leaves = jax.tree_util.tree_leaves(x)
  if not leaves or not getattr(leaves[0], "shape", ()):
    raise DataError("A calibration batch has no leading batch axis.")
  return int(leaves[0].shape[0])


def reset_batchnorm(spec: spec_lib.Spec, variables: Any, data: Iterable[Any], *,
                    progress: bool = False) -> Any:
  """Returns ``variables`` with every BatchNorm mean/var recomputed over ``data``.

  ``variables`` may also be a MultiHead (a partial zip or an ensemble): its trunk and each of
  its heads are reset, the trunk computed once per batch. A model without BatchNorm comes
  back unchanged. The input is not modified.
  """
  if isinstance(variables, multihead.MultiHead):
    spec_lib.validate(spec, variables.head(0))
    new = _reset(spec, spec_lib.flatten(variables.variables), variables.stacked, data,
                 progress)
    return variables.replace(variables=new)
  return _reset(spec, spec_lib.validate(spec, variables), frozenset(), data, progress)


def _reset(spec, flat, stacked, data, progress) -> dict:
  stored = {p for p in flat if p[0] == "batch_stats"}
  if not stored:
    return spec_lib.unflatten(flat)
  variables = spec_lib.unflatten(flat)
  sums: dict = {}
  total = 0
  batches = data_lib.iterate(data, what="BatchNorm reset")
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    batches = tqdm.tqdm(batches, desc="BatchNorm reset", leave=False)
  for x in batches:
    size = _batch_size(x)
    stats = _batch_stats(spec, stacked, variables, x)
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
