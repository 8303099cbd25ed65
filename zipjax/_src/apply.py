"""Applying merges: W* = sum_m M_m(out) . W_m . U_m(in) for every leaf, in one jitted program.

Each merged axis of a leaf is one linear map per model: an axis that writes a space is
contracted with M_m, one that reads a space with U_m, and the models' results are summed. For
a :class:`~zipjax._src.merge.GroupMerge` both maps are the one-hot matrix of model m's group
ids, O_m[j, g] = [groups[m, j] == g] (U_m = O_m, M_m = O_m^T / sizes), built inside the program
from the ids: a merge is data of shape (N, n), so the program depends on the widths and N
only and is compiled once per architecture. Two kernels compute the contraction with O_m:

- ``"einsum"``: a dot with the one-hot matrix (what accelerators run at full rate);
- ``"segment_sum"``: a sum of the axis's slices into their groups (a scatter-add along the
  axis), which on the CPU costs a pass over the leaf instead of a dot's n multiply-adds per
  value.

``kernel="auto"`` takes segment sums on the CPU and einsums elsewhere. A
:class:`~zipjax._src.merge.DenseMerge` is a dot with its blocks on every backend.

BatchNorm layers are merged as per-feature affine maps (see :func:`_merge_batchnorm`): a
self-merge and a permuted copy are reproduced exactly, before any BatchNorm reset.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from zipjax._src import spec as spec_lib
from zipjax._src.errors import MismatchError, SpecError
from zipjax._src.merge import DenseMerge, Merge
from zipjax._src.multihead import MultiHead

_HI = lax.Precision.HIGHEST
KERNELS = ("auto", "einsum", "segment_sum")


def _segment_sum(parts: Sequence[tuple[jax.Array, jax.Array]], axis: int, n: int) -> jax.Array:
  """sum over (x, ids) in ``parts`` of x's slices along ``axis`` summed into n groups by ids.

  One scatter-add a part into one buffer, in place, of the leaf viewed as (before, axis,
  after): each index adds a (before, after) window. A last axis is transposed first, so that
  its windows are rows (a scatter of columns walks the whole leaf once per index).
  """
  shape = parts[0][0].shape
  before, after = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
  rows = after == 1 and before > 1
  y = jnp.zeros((n, before) if rows else (before, n, after), parts[0][0].dtype)
  for x, ids in parts:
    if rows:
      y = y.at[ids].add(x.reshape(before, -1).T)
    else:
      y = y.at[:, ids, :].add(x.reshape(before, -1, after))
  return (y.T if rows else y).reshape(shape[:axis] + (n,) + shape[axis + 1:])


def _dot(x: jax.Array, axis: int, mat: jax.Array) -> jax.Array:
  """x contracted on ``axis`` with the rows of ``mat`` (its columns take the axis's place)."""
  return jnp.moveaxis(jnp.tensordot(x, mat, axes=((axis,), (0,)), precision=_HI), -1, axis)


def _matrix(merge: Merge, m: int, role: str, dtype) -> jax.Array:
  """Model m's map as a (n, n) matrix to contract with: U_m for role 'in', M_m^T otherwise."""
  n = merge.width
  if isinstance(merge, DenseMerge):
    return merge.U[m * n:(m + 1) * n] if role == spec_lib.IN else merge.M[:, m * n:(m + 1) * n].T
  onehot = (merge.groups[m][:, None] == jnp.arange(n)[None, :]).astype(dtype)
  return onehot if role == spec_lib.IN else onehot * _inv_sizes(merge, dtype)[None, :]


def _inv_sizes(merge: Merge, dtype) -> jax.Array:
  """1 / the number of members of each merged feature of a group merge."""
  ones = jnp.ones(merge.groups.size, dtype)
  return 1.0 / jax.ops.segment_sum(ones, merge.groups.ravel(), merge.width)


def _map_models(xs: Sequence[jax.Array], ms: Sequence[int], axis: int, merge: Merge, role: str,
                kernel: str) -> jax.Array:
  """sum over i of model ms[i]'s map (M_m, or U_m for role 'in') on ``axis`` of ``xs[i]``."""
  n = merge.width
  if kernel == "segment_sum" and not isinstance(merge, DenseMerge):
    y = _segment_sum([(x, merge.groups[m]) for m, x in zip(ms, xs)], axis, n)
    if role == spec_lib.IN:
      return y
    shape = [1] * y.ndim
    shape[axis] = n
    return y * _inv_sizes(merge, y.dtype).reshape(shape)
  return functools.reduce(jnp.add, [_dot(x, axis, _matrix(merge, m, role, x.dtype))
                                    for m, x in zip(ms, xs)])


def _merge_leaf(xs: Sequence[jax.Array], axes: Mapping[int, spec_lib.Axis],
                merges: Mapping[str, Merge], kernel: str,
                ms: Sequence[int] | None = None) -> jax.Array:
  """sum_m of model m's maps on every axis in ``axes`` of its leaf ``xs[m]``; the plain mean
  over models if no axis writes a merged space (the models' outputs are averaged). The models'
  terms are summed by the map of the last axis, one that writes a space where there is one.
  ``ms``: the models of ``xs`` (default: 0..N-1)."""
  if not axes:
    return functools.reduce(jnp.add, xs) / len(xs)
  order = sorted(axes, key=lambda a: axes[a].role != spec_lib.IN)
  ms = range(len(xs)) if ms is None else ms
  for axis in order[:-1]:
    ax = axes[axis]
    xs = [_map_models([x], [m], axis, merges[ax.space], ax.role, kernel) for m, x in zip(ms, xs)]
  ax = axes[order[-1]]
  y = _map_models(xs, ms, order[-1], merges[ax.space], ax.role, kernel)
  return y / len(xs) if ax.role == spec_lib.IN else y


def _merge_batchnorm(bn: spec_lib.BatchNormLayer, xs: Sequence[Mapping], axis: int,
                     merge: Merge, kernel: str) -> dict:
  """A BatchNorm layer's four leaves merged as the mean of its members' affine maps.

  In inference mode the layer is y = a * x + c per feature, a = scale / sqrt(var + eps),
  c = bias - a * mean. Merged: a* = sum_m M_m a_m and c* likewise, mean* and var* the means of
  the statistics, written back as scale* = a* sqrt(var* + eps) and bias* = c* + a* mean*. With
  a group merge the same is computed as means of corrected members, scale_m sqrt((var*_g +
  eps) / (var_m + eps)) and bias_m + a_m (mean*_g - mean_m) for member m of merged feature g,
  so that a feature merged with copies of itself (a self-merge, a permuted copy) comes back
  exactly, not up to the rounding of a round trip through a. The layer's own epsilon only
  enters real merges, through var + eps; flax's default is used for every layer.
  """
  eps = spec_lib.BATCHNORM_EPSILON
  out = {axis: spec_lib.Axis(bn.space, spec_lib.OUT)}
  mean = _merge_leaf([x[bn.mean] for x in xs], out, {bn.space: merge}, kernel)
  var = _merge_leaf([x[bn.var] for x in xs], out, {bn.space: merge}, kernel)
  scales, biases = [], []
  for m, x in enumerate(xs):
    a = x[bn.scale] * lax.rsqrt(x[bn.var] + eps)
    if isinstance(merge, DenseMerge):
      scales.append(a)
      biases.append(x[bn.bias] - a * x[bn.mean])
    else:
      ids = merge.groups[m]
      scales.append(x[bn.scale] * jnp.sqrt((jnp.take(var, ids, axis) + eps) / (x[bn.var] + eps)))
      biases.append(x[bn.bias] + a * (jnp.take(mean, ids, axis) - x[bn.mean]))
  scale = _merge_leaf(scales, out, {bn.space: merge}, kernel)
  bias = _merge_leaf(biases, out, {bn.space: merge}, kernel)
  if isinstance(merge, DenseMerge):
    scale, bias = scale * jnp.sqrt(var + eps), bias + scale * mean
  return {bn.scale: scale, bn.bias: bias, bn.mean: mean, bn.var: var}


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def merge_program(spec: spec_lib.Spec, trunk: frozenset | None, kernel: str,
                  flats: Sequence[Mapping], merges: Mapping[str, Merge]) -> tuple[dict, jax.Array]:
  """Zips the trunk leaves (all leaves if ``trunk`` is None); head leaves stay per model,
  stacked on a leading axis, with their axes that read a trunk space mapped by U_m. Also
  returns whether the result is finite: every value of every model reaches it with a nonzero
  weight (or times 0, and 0 * NaN is NaN), so one sum over the result checks the models."""
  xs = [{p: x.astype(jnp.float32) for p, x in f.items()} for f in flats]
  out = {}
  for bn in spec.batchnorm_layers(trunk):
    axis = next(iter(spec.leaf_axes(bn.var, flats[0][bn.var].ndim)))
    out.update(_merge_batchnorm(bn, xs, axis, merges[bn.space], kernel))
  for path, leaf in flats[0].items():
    if path in out:
      continue
    axes = spec.leaf_axes(path, leaf.ndim)
    leaves = [x[path] for x in xs]
    if trunk is None or spec.is_trunk_leaf(path, trunk):
      out[path] = _merge_leaf(leaves, axes, merges, kernel)
    else:
      reads = {a: ax for a, ax in axes.items() if ax.role == spec_lib.IN and ax.space in trunk}
      out[path] = jnp.stack([_merge_leaf([x], reads, merges, kernel, [m]) if reads else x
                             for m, x in enumerate(leaves)])
  total = sum(jnp.sum(v) for p, v in out.items() if jnp.issubdtype(flats[0][p].dtype, jnp.inexact))
  return {p: v.astype(flats[0][p].dtype) for p, v in out.items()}, jnp.isfinite(total)


def resolve_kernel(kernel: str) -> str:
  """``kernel`` with "auto" resolved for the default backend."""
  if kernel not in KERNELS:
    raise ValueError(f"Unknown kernel {kernel!r}; expected one of {KERNELS}.")
  if kernel == "auto":
    return "segment_sum" if jax.default_backend() == "cpu" else "einsum"
  return kernel


def apply_merges(spec: spec_lib.Spec, variables_list: Sequence[Any],
                 merges: Mapping[str, Merge], *, stop_at: str | None = None,
                 kernel: str = "auto") -> dict | MultiHead:
  """Zips N models' variables with one merge per space.

  Arguments:
    spec: the models' spec.
    variables_list: N >= 2 variables trees of the same structure and shapes.
    merges: {space: Merge} for every space (up to ``stop_at``), of the spec's widths and N.
    stop_at: a partial zip: only the spaces up to this stop point are merged.
    kernel: "auto", "einsum" or "segment_sum" (see the module docstring); the result is the
      same up to float rounding.

  Returns:
    The merged variables, with the inputs' tree structure, shapes and dtypes (a full zip), or
    with ``stop_at`` a MultiHead: the trunk merged, every model's rest kept as its head.

  Raises:
    SpecError: a space without a merge. MismatchError: a merge of the wrong width or number
    of models, or non-finite values in a model.
  """
  flats = spec_lib.check_models(spec, variables_list, finite=False)
  needed = spec.space_names if stop_at is None else spec.trunk_spaces(stop_at)
  missing = [s for s in needed if s not in merges]
  if missing:
    raise SpecError(f"apply_merges has no merge for spaces {missing}; "
                    + ("a full zip needs one for every space" if stop_at is None else
                       f"a partial zip at {stop_at!r} needs one for every space up to it")
                    + f" of {spec.name!r}.")
  for name in needed:
    merge, width = merges[name], spec.width(name)
    if not isinstance(merge, Merge):
      raise TypeError(f"The merge of space {name!r} is a {type(merge).__name__}; expected a "
                      "zipjax.match.GroupMerge or DenseMerge.")
    if (merge.num_models, merge.width) != (len(flats), width):
      raise MismatchError(
          f"The merge of space {name!r} is for {merge.num_models} models of width "
          f"{merge.width}; the models are {len(flats)} of width {width} (M must be "
          f"{(width, len(flats) * width)}, U {(len(flats) * width, width)}).")
  trunk = None if stop_at is None else frozenset(needed)
  leaves, finite = merge_program(spec, trunk, resolve_kernel(kernel), tuple(flats),
                                 {name: merges[name] for name in needed})
  if not bool(finite):
    for m, flat in enumerate(flats):  # the exact check, only on this rare path
      spec_lib.check_finite(flat, label=f"Model {m}")
  zipped = spec_lib.unflatten({p: leaves[p] for p in flats[0]})
  if stop_at is None:
    return zipped
  heads = frozenset(p for p in flats[0] if not spec.is_trunk_leaf(p, trunk))
  return MultiHead(zipped, spec, heads, stop_at)
