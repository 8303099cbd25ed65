"""Inferring a zip spec from a model's jaxpr.

``infer_spec`` traces ``apply(variables, x)`` with ``jax.make_jaxpr`` and groups every array
axis of the program into feature spaces with a union-find over its equations:

- ``dot_general`` and ``conv_general_dilated`` tie the contracted axis of the weight to the
  feature axis of the input (the weight *reads* that space: role 'in') and link the weight's
  output axis to the result's feature axis (it *writes* that space: role 'out'); a grouped
  convolution's weight reads one group's slice of the input space (``Axis.groups``), and its
  input and output spaces are matched in groups;
- element-wise operations, with their size-1 broadcasting, unify the axes they align (a bias,
  a BatchNorm or LayerNorm scale, a residual add); a parameter that reaches the activations
  through ``sqrt``/``rsqrt`` (a BatchNorm running variance) gets role 'var';
- reductions, pooling, ``reshape``, ``transpose``, ``squeeze``, ``broadcast_in_dim`` map axes
  one to one; nested jaxprs (``jit``, ``custom_jvp_call``, ``custom_vjp_call``, ``remat``,
  ``scan``) are followed, each call site separately.

Axes whose order matters are *pinned*: the model's inputs and outputs, convolution windows,
the axis a slice, pad, reversal, cumulative op or argmax works along, a concatenated axis and
the axes concatenated into it, an axis that a reshape merges with or splits into others, and
a scanned axis. A space that holds a pinned axis stays unmerged, and so does a space that no
parameterised layer both writes and reads, and a space that a parameter axis both writes and
reads (tied weights). Attention is recognised in a product of two activations: queries
times keys contract the within-head axis of features that a reshape split into heads (or, for
one head, features not split), batched over the heads; their features become one space in
groups (the heads) whose attention layer (``Space.heads``) also holds the values' space, whose
heads are batched with the attention weights'. Any other product over merged features is
refused, or with ``attention='unmerged'`` its spaces stay unmerged. Every other space is
merged. A primitive outside the analysis's
tables raises :class:`SpecError` naming the primitive, the equation and the model code it came
from, and so does a sort along a feature axis that would otherwise be merged.

Features of a space are the inputs of the layers that read it, followed back through pooling,
means, reshapes and dtype casts to the activation they come from (after the nonlinearity);
``features`` evaluates the jaxpr and captures them, the space's axis moved last.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.extend.core as jcore
import jax.extend.source_info_util as source_info_util
import jax.numpy as jnp

from zipjax._src import spec as spec_lib
from zipjax._src.errors import SpecError, fmt_path

Path = spec_lib.Path
Scope = tuple[int, ...]

_ATTENTION_MODES = ("heads", "refuse", "unmerged")

# Call-like primitives: one body jaxpr whose inputs and outputs are the equation's, one to one.
_CALLS = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}

_UNARY = frozenset("""
    abs acos acosh asin asinh atan atanh bessel_i0e bessel_i1e cbrt ceil clz conj
    convert_element_type copy copy_p cos cosh digamma erf erf_inv erfc exp exp2 expm1 floor imag
    integer_pow is_finite lgamma log log1p logistic neg not population_count real stop_gradient
    reduce_precision round rsqrt sign sin sinh sqrt square tan tanh
""".split())
_NARY = frozenset("""
    add add_any and atan2 clamp complex div eq ge gt igamma igammac le lt max min mul ne
    nextafter or pow random_gamma_grad rem select_n shift_left shift_right_arithmetic
    shift_right_logical sub xor
""".split())
# Identities on any number of operands: output i is operand i.
_IDENTITY = frozenset(
    "optimization_barrier device_put sharding_constraint mesh_cast reshard".split())
_REDUCE = frozenset("reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or "
                    "reduce_xor".split())
_ARGREDUCE = frozenset(("argmax", "argmin"))
_CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())
_REDUCE_WINDOW = frozenset("reduce_window_sum reduce_window_max reduce_window_min "
                           "reduce_window".split())
# Known primitives whose outputs depend on no feature order we could track: every axis they
# touch is pinned (their spaces stay unmerged).
_OPAQUE = frozenset("""
    iota random_bits random_seed random_wrap random_unwrap random_fold_in random_split
    threefry2x32 rng_bit_generator rng_uniform scatter scatter-add scatter_add scatter-mul
    scatter_mul scatter-min scatter_min scatter-max scatter_max
""".split())
# Ops that carry the features of their first operand unchanged along the space's axis: the
# capture of a space's features walks back through them (pooling, means, reshapes, casts).
_TRANSPARENT = frozenset("""
    convert_element_type copy copy_p reduce_precision reshape transpose squeeze
    broadcast_in_dim reduce_sum reduce_max reduce_min reduce_window_sum reduce_window_max
    reduce_window_min reduce_window optimization_barrier device_put sharding_constraint
""".split()) | frozenset(("mul", "div"))
_SQRT = frozenset(("sqrt", "rsqrt"))
_INPUT_PIN = "an axis of the model's input"
_OUTPUT_PIN = "an axis of the model's output"
_WINDOW_PIN = "convolution window"
# Axes that are never features to merge: nothing to report when they stay unmerged.
_EXPECTED_PINS = frozenset((_INPUT_PIN, _OUTPUT_PIN, _WINDOW_PIN))


class _Unsupported(Exception):
  """Raised by an equation rule; becomes a SpecError with the equation's location."""


# ----------------------------------------------------------------------------------------------
# Messages


@functools.cache
def _library_dirs() -> tuple[str, ...]:
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  dirs = [os.path.dirname(m.__file__) for m in (jax, jaxlib, flax)]
  dirs.append(os.path.dirname(os.path.abspath(__file__)))  # zipjax/_src
  return tuple(os.path.join(os.path.realpath(d), "") for d in dirs)


def _is_library_file(filename: str) -> bool:
  """Whether a traceback frame is inside jax, jaxlib, flax or zipjax's internals."""
  return os.path.realpath(filename).startswith(_library_dirs())


def _where(eqn) -> str:
  """The model code an equation comes from: 'model.py:12 (MLP.__call__)', plus the library
  line that emitted it ('via flax/linen/linear.py:287:8 (Dense.__call__)')."""
  innermost = source_info_util.summarize(eqn.source_info)
  frames = getattr(getattr(eqn.source_info, "traceback", None), "frames", None) or ()
  for f in frames:
    filename = getattr(f, "file_name", "")
    if filename and not _is_library_file(filename):
      user = f"{filename}:{f.line_num} ({f.function_name})"
      return user if innermost.startswith(f"{filename}:{f.line_num}") else (
          f"{user}, via {innermost}")
  return innermost


def _eqn_text(eqn, limit: int = 600) -> str:
  text = " ".join(str(eqn).split())
  return text if len(text) <= limit else text[:limit] + " ..."


def _location(eqn, callers: Sequence[Any] = ()) -> str:
  """Where an equation comes from; inside a library function without source information
  (jnp.fft, say), where that function is called."""
  where = _where(eqn)
  for caller in reversed(callers):
    if where:
      break
    where = _where(caller)
    if where:
      where = f"{where} (in `{caller.primitive.name}`"\
              f"{' ' + str(caller.params['name']) if 'name' in caller.params else ''})"
  return where or "unknown"


def _error(eqn, message: str, where: str) -> SpecError:
  return SpecError(f"{message}\n  primitive: {eqn.primitive.name}\n  equation: {_eqn_text(eqn)}"
                   f"\n  source: {where}")


# ----------------------------------------------------------------------------------------------
# Per-equation axis rules


@dataclasses.dataclass
class _Rule:
  """How one equation maps axes.

  links: (operand, axis, output, axis): the output axis carries the operand axis's features.
  ties: (operand, axis, operand, axis): two operand axes that must share one space (the
    contracted axes of a product).
  contract: operand axes summed over against another operand (a weight's 'in' axis).
  pin_in / pin_out: (index, axis, reason): axes whose order matters.
  refuse_in: (operand, axis, reason): fine on a pinned axis, an error on a merged space.
  composes: (output, axis, [(operand, axis, repeats)]): the output axis is the operand axes'
    features one after the other, each tiled ``repeats`` times (a concatenation, or a
    feature map flattened channels-last): a space made of spaces.
  """

  links: list = dataclasses.field(default_factory=list)
  ties: list = dataclasses.field(default_factory=list)
  contract: set = dataclasses.field(default_factory=set)
  pin_in: list = dataclasses.field(default_factory=list)
  pin_out: list = dataclasses.field(default_factory=list)
  refuse_in: list = dataclasses.field(default_factory=list)
  composes: list = dataclasses.field(default_factory=list)
  # (operand, axis, output, group axis, axis in group): a feature axis split into groups
  # (GroupNorm's reshape); and (operand, group axis, axis in group, output, axis): the
  # groups joined back. Between the two the features may be permuted within their groups.
  splits: list = dataclasses.field(default_factory=list)
  joins: list = dataclasses.field(default_factory=list)
  # (weight, its axis, activation, its axis, groups, weight's group axis, output, its axis):
  # a grouped convolution, whose weight axis reads one group's slice of the activation axis.
  slices: list = dataclasses.field(default_factory=list)


def _shape(v) -> tuple[int, ...]:
  return tuple(getattr(v.aval, "shape", ()))


