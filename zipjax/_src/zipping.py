"""Zip kernels and the top-level ``zip`` / ``zip_many``.

For every leaf, W* = sum_m M_m(out) . W_m . U_m(in): each axis that writes a space is
multiplied by that space's M_m, each axis that reads one by U_m, each variance axis by M_m
squared. A leaf that writes no merged space (the model's output layer, say) is averaged over
the models instead. Merges that average groups of features are applied as gathers (every
group's first member over the whole leaf, further members as small scattered blocks); any
other M and U as dense per-model blocks. Leaves are zipped in jitted programs of at most
32 leaves.
"""

from __future__ import annotations

import builtins
import functools
import itertools
import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from zipjax._src import batchnorm as bn_lib
from zipjax._src import data as data_lib
from zipjax._src import match as match_lib
from zipjax._src.multihead import MultiHead
from zipjax._src import spec as spec_lib
from zipjax._src import stats as stats_lib
from zipjax._src.errors import MismatchError, SpecError

_HI = jax.lax.Precision.HIGHEST


class Groups(NamedTuple):
  """A merge that averages groups of features, as gather indices.

  For model m and merged feature g, ``idx[m, g, :]`` are model m's members of g (padded with
  index 0), ``mask[m, g, :]`` marks the real ones and ``inv_size[g]`` is 1 / the number of
  g's members over all models: M_m[g, j] = mask / size and U_m[j, g] = mask. ``rows[m]``
  lists the P groups to which model m gives more than one member (the rest is padding,
  ``rows_mask`` 0): a zip gathers every group's first member over the whole leaf and the
  further members of these groups only, instead of multiplying by n x n blocks.
  ``rows_idx``, ``rows_mask`` and ``rows_inv_size`` are those groups' second members, their
  weights (0 for the padding) and 1 / sizes, taken out on the host so that the zip kernel
  does no index arithmetic. The ``rows2`` fields are the same for the P2 groups to which
  model m gives more than two members, and their members after the second. A kernel takes
  the first member (or on a last axis, :func:`_two_members_on_last_axis`, the first two) of
  every group, and the rest from these.
  """

  idx: jax.Array  # (N, n, K) int32
  mask: jax.Array  # (N, n, K) float32
  rows: jax.Array  # (N, P) int32: the groups model m gives several members, padded, sorted
  rows_idx: jax.Array  # (N, P, 1) int32: their second members
  rows_mask: jax.Array  # (N, P, 1) float32: 1 for a real second member, else 0
  rows_inv_size: jax.Array  # (N, P) float32: 1 / their sizes
  inv_size: jax.Array  # (n,) float32: 1 / the groups' sizes
  rows2: jax.Array  # (N, P2) int32: the groups model m gives more than two members, padded
  rows2_idx: jax.Array  # (N, P2, K - 2) int32: their members after the second
  rows2_mask: jax.Array  # (N, P2, K - 2) float32
  rows2_inv_size: jax.Array  # (N, P2) float32


class _Members(NamedTuple):
  """Every member of every group, for leaves small enough to gather them all in one fused
  loop (:func:`_is_small`): Groups without the rows, whose sizes P change with every merge,
  and with K rounded up (:func:`_members`), so that programs of small leaves are found
  compiled for other merges of the same widths."""

  idx: jax.Array  # (N, n, K) int32
  mask: jax.Array  # (N, n, K) float32
  inv_size: jax.Array  # (n,) float32


def _members(groups: Groups) -> _Members:
  """``groups`` as _Members, with K = 1 (a permutation) kept and any other K rounded up to
  a power of two, at least 4: greedy merges have K of 2 or 3 in varying spaces, and every
  space of a program must keep its K for the program to be found compiled."""
  num, n, k = groups.idx.shape
  shape = (num, n, 1 if k == 1 else max(4, 1 << (k - 1).bit_length()))
  idx, mask = np.zeros(shape, np.int32), np.zeros(shape, np.float32)
  idx[:, :, :k], mask[:, :, :k] = groups.idx, groups.mask
  return _Members(idx, mask, groups.inv_size)


