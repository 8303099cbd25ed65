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

import collections
import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zipjax._src import spec as spec_lib
from zipjax._src.errors import MismatchError, SpecError
from zipjax._src.merge import DenseMerge, Merge
from zipjax._src.multihead import MultiHead

_HI = lax.Precision.HIGHEST
KERNELS = ("auto", "einsum", "segment_sum")
#: How BatchNorm layers are merged (``apply_merges(..., batchnorm=)``): as their affine maps,
#: or each of their four leaves by itself, as the official ZipIt! code does.
BATCHNORM_MERGES = ("affine", "leaves")


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
  grouped = [(a, ax) for a, ax in axes.items() if ax.groups > 1]
  if grouped:  # a grouped convolution: merged as its block-diagonal plain kernel
    for a, ax in grouped:
      xs = [spec_lib.expand_groups(x, a, ax.by, ax.groups) for x in xs]
    y = _merge_leaf(xs, {a: spec_lib.Axis(ax.space, ax.role) for a, ax in axes.items()},
                    merges, kernel, ms)
    for a, ax in grouped:
      y = spec_lib.compress_groups(y, a, ax.by, ax.groups)
    return y
  order = sorted(axes, key=lambda a: axes[a].role != spec_lib.IN)
  ms = range(len(xs)) if ms is None else ms
  for axis in order[:-1]:
    ax = axes[axis]
    xs = [_map_models([x], [m], axis, merges[ax.space], ax.role, kernel) for m, x in zip(ms, xs)]
  ax = axes[order[-1]]
  y = _map_models(xs, ms, order[-1], merges[ax.space], ax.role, kernel)
  return y / len(xs) if ax.role == spec_lib.IN else y