def _pin_all(eqn, rule: _Rule, reason: str) -> _Rule:
  for i, v in enumerate(eqn.invars):
    rule.pin_in += [(i, a, reason) for a in range(len(_shape(v)))]
  for j, v in enumerate(eqn.outvars):
    rule.pin_out += [(j, a, reason) for a in range(len(_shape(v)))]
  return rule


def _elementwise(eqn) -> _Rule:
  rule = _Rule()
  for j, out in enumerate(eqn.outvars):
    oshape = _shape(out)
    for i, v in enumerate(eqn.invars):
      shape = _shape(v)
      if not shape:
        continue
      if len(shape) != len(oshape):
        raise _Unsupported(f"operand {i} has rank {len(shape)} but the result has rank "
                           f"{len(oshape)}")
      rule.links += [(i, a, j, a) for a in range(len(shape)) if shape[a] == oshape[a]]
  return rule


def _kept(ndim: int, removed: Iterable[int]) -> list[int]:
  removed = {a % ndim for a in removed} if ndim else set()
  return [a for a in range(ndim) if a not in removed]


def _reduce(eqn, axes, *, pin_reason: str | None = None) -> _Rule:
  rule = _Rule()
  for i, v in enumerate(eqn.invars):
    ndim = len(_shape(v))
    if not ndim:
      continue
    kept = _kept(ndim, axes)
    for j, out in enumerate(eqn.outvars):
      if len(_shape(out)) != len(kept):
        raise _Unsupported("unexpected result rank")
      rule.links += [(i, a, j, k) for k, a in enumerate(kept)]
    if pin_reason:
      rule.pin_in += [(i, a % ndim, pin_reason) for a in axes]
  return rule


def _reshape_blocks(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]]:
  """Minimal groups of axes with equal products; size-1 axes belong to no group."""
  si = [a for a, n in enumerate(src) if n != 1]
  di = [a for a, n in enumerate(dst) if n != 1]
  blocks, i, j = [], 0, 0
  while i < len(si) and j < len(di):
    bs, bd = [si[i]], [di[j]]
    ps, pd = src[si[i]], dst[di[j]]
    i, j = i + 1, j + 1
    while ps != pd:
      if ps < pd and i < len(si):
        ps *= src[si[i]]
        bs.append(si[i])
        i += 1
      elif pd < ps and j < len(di):
        pd *= dst[di[j]]
        bd.append(di[j])
        j += 1
      else:
        raise _Unsupported(f"cannot match reshape {tuple(src)} -> {tuple(dst)}")
    blocks.append((bs, bd))
  if i < len(si) or j < len(di):
    raise _Unsupported(f"cannot match reshape {tuple(src)} -> {tuple(dst)}")
  return blocks


def _window_rule(eqn, num: int) -> _Rule:
  p = eqn.params
  rule = _Rule()
  for i in range(num):
    ndim = len(_shape(eqn.invars[i]))
    for a in range(ndim):
      trivial = (p["window_dimensions"][a] == 1 and p["window_strides"][a] == 1
                 and tuple(p["padding"][a]) == (0, 0)
                 and (p.get("base_dilation") or (1,) * ndim)[a] == 1
                 and (p.get("window_dilation") or (1,) * ndim)[a] == 1)
      if trivial:
        rule.links.append((i, a, i, a))
      else:
        rule.pin_in.append((i, a, "pooled over (a window along this axis)"))
        rule.pin_out.append((i, a, "pooled over (a window along this axis)"))
  return rule


def _dot_general(eqn) -> _Rule:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  nl, nr = len(_shape(eqn.invars[0])), len(_shape(eqn.invars[1]))
  rule = _Rule()
  out = 0
  for a, b in zip(lb, rb):
    rule.links += [(0, a, 0, out), (1, b, 0, out)]
    out += 1
  for a in range(nl):
    if a not in lc and a not in lb:
      rule.links.append((0, a, 0, out))
      out += 1
  for b in range(nr):
    if b not in rc and b not in rb:
      rule.links.append((1, b, 0, out))
      out += 1
  for a, b in zip(lc, rc):
    rule.ties.append((0, a, 1, b))
    rule.contract |= {(0, a), (1, b)}
  return rule


def _conv(eqn) -> _Rule:
  p = eqn.params
  dn = p["dimension_numbers"]
  lhs, rhs, out = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  rule = _Rule()
  if p.get("batch_group_count", 1) != 1:
    return _pin_all(eqn, rule, "convolution with batch_group_count > 1")
  rule.links.append((0, lhs[0], 0, out[0]))
  window = _WINDOW_PIN
  rule.pin_in += [(0, a, window) for a in lhs[2:]] + [(1, a, window) for a in rhs[2:]]
  rule.pin_out += [(0, a, window) for a in out[2:]]
  groups = p.get("feature_group_count", 1)
  lshape, rshape = _shape(eqn.invars[0]), _shape(eqn.invars[1])
  if groups == 1:
    rule.ties.append((0, lhs[1], 1, rhs[1]))
    rule.contract |= {(0, lhs[1]), (1, rhs[1])}
    rule.links.append((1, rhs[0], 0, out[1]))
  elif groups == lshape[lhs[1]] and rshape[rhs[0]] == groups:
    # Depthwise: output channel c reads input channel c only.
    rule.links += [(0, lhs[1], 0, out[1]), (1, rhs[0], 0, out[1])]
  else:  # Grouped: output channel o reads group o // (out / groups) of the input channels.
    rule.links.append((1, rhs[0], 0, out[1]))
    rule.contract |= {(0, lhs[1]), (1, rhs[1])}
    rule.slices.append((1, rhs[1], 0, lhs[1], groups, rhs[0], 0, out[1]))
  return rule


def _gather(eqn) -> _Rule:
  p = eqn.params
  dn = p["dimension_numbers"]
  shape = _shape(eqn.invars[0])
  oshape = _shape(eqn.outvars[0])
  rule = _Rule()
  batching = tuple(getattr(dn, "operand_batching_dims", ()))
  window = [a for a in range(len(shape)) if a not in dn.collapsed_slice_dims and a not in batching]
  if len(window) != len(dn.offset_dims):
    raise _Unsupported("gather offset dims do not match the operand's window dims")
  reason = "indexed by a gather"
  for a, o in zip(window, dn.offset_dims):
    if p["slice_sizes"][a] == shape[a] and a not in dn.start_index_map:
      rule.links.append((0, a, 0, o))
    else:
      rule.pin_in.append((0, a, reason))
      rule.pin_out.append((0, o, reason))
  for a in range(len(shape)):
    if a not in window:
      rule.pin_in.append((0, a, reason))
  rule.pin_in += [(1, a, reason) for a in range(len(_shape(eqn.invars[1])))]
  rule.pin_out += [(0, o, reason) for o in range(len(oshape)) if o not in dn.offset_dims]
  return rule


