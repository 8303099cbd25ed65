"""Zip kernels and the top-level ``zip`` / ``zip_many``.

For every leaf, W* = sum_m M_m(out) . W_m . U_m(in): each axis that writes a space is
multiplied by that space's M_m, each axis that reads one by U_m, each variance axis by M_m
squared. A leaf that writes no merged space (the model's output layer, say) is averaged over
the models instead. All leaves are zipped in one jitted program of einsums.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from zipjax._src import batchnorm as bn_lib
from zipjax._src import data as data_lib
from zipjax._src import match as match_lib
from zipjax._src.multihead import MultiHead
from zipjax._src import spec as spec_lib
from zipjax._src import stats as stats_lib
from zipjax._src.errors import MismatchError, SpecError

_HI = jax.lax.Precision.HIGHEST


def _transform(leaf: jax.Array, axis: int, mats: jax.Array) -> jax.Array:
  """Applies mats[m] (new, old) to axis ``axis`` of leaf[m] for every model m."""
  x = jnp.moveaxis(leaf, axis + 1, -1)
  x = jnp.einsum("m...j,mij->m...i", x, mats, precision=_HI)
  return jnp.moveaxis(x, -1, axis + 1)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _zip_leaves(spec, trunk, stacked: Mapping, blocks: Mapping) -> dict:
  """Zips trunk leaves (all leaves if ``trunk`` is None); head leaves stay per model, with
  their axes that read a merged space multiplied by U_m."""
  out = {}
  for path, leaf in stacked.items():
    x = leaf.astype(jnp.float32)
    if trunk is not None and not spec.is_trunk_leaf(path, trunk):
      for axis, ax in spec.leaf_axes(path, leaf.ndim - 1).items():
        if ax.role == spec_lib.IN and ax.space in trunk:
          x = _transform(x, axis, jnp.swapaxes(blocks[ax.space][1], 1, 2))
      out[path] = x.astype(leaf.dtype)
      continue
    writes = False
    for axis, ax in spec.leaf_axes(path, leaf.ndim - 1).items():
      ms, us = blocks[ax.space]
      if ax.role == spec_lib.OUT:
        x, writes = _transform(x, axis, ms), True
      elif ax.role == spec_lib.VAR:
        x, writes = _transform(x, axis, ms * ms), True
      else:
        x = _transform(x, axis, jnp.swapaxes(us, 1, 2))
    x = x.sum(0) if writes else x.mean(0)
    out[path] = x.astype(leaf.dtype)
  return out


def merge_blocks(merges: Mapping[str, match_lib.Merge]) -> dict[str, tuple[jax.Array, jax.Array]]:
  """{space: (M blocks (N, n, n), U blocks (N, n, n))} as device arrays."""
  out = {}
  for name, merge in merges.items():
    ms, us = merge.blocks()
    out[name] = (jnp.asarray(np.stack(ms)), jnp.asarray(np.stack(us)))
  return out


def apply_merges(spec: spec_lib.Spec, variables_list: Sequence[Any],
                 merges: Mapping[str, match_lib.Merge], *,
                 stop_at: str | None = None) -> dict | MultiHead:
  """Zips N models' variables with one Merge per space.

  Returns the merged variables (full zip), or with ``stop_at`` a MultiHead: the spaces up to
  ``stop_at`` merged into one trunk, the rest of every model kept as its head.
  """
  flats = check_models(spec, variables_list)
  needed = spec.space_names if stop_at is None else spec.trunk_spaces(stop_at)
  missing = [s for s in needed if s not in merges]
  if missing:
    raise SpecError(f"apply_merges has no merge for spaces {missing}; "
                    + ("a full zip needs one for every space" if stop_at is None else
                       f"a partial zip at {stop_at!r} needs one for every space up to it")
                    + f" of {spec.name!r}.")
  num = len(flats)
  for name, merge in merges.items():
    width = spec.width(name)
    if merge.M.shape != (width, num * width) or merge.U.shape != (num * width, width):
      raise MismatchError(
          f"The merge of space {name!r} has M {merge.M.shape} and U {merge.U.shape}; with "
          f"{num} models of width {width} they must be {(width, num * width)} and "
          f"{(num * width, width)}.")
  stacked = {p: jnp.stack([jnp.asarray(f[p]) for f in flats]) for p in flats[0]}
  trunk = None if stop_at is None else frozenset(needed)
  blocks = merge_blocks({k: merges[k] for k in needed})
  zipped = spec_lib.unflatten(_zip_leaves(spec, trunk, stacked, blocks))
  if stop_at is None:
    return zipped
  heads = frozenset(p for p in flats[0] if not spec.is_trunk_leaf(p, trunk))
  return MultiHead(zipped, spec, heads, stop_at)


def check_models(spec: spec_lib.Spec, variables_list: Sequence[Any]) -> list[dict]:
  if isinstance(variables_list, Mapping) or len(variables_list) < 2:
    raise ValueError("Zipping needs a sequence of at least 2 models' variables, got "
                     f"{type(variables_list).__name__} of length "
                     f"{len(variables_list) if not isinstance(variables_list, Mapping) else 1}.")
  flats = spec_lib.check_same_structure(variables_list)
  for m, v in enumerate(variables_list):
    spec_lib.validate(spec, v, label=f"model {m}")
  for m, flat in enumerate(flats):
    spec_lib.check_finite(flat, label=f"Model {m}")
  return flats


def compute_merges(stats: Mapping[str, stats_lib.FeatureStats], *, num_models: int,
                   matcher: Callable | None = None,
                   progress: bool = False) -> dict[str, match_lib.Merge]:
  """One Merge per space from its statistics."""
  matcher = matcher or match_lib.greedy()
  items = stats.items()
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    items = tqdm.tqdm(items, desc="matching", leave=False)
  return {name: matcher(np.asarray(stats_lib.correlation(s)), num_models=num_models)
          for name, s in items}


def zip_many(variables_list: Sequence[Any], spec: spec_lib.Spec, *, data: Iterable[Any],
             matcher: Callable | None = None, stop_at: str | None = None,
             reset_bn: bool = True, progress: bool = False,
             mesh: Mesh | None = None) -> dict | MultiHead:
  """Merges N >= 2 models of the same architecture into one, without training.

  Args:
    variables_list: the models' variables ({'params': ..., 'batch_stats': ...}).
    spec: the models' zip spec (from ``zipjax.models`` or ``zipjax.spec.linen_spec``).
    data: a re-iterable collection of calibration batches (arrays, (inputs, labels) tuples
      or dicts with an 'image' entry). It is passed over twice.
    matcher: a per-space matcher such as ``zipjax.match.greedy()`` (the default), or a
      whole-model matcher such as ``zipjax.match.weight_matching()``.
    stop_at: a partial zip: merge the spaces up to this stop point (``spec.stop_points``)
      and keep the rest of every model as its own head.
    reset_bn: recompute the merged model's BatchNorm statistics over ``data``.
    progress: show tqdm progress bars.
    mesh: the devices the passes over ``data`` (statistics, BatchNorm reset) run on,
      data-parallel: batches sharded over the mesh's "data" axis, variables replicated
      (default: all local devices; a one-device mesh is the plain path). Matching runs on the
      host and the zip kernels once, where the variables are. On several hosts, pass a mesh
      over every process's devices and batches made with
      ``jax.make_array_from_process_local_data``; see :func:`zipjax.compute_stats`.

  Returns:
    A full zip: variables with the same tree structure, shapes and dtypes as each input. A
    partial zip: a MultiHead whose ``apply(x)`` gives one output per source model.
  """
  check_models(spec, variables_list)
  data_lib.check_reiterable(data)
  spaces = spec.space_names if stop_at is None else spec.trunk_spaces(stop_at)
  matcher = matcher or match_lib.greedy()
  if getattr(matcher, "whole_model", False):
    merges = matcher(spec, variables_list, spaces=spaces)
  else:
    stats = stats_lib.compute_stats(spec, variables_list, data, spaces=spaces,
                                    progress=progress, mesh=mesh)
    merges = compute_merges(stats, num_models=len(variables_list), matcher=matcher,
                            progress=progress)
  merged = apply_merges(spec, variables_list, merges, stop_at=stop_at)
  if reset_bn:
    merged = bn_lib.reset_batchnorm(spec, merged, data, progress=progress, mesh=mesh)
  return merged


def zip(variables_a: Any, variables_b: Any, spec: spec_lib.Spec, *,  # pylint: disable=redefined-builtin
        data: Iterable[Any], matcher: Callable | None = None, stop_at: str | None = None,
        reset_bn: bool = True, progress: bool = False,
        mesh: Mesh | None = None) -> dict | MultiHead:
  """Merges two models into one (or a two-headed model with ``stop_at``); see
  :func:`zip_many`."""
  return zip_many([variables_a, variables_b], spec, data=data, matcher=matcher,
                  stop_at=stop_at, reset_bn=reset_bn, progress=progress, mesh=mesh)