def _merge_batchnorm(xs: Sequence[Sequence[jax.Array]], axis: int, merge: Merge,
                     kernel: str) -> tuple[jax.Array, ...]:
  """A BatchNorm layer's leaves (scale, bias, mean, var of each model, ``xs[m]``) merged as
  the mean of its members' affine maps.

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
  out = {axis: spec_lib.Axis("bn", spec_lib.OUT)}
  merges = {"bn": merge}
  mean = _merge_leaf([x[2] for x in xs], out, merges, kernel)
  var = _merge_leaf([x[3] for x in xs], out, merges, kernel)
  scales, biases = [], []
  for m, (scale, bias, mean_m, var_m) in enumerate(xs):
    a = scale * lax.rsqrt(var_m + eps)
    if isinstance(merge, DenseMerge):
      scales.append(a)
      biases.append(bias - a * mean_m)
    else:
      ids = merge.groups[m]
      scales.append(scale * jnp.sqrt((jnp.take(var, ids, axis) + eps) / (var_m + eps)))
      biases.append(bias + a * (jnp.take(mean, ids, axis) - mean_m))
  scale = _merge_leaf(scales, out, merges, kernel)
  bias = _merge_leaf(biases, out, merges, kernel)
  if isinstance(merge, DenseMerge):
    scale, bias = scale * jnp.sqrt(var + eps), bias + scale * mean
  return scale, bias, mean, var


def _units(spec: spec_lib.Spec, trunk: frozenset | None, flats: Sequence[Mapping],
           merges: Mapping[str, Merge], batchnorm: str = "affine"
           ) -> dict[tuple, list[tuple[tuple, tuple]]]:
  """The leaves to merge as units (a leaf, or a BatchNorm layer's four leaves), grouped by
  signature (kind, shape, dtype, roles, widths, merge types): {signature: [(the unit's leaf
  paths, the spaces of its merged axes)]}. Kinds: "batchnorm", "leaf" (a trunk leaf: all
  leaves in a full zip) and "head" (a leaf past a partial zip's stop, kept per model).
  With ``batchnorm="leaves"`` a BatchNorm layer's leaves are units of their own."""
  units: dict[tuple, list] = collections.defaultdict(list)
  done = set()
  for bn in spec.batchnorm_layers(trunk) if batchnorm == "affine" else ():
    leaf = flats[0][bn.var]
    axis = next(iter(spec.leaf_axes(bn.var, leaf.ndim)))
    paths = (bn.scale, bn.bias, bn.mean, bn.var)
    done.update(paths)
    units[("batchnorm", leaf.shape, leaf.dtype, axis, type(merges[bn.space]))].append(
        (paths, (bn.space,)))
  for path, leaf in flats[0].items():
    if path in done:
      continue
    axes = sorted(spec.leaf_axes(path, leaf.ndim).items())
    kind = "leaf" if trunk is None or spec.is_trunk_leaf(path, trunk) else "head"
    if kind == "head":
      axes = [(a, ax) for a, ax in axes if ax.role == spec_lib.IN and ax.space in trunk]
    key = tuple((a, ax.role, type(merges[ax.space]), spec.width(ax.space), ax.groups, ax.by)
                for a, ax in axes)
    units[(kind, leaf.shape, leaf.dtype, key)].append(((path,), tuple(ax.space for _, ax in axes)))
  return units


def _merge_unit(signature: tuple, xs: Sequence[Sequence[jax.Array]], ms: Sequence[Merge],
                kernel: str) -> tuple[jax.Array, ...]:
  """One unit of ``signature`` merged: ``xs[m]``, model m's leaves of the unit; ``ms``, the
  merges of its axes (of its layer, for a BatchNorm layer)."""
  if signature[0] == "batchnorm":
    return _merge_batchnorm(xs, signature[3], ms[0], kernel)
  axes = {a: spec_lib.Axis(str(i), role, groups, by)
          for i, (a, role, _, _, groups, by) in enumerate(signature[3])}
  merges = {str(i): m for i, m in enumerate(ms)}
  if signature[0] == "leaf":
    return (_merge_leaf([x[0] for x in xs], axes, merges, kernel),)
  return (jnp.stack([_merge_leaf([x[0]], axes, merges, kernel, [m]) if axes else x[0]
                     for m, x in enumerate(xs)]),)


@functools.partial(jax.jit, static_argnums=(0, 1))
def merge_program(signature: tuple, kernel: str, units: Sequence, merges: Sequence
                  ) -> tuple[list[list[jax.Array]], jax.Array]:
  """Merges the units of one signature: ``units[i][m]``, model m's leaves of unit i;
  ``merges[i]``, the merges of unit i's axes. The units are stacked and merged by one
  vmapped body, so a model compiles one program per kind of layer it has (ResNet-50: 28 for
  267 leaves), each reused by every model with layers of that kind. Also returns whether the
  result is finite: every value of every model reaches it with a nonzero weight (or times 0,
  and 0 * NaN is NaN), so one sum over the result checks the inputs."""
  xs = jax.tree_util.tree_map(lambda *a: jnp.stack(a).astype(jnp.float32), *units)
  ms = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *merges)
  merged = jax.vmap(functools.partial(_merge_unit, signature, kernel=kernel))(xs, ms)
  total = sum(jnp.sum(y) for y in merged)
  return ([[y[i].astype(signature[2]) for y in merged] for i in range(len(units))],
          jnp.isfinite(total))


def merge_flats(spec: spec_lib.Spec, trunk: frozenset | None, flats: Sequence[Mapping],
                merges: Mapping[str, Merge], kernel: str, batchnorm: str = "affine"
                ) -> tuple[dict, list[jax.Array]]:
  """The merged leaves {path: array} of the models' flat variables, and each program's flag
  that its result is finite (see :func:`merge_program`)."""
  leaves, finite = {}, []
  for signature, units in _units(spec, trunk, flats, merges, batchnorm).items():
    merged, ok = merge_program(signature, kernel, [[[f[p] for p in paths] for f in flats]
                                                   for paths, _ in units],
                               [[merges[s] for s in spaces] for _, spaces in units])
    finite.append(ok)
    for (paths, _), ys in zip(units, merged):
      leaves.update(zip(paths, ys))
  return leaves, finite


def _check_keeps_groups(name: str, merge: Merge, groups: int, *, paired: bool) -> None:
  """Raises unless merged feature j of a space in ``groups`` groups draws only on features of
  j's group (what GroupNorm and grouped convolutions need; see ``Space.groups``), or, for
  attention heads (``paired``), on whole groups of each model paired into j's group."""
  size = merge.width // groups
  group = np.arange(merge.width) // size
  if isinstance(merge, DenseMerge):
    m = np.asarray(merge.M).reshape(merge.width, merge.num_models, merge.width)
    u = np.asarray(merge.U).reshape(merge.num_models, merge.width, merge.width)
    off = group[:, None] != group[None, :]
    ok = paired or not (np.abs(m).transpose(1, 0, 2)[:, off].any() or np.abs(u)[:, off].any())
    if paired:  # each model group's features feed one merged group
      feeds = np.abs(m).transpose(1, 2, 0).reshape(merge.num_models, groups, size, groups, size)
      ok = bool(((feeds.sum(axis=(2, 4)) > 0).sum(axis=-1) <= 1).all())
  else:
    into = np.asarray(merge.groups) // size
    if paired:
      into = into.reshape(merge.num_models, groups, size)
      ok = bool((into == into[..., :1]).all())
    else:
      ok = bool((into == group[None, :]).all())
  if not ok:
    raise MismatchError(
        f"The merge of space {name!r} mixes features of different groups, but the space is "
        f"matched within {groups} groups ("
        + ("attention heads" if paired else "a GroupNorm or a grouped convolution")
        + "): merging across groups changes what the layer computes. Match it group by "
        "group: compute_merges(stats, num_models=N, spec=spec) (zipjax.zip does).")


def resolve_kernel(kernel: str) -> str:
  """``kernel`` with "auto" resolved for the default backend."""
  if kernel not in KERNELS:
    raise ValueError(f"Unknown kernel {kernel!r}; expected one of {KERNELS}.")
  if kernel == "auto":
    return "segment_sum" if jax.default_backend() == "cpu" else "einsum"
  return kernel


def apply_merges(variables_list: Sequence[Any], spec: spec_lib.Spec,
                 merges: Mapping[str, Merge], *, stop_at: str | None = None,
                 kernel: str = "auto", batchnorm: str = "affine") -> dict | MultiHead:
  """Zips N models' variables with one merge per space.

  Arguments:
    variables_list: N >= 2 variables trees of the same structure and shapes.
    spec: the models' spec.
    merges: {space: Merge} for every space (up to ``stop_at``), of the spec's widths and N.
    stop_at: a partial zip: only the spaces up to this stop point are merged.
    kernel: "auto", "einsum" or "segment_sum" (see the module docstring); the result is the
      same up to float rounding.
    batchnorm: "affine" (default): each BatchNorm layer merged as its per-feature affine map
      (see :func:`_merge_batchnorm`; a self-merge or a permuted copy comes back exactly,
      with or without a BatchNorm reset). "leaves": its scale, bias, mean and variance each
      merged with M like any leaf, as the official ZipIt! code does (``zip(...,
      mode="official")``); a merged model then needs a BatchNorm reset to be of use.

  Returns:
    The merged variables, with the inputs' tree structure, shapes and dtypes (a full zip), or
    with ``stop_at`` a MultiHead: the trunk merged, every model's rest kept as its head.

  Raises:
    SpecError: a space without a merge. MismatchError: a merge of the wrong width or number
    of models, or non-finite values in a model.
  """
  spec_lib.check_order(variables_list, spec, "apply_merges(variables_list, spec, merges)")
  if batchnorm not in BATCHNORM_MERGES:
    raise ValueError(f"batchnorm must be one of {BATCHNORM_MERGES}, got {batchnorm!r}.")
  flats = spec_lib.check_models(spec, variables_list, finite=False)
  needed = spec.space_names if stop_at is None else spec.trunk_spaces(stop_at)
  missing = [s for s in needed if s not in merges and not spec.space(s).parts]
  if missing:
    raise SpecError(f"apply_merges has no merge for spaces {missing}; "
                    + ("a full zip needs one for every space" if stop_at is None else
                       f"a partial zip at {stop_at!r} needs one for every space up to it")
                    + f" of {spec.name!r}.")
  for name in (n for n in needed if n in merges):
    merge, width = merges[name], spec.width(name)
    if not isinstance(merge, Merge):
      raise TypeError(f"The merge of space {name!r} is a {type(merge).__name__}; expected a "
                      "zipjax.match.GroupMerge or DenseMerge.")
    if (merge.num_models, merge.width) != (len(flats), width):
      raise MismatchError(
          f"The merge of space {name!r} is for {merge.num_models} models of width "
          f"{merge.width}; the models are {len(flats)} of width {width} (M must be "
          f"{(width, len(flats) * width)}, U {(len(flats) * width, width)}).")
    if spec.space(name).groups > 1:
      _check_keeps_groups(name, merge, spec.space(name).groups,
                          paired=spec.space(name).heads is not None)
  merges = spec.composed(merges, needed)
  trunk = None if stop_at is None else frozenset(needed)
  leaves, finite = merge_flats(spec, trunk, flats, merges, resolve_kernel(kernel), batchnorm)
  if not all(jax.device_get(finite)):
    for m, flat in enumerate(flats):  # the exact check, only on this rare path
      spec_lib.check_finite(flat, label=f"Model {m}")
  zipped = spec_lib.unflatten({p: leaves[p] for p in flats[0]}, variables_list[0])
  if stop_at is None:
    return zipped
  heads = frozenset(p for p in flats[0] if not spec.is_trunk_leaf(p, trunk))
  return MultiHead(zipped, spec, heads, stop_at)