def _rule(eqn) -> _Rule:
  """The axis rule of one (non-call) equation; raises _Unsupported for unknown primitives."""
  name = eqn.primitive.name
  p = eqn.params
  ins = [_shape(v) for v in eqn.invars]
  if name in _UNARY or name in _NARY:
    return _elementwise(eqn)
  if name in _IDENTITY:
    rule = _Rule()
    for i, shape in enumerate(ins[:len(eqn.outvars)]):
      rule.links += [(i, a, i, a) for a in range(len(shape))]
    return rule
  if name in _REDUCE:
    return _reduce(eqn, p["axes"])
  if name in _ARGREDUCE:
    return _reduce(eqn, p["axes"], pin_reason="argmax/argmin along this axis")
  if name == "reduce":
    half = len(eqn.invars) // 2
    rule = _Rule()
    for i in range(half):
      ndim = len(ins[i])
      kept = _kept(ndim, p["dimensions"])
      for j in range(len(eqn.outvars)):
        rule.links += [(i, a, j, k) for k, a in enumerate(kept)]
      rule.pin_in += [(i, a, "reduced with a custom computation") for a in p["dimensions"]]
    return rule
  if name in _CUMULATIVE:
    rule = _Rule()
    axis = p["axis"] % len(ins[0])
    rule.links += [(0, a, 0, a) for a in range(len(ins[0])) if a != axis]
    rule.pin_in.append((0, axis, f"{name} along this axis"))
    rule.pin_out.append((0, axis, f"{name} along this axis"))
    return rule
  if name in _REDUCE_WINDOW:
    return _window_rule(eqn, len(eqn.outvars))
  if name == "broadcast_in_dim":
    rule = _Rule()
    oshape = _shape(eqn.outvars[0])
    for a, d in enumerate(p["broadcast_dimensions"]):
      if ins[0][a] == oshape[d]:
        rule.links.append((0, a, 0, d))
    return rule
  if name == "reshape":
    if p.get("dimensions") is not None:
      raise _Unsupported("reshape with `dimensions` (a transpose first) is not supported")
    rule = _Rule()
    for src, dst in _reshape_blocks(ins[0], _shape(eqn.outvars[0])):
      if len(src) == 1 and len(dst) == 1:
        rule.links.append((0, src[0], 0, dst[0]))
      elif len(src) == 1 and len(dst) == 2:
        rule.splits.append((0, src[0], 0, dst[0], dst[1]))
      elif len(dst) == 1 and len(src) == 2 and src[1] == src[0] + 1:
        rule.joins.append((0, src[0], src[1], 0, dst[0]))
      elif len(dst) == 1:
        # Flattened, last axis innermost: the features of src[-1] at every outer position.
        outer = src[:-1]
        rule.composes.append((0, dst[0], [(0, src[-1], math.prod(ins[0][a] for a in outer))]))
        rule.pin_in += [(0, a, "flattened together with a feature axis") for a in outer]
      else:
        reason = "merged with or split into other axes by a reshape"
        rule.pin_in += [(0, a, reason) for a in src]
        rule.pin_out += [(0, a, reason) for a in dst]
    return rule
  if name == "transpose":
    return _Rule(links=[(0, a, 0, k) for k, a in enumerate(p["permutation"])])
  if name == "squeeze":
    kept = _kept(len(ins[0]), p["dimensions"])
    return _Rule(links=[(0, a, 0, k) for k, a in enumerate(kept)])
  if name == "rev":
    rule = _Rule(links=[(0, a, 0, a) for a in range(len(ins[0])) if a not in p["dimensions"]])
    rule.pin_in += [(0, a, "reversed") for a in p["dimensions"]]
    rule.pin_out += [(0, a, "reversed") for a in p["dimensions"]]
    return rule
  if name == "concatenate":
    d = p["dimension"]
    rule = _Rule()
    for i, shape in enumerate(ins):
      rule.links += [(i, a, 0, a) for a in range(len(shape)) if a != d]
    rule.composes.append((0, d, [(i, d, 1) for i in range(len(ins))]))
    return rule
  if name == "split":
    axis = p["axis"]
    rule = _Rule()
    reason = "split into parts along this axis"
    rule.pin_in.append((0, axis, reason))
    for j in range(len(eqn.outvars)):
      rule.links += [(0, a, j, a) for a in range(len(ins[0])) if a != axis]
      rule.pin_out.append((j, axis, reason))
    return rule
  if name == "pad":
    rule = _Rule()
    for a, cfg in enumerate(p["padding_config"]):
      if tuple(cfg) == (0, 0, 0):
        rule.links.append((0, a, 0, a))
      else:
        rule.pin_in.append((0, a, "padded"))
        rule.pin_out.append((0, a, "padded"))
    return rule
  if name == "slice":
    rule = _Rule()
    strides = p.get("strides") or (1,) * len(ins[0])
    for a, n in enumerate(ins[0]):
      if p["start_indices"][a] == 0 and p["limit_indices"][a] == n and strides[a] == 1:
        rule.links.append((0, a, 0, a))
      else:
        rule.pin_in.append((0, a, "sliced"))
        rule.pin_out.append((0, a, "sliced"))
    return rule
  if name == "dynamic_slice":
    rule = _Rule()
    for a, n in enumerate(ins[0]):
      if p["slice_sizes"][a] == n:
        rule.links.append((0, a, 0, a))
      else:
        rule.pin_in.append((0, a, "sliced"))
        rule.pin_out.append((0, a, "sliced"))
    return rule
  if name == "dynamic_update_slice":
    rule = _Rule()
    for a, n in enumerate(ins[0]):
      if ins[1][a] == n:
        rule.links += [(0, a, 0, a), (1, a, 0, a)]
      else:
        rule.pin_in += [(0, a, "updated in part"), (1, a, "updated in part")]
        rule.pin_out.append((0, a, "updated in part"))
    return rule
  if name == "gather":
    return _gather(eqn)
  if name == "dot_general":
    return _dot_general(eqn)
  if name == "conv_general_dilated":
    return _conv(eqn)
  if name == "sort":
    d = p["dimension"]
    rule = _Rule()
    reason = "sorted along this axis"
    for i, shape in enumerate(ins):
      for j in range(len(eqn.outvars)):
        rule.links += [(i, a, j, a) for a in range(len(shape)) if a != d]
      rule.refuse_in.append((i, d, reason))
    rule.pin_out += [(j, d, reason) for j in range(len(eqn.outvars))]
    return rule
  if name in _OPAQUE:
    return _pin_all(eqn, _Rule(), f"used by {name}")
  if name == "debug_callback":  # jax.debug.print and friends: no effect on the outputs
    return _Rule()
  hint = ""
  if name in ("while", "cond"):
    hint = (" Control flow other than lax.scan is not supported; trace the model in "
            "inference mode without data-dependent branches or loops.")
  raise _Unsupported(f"infer_spec does not know how primitive `{name}` maps feature axes."
                     + hint)


# ----------------------------------------------------------------------------------------------
# Union-find


class _UnionFind:

  def __init__(self):
    self.parent: list[int] = []

  def add(self) -> int:
    self.parent.append(len(self.parent))
    return len(self.parent) - 1

  def find(self, x: int) -> int:
    root = x
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[x] != root:
      self.parent[x], x = root, self.parent[x]
    return root

  def union(self, a: int, b: int) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra != rb:
      self.parent[max(ra, rb)] = min(ra, rb)


# ----------------------------------------------------------------------------------------------
# The analysis


def _is_literal(v) -> bool:
  return isinstance(v, jcore.Literal)


def _is_drop(v) -> bool:
  return isinstance(v, jcore.DropVar)


def _call_body(eqn):
  """(open jaxpr, consts) of a call-like equation."""
  body = eqn.params.get(_CALLS[eqn.primitive.name])
  if body is None:
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
      if key in eqn.params:
        body = eqn.params[key]
        break
  if isinstance(body, jcore.ClosedJaxpr):
    return body.jaxpr, list(body.consts)
  if isinstance(body, jcore.Jaxpr):
    return body, []
  raise _Unsupported(f"cannot find the body jaxpr of `{eqn.primitive.name}`")


@dataclasses.dataclass(frozen=True)
class _Capture:
  scope: Scope
  var: Any
  axis: int


@dataclasses.dataclass
class _SpaceInfo:
  key: frozenset  # {(leaf path, axis, role)}: identifies the space across traces
  width: int
  leaf_axes: dict  # {(leaf index, axis): role}
  captures: list  # [_Capture] in network order
  name_hint: str
  order: tuple
  parts: tuple = ()  # a space made of spaces: ((part root or None, width, repeats), ...)
  groups: int = 1  # matched group by group (GroupNorm, grouped convolutions)
  slices: dict = dataclasses.field(default_factory=dict)  # {(leaf, axis): (groups, by axis)}
  heads: Any = None  # the attention layer whose heads the groups are (a root), or None


