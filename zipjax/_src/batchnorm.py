"""BatchNorm reset: the statistics of a model's BatchNorm layers, recomputed over data.

Every BatchNorm layer normalises with the statistics of the current batch during the pass (as
in training), and the stored mean and variance become the cumulative average of the batch
statistics over the pass (not an exponential moving average): weighted by batch size, with the
variance of each batch biased, as flax computes it (``statistics="flax"``, the default); or
each batch weighing the same, with its unbiased variance, as PyTorch's BatchNorm with
``momentum=None`` does and the official ZipIt! code uses (``statistics="pytorch"``).

With several devices (all local ones by default, or a ``mesh``), every batch is split over the
devices along its batch axis and XLA all-reduces the batch statistics, so a layer normalises
with the statistics of the whole batch, as on one device (see ``zipjax._src.sharding``).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from zipjax._src import data as data_lib
from zipjax._src import multihead
from zipjax._src import sharding as sharding_lib
from zipjax._src import spec as spec_lib
from zipjax._src.errors import DataError, SpecError, fmt_path


STATISTICS = ("flax", "pytorch")


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=4)
def _accumulate(spec, stacked, out_sharding, unbiased, sums, variables, x, weight):
  """``sums`` plus ``weight`` times the BatchNorm statistics of batch ``x``.

  The running sums go through every step, so the steps run one after the other: on a CPU
  mesh, two steps in flight at once could each hold some devices' threads in an all-reduce
  that waits for the others.
  """
  stats = _batch_stats(spec, stacked, variables, x, per_head=out_sharding is not None,
                       unbiased=unbiased)
  missing = sorted(fmt_path(p) for p in sums if p not in stats)
  unknown = sorted(fmt_path(p) for p in stats if p not in sums)
  if missing or unknown:
    raise SpecError(
        "BatchNorm reset found batch statistics that do not line up with the variables.\n"
        f"  stored but computed by no nn.BatchNorm call: {missing}\n"
        f"  computed but not stored: {unknown}")
  new = {p: s + stats[p].astype(jnp.float32) * weight for p, s in sums.items()}
  if out_sharding is not None:
    new = jax.lax.with_sharding_constraint(new, out_sharding)
  return new


def _batch_stats(spec, stacked, variables, x, *, per_head: bool, unbiased: bool) -> dict:
  """{batch_stats path: mean or var} of batch ``x`` (traced inside ``_accumulate``)."""
  stats_of = functools.partial(_stats_of, unbiased=unbiased)
  if not stacked:
    stats = stats_of(spec, variables, x)
  elif not per_head:
    axes = multihead.in_axes(variables, stacked)
    stats = jax.vmap(lambda v, x: stats_of(spec, v, x), in_axes=(axes, None))(variables, x)
    # vmap stacks every output; a trunk layer's statistics are the same for every head.
    stats = {p: (v if p in stacked else v[0]) for p, v in stats.items()}
  else:
    # On a mesh, one pass per head: XLA's SPMD partitioner gathers the whole batch onto every
    # device for the grouped convolutions vmap makes of the heads (openxla/xla#47945). Each
    # pass recomputes the trunk, but on 1/devices of the batch.
    flat = spec_lib.flatten(variables)
    num = next(v.shape[0] for p, v in flat.items() if p in stacked)
    heads = [stats_of(spec, spec_lib.unflatten(
        {p: (v[m] if p in stacked else v) for p, v in flat.items()}, variables), x)
             for m in range(num)]
    stats = {p: (jnp.stack([s[p] for s in heads]) if p in stacked else v)
             for p, v in heads[0].items()}
  return stats


def _stats_of(spec, variables, x, *, unbiased: bool = False) -> dict:
  """``spec.batchnorm_stats`` as {statistic's leaf path: value}; a layer given as
  {layer path: (mean, var)} or (mean, var, count) is spread over its 'mean' and 'var'
  leaves, the variance made unbiased (times count / (count - 1)) if ``unbiased``."""
  out = {}
  for path, value in spec.batchnorm_stats(variables, x).items():
    if not isinstance(value, tuple):
      if unbiased:
        raise SpecError(
            f"The PyTorch-style BatchNorm reset (unbiased variance) needs the number of values "
            f"behind each layer's statistics, but the spec {spec.name!r} reports "
            f"{fmt_path(path)} as a leaf. Its batchnorm_stats must return {{layer path: "
            "(mean, var, count)}} (linen models do), or reset with statistics='flax'.")
      out[tuple(path)] = value
      continue
    if len(value) not in (2, 3):
      raise SpecError(f"batchnorm_stats gave {len(value)} values for {fmt_path(path)}; "
                      "expected {layer path: (mean, var)}, {layer path: (mean, var, count)} "
                      "or {leaf path: array}.")
    mean, var = value[:2]
    if unbiased:
      if len(value) != 3 or int(value[2]) < 2:
        raise SpecError(
            f"The PyTorch-style BatchNorm reset (unbiased variance) needs the number (at "
            f"least 2) of values behind the statistics of {fmt_path(path)}; batchnorm_stats "
            "must return {layer path: (mean, var, count)}, or reset with statistics='flax'.")
      var = var * (value[2] / (value[2] - 1))
    out[tuple(path) + ("mean",)], out[tuple(path) + ("var",)] = mean, var
  return out


def batchnorm_paths(spec: spec_lib.Spec, variables: Any, x: Any, *,
                    unbiased: bool = False) -> frozenset:
  """The leaf paths whose values a BatchNorm reset recomputes (traced, not run), checked
  against the spec: a model whose spec has BatchNorm layers must report their statistics."""
  shapes = jax.eval_shape(lambda v, x: _stats_of(spec, v, x, unbiased=unbiased), variables, x)
  paths = frozenset(shapes)
  flat = spec_lib.flatten(variables)
  unknown = sorted(fmt_path(p) for p in paths if p not in flat)
  if unknown:
    raise SpecError(f"batchnorm_stats of spec {spec.name!r} reports statistics for "
                    f"{unknown[:8]}, which are not leaves of the variables (leaves are named "
                    "like 'batch_stats/bn1/mean' for linen, 'bn1/mean' for NNX).")
  layers = [bn for bn in spec.batchnorm_layers() if bn.mean not in paths or bn.var not in paths]
  if layers:
    raise SpecError(
        f"The spec {spec.name!r} has BatchNorm layers whose statistics its `batchnorm_stats` "
        f"does not compute: {[fmt_path(bn.var[:-1]) for bn in layers[:8]]}; the reset would "
        "leave them stale. For a plain function pass infer_spec(..., batchnorm_stats=f) with "
        "f(variables, x) -> {leaf path: batch mean or variance}; linen and NNX models get one "
        "automatically. To keep the merged statistics, pass reset_bn=False.")
  return paths


def reset_batchnorm(variables: Any, spec: spec_lib.Spec, data: Iterable[Any], *,
                    statistics: str = "flax", progress: bool = False,
                    mesh: Mesh | None = None) -> Any:
  """Returns ``variables`` with every BatchNorm mean/var recomputed over ``data``.

  ``statistics="flax"`` (the default) averages the batches' statistics weighted by batch
  size, each batch's variance biased (what flax's BatchNorm computes); ``"pytorch"`` gives
  every batch the same weight and takes its unbiased variance, as PyTorch's BatchNorm with
  ``momentum=None`` (the official ZipIt! reset; it needs a spec whose ``batchnorm_stats``
  reports counts, as linen specs do, else a SpecError).

  ``variables`` may also be a MultiHead (a partial zip or an ensemble): its trunk and each of
  its heads are reset, the trunk computed once per batch (on a mesh, once per head). A model
  without BatchNorm comes back unchanged. The input is not modified.

  Data-parallel over ``mesh`` (default: all local devices; one device takes the plain
  single-device path): every batch is sharded along its batch axis over the mesh's "data"
  axis, the variables replicated, and XLA all-reduces the batch statistics, so each layer
  normalises with the statistics of the whole batch. A batch whose size is not a multiple of
  the number of devices is placed replicated instead (each device computes all of it; padding
  would change its statistics). On several hosts, pass a mesh over every process's devices and
  batches made with ``jax.make_array_from_process_local_data``. The new statistics come back
  on one device, or where the stored ones were if the caller committed those to devices.
  """
  spec_lib.check_order(variables, spec, "reset_batchnorm(variables, spec, data)")
  if statistics not in STATISTICS:
    raise ValueError(f"statistics must be one of {STATISTICS}, got {statistics!r}.")
  unbiased = statistics == "pytorch"
  mesh = sharding_lib.resolve_mesh(mesh)
  if isinstance(variables, multihead.MultiHead):
    spec_lib.validate(spec, variables.head(0))
    new = _reset(spec, variables.variables, variables.head(0), variables.stacked, data,
                 unbiased, progress, mesh)
    return variables.replace(variables=new)
  spec_lib.validate(spec, variables)
  return _reset(spec, variables, variables, frozenset(), data, unbiased, progress, mesh)


def _reset(spec, variables, one_model, stacked, data, unbiased, progress, mesh) -> Any:
  flat = spec_lib.flatten(variables)
  stored = batchnorm_paths(spec, one_model, data_lib.first_input(data, what="BatchNorm reset"),
                           unbiased=unbiased)
  if not stored:
    return variables
  like = variables
  out_sharding = None
  if mesh is not None:
    out_sharding = sharding_lib.replicated(mesh)
    variables = sharding_lib.replicate(variables, mesh)
  # Float32 running sums, one per stored statistic (replicated on a mesh), made on the host.
  sums = jax.device_put({p: np.zeros(np.shape(flat[p]), np.float32) for p in stored})
  if mesh is not None:
    sums = sharding_lib.replicate(sums, mesh)
  total = 0
  batches = data_lib.iterate(data, what="BatchNorm reset")
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    batches = tqdm.tqdm(batches, desc="BatchNorm reset", leave=False)
  warned = False
  for x in batches:
    weight = 1 if unbiased else sharding_lib.batch_size(x)
    if mesh is not None:
      shards = sharding_lib.num_shards(mesh)
      if (not warned and not sharding_lib.is_global(x)
          and sharding_lib.batch_size(x) % shards):
        warned = True
        warnings.warn(
            f"BatchNorm reset: a batch of {sharding_lib.batch_size(x)} examples is not a "
            f"multiple of the mesh's {shards} devices, so every device computes all of it (a "
            "batch's statistics depend on all of its examples, and padding would change "
            "them): no faster than one device, and on simulated CPU devices, which share the "
            f"cores, about {shards} times the work. Use batches whose size is a multiple of "
            f"{shards}, or pass mesh= a Mesh of one device.", stacklevel=3)
      x = sharding_lib.place_batch(x, mesh)
    sums = _accumulate(spec, stacked, out_sharding, unbiased, sums, variables, x,
                       jnp.float32(weight))
    total += weight
  if mesh is not None:
    sums = sharding_lib.to_local(sums)
  # The means on the host: small arrays, and no program to compile per shape.
  sums = jax.device_get(sums)
  for path in stored:
    value = sums[path] / np.float32(total)
    if not np.isfinite(value).all():
      raise DataError(f"BatchNorm statistics {fmt_path(path)} are not finite after the reset; "
                      "check the calibration inputs and the model's parameters.")
    value = jnp.asarray(value.astype(jnp.result_type(flat[path])))
    if mesh is not None and isinstance(flat[path], jax.Array) and flat[path].committed:
      value = jax.device_put(value, flat[path].sharding)  # where the caller put it
    flat[path] = value
  return spec_lib.unflatten(flat, like)