def as_groups(merge: match_lib.Merge) -> Groups | None:
  """The Groups form of ``merge``, or None if it is not an averaging of feature groups (a
  matcher may return any M and U; those are zipped with dense blocks)."""
  n, dim = merge.M.shape
  num = dim // n
  owner = match_lib.merge_groups(merge)  # known for merges built from groups: no scan
  if owner is not None:
    size = np.bincount(owner, minlength=n)
  else:
    M = np.ascontiguousarray(merge.M, np.float32)
    U = np.ascontiguousarray(merge.U, np.float32)
    owner = U.argmax(1)
    # Counting nonzero bit patterns is 10 times faster than counting nonzero floats; -0.0
    # counts as nonzero, which only sends such a merge to the dense path.
    if (np.count_nonzero(U.view(np.int32)) != dim
        or not np.all(U[np.arange(dim), owner] == 1.0)
        or np.count_nonzero(M.view(np.int32)) != dim):
      return None
    size = np.bincount(owner, minlength=n)
    if not np.all(size > 0):
      return None
    inv = (1.0 / size).astype(np.float32)
    if not np.array_equal(M[owner, np.arange(dim)], inv[owner]):
      return None
  # Features sorted by (model, group), each one's rank among its model's members of it.
  key = (np.arange(num)[:, None] * n + owner.reshape(num, n)).ravel()
  counts = np.bincount(key, minlength=num * n)
  k = int(counts.max())
  order = np.argsort(key, kind="stable")
  sorted_key = key[order]
  rank = np.arange(num * n) - (np.cumsum(counts) - counts)[sorted_key]
  idx = np.zeros((num * n, k), np.int32)
  mask = np.zeros((num * n, k), np.float32)
  idx[sorted_key, rank] = order % n
  mask[sorted_key, rank] = 1.0
  idx, mask = idx.reshape(num, n, k), mask.reshape(num, n, k)
  inv_size = 1 / size.astype(np.float32)
  counts = counts.reshape(num, n)
  models = np.arange(num)[:, None]

  def members(start, stop):
    """(rows, idx, mask, inv_size) of the groups a model gives more than ``start`` members:
    their members ``start`` to ``stop`` - 1 (from 0)."""
    rows, more = _rows_with_more(counts, start)
    real = mask[models, rows, start:stop] * more[models, rows][:, :, None]
    return rows, idx[models, rows, start:stop], real, inv_size[rows]

  return Groups(idx, mask, *members(1, 2), inv_size, *members(2, k))