class _Analysis:
  """The union-find over one traced program, and what it concludes."""

  def __init__(self, closed, leaf_paths: Sequence[Path], attention: str):
    self.closed = closed
    self.paths = list(leaf_paths)
    self.attention = attention
    self.uf = _UnionFind()
    self.ids: dict = {}  # (scope, var, axis) -> node
    self.pins: dict = {}  # node -> reason
    self.pin_eqn: dict = {}  # node -> (eqn, callers) that pinned it first
    # Spaces made of spaces: [(composite node, [(part node or width, repeats)], [part reader])]
    self.composites: list = []
    # Features split into groups and joined back: [(feature node, group node, in-group node,
    # groups, eqn, callers)], and the joins seen: [(split index, joined output node)].
    self.splits: list = []
    self.joins: list = []
    # Grouped convolutions: [(activation node, output node, leaf, axis, by axis, groups)].
    self.slices: list = []
    self._slice_readers: dict = {}  # (leaf, axis) -> the first activation node it reads
    self.refusals: list = []  # (node, eqn, reason, location)
    # Products of two activations: [(scope, operands, dimension numbers)]; and their axes:
    # (node, eqn, location, product index, operand, kind: 'contract', 'batch' or 'free').
    self.products: list = []
    self.bilinear: list = []
    self.split_vars: list = []  # per split: (position, scope, var, axis) of the features
    self.dynamic: set = set()  # (scope, var) depending on the model's inputs
    self.origins: dict = {}  # (scope, var) -> [ {(leaf, axis): through_sqrt} per axis ]
    self.roles: dict = collections.defaultdict(dict)  # (leaf, axis) -> {role: first position}
    self.layer_axes: set = set()  # (leaf, axis) that a product (dot_general, conv) reads or writes
    self.readers: dict = {}  # (scope, var, axis) -> position of the reading layer
    self.producer: dict = {}  # (scope, var) -> (eqn, rule, output index)
    self.call_in: dict = {}  # (body scope, body invar) -> (scope, caller operand)
    self.call_out: dict = {}  # (scope, caller output) -> (body scope, body outvar)
    self.position: dict = {}  # (scope, var) -> position of its definition
    self.rep: dict = {}  # (scope, var) -> node of the data-flow graph
    self.succ: dict = collections.defaultdict(set)
    self.pred: dict = collections.defaultdict(set)
    self.inputs: list = []
    self.outputs: list = []
    self.shapes: dict = {}  # (scope, var) -> shape
    self._pos = 0
    self._callers: list = []  # the call and scan equations being analysed, outermost first
    self._run()

  # -- nodes ------------------------------------------------------------------------------------

  def node(self, scope: Scope, v, axis: int) -> int:
    key = (scope, v, axis)
    n = self.ids.get(key)
    if n is None:
      n = self.ids[key] = self.uf.add()
    return n

  def find(self, scope: Scope, v, axis: int) -> int:
    return self.uf.find(self.node(scope, v, axis))

  def is_dynamic(self, scope: Scope, v) -> bool:
    return not _is_literal(v) and (scope, v) in self.dynamic

  def define(self, scope: Scope, v, dynamic: bool, origins, rep) -> None:
    key = (scope, v)
    shape = _shape(v)
    self.shapes[key] = shape
    for a in range(len(shape)):
      self.node(scope, v, a)
    self.position.setdefault(key, self._pos)
    self.rep[key] = rep if rep is not None else key
    if dynamic:
      self.dynamic.add(key)
      self.origins.pop(key, None)
    elif origins is not None and any(origins):
      self.origins[key] = origins
    else:
      self.origins.pop(key, None)

  def edge(self, a, b) -> None:
    if a != b:
      self.succ[a].add(b)
      self.pred[b].add(a)

  def pin(self, scope: Scope, v, axis: int, reason: str, eqn=None) -> None:
    if not _is_literal(v) and not _is_drop(v):
      node = self.node(scope, v, axis)
      if node not in self.pins:
        self.pins[node] = reason
        if eqn is not None:
          self.pin_eqn[node] = (eqn, tuple(self._callers))

  def unify(self, sa: Scope, va, aa: int, sb: Scope, vb, ab: int) -> None:
    if any(_is_literal(v) or _is_drop(v) for v in (va, vb)):
      return
    self.uf.union(self.node(sa, va, aa), self.node(sb, vb, ab))

  def add_role(self, leaf: int, axis: int, role: str) -> None:
    self.roles[(leaf, axis)].setdefault(role, self._pos)

  # -- traversal --------------------------------------------------------------------------------

  def _run(self) -> None:
    jaxpr = self.closed.jaxpr
    num_leaves = len(self.paths)
    for v in jaxpr.constvars:
      self.define((), v, False, None, None)
    for k, v in enumerate(jaxpr.invars):
      ndim = len(_shape(v))
      if k < num_leaves:
        self.define((), v, False, [{(k, a): False} for a in range(ndim)], None)
      else:
        self.define((), v, True, None, None)
        self.inputs.append(((), v))
        for a in range(ndim):
          self.pin((), v, a, _INPUT_PIN)
    self._jaxpr(jaxpr, (), None)
    for v in jaxpr.outvars:
      if _is_literal(v):
        continue
      for a in range(len(_shape(v))):
        self.pin((), v, a, _OUTPUT_PIN)
      if self.is_dynamic((), v):
        self.outputs.append(self.rep[((), v)])

  def _jaxpr(self, jaxpr, scope: Scope, rep) -> None:
    for i, eqn in enumerate(jaxpr.eqns):
      self._pos += 1
      try:
        name = eqn.primitive.name
        if name in _CALLS or name == "scan":
          self._callers.append(eqn)
          try:
            (self._call if name in _CALLS else self._scan)(eqn, scope, i, rep)
          finally:
            self._callers.pop()
        else:
          self._eqn(eqn, scope, rep)
      except _Unsupported as e:
        raise _error(eqn, f"Cannot infer a zip spec: {e}",
                     _location(eqn, self._callers)) from None

  def _eqn(self, eqn, scope: Scope, rep) -> None:
    rule = _rule(eqn)
    ins, outs = eqn.invars, eqn.outvars
    dyn = [self.is_dynamic(scope, v) for v in ins]
    any_dyn = any(dyn)
    out_origins = None
    if not any_dyn:
      out_origins = self._propagate_origins(eqn, rule, scope)
    for j, o in enumerate(outs):
      if _is_drop(o):
        continue
      self.define(scope, o, any_dyn, out_origins[j] if out_origins else None, rep)
      self.producer[(scope, o)] = (eqn, rule, j)
      if any_dyn:
        for v, d in zip(ins, dyn):
          if d:
            self.edge(self.rep[(scope, v)], self.rep[(scope, o)])
    for i, a, j, b in rule.links:
      self.unify(scope, ins[i], a, scope, outs[j], b)
    for i, a, j, b in rule.ties:
      self.unify(scope, ins[i], a, scope, ins[j], b)
    for i, a, reason in rule.pin_in:
      self.pin(scope, ins[i], a, reason, eqn)
    for j, b, reason in rule.pin_out:
      self.pin(scope, outs[j], b, reason, eqn)
    for i, a, j, g, k in rule.splits:
      if not _is_drop(outs[j]) and self.is_dynamic(scope, ins[i]):
        self.splits.append((self.node(scope, ins[i], a), self.node(scope, outs[j], g),
                            self.node(scope, outs[j], k), _shape(outs[j])[g], eqn,
                            tuple(self._callers)))
        self.split_vars.append((self._pos, scope, ins[i], a))
    for i, g, k, j, b in rule.joins:
      if _is_drop(outs[j]):
        continue
      # The groups joined back: features split before, or group statistics broadcast over
      # each group (GroupNorm's mean and variance) whose in-group axis is checked later.
      gi, size = self.find(scope, ins[i], g), _shape(ins[i])[k]
      found = [n for n, s in enumerate(self.splits)
               if self.uf.find(s[1]) == gi and s[3] * size == _shape(outs[j])[b]]
      if found:
        self.joins.append((found[-1], self.node(scope, outs[j], b), self.node(scope, ins[i], k)))
        self.uf.union(self.splits[found[-1]][0], self.node(scope, outs[j], b))
      else:  # an ordinary flatten
        self.pin(scope, ins[i], g, "flattened together with a feature axis", eqn)
        width, repeats = _shape(ins[i])[k], _shape(ins[i])[g]
        dynamic = not _is_literal(ins[i]) and self.is_dynamic(scope, ins[i])
        self.composites.append((
            self.node(scope, outs[j], b),
            [(self.node(scope, ins[i], k) if dynamic else None, width, repeats)],
            [(self._pos, scope, ins[i], k)] if dynamic else []))
    for j, b, parts in rule.composes:
      if _is_drop(outs[j]):
        continue
      made, readers = [], []
      for i, a, repeats in parts:
        v = ins[i]
        width = _shape(v)[a]
        if _is_literal(v) or not self.is_dynamic(scope, v):
          made.append((None, width, repeats))  # constants and parameters: not aligned
        else:
          made.append((self.node(scope, v, a), width, repeats))
          readers.append((self._pos, scope, v, a))
      self.composites.append((self.node(scope, outs[j], b), made, readers))
    for w, wa, i, a, num, wb, j, b in rule.slices:
      org = None if dyn[w] or _is_literal(ins[w]) else self.origins.get((scope, ins[w]))
      slice_of = org[wa] if org else {}
      by_of = org[wb] if org else {}
      leaf = next(iter(slice_of), None)
      by = next((lb for (k, lb) in by_of if leaf and k == leaf[0]), None)
      if dyn[i] and len(slice_of) == 1 and by is not None:
        act = self.node(scope, ins[i], a)
        # One kernel applied to several inputs: like a tie, they share one space.
        self.uf.union(self._slice_readers.setdefault(leaf, act), act)
        self.slices.append((act, self.node(scope, outs[j], b), leaf[0], leaf[1], by, num))
        self.readers.setdefault((scope, ins[i], a), self._pos)
      else:
        reason = "grouped convolution whose kernel is not a parameter"
        for x, ax in ((ins[w], wa), (ins[w], wb), (ins[i], a)):
          self.pin(scope, x, ax, reason, eqn)
        self.pin(scope, outs[j], b, reason, eqn)
    for i, a, reason in rule.refuse_in:
      if not _is_literal(ins[i]):
        self.refusals.append((self.node(scope, ins[i], a), eqn, reason,
                              _location(eqn, self._callers)))
    if not any_dyn:
      return
    linked = {(i, a) for i, a, _, _ in rule.links}
    for i, v in enumerate(ins):
      if dyn[i] or _is_literal(v):
        continue
      for a, org in enumerate(self.origins.get((scope, v), ())):
        if (i, a) in rule.contract:
          role = spec_lib.IN
        elif (i, a) in linked:
          role = spec_lib.OUT
        else:
          continue
        for (leaf, la), through_sqrt in org.items():
          self.add_role(leaf, la, spec_lib.VAR if role == spec_lib.OUT and through_sqrt
                        else role)
          if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            self.layer_axes.add((leaf, la))
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      for i, a, j, b in rule.ties:
        for (di, da), (si, sa) in (((i, a), (j, b)), ((j, b), (i, a))):
          org = self.origins.get((scope, ins[si]))
          if dyn[di] and not dyn[si] and org and org[sa]:
            self.readers.setdefault((scope, ins[di], da), self._pos)
      if eqn.primitive.name == "dot_general" and all(dyn):
        # A product of two activations (attention): see _attention_heads.
        where = _location(eqn, self._callers)
        dn = eqn.params["dimension_numbers"]
        index = len(self.products)
        self.products.append((scope, tuple(ins), dn, self._pos))
        for o, v in enumerate(ins):
          contract, batch = dn[0][o], dn[1][o]
          for a in range(len(_shape(v))):
            kind = "contract" if a in contract else "batch" if a in batch else "free"
            self.bilinear.append((self.node(scope, v, a), eqn, where, index, o, kind))

  def _propagate_origins(self, eqn, rule: _Rule, scope: Scope):
    sqrt = eqn.primitive.name in _SQRT
    outs = [[{} for _ in _shape(o)] for o in eqn.outvars]
    found = False
    for i, a, j, b in rule.links:
      v = eqn.invars[i]
      if _is_literal(v):
        continue
      org = self.origins.get((scope, v))
      if org and org[a]:
        for k, flag in org[a].items():
          outs[j][b][k] = outs[j][b].get(k, False) or flag or sqrt
        found = True
    return outs if found else None

  def _call(self, eqn, scope: Scope, i: int, rep) -> None:
    body, _ = _call_body(eqn)
    sub = scope + (i,)
    if len(body.invars) != len(eqn.invars) or len(body.outvars) != len(eqn.outvars):
      raise _Unsupported(f"`{eqn.primitive.name}` whose body does not take its operands one "
                         "to one")
    for cv in body.constvars:
      self.define(sub, cv, False, None, rep)
    for bv, ov in zip(body.invars, eqn.invars):
      if _is_literal(ov):
        self.define(sub, bv, False, None, rep)
        continue
      self.define(sub, bv, self.is_dynamic(scope, ov), self.origins.get((scope, ov)), rep)
      for a in range(len(_shape(bv))):
        self.unify(scope, ov, a, sub, bv, a)
      self.call_in[(sub, bv)] = (scope, ov)
      if self.is_dynamic(scope, ov):
        self.edge(self.rep[(scope, ov)], self.rep[(sub, bv)])
    self._jaxpr(body, sub, rep)
    for bo, oo in zip(body.outvars, eqn.outvars):
      if _is_drop(oo):
        continue
      if _is_literal(bo):
        self.define(scope, oo, False, None, rep)
        continue
      self.define(scope, oo, self.is_dynamic(sub, bo), self.origins.get((sub, bo)), rep)
      for a in range(len(_shape(bo))):
        self.unify(sub, bo, a, scope, oo, a)
      self.call_out[(scope, oo)] = (sub, bo)
      if self.is_dynamic(sub, bo):
        self.edge(self.rep[(sub, bo)], self.rep[(scope, oo)])

  def _scan(self, eqn, scope: Scope, i: int, rep) -> None:
    p = eqn.params
    body = p["jaxpr"]
    nc, nk = p["num_consts"], p["num_carry"]
    sub = scope + (i,)
    node = rep if rep is not None else ("scan", sub)
    ins, outs = eqn.invars, eqn.outvars
    bins, bouts = body.jaxpr.invars, body.jaxpr.outvars
    carry_dyn = [self.is_dynamic(scope, ins[nc + k]) for k in range(nk)]
    for _ in range(nk + 2):  # until the carries' dependence on the inputs is a fixed point
      for cv in body.jaxpr.constvars:
        self.define(sub, cv, False, None, node)
      for k, (bv, ov) in enumerate(zip(bins, ins)):
        is_carry = nc <= k < nc + nk
        shift = 1 if k >= nc + nk else 0
        dynamic = carry_dyn[k - nc] if is_carry else self.is_dynamic(scope, ov)
        org = None
        if not is_carry and not _is_literal(ov):
          org = self.origins.get((scope, ov))
          org = org[shift:] if org else None
        self.define(sub, bv, dynamic, org, node)
        for a in range(len(_shape(bv))):
          self.unify(scope, ov, a + shift, sub, bv, a)
        if shift:
          self.pin(scope, ov, 0, "scanned over")
      self._jaxpr(body.jaxpr, sub, node)
      new = [carry_dyn[k] or self.is_dynamic(sub, bouts[k]) for k in range(nk)]
      if new == carry_dyn:
        break
      carry_dyn = new
    for k in range(nk):
      for a in range(len(_shape(bins[nc + k]))):
        self.unify(sub, bins[nc + k], a, sub, bouts[k], a)
        self.unify(scope, ins[nc + k], a, scope, outs[k], a)
    if rep is None:
      self.position.setdefault(node, self._pos)
      for v in ins:
        if self.is_dynamic(scope, v):
          self.edge(self.rep[(scope, v)], node)
    for k, oo in enumerate(outs):
      if _is_drop(oo):
        continue
      dynamic = carry_dyn[k] if k < nk else self.is_dynamic(sub, bouts[k])
      self.define(scope, oo, dynamic, None, rep)
      if dynamic:
        self.edge(node, self.rep[(scope, oo)])
      if k >= nk:
        self.pin(scope, oo, 0, "stacked by a scan")
        for a in range(len(_shape(bouts[k]))):
          self.unify(sub, bouts[k], a, scope, oo, a + 1)

  # -- capture points ---------------------------------------------------------------------------

  def _transparent(self, eqn, rule: _Rule, scope: Scope, j: int, axis: int):
    """The (operand, axis) that output ``j`` axis ``axis`` of a transparent op carries."""
    name = eqn.primitive.name
    if name not in _TRANSPARENT:
      return None
    if name in ("mul", "div"):
      # Only a scaling by a constant (a mean's 1/count): not by a parameter or activation.
      dyn = [i for i, v in enumerate(eqn.invars) if self.is_dynamic(scope, v)]
      if len(dyn) != 1 or (name == "div" and dyn[0] != 0):
        return None
      other = eqn.invars[1 - dyn[0]]
      if not _is_literal(other) and (scope, other) in self.origins:
        return None
    for i, a, jj, b in rule.links:
      if jj == j and b == axis and self.is_dynamic(scope, eqn.invars[i]):
        return i, a
    return None

  def _walk_back(self, scope: Scope, v, axis: int) -> tuple[tuple, bool]:
    """Follows an activation back through transparent ops; ((scope, var, axis), moved)."""
    moved = False
    while True:
      key = (scope, v)
      if key in self.call_in:  # an input of a call body: continue in the caller
        scope, v = self.call_in[key]
        continue
      if key in self.call_out:  # an output of a call: look inside, keep it if nothing moves
        inner, inner_moved = self._walk_back(*self.call_out[key], axis)
        if not inner_moved:
          return (scope, v, axis), moved
        (scope, v, axis), moved = inner, True
        continue
      prod = self.producer.get(key)
      if prod is None:
        return (scope, v, axis), moved
      eqn, rule, j = prod
      step = self._transparent(eqn, rule, scope, j, axis)
      if step is None:
        return (scope, v, axis), moved
      v, axis = eqn.invars[step[0]], step[1]
      moved = True

  # -- conclusions ------------------------------------------------------------------------------

  def _pin_reason(self, root: int) -> str | None:
    """Why a class of axes is pinned, with the model code that pinned it; None for the
    model's inputs and outputs and convolution windows, which are never merged."""
    for node, reason in self.pins.items():
      if self.uf.find(node) != root:
        continue
      if reason in _EXPECTED_PINS:
        return None
      if node in self.pin_eqn:
        eqn, callers = self.pin_eqn[node]
        return (f"{reason} ({eqn.primitive.name} at {_location(eqn, callers)}); "
                "zipjax does not merge such an axis yet")
      return reason
    return None

  def _grouped_convolutions(self, groups: dict, pinned: set, reasons: dict) -> dict:
    """Moves each grouped convolution's kernel slice axis into the space of the activation it
    reads, and has that space and the one the convolution writes matched within the groups
    (with GroupNorm's groups: the least common multiple). Returns {(leaf, axis): (groups,
    by axis)} for the slice axes."""
    top = self.closed.jaxpr
    composites = {self.uf.find(node) for node, _, _ in self.composites}
    need: dict = {}
    slice_of: dict = {}
    for act, out, k, la, lb, num in self.slices:
      ra, ro = self.uf.find(act), self.uf.find(out)
      if (k, la) in slice_of:
        continue
      rs = self.find((), top.invars[k], la)
      slice_of[(k, la)] = (num, lb)
      groups.pop(rs, None)
      groups[ra].append((k, la))
      why = None
      if ra in composites:
        why = "a grouped convolution reads a concatenation or a flattened map"
      elif rs in pinned or rs == ra:
        why = "a grouped convolution's kernel is used in other ways too"
      if why is not None:
        for r in (ra, ro):
          if r not in pinned:
            pinned.add(r)
            reasons[r] = f"{why}; zipjax does not merge such an axis yet"
        continue
      for r in (ra, ro):
        need[r] = math.lcm(need.get(r, 1), num)
    for root, num in need.items():
      if root in pinned:
        continue
      total = math.lcm(self.grouped.get(root, 1), num)
      full = [ka for ka in groups.get(root, ()) if ka not in slice_of]
      width = _shape(top.invars[full[0][0]])[full[0][1]] if full else None
      if width is not None and width % total:
        pinned.add(root)
        reasons[root] = (f"split into {self.grouped.get(root, 1)} groups (GroupNorm) and {num} "
                         "(a grouped convolution), which do not nest; zipjax does not merge such "
                         "an axis yet")
        self.grouped.pop(root, None)
      else:
        self.grouped[root] = total
    return slice_of

  def _attention_heads(self) -> None:
    """Recognises the queries and keys of attention among the products of two activations.

    A product that contracts one axis of each operand is queries times keys if that axis is
    the within-head axis of features split into heads by a reshape (``q = Dense(h * d)(x)
    .reshape(..., h, d)``), with both operands' heads axes batched together; or, for one
    head, an axis of features that are not split (and whose order does not matter). The
    queries' and keys' features become one space, so that one merge serves both and every
    logit is an inner product of merged features, in groups (the heads) if split.

    Fills ``self.qk`` ({product index: (heads node or None, [reader])}), ``self.qk_nodes``
    (a node of each queries-and-keys space) and ``self.qk_splits`` (the splits they use).
    """
    self.qk, self.qk_nodes, self.qk_splits = {}, [], set()
    if self.attention != "heads":
      return
    pinned = {self.uf.find(n) for n in self.pins}
    for index, (scope, ins, dn, pos) in enumerate(self.products):
      (lc, rc), (lb, _) = dn
      if len(lc) != 1:
        continue
      inner = self.find(scope, ins[0], lc[0])  # the contraction tied both operands' axes
      batch = {self.find(scope, ins[0], a) for a in lb}
      found = [n for n, sp in enumerate(self.splits)
               if self.uf.find(sp[2]) == inner and self.uf.find(sp[1]) in batch]
      if found:
        for n in found[1:]:
          self.uf.union(self.splits[found[0]][0], self.splits[n][0])
        self.qk_splits.update(found)
        self.qk_nodes.append(self.splits[found[0]][0])
        self.qk[index] = (self.splits[found[0]][1], [self.split_vars[n] for n in found])
      elif inner not in pinned and not any(self.uf.find(sp[2]) == inner for sp in self.splits):
        self.qk_nodes.append(self.node(scope, ins[0], lc[0]))
        self.qk[index] = (None, [(pos, scope, ins[0], lc[0]), (pos, scope, ins[1], rc[0])])

  def _weighs_features(self, index: int, operand: int, kind: str, merged: set) -> bool:
    """Whether an axis of a product of two activations is one that attention's merge keeps
    right: queries and keys (one space), or an axis of attention-weighted values (features
    that pass through, weighed by an operand that carries no merged features)."""
    if index in self.qk:
      return True
    if kind != "free":
      return False
    scope, ins, _, _ = self.products[index]
    other = ins[1 - operand]
    return not any(self.find(scope, other, a) in merged for a in range(len(_shape(other))))

  def conclude(self) -> tuple[list[_SpaceInfo], list[frozenset]]:
    """The merged spaces in network order, and the keys of those that are stop points.

    Also fills ``self.unmerged``: {(leaf index, axis): why} for the parameter axes that carry
    features but stay unmerged (inputs, outputs and convolution windows left out).
    """
    top = self.closed.jaxpr
    self._attention_heads()
    groups = collections.defaultdict(list)
    for k, v in enumerate(top.invars[:len(self.paths)]):
      for a in range(len(_shape(v))):
        groups[self.find((), v, a)].append((k, a))
    pinned = {self.uf.find(n) for n in self.pins}
    reasons: dict = {}  # root -> why, for pins that spread from a space made of spaces
    self.unmerged = {}
    # Features split into groups: a space with groups if joined back unchanged (GroupNorm).
    self.grouped = {}
    joined = collections.defaultdict(set)
    for s, _, k in self.joins:
      joined[s].add(self.uf.find(k))
    for s, (feat, g, k, num, eqn, callers) in enumerate(self.splits):
      root = self.uf.find(feat)
      inner = {self.uf.find(g), self.uf.find(k)} | joined[s]
      why = None
      if s not in joined and s not in self.qk_splits:
        why = "split into parts by a reshape and never joined back"
      elif inner & pinned:
        why = "split into groups by a reshape, and the groups' order matters"
      elif inner & set(groups):
        why = "split into groups by a reshape, and parameters act on the groups' parts"
      elif self.grouped.get(root, num) != num:
        why = "split into groups of different sizes at different places"
      if why is None:
        self.grouped[root] = num
      elif root not in pinned:
        pinned.add(root)
        reasons[root] = (f"{why} ({eqn.primitive.name} at {_location(eqn, callers)}); zipjax "
                         "does not merge such an axis yet")
    self.grouped = {r: n for r, n in self.grouped.items() if r not in pinned}
    # Spaces split into the heads of an attention layer: {space root: the heads' root}.
    layer_of = {self.uf.find(h) for h, _ in self.qk.values() if h is not None}
    self.heads = {}
    for feat, g, _, _, _, _ in self.splits:
      if self.uf.find(feat) in self.grouped and self.uf.find(g) in layer_of:
        self.heads[self.uf.find(feat)] = self.uf.find(g)
    qk_roots = {self.uf.find(n) for n in self.qk_nodes}
    slice_of = self._grouped_convolutions(groups, pinned, reasons)

    def leave(axes, why):
      for ka in axes:
        if why and ka in self.roles:
          self.unmerged[ka] = why

    def why_pinned(root):
      return reasons[root] if root in reasons else self._pin_reason(root)

    def roles_of(axes):
      roles, conflict = {}, False
      for ka in axes:
        found = set(self.roles.get(ka, {}))
        if len(found) > 1:
          conflict = True  # tied weights: one axis reads and writes the space
        roles[ka] = found.pop() if len(found) == 1 else spec_lib.OUT
      return roles, conflict

    # Spaces made of spaces: one definition per class, or the class is pinned. A pinned one
    # pins its parts (their order inside it matters), and so does one with tied weights.
    made = {}
    for node, parts, _ in self.composites:
      root = self.uf.find(node)
      parts = tuple((None if p is None else self.uf.find(p), w, r) for p, w, r in parts)
      if made.setdefault(root, parts) != parts and root not in pinned:
        pinned.add(root)
        reasons[root] = "made of different spaces at different places"
    changed = True
    while changed:
      changed = False
      for root, parts in made.items():
        if root not in pinned and root in groups and roles_of(groups[root])[1]:
          pinned.add(root)
          reasons[root] = "tied weights: one parameter axis both reads and writes it"
        if root not in pinned:
          continue
        for p, _, _ in parts:
          if p is not None and p not in pinned:
            pinned.add(p)
            why = why_pinned(root)
            reasons[p] = ("flattened or concatenated into an axis that stays unmerged"
                          + (f": {why}" if why else " (the model's input or output)"))
            changed = True
    # Spaces made of spaces made of spaces (a concatenation flattened): parts expanded.
    def expand(parts, seen=()):
      out = []
      for p, w, r in parts:
        if p in made and p not in pinned and p not in seen:
          out += [q for q in expand(made[p], seen + (p,))] * r
        else:
          out.append((p, w, r))
      return tuple(out)

    raw_made = made
    made = {root: expand(parts) for root, parts in made.items()}
    # A space read or written through a space made of it counts as read or written.
    inherited = collections.defaultdict(set)
    for root, parts in made.items():
      kinds = set(roles_of(groups.get(root, ()))[0].values())
      for p, _, _ in parts:
        if p is not None:
          inherited[p] |= kinds

    candidates = {}
    for root, axes in groups.items():
      if root in made:
        continue
      if root in pinned:
        # Not a feature space when no layer reads or writes it (tokens, to which a position
        # embedding is added): nothing to report.
        if any(ka in self.layer_axes for ka in axes):
          leave(axes, why_pinned(root))
        continue
      if len(axes) < 2 and not inherited[root]:
        leave(axes, "no other parameter axis shares its features")
        continue
      roles, conflict = roles_of(axes)
      if conflict:
        leave(axes, "tied weights: one parameter axis both reads and writes its space")
        continue
      kinds = set(roles.values()) | inherited[root]
      if kinds & {spec_lib.OUT, spec_lib.VAR} and (spec_lib.IN in kinds or root in qk_roots):
        candidates[root] = roles
      else:
        leave(axes, "no layer with parameters both writes and reads its space")
    composed = {}
    for root, parts in made.items():
      axes = groups.get(root)
      if not axes:
        continue
      if root in pinned:
        if any(ka in self.layer_axes for ka in axes):  # else not a feature space: tokens
          leave(axes, why_pinned(root))
      elif not any(p in candidates for p, _, _ in parts):
        # Nothing to report when its parts are the model's input (a flattened image).
        whys = [why_pinned(p) if p in pinned else "no layer both writes and reads it"
                for p, _, _ in parts if p is not None]
        whys = [w for w in whys if w]
        leave(axes, f"made of features that stay unmerged ({whys[0]})" if whys else None)
      else:
        composed[root] = roles_of(axes)[0]

    merged = set(candidates) | set(composed)
    for n, eqn, where, index, operand, kind in self.bilinear:
      root = self.uf.find(n)
      if self.attention == "heads" and self._weighs_features(index, operand, kind, merged):
        continue
      if root in composed and self.attention == "unmerged":
        leave(composed.pop(root), f"attention: two activations are multiplied over it at {where}")
        for p, _, _ in made[root]:
          if p in candidates:
            leave(candidates.pop(p), "part of a space that attention multiplies over")
        continue
      if root not in candidates and root not in composed:
        continue
      axes_of = candidates[root] if root in candidates else composed[root]
      if self.attention == "refuse":
        names = sorted({fmt_path(self.paths[k]) for k, _ in axes_of})
        raise _error(eqn, "Cannot infer a zip spec: two activations are multiplied together "
                     "(attention scores or attention-weighted values) over a feature axis that "
                     f"parameters write, of {names[:8]}, and attention='refuse'. Pass "
                     "attention='heads' to merge attention heads, or 'unmerged' to leave "
                     "these spaces unmerged.", where)
      if self.attention == "heads":
        names = sorted({fmt_path(self.paths[k]) for k, _ in axes_of})
        raise _error(eqn, "Cannot infer a zip spec: two activations are multiplied together "
                     f"over a feature axis that parameters write, of {names[:8]}, in a form "
                     "zipjax does not merge. It merges the heads of attention whose query, "
                     "key and value projections write heads * head_dim features that a "
                     "reshape splits into heads (q = Dense(h * d)(x).reshape(..., h, d), the "
                     "logits contracting d and batching h), and single-head attention. Not "
                     "yet: heads on a kernel axis of their own (flax.linen."
                     "MultiHeadDotProductAttention's DenseGeneral), queries and keys of "
                     "different widths, grouped-query attention, rotary position embeddings. "
                     "Pass attention='unmerged' to leave these spaces unmerged (their weights "
                     "averaged), or declare a spec (zipjax.spec.Space(..., heads=...)).", where)
      leave(candidates.pop(root), f"attention: two activations are multiplied over it at "
            f"{where} (attention='unmerged')")
    for n, eqn, reason, where in self.refusals:
      root = self.uf.find(n)
      if root in candidates:
        names = sorted({fmt_path(self.paths[k]) for k, _ in candidates[root]})
        raise _error(eqn, f"Cannot infer a zip spec: a feature axis is {reason}; its order "
                     f"matters, so the space of {names[:8]} cannot be merged.", where)

    readers = collections.defaultdict(list)
    for (scope, v, a), pos in self.readers.items():
      root = self.find(scope, v, a)
      if root in candidates:
        readers[root].append((pos, scope, v, a))
    used, todo = set(), list(composed)  # composed spaces and those nested in them
    while todo:
      r = todo.pop()
      if r not in used:
        used.add(r)
        todo += [p for p, _, _ in raw_made.get(r, ()) if p in raw_made]
    for node, _, part_readers in self.composites:
      if self.uf.find(node) in used:
        for pos, scope, v, a in part_readers:
          if self.find(scope, v, a) in candidates:
            readers[self.find(scope, v, a)].append((pos, scope, v, a))
    vars_of = collections.defaultdict(set)
    last = {}
    for (scope, v), shape in self.shapes.items():
      if (scope, v) not in self.dynamic:
        continue
      for a in range(len(shape)):
        root = self.find(scope, v, a)
        if root in candidates:
          vars_of[root].add(self.rep[(scope, v)])
          pos = self.position[(scope, v)]
          if root not in last or pos > last[root][0]:
            last[root] = (pos, self.rep[(scope, v)])

    qk_readers = collections.defaultdict(list)  # queries and keys: read by the logits
    for h, found in self.qk.values():
      for pos, scope, v, a in found:
        qk_readers[self.find(scope, v, a)].append((pos, scope, v, a))
    spaces = []
    for root, roles in candidates.items():
      caps = {}
      for pos, scope, v, a in sorted(readers[root] + qk_readers.get(root, []),
                                     key=lambda t: t[0]):
        (cs, cv, ca), _ = self._walk_back(scope, v, a)
        caps.setdefault((cs, cv), (self.position[(cs, cv)], ca))
      if not caps:
        leave(roles, "no activation of its space reaches a layer that reads it")
        continue
      captures = [_Capture(s, v, a) for (s, v), (_, a) in
                  sorted(caps.items(), key=lambda kv: kv[1][0])]
      k0, a0 = next((ka for ka in roles if ka not in slice_of), next(iter(roles)))
      width = _shape(top.invars[k0])[a0] * (slice_of[(k0, a0)][0] if (k0, a0) in slice_of
                                            else 1)
      leaf_axes = {ka: roles[ka] for ka in sorted(roles)}
      key = frozenset((self.paths[k], a, role) for (k, a), role in leaf_axes.items())
      writers = sorted((min(self.roles.get(ka, {}).values(), default=1 << 60), ka)
                       for ka, role in leaf_axes.items() if role != spec_lib.IN)
      first = writers[0][1][0] if writers else next(iter(leaf_axes))[0]
      spaces.append(_SpaceInfo(key=key, width=width, leaf_axes=leaf_axes, captures=captures,
                               name_hint=_module_name(self.paths[first]),
                               order=(last.get(root, (0,))[0], root),
                               groups=self.grouped.get(root, 1),
                               slices={ka: slice_of[ka] for ka in leaf_axes if ka in slice_of},
                               heads=self.heads.get(root)))
    spaces.sort(key=lambda s: s.order)
    base = {s.order[1]: s for s in spaces}
    for root, roles in composed.items():
      parts = tuple((p if p in base else None, w, r) for p, w, r in made[root])
      if not any(p is not None for p, _, _ in parts):
        leave(roles, "made of features that stay unmerged")
        continue
      leaf_axes = {ka: roles[ka] for ka in sorted(roles)}
      k0, a0 = next(iter(leaf_axes))
      hint = _composite_name([base[p].name_hint if p is not None else str(w)
                              for p, w, r in parts for _ in range(r)])
      spaces.append(_SpaceInfo(
          key=frozenset((self.paths[k], a, role) for (k, a), role in leaf_axes.items()),
          width=_shape(top.invars[k0])[a0], leaf_axes=leaf_axes, captures=[], name_hint=hint,
          order=(max(base[p].order[0] for p, _, _ in parts if p is not None), root),
          parts=parts))
    spaces.sort(key=lambda s: (s.order, bool(s.parts)))

    roots = {s.order[1]: s for s in spaces if not s.parts}
    stops = []
    for root, s in roots.items():
      if root not in last:
        continue
      v = last[root][1]
      if not isinstance(v, tuple) or (v and v[0] == "scan"):
        continue
      if self._is_stop(v, root, roots, vars_of) and _splits_leaves(spaces, s):
        stops.append(s.key)
    return spaces, stops

  def _reach(self, start, edges, blocked=None) -> set:
    seen = set()
    todo = [start] if not isinstance(start, list) else list(start)
    while todo:
      n = todo.pop()
      if n in seen or n == blocked:
        continue
      seen.add(n)
      todo.extend(edges.get(n, ()))
    return seen

  def _is_stop(self, v, root, roots, vars_of) -> bool:
    """Every input-to-output path passes ``v``; other spaces lie wholly before or after it."""
    if v in self.inputs or v in self.outputs:
      return False
    reached = self._reach(list(self.inputs), self.succ, blocked=v)
    if any(o in reached for o in self.outputs):
      return False
    before = self._reach(v, self.pred)
    after = self._reach(v, self.succ)
    for other in roots:
      if other == root:
        continue
      reps = vars_of.get(other, set())
      if not (reps <= before or reps <= after):
        return False
    return True


