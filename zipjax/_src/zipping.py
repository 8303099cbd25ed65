"""The top-level ``zip`` / ``zip_many``: statistics, matching, applying merges, BatchNorm reset."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from jax.sharding import Mesh

from zipjax._src import apply as apply_lib
from zipjax._src import batchnorm as bn_lib
from zipjax._src import data as data_lib
from zipjax._src import match as match_lib
from zipjax._src import spec as spec_lib
from zipjax._src import stats as stats_lib
from zipjax._src.multihead import MultiHead


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
             reset_bn: bool = True, progress: bool = False, mesh: Mesh | None = None,
             microbatch: int | str | None = "auto") -> dict | MultiHead:
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
    microbatch: the feature statistics take every batch in parts of at most this many
      examples; None takes whole batches, "auto" (the default) whole batches on accelerators
      and, on the CPU, parts whose features fit in 32 MiB a device (see
      :func:`zipjax.compute_stats`). The BatchNorm reset
      always takes whole batches: its result depends on the batches.

  Returns:
    A full zip: variables with the same tree structure, shapes and dtypes as each input. A
    partial zip: a MultiHead whose ``apply(x)`` gives one output per source model.
  """
  spec_lib.check_models(spec, variables_list)
  data_lib.check_reiterable(data)
  spaces = spec.space_names if stop_at is None else spec.trunk_spaces(stop_at)
  matcher = matcher or match_lib.greedy()
  if isinstance(matcher, match_lib.WholeModelMatcher):
    merges = matcher(spec, variables_list, spaces=spaces)
  else:
    stats = stats_lib.compute_stats(spec, variables_list, data, spaces=spaces,
                                    progress=progress, mesh=mesh, microbatch=microbatch)
    merges = compute_merges(stats, num_models=len(variables_list), matcher=matcher,
                            progress=progress)
  merged = apply_lib.apply_merges(spec, variables_list, merges, stop_at=stop_at)
  if reset_bn:
    merged = bn_lib.reset_batchnorm(spec, merged, data, progress=progress, mesh=mesh)
  return merged


def zip(variables_a: Any, variables_b: Any, spec: spec_lib.Spec, *,  # pylint: disable=redefined-builtin
        data: Iterable[Any], matcher: Callable | None = None, stop_at: str | None = None,
        reset_bn: bool = True, progress: bool = False, mesh: Mesh | None = None,
        microbatch: int | str | None = "auto") -> dict | MultiHead:
  """Merges two models into one (or a two-headed model with ``stop_at``); see
  :func:`zip_many`."""
  return zip_many([variables_a, variables_b], spec, data=data, matcher=matcher,
                  stop_at=stop_at, reset_bn=reset_bn, progress=progress, mesh=mesh,
                  microbatch=microbatch)