def _rows_with_more(counts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The groups to which each model gives more than ``k`` members (``counts``: (N, n)
  members a model and group), padded with the model's lowest other groups to one length P,
  so that each model's rows are distinct and sorted: (rows (N, P) int32, which groups have
  more (N, n) bool)."""
  several = counts > k
  num_several = several.sum(1)
  p = int(num_several.max())
  rows = np.nonzero(several | (~several & (np.cumsum(~several, 1)
                                           <= (p - num_several)[:, None])))[1]
  return rows.reshape(len(counts), p).astype(np.int32), several


@jax.tree_util.register_pytree_node_class
class _PackedGroups:
  """A Groups as slices of two arrays, one of integer fields (int32) and one of float fields
  (float32), raveled and concatenated; each field's shape, kind and start are static. The
  arrays can hold every space's fields (:meth:`pack_all`): sent as seven arrays a space, a
  ResNet-50's merges cost some 14 ms of per-array transfer overhead a call, a fifth of
  apply_merges; as two arrays a space, 2.8 ms; as two arrays in all, one transfer."""

  def __init__(self, ints, floats, layout: tuple[type, tuple[tuple[tuple[int, ...], bool, int],
                                                            ...]]):
    self.ints, self.floats, self.layout = ints, floats, layout

  def tree_flatten(self):
    return (self.ints, self.floats), self.layout

  @classmethod
  def tree_unflatten(cls, layout, leaves):
    return cls(*leaves, layout)

  @classmethod
  def pack_all(cls, groups: Mapping[str, Groups | _Members]) -> dict[str, _PackedGroups]:
    """{space: its packed Groups (or _Members)}, all in two shared numpy arrays."""
    bufs: dict[bool, list] = {True: [], False: []}
    size = {True: 0, False: 0}
    layouts = {}
    for name, g in groups.items():
      layout = []
      for a in map(np.asarray, g):
        is_int = bool(np.issubdtype(a.dtype, np.integer))
        layout.append((a.shape, is_int, size[is_int]))
        bufs[is_int].append(a.ravel())
        size[is_int] += a.size
      layouts[name] = (type(g), tuple(layout))
    ints = np.concatenate(bufs[True] or [np.zeros(0)]).astype(np.int32)
    floats = np.concatenate(bufs[False] or [np.zeros(0)]).astype(np.float32)
    return {name: cls(ints, floats, layout) for name, layout in layouts.items()}

  def unpack(self) -> Groups | _Members:
    """The Groups (or _Members), sliced out of the two arrays (inside a jitted program:
    static slices)."""
    kind, layout = self.layout
    fields = []
    for shape, is_int, start in layout:
      buf = self.ints if is_int else self.floats
      fields.append(lax.reshape(lax.slice(buf, (start,), (start + math.prod(shape),)), shape))
    return kind(*fields)


class _Plans(NamedTuple):
  """The merges as the zip programs take them: ``device``, {space: packed Groups} (every
  space's in two arrays, one transfer) or {space: (M blocks, U blocks)} for merges that are
  no group averages, on the device; ``members``, {space: _Members} on the host, packed for
  each program of small leaves by :func:`_zip_leaves`."""

  device: dict[str, _PackedGroups | tuple]
  members: dict[str, _Members]


def prepare_merges(merges: Mapping[str, match_lib.Merge]) -> _Plans:
  """The merges, ready for :func:`_zip_leaves`."""
  groups, dense = {}, {}
  for name, merge in merges.items():
    g = as_groups(merge)
    if g is not None:
      groups[name] = g
    else:
      dense[name] = tuple(np.stack(b) for b in merge.blocks())
  (packed,), dense = _put_packed([_PackedGroups.pack_all(groups)]), jax.device_put(dense)
  return _Plans({name: packed[name] if name in packed else dense[name] for name in merges},
                {name: _members(g) for name, g in groups.items()})


def _weight(mask: jax.Array, inv_size: jax.Array, role: str) -> jax.Array:
  """Weights of members (mask (n, K) of groups with 1 / sizes ``inv_size`` (n,)): U_m
  (IN), M_m (OUT) or M_m squared (VAR). Multiplied by reciprocals taken on the host: XLA
  fuses a product into the gathers, but compiles a division as a program of its own."""
  if role == spec_lib.IN:
    return mask
  inv = inv_size if role == spec_lib.OUT else lax.mul(inv_size, inv_size)
  return lax.mul(mask, lax.broadcast_in_dim(inv, mask.shape, (0,)))


def _index0(i: int, a: jax.Array) -> jax.Array:
  """a[i], as one primitive."""
  return lax.index_in_dim(a, i, 0, keepdims=False)


def _column(a: jax.Array, k: int) -> jax.Array:
  """a[:, k] of a 2-D array, as one primitive (the zip kernels are built from lax
  primitives: jnp indexing and jnp.take trace as nested programs, which made tracing and
  lowering a ResNet-50's kernels take some 4 s)."""
  return lax.index_in_dim(a, k, 1, keepdims=False)


_FLAT_INDEX_LIMIT = 2**31


def _gather(x: jax.Array, ops: Mapping[int, tuple[jax.Array, jax.Array]]) -> jax.Array:
  """y[..g..] = sum over members k of w[g, k] * x[..idx[g, k]..], on every axis in ``ops``
  ({axis: (idx (n, K), w (n, K))}) at once.

  Each term is one gather from the flattened leaf with an index computed from iotas, which
  XLA fuses with the weights and the sum into one loop in the output's own layout; gathering
  axis by axis with ``jnp.take`` lets XLA pick transposed layouts, some 10 times slower.
  """
  shape = x.shape
  out_shape = list(shape)
  for axis, (idx, _) in ops.items():
    out_shape[axis] = idx.shape[0]
  if x.size >= _FLAT_INDEX_LIMIT:  # int32 flat indices would overflow: one axis at a time
    for axis, (idx, w) in ops.items():
      bshape = [1] * x.ndim
      bshape[axis] = idx.shape[0]
      x = functools.reduce(jnp.add, [jnp.take(x, idx[:, k], axis=axis, mode="clip")
                                     * w[:, k].reshape(bshape) for k in range(idx.shape[1])])
    return x
  strides = [math.prod(shape[a + 1:]) for a in range(len(shape))]
  base = None
  for axis in range(len(shape)):
    if axis not in ops:
      term = lax.broadcasted_iota(jnp.int32, out_shape, axis)
      if strides[axis] != 1:
        term = lax.mul(term, np.int32(strides[axis]))
      base = term if base is None else lax.add(base, term)
  flat = lax.reshape(x, (x.size,))
  dnums = lax.GatherDimensionNumbers(offset_dims=(), collapsed_slice_dims=(0,),
                                     start_index_map=(0,))
  terms = []
  items = list(ops.items())
  for ks in itertools.product(*(range(idx.shape[1]) for _, (idx, _) in items)):
    index, weight = base, None
    for j, k in enumerate(ks):
      axis, (idx, w) = items[j]
      column = _column(idx, k)
      if strides[axis] != 1:
        column = lax.mul(column, np.int32(strides[axis]))
      column = lax.broadcast_in_dim(column, out_shape, (axis,))
      index = column if index is None else lax.add(index, column)
      w_k = lax.broadcast_in_dim(_column(w, k), out_shape, (axis,))
      weight = w_k if weight is None else lax.mul(weight, w_k)
    # The indices come from as_groups and the iotas, in bounds: no clamping is compiled.
    index = lax.broadcast_in_dim(index, (*out_shape, 1), tuple(range(len(shape))))
    value = lax.gather(flat, index, dnums, slice_sizes=(1,),
                       mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)
    terms.append(lax.mul(value, lax.convert_element_type(weight, x.dtype)))
  return functools.reduce(lax.add, terms)


def _scatter_add(y: jax.Array, axis: int, rows: jax.Array, block: jax.Array) -> jax.Array:
  """y with ``block`` added at ``rows`` of ``axis`` (in any order; repeats add up). The
  rows come from :func:`as_groups`, in bounds: no index clamping is compiled."""
  others = tuple(a for a in range(y.ndim) if a != axis)
  dnums = jax.lax.ScatterDimensionNumbers(update_window_dims=others,
                                          inserted_window_dims=(axis,),
                                          scatter_dims_to_operand_dims=(axis,))
  return jax.lax.scatter_add(y, lax.expand_dims(rows, (1,)), block, dnums,
                             mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


# Leaves whose every member combination takes at most this many gathered values (the leaf's
# size times the product of K over its axes) gather them all in one fused loop, with no
# blocks and scatters: the BatchNorm and bias leaves, small convolutions. Each of XLA's
# fused loops costs some 8 ms of compilation on the CPU; for two ResNet-50s with greedy
# merges this cut the kernels' compilation from 11.9 to 7.7 s, at the same run time.
_SMALL_GATHERS = 2**17


# The last axis of a leaf is gathered with two members a group in the main loop, and only
# the members after the second in a block, where the groups to which a model gives several
# members are more than this share of the merged features (greedy merges of the features
# of real models: a quarter to a third).
_TWO_MEMBERS_SHARE = 1 / 8


def _two_members_on_last_axis(groups: Groups) -> bool:
  """Whether a leaf whose last axis is merged by ``groups`` gathers two members of every
  group of that axis in its main loop (static: from the shapes)."""
  return groups.rows.shape[1] > _TWO_MEMBERS_SHARE * groups.idx.shape[1]


def _groups_apply(xs: Sequence[jax.Array], ms: Sequence[int],
                  axes: Mapping[int, tuple[Groups | _Members, str]]) -> jax.Array:
  """The sum over models m in ``ms`` of model m's side of group-average merges, applied on
  every axis in ``axes`` ({axis: (groups, role)}) to its leaf ``xs[i]``.

  The main members of every group on every axis (the first; on a last axis whose groups
  often have several members of a model, the first two), for all the models, are one fused
  gather pass. The other members exist only for the groups a model gives more. The other
  member combinations are split by the first axis a (in order, such a last axis first) with
  a member after its main ones: main members on the axes before a, the further members of
  a's groups that have them, every member on the axes after a. For each axis, the models'
  blocks of such terms (as small as those groups) are computed in one fused gather and
  scatter-added in place with one scatter. Such a merge costs about one pass over the leaf
  (two where the last axis takes two members), and compiles to 1 + 2 x (axes) fused loops
  whatever the number of models, except blocks on a last axis that takes one member in the
  main loop: XLA does not fuse their gathers, one a model and part, with their concatenation
  and its transposition for the scatter (a 3x3x256x256 kernel merged on its two last axes:
  9 loops and a concatenation against 5; putting the rows first in the program gave the 5
  loops but no faster kernel). Small leaves (``_SMALL_GATHERS``, and every leaf given
  _Members) gather every member combination in one operation instead.

  A block on a leaf's last axis is a walk down the whole leaf for each of its columns (the
  last axis holds each row's contiguous values), so it is fast for a few columns only:
  with greedy merges of real features, where a model gives several members to a quarter of
  the groups, those blocks took 140 of the 200 ms of two ResNet-50s' kernel.
  """
  models = range(len(xs))  # (the module's ``zip`` shadows the builtin)
  main, every, further = [], [], []
  for m in ms:
    main.append({}), every.append({}), further.append({})
    for axis, (g, role) in axes.items():
      model = functools.partial(_index0, m)
      idx, w = model(g.idx), _weight(model(g.mask), g.inv_size, role)
      every[-1][axis] = (idx, w)
      if isinstance(g, _Members):
        continue
      main[-1][axis] = (lax.slice_in_dim(idx, 0, 1, axis=1), lax.slice_in_dim(w, 0, 1, axis=1))
      if g.idx.shape[2] > 1 and g.rows.shape[1]:
        further[-1][axis] = _further(g, m, role)
  terms = math.prod(g.idx.shape[2] for g, _ in axes.values())
  if (any(isinstance(g, _Members) for g, _ in axes.values()) or not further[0]
      or xs[0].size * terms <= _SMALL_GATHERS):  # every member in one fused loop
    return functools.reduce(lax.add, [_gather(xs[i], every[i]) for i in models])
  order = sorted(further[0])
  last = xs[0].ndim - 1
  if last in further[0] and _two_members_on_last_axis(axes[last][0]):
    order.remove(last)
    for i in models:
      main[i][last] = tuple(lax.slice_in_dim(v, 0, 2, axis=1) for v in every[i][last])
      further[i][last] = further[i][last][1:]  # the second members' part is in ``main``
    if further[0][last]:
      order.insert(0, last)
  y = functools.reduce(lax.add, [_gather(xs[i], main[i]) for i in models])
  for j, a in enumerate(order):
    blocks, rows = [], []
    for part in range(len(further[0][a])):
      for i in models:
        ops = dict(main[i])
        ops[a] = further[i][a][part][1:]
        ops.update({b: every[i][b] for b in order[j + 1:]})
        blocks.append(_gather(xs[i], ops))
      rows += [further[i][a][part][0] for i in models]
    y = _scatter_add(y, a, lax.concatenate(rows, 0), lax.concatenate(blocks, a))
  return y


def _further(g: Groups, m: int, role: str) -> tuple[tuple[jax.Array, jax.Array, jax.Array], ...]:
  """Model m's members of ``g`` after the first, as (rows, idx, weights) parts: the second
  members of the groups it gives several, and where some have more, the members after the
  second of those (so that no block gathers K - 1 members for groups of two)."""
  model = functools.partial(_index0, m)
  return tuple((model(rows), model(idx), _weight(model(mask), model(inv_size), role))
               for rows, idx, mask, inv_size in (
                   (g.rows, g.rows_idx, g.rows_mask, g.rows_inv_size),
                   (g.rows2, g.rows2_idx, g.rows2_mask, g.rows2_inv_size))
               if rows.shape[1] and idx.shape[2])


def _transform(xs: Sequence[jax.Array], ms: Sequence[int],
               axes: Sequence[tuple[int, Any, str]]) -> jax.Array:
  """The sum over models m in ``ms`` of model m's side of each (axis, plan, role) applied
  to its leaf ``xs[i]``: M_m (role OUT), M_m squared (VAR) or U_m transposed (IN)."""
  gathers = {}
  xs = list(xs)
  for axis, plan, role in axes:
    if isinstance(plan, (Groups, _Members)):
      gathers[axis] = (plan, role)
      continue
    mats, ums = plan
    for i, m in enumerate(ms):
      mat = {spec_lib.OUT: mats[m], spec_lib.VAR: mats[m] * mats[m]}.get(role)
      if mat is None:
        mat = ums[m].T
      xs[i] = jnp.moveaxis(jnp.tensordot(xs[i], mat, axes=((axis,), (1,)), precision=_HI),
                           -1, axis)
  if gathers:
    return _groups_apply(xs, ms, gathers)
  return functools.reduce(jnp.add, xs)


_LEAVES_PER_PROGRAM = 32


def _is_small(size: int, num_axes: int) -> bool:
  """Whether a leaf of ``size`` values with ``num_axes`` merged axes is zipped in a program
  of small leaves, from _Members: at most ``_SMALL_GATHERS`` values gathered at K = 4 (the
  rounded K of greedy merges), so that the rounding costs at most that."""
  return size * 4**num_axes <= _SMALL_GATHERS


def _zip_leaves(spec, trunk, flats: Sequence[Mapping], plans: _Plans) -> tuple[dict, list]:
  """:func:`_zip_leaves_program` over the leaves in programs of at most
  ``_LEAVES_PER_PROGRAM`` leaves: compiling all the leaves of a ResNet-50 with greedy merges
  as one program took 700-960 MiB (more than the models and their statistics) and 17-23 s;
  programs of 32 leaves took 180 MiB at most, about as long, and run as fast. Small leaves
  (BatchNorm and bias leaves, the smallest convolutions) are in programs of their own, fed
  their spaces' _Members, packed for each program (one transfer for all): their shapes
  depend on the widths and K only, so those programs are mostly found compiled when other
  merges of the same models are applied. Returns the zipped leaves and each program's flag
  that its leaves are finite."""
  programs = _programs(spec, tuple((p, x.ndim, x.size) for p, x in flats[0].items()))
  members = _put_packed([
      _PackedGroups.pack_all({name: plans.members[name] for name in spaces
                              if name in plans.members}) if small else {}
      for _, spaces, small in programs])
  out, finite = {}, []
  for (paths, spaces, small), packed in builtins.zip(programs, members):
    program_plans = {name: packed.get(name, plans.device[name]) for name in spaces
                     if name in plans.device}
    leaves, flags = _zip_leaves_program(spec, trunk, tuple({p: f[p] for p in paths}
                                                           for f in flats), program_plans)
    out.update(leaves)
    finite.append(flags)
  return {p: out[p] for p in flats[0]}, finite


def _put_packed(packed: Sequence[Mapping[str, _PackedGroups]]) -> list[dict[str, _PackedGroups]]:
  """Each dict's packed arrays (the two its entries share) on the device, in one transfer."""
  shared = [next(iter(d.values()), None) for d in packed]
  bufs = jax.device_put([(p.ints, p.floats) if p is not None else () for p in shared])
  return [{name: _PackedGroups(*buf, p.layout) for name, p in d.items()}
          for d, buf in builtins.zip(packed, bufs)]


@functools.lru_cache(maxsize=64)
def _programs(spec, leaves: tuple) -> list[tuple[tuple, tuple, bool]]:
  """The leaves ((path, ndim, size), ...) split into programs: (paths, spaces they use,
  whether its leaves are small), the small leaves first."""
  programs = []
  for small in (True, False):
    kept = [(p, ndim) for p, ndim, size in leaves
            if _is_small(size, len(spec.leaf_axes(p, ndim))) == small]
    for start in range(0, len(kept), _LEAVES_PER_PROGRAM):
      chunk = kept[start:start + _LEAVES_PER_PROGRAM]
      spaces = {ax.space for p, ndim in chunk for ax in spec.leaf_axes(p, ndim).values()}
      programs.append((tuple(p for p, _ in chunk), tuple(sorted(spaces)), small))
  return programs


@functools.partial(jax.jit, static_argnums=(0, 1))
def _zip_leaves_program(spec, trunk, flats: Sequence[Mapping],
                        plans: Mapping) -> tuple[dict, jax.Array]:
  """Zips trunk leaves (all leaves if ``trunk`` is None); head leaves stay per model (stacked
  on a leading axis), with their axes that read a merged space transformed by U_m. Also
  returns whether every model's values are finite (checked in the same program).

  No stacked copy of the models is made: XLA fuses the models' first-member gathers,
  weights and sum into one loop per leaf (see :func:`_groups_apply`).
  """
  plans = {name: p.unpack() if isinstance(p, _PackedGroups) else p for name, p in plans.items()}
  out, sums = {}, []
  for path in flats[0]:
    leaves = [f[path] for f in flats]
    dtype = leaves[0].dtype
    axes = spec.leaf_axes(path, leaves[0].ndim)
    xs = [lax.convert_element_type(x, jnp.float32) for x in leaves]
    if trunk is not None and not spec.is_trunk_leaf(path, trunk):
      reads = [(axis, plans[ax.space], spec_lib.IN) for axis, ax in axes.items()
               if ax.role == spec_lib.IN and ax.space in trunk]
      x = jnp.stack([_transform([x], [m], reads) for m, x in enumerate(xs)])
    else:
      ops = [(axis, plans[ax.space], ax.role) for axis, ax in axes.items()]
      x = _transform(xs, range(len(xs)), ops)
      if not any(ax.role != spec_lib.IN for ax in axes.values()):
        x = x / len(xs)
    if jnp.issubdtype(dtype, jnp.inexact):
      sums.append(jnp.sum(x))
    out[path] = x.astype(dtype)
  # Every value of every model reaches its zipped leaf with a weight that is not 0 (or is
  # multiplied by 0: 0 * NaN and 0 * inf are NaN), and NaN and inf survive a sum, so a
  # finite sum of the results clears the models: one pass over the result instead of one
  # over each model, and one flag per program. An overflowing sum of finite values is
  # sorted out by the exact check on the error path.
  return out, jnp.isfinite(functools.reduce(jnp.add, sums, jnp.zeros((), jnp.float32)))


def apply_merges(spec: spec_lib.Spec, variables_list: Sequence[Any],
                 merges: Mapping[str, match_lib.Merge], *,
                 stop_at: str | None = None) -> dict | MultiHead:
  """Zips N models' variables with one Merge per space.

  Returns the merged variables (full zip), or with ``stop_at`` a MultiHead: the spaces up to
  ``stop_at`` merged into one trunk, the rest of every model kept as its head. Merges that
  average groups of features (every matcher in ``zipjax.match``) are applied as gathers,
  others as dense per-model blocks; both in one jitted program, which also checks that the
  models' values are finite.
  """
  flats = check_models(spec, variables_list, finite=False)
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
  trunk = None if stop_at is None else frozenset(needed)
  plans = prepare_merges({k: merges[k] for k in needed})
  leaves, finite = _zip_leaves(spec, trunk, tuple(flats), plans)
  _raise_if_not_finite(finite, variables_list)
  zipped = spec_lib.unflatten(leaves)
  if stop_at is None:
    return zipped
  heads = frozenset(p for p in flats[0] if not spec.is_trunk_leaf(p, trunk))
  return MultiHead(zipped, spec, heads, stop_at)


def _raise_if_not_finite(finite: Sequence, variables_list: Sequence[Any]) -> None:
  """Raises, naming the model and leaves, if the kernel's finiteness flags are not all set."""
  if all(jax.device_get(finite)):
    return
  for m, v in enumerate(variables_list):  # the exact check, only on this rare path
    spec_lib.check_finite(spec_lib.flatten(v), label=f"Model {m}")


def check_models(spec: spec_lib.Spec, variables_list: Sequence[Any], *,
                 finite: bool = True) -> list[dict]:
  """Checks N models against the spec and each other; returns their flat variables."""
  if isinstance(variables_list, Mapping) or len(variables_list) < 2:
    raise ValueError("Zipping needs a sequence of at least 2 models' variables, got "
                     f"{type(variables_list).__name__} of length "
                     f"{len(variables_list) if not isinstance(variables_list, Mapping) else 1}.")
  flats = spec_lib.check_same_structure(variables_list)
  # The models have the same leaves and shapes, so model 0 stands for all of them.
  spec_lib.validate_flat(spec, flats[0], label="model 0")
  if finite:
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
      :func:`zipjax.compute_stats`: for two ResNet-20s, 10-20 % faster). The BatchNorm reset
      always takes whole batches: its result depends on the batches.

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
                                    progress=progress, mesh=mesh, microbatch=microbatch)
    merges = compute_merges(stats, num_models=len(variables_list), matcher=matcher,
                            progress=progress)
  merged = apply_merges(spec, variables_list, merges, stop_at=stop_at)
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