def _composite_name(names: Sequence[str]) -> str:
  """'flatten(a)' for a repeated, 'concat(a,b)' for a then b, 'flatten(concat(a,b))' for a
  concatenation repeated."""
  for period in range(1, len(names) + 1):
    if len(names) % period == 0 and list(names) == list(names[:period]) * (
        len(names) // period):
      break
  inner = names[0] if period == 1 else "concat(" + ",".join(names[:period]) + ")"
  return inner if period == len(names) and period > 1 else f"flatten({inner})"


def _splits_leaves(spaces: Sequence[_SpaceInfo], stop: _SpaceInfo) -> bool:
  """Whether a partial zip at ``stop`` splits the leaves cleanly (``spec.bypassing_leaf``)."""
  index = {id(s): i for i, s in enumerate(spaces)}
  by_root = {s.order[1]: s for s in spaces}
  leaf_spaces = collections.defaultdict(list)
  for s in spaces:
    members = [by_root[p] for p, _, _ in s.parts if p is not None] or [s]
    for (k, _), role in s.leaf_axes.items():
      leaf_spaces[k] += [(index[id(m)], role) for m in members]
  return spec_lib.bypassing_leaf(leaf_spaces, index[id(stop)]) is None


def _module_name(path: Path) -> str:
  """('params', 'stage1', 'conv1', 'kernel') -> 'stage1/conv1'."""
  parts = list(path)
  if parts and parts[0] in ("params", "batch_stats"):
    parts = parts[1:]
  if len(parts) > 1:
    parts = parts[:-1]
  return "/".join(parts) or "space"


# ----------------------------------------------------------------------------------------------
# Evaluation with captures


def _bind(eqn, invals):
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
    subfuns, bind_params = bind_params
    invals = list(subfuns) + list(invals)
  ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
  if ctx is not None:
    with ctx:
      out = eqn.primitive.bind(*invals, **bind_params)
  else:
    out = eqn.primitive.bind(*invals, **bind_params)
  return out if eqn.primitive.multiple_results else [out]


class _Evaluator:
  """Evaluates a closed jaxpr and records the captures, each with its axis moved last."""

  def __init__(self, captures: Sequence[_Capture]):
    self.want = collections.defaultdict(lambda: collections.defaultdict(list))
    self.prefixes = set()
    for cid, c in enumerate(captures):
      self.want[c.scope][c.var].append((cid, c.axis))
      for n in range(len(c.scope)):
        self.prefixes.add(c.scope[:n + 1])

  def run(self, closed, args) -> dict[int, jax.Array]:
    out: dict = {}
    self._jaxpr(closed.jaxpr, closed.consts, args, (), out)
    return out

  def _record(self, scope, v, val, out) -> None:
    for cid, axis in self.want.get(scope, {}).get(v, ()):
      out[cid] = jnp.moveaxis(val, axis, -1)

  def _jaxpr(self, jaxpr, consts, args, scope: Scope, out):
    env = {}

    def read(v):
      return v.val if _is_literal(v) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
      env[v] = c
    for v, a in zip(jaxpr.invars, args):
      env[v] = a
      self._record(scope, v, a, out)
    for i, eqn in enumerate(jaxpr.eqns):
      invals = [read(v) for v in eqn.invars]
      sub = scope + (i,)
      name = eqn.primitive.name
      if sub in self.prefixes and name in _CALLS:
        body, body_consts = _call_body(eqn)
        outs = self._jaxpr(body, body_consts, invals, sub, out)
      elif sub in self.prefixes and name == "scan":
        outs = self._scan(eqn, invals, sub, out)
      else:
        outs = _bind(eqn, invals)
      for v, val in zip(eqn.outvars, outs):
        if not _is_drop(v):
          env[v] = val
          self._record(scope, v, val, out)
    return [read(v) for v in jaxpr.outvars]

  def _scan(self, eqn, invals, sub: Scope, out):
    p = eqn.params
    body = p["jaxpr"]
    nc, nk = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]

    def step(carry, x):
      inner: dict = {}
      res = self._jaxpr(body.jaxpr, body.consts, list(consts) + list(carry) + list(x), sub,
                        inner)
      return list(res[:nk]), (list(res[nk:]), inner)

    carry, (ys, caps) = jax.lax.scan(step, list(init), list(xs), length=p["length"],
                                     reverse=p["reverse"], unroll=p.get("unroll", 1))
    out.update(caps)
    return list(carry) + list(ys)


