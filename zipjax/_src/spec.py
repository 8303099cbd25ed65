"""The zip spec: named feature spaces, and what every array axis of a model does with them.

A spec says, for every leaf of a variables tree (``params`` and ``batch_stats``), which axes
*write* a feature space (they get the merge matrix M), which *read* one (they get the unmerge
matrix U), which hold a BatchNorm's running variance (merged with the layer's affine map, see
:class:`BatchNormLayer`), and which are untouched. It also
knows how to run the model: its plain forward pass, the capture of each space's features, and
the batch statistics of its BatchNorm layers.

Model code and spec read alike::

    leaves = {
        **spec.conv("conv1", None, "s1"),
        **spec.batchnorm("bn1", "s1"),
        **spec.dense("head", "s1", None),
    }
    the_spec = spec.linen_spec(module, spaces=[spec.Space("s1", 64)], leaves=leaves)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import weakref
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zipjax._src import merge as merge_lib
from zipjax._src.errors import MismatchError, SpecError, fmt_path, key_name

Path = tuple[str, ...]
Variables = Mapping[str, Any]

#: The Flax collection that models ``sow`` their features into (see :func:`capture`).
FEATURES = "zip_features"
_SOW_PREFIX = "space:"

OUT = "out"  # the axis writes the space: merged with M
IN = "in"  # the axis reads the space: merged with U
VAR = "var"  # the axis holds a BatchNorm's running variances of the space (see BatchNormLayer)
_ROLES = (OUT, IN, VAR)

#: The epsilon with which BatchNorm layers are merged as affine maps (flax's default). A
#: self-merge or a permuted copy comes back exactly whatever a layer's own epsilon is.
BATCHNORM_EPSILON = 1e-5


@dataclasses.dataclass(frozen=True)
class Space:
  """A feature space: ``width`` channels that one set of layers writes.

  A space may be *made of spaces* (``parts``): the concatenation of other spaces' features,
  each part ``(space, repeats)`` tiled ``repeats`` times in axis order. Concatenated branches
  are ``parts=(("a", 1), ("b", 1))``; a (h, w, c) feature map flattened channels-last into a
  Dense layer is ``parts=(("c", h * w),)``. A part given as an int is that many features
  that no merge aligns (e.g. the model's input concatenated with a hidden space). Such a
  space is not matched: its merge is built from its parts' (block-diagonal), so every
  position of a flattened map gets the same merge.

  A space with ``groups`` > 1 (the channels a GroupNorm normalises in groups) is matched
  group by group: feature j of group g merges only with features of group g of any model, so
  every merged group's statistics come from the groups it merges. A self-merge and a copy
  permuted within its groups come back exactly.

  A space whose groups are attention heads names its attention layer in ``heads``: the
  spaces with the same ``heads`` (a layer's query/key space, whose merge the queries and keys
  share so that the attention logits stay consistent, and its value/output space) share one
  pairing of groups across models, which the matcher chooses on the groups' similarity (see
  :func:`zipjax.match.pair_groups`: heads of one model may merge too, as its same-model
  budget allows); each space is then matched within the paired groups. A self-merge and a
  copy whose heads and within-head features are permuted come back exactly.
  """

  name: str
  width: int
  parts: tuple[tuple[str | int, int], ...] = ()
  groups: int = 1
  heads: str | None = None

  def __post_init__(self):
    if self.groups < 1 or self.width % self.groups:
      raise SpecError(f"Space {self.name!r}: width {self.width} does not split into "
                      f"{self.groups} groups.")
    if (self.groups > 1 or self.heads is not None) and self.parts:
      raise SpecError(f"Space {self.name!r} is made of other spaces; it cannot have groups "
                      "or heads.")
    if self.heads is not None and (not isinstance(self.heads, str) or not self.heads):
      raise SpecError(f"Space {self.name!r}: heads must name the attention layer (a "
                      f"non-empty str shared by its spaces), got {self.heads!r}.")


@dataclasses.dataclass(frozen=True)
class Axis:
  """What one array axis does with a space: ``role`` is 'out', 'in' or 'var'.

  An 'in' axis with ``groups`` > 1 reads one group's slice of the space (width / groups
  features): the kernel of a grouped convolution, ``(*window, in / groups, out)``, whose output
  channel o reads group o // (out / groups) of its input. ``by`` is the leaf's axis that says
  which group (the output channels; -1 in flax's layout). The space, and the space of the
  ``by`` axis if it is merged, are matched within groups (their ``groups`` a multiple of this
  one), so each merged output channel reads the merged slice of its own group.
  """

  space: str
  role: str
  groups: int = 1
  by: int | None = None

  def __post_init__(self):
    if self.role not in _ROLES:
      raise SpecError(f"Axis role must be one of {_ROLES}, got {self.role!r}.")
    if self.groups < 1 or (self.groups > 1) != (self.by is not None):
      raise SpecError(f"Axis of space {self.space!r}: groups={self.groups} needs by= (the axis "
                      "that selects each slice's group), and by= needs groups > 1.")
    if self.groups > 1 and self.role != IN:
      raise SpecError(f"Axis of space {self.space!r}: only an 'in' axis reads one group's "
                      f"slice of a space; got role {self.role!r} with groups={self.groups}.")


def _group_mask(n: int, c: int, groups: int, axis: int, by: int, ndim: int, dtype, xp):
  """1 where slice position i of the whole space (size n * groups along ``axis``) lies in the
  group of index o along ``by`` (size c), else 0; shaped to broadcast against the leaf."""
  block = xp.arange(n * groups) // n
  group = xp.arange(c) // (c // groups)
  shape_a, shape_b = [1] * ndim, [1] * ndim
  shape_a[axis], shape_b[by] = n * groups, c
  return (block.reshape(shape_a) == group.reshape(shape_b)).astype(dtype)


def expand_groups(x, axis: int, by: int, groups: int, xp=jnp):
  """A leaf whose ``axis`` holds one group's slice (see :class:`Axis`) as the same map over
  the whole space: ``axis`` grows ``groups`` times, zero outside each ``by`` index's group
  (a grouped convolution's kernel as the block-diagonal kernel of a plain one)."""
  n, c = x.shape[axis], x.shape[by]
  tiled = xp.concatenate([x] * groups, axis=axis)
  return tiled * _group_mask(n, c, groups, axis, by, x.ndim, x.dtype, xp)


def compress_groups(y, axis: int, by: int, groups: int, xp=jnp):
  """The inverse of :func:`expand_groups`: each ``by`` index's slice of its own group
  (entries outside it, zero for merges that keep groups, are dropped)."""
  n, c = y.shape[axis] // groups, y.shape[by]
  y = y * _group_mask(n, c, groups, axis, by, y.ndim, y.dtype, xp)
  return y.reshape(y.shape[:axis] + (groups, n) + y.shape[axis + 1:]).sum(axis=axis)


# A leaf's axes: {axis index (negative counts from the end): Axis}. Empty: untouched.
LeafAxes = Mapping[int, Axis]


_NNX_CAPTURE: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "zipjax_capture", default=None)


@contextlib.contextmanager
def capturing():
  """Collects the features that NNX modules ``capture`` while the block runs: yields
  {space: [arrays]}."""
  record: dict = {}
  token = _NNX_CAPTURE.set(record)
  try:
    yield record
  finally:
    _NNX_CAPTURE.reset(token)


def capture(module: Any, space: str, x: jax.Array) -> None:
  """Records ``x`` as features of ``space`` (channels last) from inside a module.

  Call it after the activation, in a flax.linen module's or an NNX module's ``__call__``. A
  space may be captured at several places (a residual stream after every block); all
  captures count as samples of the same space. It records nothing in any other call (a
  linen ``init``, a user's own forward pass), so it leaves the model's state alone.
  """
  if not isinstance(module, nn.Module):  # NNX: only while a spec's `features` runs
    record = _NNX_CAPTURE.get()
    if record is not None:
      record.setdefault(space, []).append(x)
    return
  if module.is_initializing() or not module.is_mutable_collection(FEATURES):
    return
  # Prefixed, so a space may share its name with a submodule of the capturing module.
  module.sow(FEATURES, _SOW_PREFIX + space, x)


# ----------------------------------------------------------------------------------------------
# Helpers per module type. Each returns {leaf path: LeafAxes} for one module; None as a space
# means "not merged" (the model's input or output).


def _module_path(name: str | Sequence[str]) -> Path:
  return tuple(name.split("/")) if isinstance(name, str) else tuple(name)


def _axes(*entries: tuple[int, str, str | None]) -> dict[int, Axis]:
  """{axis: Axis(space, role)} from (axis, role, space) triples, skipping space None."""
  return {axis: Axis(space, role) for axis, role, space in entries if space is not None}


def _prefix(collection: str | None) -> Path:
  return () if collection is None else (collection,)


def dense(name: str | Sequence[str], in_space: str | None, out_space: str | None, *,
          bias: bool = True, collection: str | None = "params") -> dict[Path, LeafAxes]:
  """``nn.Dense`` / ``nnx.Linear``: kernel (in, out), bias (out).

  ``collection`` is the first key of the leaf paths: linen's "params"; None for an NNX
  module's state, whose paths start at the module (``('fc', 'kernel')``).
  """
  p = _prefix(collection) + _module_path(name)
  leaves = {p + ("kernel",): _axes((-2, IN, in_space), (-1, OUT, out_space))}
  if bias:
    leaves[p + ("bias",)] = _axes((-1, OUT, out_space))
  return leaves


def conv(name: str | Sequence[str], in_space: str | None, out_space: str | None, *,
         bias: bool = True, groups: int = 1,
         collection: str | None = "params") -> dict[Path, LeafAxes]:
  """``nn.Conv`` / ``nnx.Conv`` of any spatial rank: kernel ``(*window, in / groups, out)``,
  bias (out).

  ``groups`` is the layer's ``feature_group_count``: a grouped convolution's kernel reads one
  group's slice of ``in_space`` (see :class:`Axis`); declare ``in_space`` and ``out_space``
  with ``groups`` a multiple of it. A depthwise convolution (groups = channels, one output
  per channel) writes the space it reads: declare it as ``conv(name, None, space)`` with the
  default ``groups``.
  """
  leaves = dense(name, None, out_space, bias=bias, collection=collection)
  if in_space is not None:
    kernel = _prefix(collection) + _module_path(name) + ("kernel",)
    leaves[kernel] = {-2: Axis(in_space, IN, groups, None if groups == 1 else -1),
                      **leaves[kernel]}
  return leaves


def batchnorm(name: str | Sequence[str], space: str, *,
              collection: str | None = "params") -> dict[Path, LeafAxes]:
  """``nn.BatchNorm`` / ``nnx.BatchNorm`` on a space: scale, bias, mean (role 'out') and var
  (role 'var'), merged together as the layer's per-feature affine map (see
  :class:`BatchNormLayer`). With ``collection=None`` (NNX) the statistics sit beside the
  parameters; otherwise in linen's "batch_stats"."""
  p = _module_path(name)
  params = _prefix(collection) + p
  stats = p if collection is None else ("batch_stats",) + p
  return {
      params + ("scale",): _axes((-1, OUT, space)),
      params + ("bias",): _axes((-1, OUT, space)),
      stats + ("mean",): _axes((-1, OUT, space)),
      stats + ("var",): _axes((-1, VAR, space)),
  }


def layernorm(name: str | Sequence[str], space: str, *,
              collection: str | None = "params") -> dict[Path, LeafAxes]:
  """``nn.LayerNorm`` / ``nnx.LayerNorm`` over a space: scale and bias get M."""
  p = _prefix(collection) + _module_path(name)
  return {p + ("scale",): _axes((-1, OUT, space)), p + ("bias",): _axes((-1, OUT, space))}


# ----------------------------------------------------------------------------------------------


def bypassing_leaf(leaf_spaces: Mapping[Any, Iterable[tuple[int, str]]],
                   stop: int) -> tuple[Any, list[int]] | None:
  """The rule that makes a space a valid stop point, on spaces numbered in network order.

  ``leaf_spaces`` maps each leaf to the (space index, role) of its axes. A partial zip at
  space ``stop`` splits the leaves cleanly if every leaf that writes a space up to ``stop``
  (the merged trunk) reads only trunk spaces, and every other leaf reads no trunk space but
  ``stop``. Returns the first leaf that breaks the rule and the spaces it reads across the
  stop, or None.
  """
  for leaf, entries in leaf_spaces.items():
    entries = list(entries)
    reads = [i for i, role in entries if role == IN]
    if any(i <= stop for i, role in entries if role != IN):
      bad = [i for i in reads if i > stop]
    else:
      bad = [i for i in reads if i < stop]
    if bad:
      return leaf, bad
  return None


@dataclasses.dataclass(frozen=True)
class BatchNormLayer:
  """The four leaves of one BatchNorm layer on ``space``, merged as its affine map.

  In inference mode the layer is y = a * x + c per feature, a = scale / sqrt(var + eps),
  c = bias - a * mean. A zip merges (a, c, mean, var) with M and writes a* and c* back into
  scale and bias, so the merged layer is the average of its members' maps. A spec finds a
  layer wherever a leaf with role 'var' has siblings ``mean`` (same collection), ``scale`` and
  ``bias`` (in ``params`` for linen's ``batch_stats``) that write the same space; a variance
  without them is merged with M like any other leaf.
  """

  space: str
  scale: Path
  bias: Path
  mean: Path
  var: Path


def _batchnorm_layers(leaves: Mapping[Path, LeafAxes]) -> tuple[BatchNormLayer, ...]:
  layers = []
  for path, axes in leaves.items():
    if len(axes) != 1 or next(iter(axes.values())).role != VAR:
      continue
    space = next(iter(axes.values())).space
    params = ("params",) + path[1:-1] if path[0] == "batch_stats" else path[:-1]
    mean, scale, bias = path[:-1] + ("mean",), params + ("scale",), params + ("bias",)
    if all(tuple((ax.space, ax.role) for ax in leaves.get(p, {}).values()) == ((space, OUT),)
           for p in (mean, scale, bias)):
      layers.append(BatchNormLayer(space, scale, bias, mean, path))
  return tuple(layers)


@dataclasses.dataclass(frozen=True, eq=False)
class Spec:
  """Everything zipjax needs to know about a model to merge copies of it.

  Attributes:
    spaces: the feature spaces in network order: a space is listed after every space whose
      layers run before its last write (a stage's inner spaces before its residual stream),
      so the spaces up to a stop point are exactly those a partial zip merges.
    leaves: for every leaf path of the variables, its axes (an empty mapping: untouched).
    stop_points: the spaces a partial zip may stop at, in network order.
    apply: ``apply(variables, x) -> outputs``, the model in inference mode.
    features: ``features(variables, x) -> {space: [arrays (..., width)]}``.
    batchnorm_stats: ``batchnorm_stats(variables, x) -> {leaf path: array}``: the batch mean
      and variance of every BatchNorm layer (``('batch_stats', 'bn1', 'mean')`` and ``(...,
      'var')`` in linen), computed with every BatchNorm layer normalising by the statistics
      of the batch; ``{layer path: (mean, var)}`` is accepted too, and ``{layer path:
      (mean, var, count)}`` with ``count`` (an int) the number of values behind each
      channel's statistics (batch size times spatial positions), which the PyTorch-style
      reset (unbiased variance) needs.
    name: a label for messages.
    unmerged: {leaf path: {axis: why}} for parameter axes that carry features but stay
      unmerged (filled by :func:`zipjax.infer_spec`; see :func:`zipjax.explain`).
    example: shapes and dtypes (``jax.ShapeDtypeStruct``) of an input the spec was made on,
      if known: error messages about calibration data show it.

  Specs hash by identity, so jitted passes are compiled once per spec.
  """

  spaces: tuple[Space, ...]
  leaves: Mapping[Path, LeafAxes]
  stop_points: tuple[str, ...]
  apply: Callable[[Variables, Any], Any]
  features: Callable[[Variables, Any], Mapping[str, Sequence[jax.Array]]]
  batchnorm_stats: Callable[[Variables, Any], Mapping[Path, Any]]
  name: str = "model"
  unmerged: Mapping[Path, Mapping[int, str]] = dataclasses.field(default_factory=dict)
  example: Any = None

  def __post_init__(self):
    names = [s.name for s in self.spaces]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
      raise SpecError(f"Spec {self.name!r} declares these spaces twice: {dupes}.")
    known = set(names)
    for path, axes in self.leaves.items():
      for axis, ax in axes.items():
        if ax.space not in known:
          raise SpecError(
              f"Leaf {fmt_path(path)} axis {axis} names the unknown space {ax.space!r}; "
              f"declare it in `spaces` (known: {names}).")
      for axis, ax in axes.items():
        if ax.groups > 1:
          self.check_group_space(path, axis, ax, ax.space, "the space it reads")
    heads: dict[str, Space] = {}
    for s in self.spaces:
      if s.heads is not None and heads.setdefault(s.heads, s).groups != s.groups:
        first = heads[s.heads]
        raise SpecError(
            f"Spaces {first.name!r} and {s.name!r} share heads={s.heads!r} but split into "
            f"{first.groups} and {s.groups} groups: the spaces of one attention layer have one "
            "group per head. Give both groups=<number of heads>.")
    composite = {s.name for s in self.spaces if s.parts}
    for s in self.spaces:
      if not s.parts:
        continue
      width = 0
      for part, repeats in s.parts:
        if isinstance(part, str):
          if part not in known or part in composite or names.index(part) > names.index(s.name):
            raise SpecError(f"Space {s.name!r} is made of {part!r}, which must be a space of "
                            "its own (not made of spaces) declared before it.")
          width += self.width(part) * repeats
        else:
          width += int(part) * repeats
      if width != s.width:
        raise SpecError(f"Space {s.name!r} has width {s.width}, but its parts {s.parts} add "
                        f"up to {width}.")
    unknown_stops = [s for s in self.stop_points if s not in known]
    if unknown_stops:
      raise SpecError(f"Stop points {unknown_stops} are not spaces of spec {self.name!r} "
                      f"(spaces: {names}).")
    for stop in self.stop_points:
      self._check_stop_point(stop)

  def check_group_space(self, path: Path, axis: int, ax: Axis, name: str, what: str) -> None:
    """Raises unless space ``name`` is matched within the groups of ``ax``, an axis that
    reads one group's slice (:class:`Axis`)."""
    space = self.space(name)
    if space.parts or space.groups % ax.groups:
      raise SpecError(
          f"Leaf {fmt_path(path)} axis {axis} reads one of {ax.groups} groups of {ax.space!r} "
          f"(a grouped convolution), so {what}, {name!r}, must be matched within those "
          f"groups: declare Space({name!r}, {space.width}, groups={ax.groups}) (or a multiple "
          f"of {ax.groups}); it has groups={space.groups}"
          + (" and is made of spaces." if space.parts else "."))

  def trunk_spaces(self, stop_at: str) -> tuple[str, ...]:
    """The spaces a partial zip at ``stop_at`` merges: those up to it in network order, and
    the spaces made of them."""
    if stop_at not in self.stop_points:
      raise SpecError(f"stop_at={stop_at!r} is not a stop point of {self.name!r}; valid stop "
                      f"points, in network order: {list(self.stop_points)}.")
    names = self.space_names
    base = [n for n in names[:names.index(stop_at) + 1] if not self.space(n).parts]
    made = [s.name for s in self.spaces if s.parts and all(
        p in base for p, _ in s.parts if isinstance(p, str))]
    return tuple(n for n in names if n in base or n in made)

  @property
  def matched_spaces(self) -> tuple[str, ...]:
    """The spaces a matcher merges: every space not made of other spaces."""
    return tuple(s.name for s in self.spaces if not s.parts)

  def space(self, name: str) -> Space:
    for s in self.spaces:
      if s.name == name:
        return s
    raise SpecError(f"Unknown space {name!r}; the spaces of {self.name!r} are "
                    f"{list(self.space_names)}.")

  def composed(self, merges: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """``merges`` with the merge of every space of ``names`` made of spaces added, built from
    its parts' merges (see :class:`Space`)."""
    out = dict(merges)
    for name in names:
      s = self.space(name)
      if not s.parts or name in out:
        continue
      missing = [p for p, _ in s.parts if isinstance(p, str) and p not in out]
      if missing:
        raise SpecError(f"Space {name!r} is made of {missing}, which have no merges.")
      num = next(m.num_models for m in out.values())
      out[name] = merge_lib.compose([
          (out[p] if isinstance(p, str) else merge_lib.identity_merge(int(p), num), repeats)
          for p, repeats in s.parts])
    return out

  def is_trunk_leaf(self, path: Path, trunk: Sequence[str]) -> bool:
    """Whether a leaf belongs to the merged trunk: it writes a trunk space."""
    return any(ax.role != IN and ax.space in trunk for ax in self.leaves[path].values())

  def _check_stop_point(self, stop: str) -> None:
    names = self.space_names
    index = {n: i for i, n in enumerate(names)}
    if self.space(stop).parts:
      raise SpecError(f"{stop!r} is made of other spaces; it cannot be a stop point.")

    def entries(axes):  # a space made of spaces counts as its parts
      for ax in axes.values():
        parts = [p for p, _ in self.space(ax.space).parts if isinstance(p, str)]
        for n in parts or [ax.space]:
          yield index[n], ax.role

    found = bypassing_leaf({p: list(entries(axes)) for p, axes in self.leaves.items()},
                           index[stop])
    if found:
      path, bad = found
      raise SpecError(
          f"{stop!r} is not a valid stop point of {self.name!r}: leaf {fmt_path(path)} reads "
          f"spaces {[names[i] for i in bad]} across it, so some path of the network bypasses "
          f"{stop!r}. Stop points must be spaces every path passes through, and spaces must be "
          "in network order.")

  @property
  def space_names(self) -> tuple[str, ...]:
    return tuple(s.name for s in self.spaces)

  @functools.cached_property
  def _batchnorms(self) -> tuple[BatchNormLayer, ...]:
    return _batchnorm_layers(self.leaves)

  def batchnorm_layers(self, trunk: Iterable[str] | None = None) -> tuple[BatchNormLayer, ...]:
    """The BatchNorm layers merged as affine maps: all, or those on the spaces ``trunk``."""
    return tuple(bn for bn in self._batchnorms if trunk is None or bn.space in trunk)

  def width(self, space: str) -> int:
    return self.space(space).width

  def leaf_axes(self, path: Path, ndim: int) -> dict[int, Axis]:
    """The axes of one leaf with non-negative indices (``by`` too)."""
    return {a % ndim: ax if ax.by is None else dataclasses.replace(ax, by=ax.by % ndim)
            for a, ax in self.leaves[path].items()}

  def __repr__(self):
    return (f"Spec({self.name!r}, {len(self.spaces)} spaces, {len(self.leaves)} leaves, "
            f"stop_points={list(self.stop_points)})")


def _batchnorm_interceptor(record: dict):
  """Replaces every nn.BatchNorm call by normalisation with the batch's own statistics."""

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if not isinstance(module, nn.BatchNorm) or context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if kwargs.get("mask") is not None:
      raise SpecError(f"BatchNorm {fmt_path(module.path)} is called with a mask; zipjax's "
                      "BatchNorm reset does not support masked statistics.")
    x = args[0]
    axes = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    axes = tuple(a % x.ndim for a in axes)
    reduce = tuple(i for i in range(x.ndim) if i not in axes)
    xf = x.astype(jnp.float32)
    mean = xf.mean(reduce)
    var = jnp.square(xf - jnp.expand_dims(mean, reduce)).mean(reduce)
    path = ("batch_stats",) + tuple(module.path)
    if path in record:
      raise SpecError(f"BatchNorm {fmt_path(module.path)} is called twice in one forward "
                      "pass; its statistics are ambiguous.")
    # The count of values behind each channel's statistics: the unbiased variance needs it.
    record[path] = (mean, var, math.prod(x.shape[i] for i in reduce))
    shape = [1] * x.ndim
    for a in axes:
      shape[a] = x.shape[a]
    y = (xf - mean.reshape(shape)) * jax.lax.rsqrt(var.reshape(shape) + module.epsilon)
    params = module.variables.get("params", {})
    if module.use_scale:
      y = y * params["scale"].reshape(shape)
    if module.use_bias:
      y = y + params["bias"].reshape(shape)
    return y.astype(module.dtype or x.dtype)

  return interceptor


def linen_spec(module: nn.Module, *, spaces: Iterable[Space],
               leaves: Mapping[Path, LeafAxes], stop_points: Sequence[str] = (),
               apply_kwargs: Mapping[str, Any] | None = None,
               name: str | None = None) -> Spec:
  """A spec for a flax.linen module that records its features with ``capture``.

  Args:
    module: the module; ``module.apply(variables, x, **apply_kwargs)`` is inference mode.
    spaces: its feature spaces in network order.
    leaves: ``{leaf path: axes}`` for every leaf, from :func:`dense`, :func:`conv`, ...
    stop_points: spaces where every path of the network passes (valid partial-zip stops).
    apply_kwargs: extra keyword arguments of the inference-mode call.
    name: a label for messages (default: the module's class name).
  """
  kwargs = dict(apply_kwargs or {})

  def apply(variables, x):
    return module.apply(_model_vars(variables), x, **kwargs)

  def features(variables, x):
    _, state = module.apply(_model_vars(variables), x, mutable=[FEATURES], **kwargs)
    out = {}
    for path, value in jax.tree_util.tree_flatten_with_path(state.get(FEATURES, {}))[0]:
      # sow stores a tuple per name: the path ends with (..., name, index).
      name = key_name(path[-2])
      if name.startswith(_SOW_PREFIX):
        out.setdefault(name[len(_SOW_PREFIX):], []).append(value)
    return out

  def batchnorm_stats(variables, x):
    record: dict = {}
    with nn.intercept_methods(_batchnorm_interceptor(record)):
      module.apply(_model_vars(variables), x, **kwargs)
    return record

  return Spec(spaces=tuple(spaces), leaves=dict(leaves), stop_points=tuple(stop_points),
              apply=apply, features=features, batchnorm_stats=batchnorm_stats,
              name=name or type(module).__name__)


def _model_vars(variables):
  """Drops a stale features collection (e.g. from a user's own init) before applying."""
  if isinstance(variables, Mapping) and FEATURES in variables:
    return type(variables)({k: v for k, v in variables.items() if k != FEATURES})
  return variables


# ----------------------------------------------------------------------------------------------
# Validation


def flatten(variables: Variables) -> dict[Path, Any]:
  """{path of str keys: leaf} of any pytree of arrays (a linen features collection excluded).

  Leaves are named by their key paths: dict keys, sequence indices, attribute and dataclass
  field names, so ``[(W, b), ...]`` gives ('0', '0'), ('0', '1'), ... An NNX ``Variable``'s
  ``value`` attribute is left out of the name: ``('conv', 'kernel')``, as in linen.
  """
  leaves = jax.tree_util.tree_flatten_with_path(_model_vars(variables))[0]
  flat = {_path_names(path): leaf for path, leaf in leaves}
  if len(flat) != len(leaves):
    seen: dict = {}
    for path, _ in leaves:
      seen.setdefault(_path_names(path), []).append(jax.tree_util.keystr(path))
    dupes = [v for v in seen.values() if len(v) > 1]
    raise SpecError(f"Leaves {dupes[0]} have the same name; zipjax addresses leaves by the "
                    "names on their key paths. Rename one of them.")
  return flat


@functools.lru_cache(maxsize=1 << 16)
def _path_names(path: tuple) -> Path:
  """The str keys of a jax.tree_util key path (cached: every zip flattens the same paths)."""
  if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and (
      path[-1].name == "value"):
    path = path[:-1]  # an NNX Variable or a linen nn.Partitioned box: named by its owner
  return tuple(key_name(k) for k in path)


def unflatten(flat: Mapping[Path, Any], like: Any = None) -> Any:
  """The inverse of :func:`flatten`: a tree with the structure of ``like`` (any pytree whose
  :func:`flatten` has the same paths) holding the leaves of ``flat``, or nested dicts."""
  if like is not None:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(_model_vars(like))
    return jax.tree_util.tree_unflatten(treedef, [flat[_path_names(p)] for p, _ in leaves])
  tree: dict = {}
  for path, leaf in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = leaf
  return tree


def validate(spec: Spec, variables: Variables, *, label: str = "variables") -> dict[Path, Any]:
  """Checks that ``spec`` covers ``variables`` exactly and that axis sizes match the widths.

  Returns the flat variables. Raises SpecError naming every offending path.
  """
  return validate_flat(spec, flatten(variables), label=label)


def validate_flat(spec: Spec, flat: Mapping[Path, Any], *,
                  label: str = "variables") -> Mapping[Path, Any]:
  """:func:`validate` of variables already flattened with :func:`flatten`."""
  missing = sorted(fmt_path(p) for p in flat if p not in spec.leaves)
  extra = sorted(fmt_path(p) for p in spec.leaves if p not in flat)
  if missing or extra:
    lines = [f"Spec {spec.name!r} does not match the leaves of {label}."]
    if missing:
      lines.append(f"  In {label}, not in the spec ({len(missing)}): {missing[:12]}"
                   + (" ..." if len(missing) > 12 else ""))
      lines.append("  Fix: add them with zipjax.spec.dense/conv/batchnorm/layernorm, or with "
                   "an empty axes mapping {} if they touch no feature space.")
    if extra:
      lines.append(f"  In the spec, not in {label} ({len(extra)}): {extra[:12]}"
                   + (" ..." if len(extra) > 12 else ""))
      lines.append("  Fix: check module names (print jax.tree_util.tree_map(jnp.shape, "
                   "variables)) and that the variables come from the same model.")
    raise SpecError("\n".join(lines))
  for path, leaf in flat.items():
    shape = np.shape(leaf)
    for axis, ax in spec.leaves[path].items():
      if not -len(shape) <= axis < len(shape):
        raise SpecError(f"Leaf {fmt_path(path)} has shape {shape}, but the spec gives its axis "
                        f"{axis} to space {ax.space!r}.")
      width = spec.width(ax.space)
      if ax.groups > 1:
        if not -len(shape) <= ax.by < len(shape) or ax.by % len(shape) == axis % len(shape):
          raise SpecError(f"Leaf {fmt_path(path)} has shape {shape}; the spec's axis {axis} "
                          f"reads groups selected by axis {ax.by}, which it does not have.")
        by = spec.leaf_axes(path, len(shape)).get(ax.by % len(shape))
        if by is not None:
          spec.check_group_space(path, axis, ax, by.space, "the space its `by` axis writes")
        if shape[axis] * ax.groups != width or shape[ax.by] % ax.groups:
          raise SpecError(
              f"Leaf {fmt_path(path)} axis {axis} has size {shape[axis]} (shape {shape}): "
              f"one of {ax.groups} groups of space {ax.space!r} of width {width} needs "
              f"{width // ax.groups}, and axis {ax.by} a multiple of {ax.groups}. Check the "
              "layer's feature_group_count.")
      elif shape[axis] != width:
        raise SpecError(
            f"Leaf {fmt_path(path)} axis {axis} has size {shape[axis]} (shape {shape}), but "
            f"space {ax.space!r} has width {width}. Fix the space width or the axis.")
  return flat


def check_order(models: Any, spec: Any, call: str, *, spec_optional: bool = False) -> None:
  """Raises TypeError when a spec is passed where models go, or the reverse."""
  first = models[0] if isinstance(models, (list, tuple)) and models else models
  if isinstance(first, Spec) or not (isinstance(spec, Spec) or
                                     (spec_optional and spec is None)):
    raise TypeError(f"Arguments in the wrong order: the call is {call} (the models first, then "
                    f"the spec); got a {type(first).__name__} first and a "
                    f"{type(spec).__name__} as the spec.")


def check_same_structure(variables_list: Sequence[Variables]) -> list[dict[Path, Any]]:
  """Flattens N variables trees and checks they have the same leaves and shapes."""
  flats = [flatten(v) for v in variables_list]
  ref = flats[0]
  for m, flat in enumerate(flats[1:], start=1):
    only_0 = sorted(fmt_path(p) for p in ref if p not in flat)
    only_m = sorted(fmt_path(p) for p in flat if p not in ref)
    if only_0 or only_m:
      raise MismatchError(
          f"Models 0 and {m} have different variables trees (different architectures?).\n"
          f"  only in model 0: {only_0[:12]}\n  only in model {m}: {only_m[:12]}")
    for p in ref:
      da, dm = jnp.result_type(ref[p]), jnp.result_type(flat[p])
      if da != dm:
        raise MismatchError(
            f"Leaf {fmt_path(p)} is {da} in model 0 but {dm} in model {m}. zipjax merges "
            "models of one dtype (the merged model has it too); cast one model first, e.g. "
            f"jax.tree.map(lambda w: w.astype(jnp.{da}), variables_{m}).")
      if np.shape(ref[p]) != np.shape(flat[p]):
        raise MismatchError(
            f"Leaf {fmt_path(p)} has shape {np.shape(ref[p])} in model 0 but "
            f"{np.shape(flat[p])} in model {m}. Zipped models need the same shapes: models "
            "of different widths cannot be zipped, and output layers for different numbers "
            "of classes must be padded to one width (or use CLIP-style heads).")
  return flats


@jax.jit
def _all_finite(flat: Mapping[Path, Any]) -> dict[Path, jax.Array]:
  return {p: jnp.all(jnp.isfinite(leaf)) for p, leaf in flat.items()}


def check_finite(flat: Mapping[Path, Any], *, label: str) -> None:
  """Raises if any leaf holds NaN or infinity (one jitted reduction over all leaves)."""
  floats = {p: leaf for p, leaf in flat.items() if jnp.issubdtype(jnp.result_type(leaf),
                                                                   jnp.inexact)}
  finite = jax.device_get(_all_finite(floats))
  bad = sorted(fmt_path(p) for p, ok in finite.items() if not ok)
  if bad:
    raise MismatchError(f"{label} has non-finite values in {bad[:12]}; zipping them would "
                        "spread NaN through the merged model. Fix the checkpoint first.")


def check_models(spec: Spec, variables_list: Sequence[Any], *,
                 finite: bool = True) -> list[dict]:
  """Checks N models against the spec and each other; returns their flat variables."""
  if isinstance(variables_list, Mapping) or len(variables_list) < 2:
    raise ValueError("Zipping needs a sequence of at least 2 models' variables, got "
                     f"{type(variables_list).__name__} of length "
                     f"{len(variables_list) if not isinstance(variables_list, Mapping) else 1}.")
  flats = check_same_structure(variables_list)
  # The models have the same leaves and shapes, so model 0 stands for all of them.
  validate_flat(spec, flats[0], label="model 0")
  if finite:
    for m, flat in enumerate(flats):
      check_finite(flat, label=f"Model {m}")
  return flats


# ----------------------------------------------------------------------------------------------
# Permutations: the test that a spec is right.


def last_captures(spec: Spec) -> Spec:
  """``spec`` with only the last capture of every space kept as its features.

  A residual stream captured after every block is then sampled once, where its stage ends
  (what the next stage, or the pooling, reads): the capture point of the official ZipIt!
  code. Spaces captured once are unchanged. The result is a new spec, the same one for every
  call on ``spec`` (so its compiled passes are reused).
  """
  if spec in _LAST_CAPTURES:
    return _LAST_CAPTURES[spec]
  features = spec.features

  def last(variables, x):
    return {name: list(found)[-1:] for name, found in features(variables, x).items()}

  out = dataclasses.replace(spec, features=last, name=f"{spec.name} (last captures)")
  _LAST_CAPTURES[spec] = out
  return out


_LAST_CAPTURES: "weakref.WeakKeyDictionary[Spec, Spec]" = weakref.WeakKeyDictionary()


def random_permutations(spec: Spec, key: jax.Array) -> dict[str, np.ndarray]:
  """One random permutation per space (a space made of spaces permutes as its parts).

  A space in groups is permuted within its groups; the groups of the spaces of one attention
  layer (``Space.heads``) are permuted too, all of that layer's spaces alike."""
  base = [s for s in spec.spaces if not s.parts]
  heads_key = jax.random.fold_in(key, 1)
  layers = sorted({s.heads for s in base if s.heads is not None})
  order = {layer: np.asarray(jax.random.permutation(k, spec.space(
      next(s.name for s in base if s.heads == layer)).groups))
      for layer, k in zip(layers, jax.random.split(heads_key, max(len(layers), 1)))}
  keys = jax.random.split(key, max(len(base), 1))
  perms = {}
  for s, k in zip(base, keys):
    size = s.width // s.groups  # within groups only: a group's features stay in it
    groups = order[s.heads] if s.heads is not None else np.arange(s.groups)
    perms[s.name] = np.concatenate([
        int(g) * size + np.asarray(jax.random.permutation(kg, size))
        for g, kg in zip(groups, jax.random.split(k, s.groups))])
  return composed_permutations(spec, perms)


def composed_permutations(spec: Spec, perms: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """``perms`` with the permutation of every space made of spaces in ``perms`` added."""
  out = dict(perms)
  for s in spec.spaces:
    if not s.parts or s.name in out or not any(p in perms for p, _ in s.parts):
      continue
    pieces, offset = [], 0
    for part, repeats in s.parts:
      width = spec.width(part) if isinstance(part, str) else int(part)
      perm = np.asarray(perms[part]) if part in perms else np.arange(width)
      for _ in range(repeats):
        pieces.append(perm + offset)
        offset += width
    out[s.name] = np.concatenate(pieces)
  return out


def permute_spaces(variables: Variables, spec: Spec, key: jax.Array | None = None, *,
                   perms: Mapping[str, np.ndarray] | None = None) -> dict:
  """Returns variables of the same function with the channels of every space permuted.

  Give a ``key`` for random permutations, or ``perms`` ({space: index array}) for chosen
  ones (spaces not in ``perms`` are left as they are).
  """
  if (key is None) == (perms is None):
    raise ValueError("permute_spaces needs exactly one of `key` or `perms`.")
  perms = random_permutations(spec, key) if perms is None else composed_permutations(spec, perms)
  flat = validate(spec, variables)
  out = {}
  for path, leaf in flat.items():  # on the host: no program compiled per leaf shape
    axes = [(axis, ax) for axis, ax in spec.leaf_axes(path, np.ndim(leaf)).items()
            if ax.space in perms]
    if axes:
      value = np.asarray(leaf)
      grouped = [(axis, ax) for axis, ax in spec.leaf_axes(path, value.ndim).items()
                 if ax.groups > 1]
      for axis, ax in grouped:
        value = expand_groups(value, axis, ax.by, ax.groups, xp=np)
      for axis, ax in axes:
        value = np.take(value, np.asarray(perms[ax.space]), axis=axis)
      for axis, ax in grouped:
        value = compress_groups(value, axis, ax.by, ax.groups, xp=np)
      leaf = jnp.asarray(value)
    out[path] = leaf
  return unflatten(out, variables)


def _max_rel_diff(a, b) -> float:
  diffs = jax.tree_util.tree_map(
      lambda u, v: float(jnp.max(jnp.abs(u - v)) / (jnp.max(jnp.abs(u)) + 1e-12)), a, b)
  return max(jax.tree_util.tree_leaves(diffs), default=0.0)


def randomized(variables: Variables, key: jax.Array) -> Any:
  """``variables`` with every float leaf perturbed at its own scale, signs kept where a leaf
  has one sign (BatchNorm variances stay positive): statistics and biases that init sets to
  0 and 1 are no longer special, so a spec that leaves them out fails :func:`check_spec`.
  Drawn with numpy on the host (seeded from ``key``): no program is compiled per shape."""
  flat = flatten(variables)
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
  out = {}
  for path, leaf in flat.items():
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating) or np.size(leaf) == 0:
      out[path] = leaf
      continue
    x = np.asarray(leaf, np.float32)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    if (x > 0).all() or (x < 0).all():
      new = x * np.exp(0.3 * noise)
    else:
      scale = float(x.std())
      new = x + (0.3 * scale if scale > 0 else 0.1) * noise
    out[path] = jnp.asarray(new.astype(jnp.result_type(leaf)))
  return unflatten(out, variables)


def check_spec(variables: Variables, spec: Spec, x: Any, *, key: jax.Array | None = None,
               rtol: float = 1e-4, randomize: bool = True) -> None:
  """Raises SpecError if the spec does not describe the model's symmetries and captures.

  A correct spec describes symmetries of the model: permuting any space, with every axis
  that writes or reads it, leaves the function unchanged. The check runs the model on ``x``
  with its spaces permuted at random, on variables whose every float leaf is perturbed
  first (``randomize``), so a BatchNorm statistic or a bias left out of the spec changes
  the outputs even when the variables come straight from ``init`` (zeros and ones). It also
  checks that every space of the spec is captured, with features of its width.

  Arguments:
    variables: one model's variables (any pytree of arrays; an NNX module is split).
    spec: its spec.
    x: an input batch.
    key: the randomness of the permutations and perturbations (default: key 0).
    rtol: the largest relative change of the outputs that passes.
    randomize: perturb the variables first (turn off only for hand-set variables).

  Raises:
    SpecError: naming the spaces whose permutation alone changes the outputs, or the spaces
      that are never captured or captured at the wrong width. TypeError: arguments in the
      wrong order (the order is check_spec(variables, spec, x)).
  """
  if isinstance(variables, Spec) or not isinstance(spec, Spec):
    raise TypeError("Arguments in the wrong order: the call is check_spec(variables, spec, x) "
                    f"(the model first, then the spec); got a {type(variables).__name__} and a "
                    f"{type(spec).__name__}.")
  if _is_nnx_module(variables):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    variables = nnx.split(variables, (nnx.Param, nnx.BatchStat), ...)[1]
  if key is None:
    key = jax.random.key(0)
  perm_key, noise_key = jax.random.split(key)
  validate(spec, variables)
  if randomize:
    variables = randomized(variables, noise_key)
  _check_captures(spec, variables, x)
  apply = jax.jit(spec.apply)
  ref = apply(variables, x)
  perms = random_permutations(spec, perm_key)
  diff = _max_rel_diff(ref, apply(permute_spaces(variables, spec, perms=perms), x))
  if not math.isfinite(diff) or diff > rtol:
    culprits = []
    for name in spec.matched_spaces:
      d = _max_rel_diff(ref, apply(permute_spaces(variables, spec, perms={name: perms[name]}),
                                   x))
      if not math.isfinite(d) or d > rtol:
        culprits.append(f"{name} (relative change {d:.3g})")
    raise SpecError(
        f"Spec {spec.name!r} is wrong: permuting its spaces changes the model's outputs by "
        f"{diff:.3g} (relative; tolerance {rtol}). Spaces whose permutation alone changes the "
        f"outputs: {culprits or 'none alone; check spaces that share a leaf'}. Check that every "
        "layer writing such a space has an 'out' axis and every layer reading it an 'in' axis, "
        "and that every leaf that depends on a space's order (a bias, a BatchNorm statistic) "
        "has an axis on it.")


def _is_nnx_module(x: Any) -> bool:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return isinstance(x, nnx.Module)


def _check_captures(spec: Spec, variables: Variables, x: Any) -> None:
  feats = jax.eval_shape(spec.features, variables, x)
  missing = [n for n in spec.matched_spaces if not feats.get(n)]
  unknown = sorted(n for n in feats if n not in spec.space_names)
  if missing or unknown:
    raise SpecError(
        f"Spec {spec.name!r}: " + (f"spaces {missing} are never captured. " if missing else "")
        + (f"The model captures {unknown}, which the spec does not declare. " if unknown
           else "")
        + "Call zipjax.spec.capture(self, name, y) once per space, after its activation, with "
        f"the names the spec declares: {list(spec.space_names)}.")
  for n in spec.matched_spaces:
    for f in feats[n]:
      if not f.shape or f.shape[-1] != spec.width(n):
        raise SpecError(f"Spec {spec.name!r}: space {n!r} has width {spec.width(n)}, but it is "
                        f"captured with shape {tuple(f.shape)} (channels must be last).")