# ----------------------------------------------------------------------------------------------
# Public API


@dataclasses.dataclass
class _Plan:
  """One analysis at one set of input shapes."""

  closed: Any
  spaces: list
  stops: list
  unmerged: dict


def _abstract(tree):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)),
                                tree)


def _shape_key(variables, x):
  leaves, treedef = jax.tree_util.tree_flatten((variables, x))
  return treedef, tuple((tuple(jnp.shape(l)), str(jnp.result_type(l))) for l in leaves)


def _analyse(apply_fn: Callable, variables, x, attention: str) -> _Plan:
  paths = list(spec_lib.flatten(variables))
  closed = jax.make_jaxpr(apply_fn)(_abstract(variables), _abstract(x))
  analysis = _Analysis(closed, paths, attention)
  spaces, stops = analysis.conclude()
  return _Plan(closed=closed, spaces=spaces, stops=stops, unmerged=analysis.unmerged)


def _unique_names(spaces: Sequence[_SpaceInfo]) -> list[str]:
  counts = collections.Counter(s.name_hint for s in spaces)
  seen: dict = collections.defaultdict(int)
  names = []
  for s in spaces:
    if counts[s.name_hint] == 1:
      names.append(s.name_hint)
    else:
      seen[s.name_hint] += 1
      names.append(f"{s.name_hint}#{seen[s.name_hint]}")
  return names


def infer_spec(model: nn.Module | Callable[[Any, Any], Any], variables: spec_lib.Variables,
               sample_input: Any, *, apply_kwargs: Mapping[str, Any] | None = None,
               batchnorm_stats: Callable | None = None, attention: str = "heads",
               name: str | None = None) -> spec_lib.Spec:
  """A zip spec for any model, inferred from its jaxpr.

  Args:
    model: a ``flax.linen`` module, run as ``model.apply(variables, x, **apply_kwargs)``, or
      a function ``apply(variables, x) -> outputs``. Either must be the model in inference
      mode (BatchNorm using its running statistics, no dropout).
    variables: the model's variables, e.g. ``{'params': ..., 'batch_stats': ...}``, or any
      pytree of arrays for a plain function.
    sample_input: an input batch; only its shapes and dtypes are used.
    apply_kwargs: extra keyword arguments of a linen module's inference-mode call.
    batchnorm_stats: for a plain function that has BatchNorm layers, ``batchnorm_stats(
      variables, x) -> {batch_stats path: (mean, var)}`` (see :class:`zipjax.Spec`). Linen
      modules get it from their ``nn.BatchNorm`` layers; by default a plain function has none.
    attention: what to do with a space that two activations are multiplied over (attention):
      'heads' (the default) merges attention heads where the queries and keys are written
      as heads * head_dim features that a reshape splits into heads (``q = Dense(h *
      d)(x).reshape(..., h, d)``; or one head, not split): queries and keys share a space,
      the values another, both in groups paired across models (``Space.heads``); any other
      product over merged features raises SpecError. 'refuse' raises SpecError for every
      such product, 'unmerged' leaves those spaces unmerged (their weights averaged) and
      merges the rest of the model.
    name: a label for messages.

  Returns:
    A :class:`zipjax.Spec` for ``zipjax.zip``. Spaces are named after the module that first
    writes them and ordered by where they end in the network, so the spaces before a stop
    point are exactly those upstream of it. Stop points are the spaces whose last activation
    every input-to-output path passes, with every other space wholly before or after it.

  Raises:
    SpecError: for a primitive the analysis does not know, a sort along a merged feature axis
      or a product of two activations it cannot merge (with attention='refuse': any); the
      message names the primitive, the equation and the model code it came from, and what
      is supported.
  """
  if attention not in _ATTENTION_MODES:
    raise ValueError(f"attention must be one of {_ATTENTION_MODES}, got {attention!r}.")
  if type(model).__module__.startswith("flax.nnx") or _is_nnx(model):
    raise TypeError("infer_spec got a flax.nnx module; call zipjax.infer_nnx_spec(module, x) "
                    "(its variables are inside the module).")
  if isinstance(variables, spec_lib.Spec):
    raise TypeError("infer_spec(model, variables, sample_input) got a Spec as the variables.")
  kwargs = dict(apply_kwargs or {})
  if isinstance(model, nn.Module):
    module = model

    def apply_fn(v, x):
      return module.apply(v, x, **kwargs)

    def bn_stats(v, x):
      record: dict = {}
      interceptor = spec_lib._batchnorm_interceptor(record)  # pylint: disable=protected-access
      with nn.intercept_methods(interceptor):
        module.apply(spec_lib._model_vars(v), x, **kwargs)  # pylint: disable=protected-access
      return record

    label = name or type(module).__name__
  else:
    if kwargs:
      raise ValueError("apply_kwargs is for flax.linen modules; bind them into the function.")
    apply_fn = model
    bn_stats = batchnorm_stats or (lambda v, x: {})
    label = name or getattr(model, "__name__", "model")

  variables = spec_lib._model_vars(variables)  # pylint: disable=protected-access
  plan = _analyse(apply_fn, variables, sample_input, attention)
  names = _unique_names(plan.spaces)
  name_of = {s.key: n for s, n in zip(plan.spaces, names)}
  paths = list(spec_lib.flatten(variables))
  leaves: dict = {p: {} for p in paths}
  for s, n in zip(plan.spaces, names):
    for (k, a), role in s.leaf_axes.items():
      leaves[paths[k]][a] = spec_lib.Axis(n, role, *s.slices.get((k, a), (1, None)))
  plans = {_shape_key(variables, sample_input): plan}

  def plan_for(v, x) -> _Plan:
    key = _shape_key(v, x)
    if key not in plans:
      new = _analyse(apply_fn, v, x, attention)
      missing = sorted(n for k, n in name_of.items() if k not in {s.key for s in new.spaces})
      if missing:
        shapes = jax.tree_util.tree_map(jnp.shape, x)
        raise SpecError(f"Spec {label!r}: traced at input shapes {shapes}, the model no longer "
                        f"has the spaces {missing}; infer the spec on inputs of the shapes you "
                        "zip with.")
      plans[key] = new
    return plans[key]

  def features(v, x):
    v = spec_lib._model_vars(v)  # pylint: disable=protected-access
    p = plan_for(v, x)
    wanted = [s for s in p.spaces if s.key in name_of]
    captures, owners = [], []
    for s in wanted:
      captures += s.captures
      owners += [name_of[s.key]] * len(s.captures)
    args = jax.tree_util.tree_leaves((v, x))
    values = _Evaluator(captures).run(p.closed, args)
    out: dict = {}
    for cid, owner in enumerate(owners):
      out.setdefault(owner, []).append(values[cid])
    return out

  def apply(v, x):
    return apply_fn(spec_lib._model_vars(v), x)  # pylint: disable=protected-access

  unmerged: dict = {}
  for (k, a), why in sorted(plan.unmerged.items()):
    unmerged.setdefault(paths[k], {})[a] = why
  root_name = {s.order[1]: n for s, n in zip(plan.spaces, names)}

  # An attention layer is named after the first of its spaces (its queries and keys).
  layer_name = {}
  for s, n in zip(plan.spaces, names):
    if s.heads is not None:
      layer_name.setdefault(s.heads, n)

  def space(s, n):
    parts = tuple((root_name[p] if p is not None else w, r) for p, w, r in s.parts)
    return spec_lib.Space(n, s.width, parts, groups=s.groups,
                          heads=layer_name.get(s.heads))

  spec = spec_lib.Spec(spaces=tuple(space(s, n) for s, n in zip(plan.spaces, names)),
                       leaves=leaves, stop_points=tuple(name_of[k] for k in plan.stops),
                       apply=apply, features=features, batchnorm_stats=bn_stats, name=label,
                       unmerged=unmerged, example=_abstract(sample_input))
  spec_lib.validate(spec, variables)
  return spec


def _is_nnx(model: Any) -> bool:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return isinstance(model, nnx.Module)


def infer_linen_spec(module: nn.Module, variables: spec_lib.Variables, sample_input: Any, *,
                     attention: str = "heads", name: str | None = None,
                     **apply_kwargs) -> spec_lib.Spec:
  """:func:`infer_spec` for a flax.linen module called as ``module.apply(v, x, **apply_kwargs)``
  (``attention`` and ``name`` as in :func:`infer_spec`)."""
  return infer_spec(module, variables, sample_input, apply_kwargs=apply_kwargs,
                    attention=attention, name=name)
