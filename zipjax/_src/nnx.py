"""Flax NNX modules: their state as the variables zipjax merges, specs declared or inferred.

An NNX module is split into a graph definition, the state zipjax merges (every ``nnx.Param``
and ``nnx.BatchStat``) and the rest (RNG state and other variables, taken from the first
model). Leaves are named by their paths in the module, ``('conv1', 'kernel')``, and the
spec's ``apply`` runs the module in evaluation mode (``module.eval()``: BatchNorm on its
running statistics, dropout off).
"""

from __future__ import annotations

import collections
import hashlib
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zipjax._src import spec as spec_lib
from zipjax._src.errors import MismatchError

#: The variables zipjax merges in an NNX module; everything else is kept from the first model.
MERGED = (nnx.Param, nnx.BatchStat)


def is_module(x: Any) -> bool:
  return isinstance(x, nnx.Module)


def split(module: nnx.Module) -> tuple[Any, nnx.State, nnx.State]:
  """``(graphdef, merged state, rest)`` of a module: the state zipjax merges is its
  parameters and BatchNorm statistics."""
  graphdef, state, rest = nnx.split(module, MERGED, ...)
  return graphdef, state, rest


def split_models(modules: Sequence[Any]) -> tuple[Any, list[nnx.State], nnx.State]:
  """The shared graph definition, the states and model 0's rest of N NNX modules."""
  if not all(is_module(m) for m in modules):
    kinds = sorted({type(m).__name__ for m in modules})
    raise TypeError(f"Zip either NNX modules or variables trees, not a mix ({kinds}).")
  for m, module in enumerate(modules[1:], start=1):
    if type(module) is not type(modules[0]):
      raise MismatchError(f"NNX modules 0 and {m} are of different classes "
                          f"({type(modules[0]).__name__} and {type(module).__name__}); zipped "
                          "models need one architecture.")
  # Graph definitions may differ in train/eval flags only; the states are compared leaf by
  # leaf later. The merged module takes model 0's definition.
  parts = [split(m) for m in modules]
  return parts[0][0], [p[1] for p in parts], parts[0][2]


def _runner(graphdef, rest) -> Callable[[Any], nnx.Module]:
  def module_of(state):
    module = nnx.merge(graphdef, state, rest, copy=True)
    module.eval()
    return module
  return module_of


def _batchnorm_stats(module_of) -> Callable:
  """``batchnorm_stats(state, x)``: every ``nnx.BatchNorm`` normalising by the statistics of
  the batch (momentum 0, so its running statistics become exactly the batch's), as {layer
  path: (mean, var, count)}."""

  def batchnorm_stats(state, x):
    module = module_of(state)
    layers, counts = {}, {}
    for path, sub in nnx.iter_modules(module):
      if isinstance(sub, nnx.BatchNorm):
        sub.use_running_average, sub.momentum = False, 0.0
        sub.promote_dtype = _counting(sub.promote_dtype, sub.axis, counts, tuple(path))
        layers[tuple(path)] = sub
    if not layers:
      return {}
    module(x)
    stats = spec_lib.flatten(nnx.state(module, nnx.BatchStat))
    out = {}
    for path in layers:
      if path in counts:
        out[path] = (stats[path + ("mean",)], stats[path + ("var",)], counts[path])
      else:  # not called: its (unchanged) statistics, which the reset reports as stale
        out.update({p: v for p, v in stats.items() if p[:len(path)] == path})
    return out

  return batchnorm_stats


def _counting(promote_dtype: Callable, axis, counts: dict, path: tuple) -> Callable:
  """``promote_dtype`` (which nnx.BatchNorm calls first with its input) also recording the
  number of values behind each feature's statistics in ``counts[path]``."""

  def promote(args, **kwargs):
    x = args[0]
    axes = {a % x.ndim for a in (axis if isinstance(axis, (tuple, list)) else (axis,))}
    counts[path] = math.prod(d for i, d in enumerate(x.shape) if i not in axes)
    return promote_dtype(args, **kwargs)

  return promote


def nnx_spec(module: nnx.Module, *, spaces: Iterable[spec_lib.Space],
             leaves: Mapping[spec_lib.Path, spec_lib.LeafAxes],
             stop_points: Sequence[str] = (), name: str | None = None) -> spec_lib.Spec:
  """A spec for an NNX module whose ``__call__`` records its features with ``capture``.

  Leaves are named as in the module's state, without a collection: ``('conv1', 'kernel')``;
  build them with the helpers' ``collection=None`` (``zipjax.spec.conv('conv1', None, 's1',
  collection=None)``). ``apply`` runs ``module.eval()``'s forward pass on the given state.
  """
  graphdef, _, rest = split(module)
  module_of = _runner(graphdef, rest)

  def apply(state, x):
    return module_of(state)(x)

  def features(state, x):
    with spec_lib.capturing() as record:
      module_of(state)(x)
    return dict(record)

  return spec_lib.Spec(spaces=tuple(spaces), leaves=dict(leaves),
                       stop_points=tuple(stop_points), apply=apply, features=features,
                       batchnorm_stats=_batchnorm_stats(module_of),
                       name=name or type(module).__name__)


def infer_nnx_spec(module: nnx.Module, sample_input: Any, *, attention: str = "heads",
                   name: str | None = None) -> spec_lib.Spec:
  """A spec for an NNX module, inferred from the jaxpr of its evaluation-mode forward pass
  over its parameters and BatchNorm statistics (see :func:`zipjax.infer_spec`)."""
  from zipjax._src import infer  # pylint: disable=g-import-not-at-top

  graphdef, state, rest = split(module)
  module_of = _runner(graphdef, rest)

  def apply(state, x):
    return module_of(state)(x)

  return infer.infer_spec(apply, state, sample_input, attention=attention,
                          batchnorm_stats=_batchnorm_stats(module_of),
                          name=name or type(module).__name__)


_SPECS: collections.OrderedDict = collections.OrderedDict()
_MAX_SPECS = 8


def _fingerprint(leaf: Any) -> Any:
  """A hashable stand-in for one leaf of a module's other state, by value."""
  if isinstance(leaf, (jax.Array, np.ndarray)):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    value = np.asarray(leaf)
    return (value.shape, str(value.dtype), hashlib.sha1(value.tobytes()).hexdigest())
  return repr(leaf)


def inferred_spec(graphdef, state: nnx.State, rest: nnx.State,
                  sample_input: Any) -> spec_lib.Spec:
  """:func:`infer_nnx_spec` of the module ``(graphdef, state, rest)``, cached: the same
  module structure, parameter shapes and dtypes, other state (by value) and input shapes give
  the same spec object, so a second zip of such modules compiles nothing again. The last
  few specs are kept."""
  graph = graphdef
  abstract = lambda tree: jax.tree.map(  # noqa: E731
      lambda a: (np.shape(a), str(jnp.result_type(a))), tree)
  try:
    hash(graphdef)
  except TypeError:  # attributes that are lists: its text (static values, functions by id)
    graphdef = repr(graphdef)
  key = (graphdef, jax.tree.structure(state), tuple(jax.tree.leaves(abstract(state))),
         tuple(_fingerprint(a) for a in jax.tree.leaves(rest)),
         jax.tree.structure(sample_input), tuple(jax.tree.leaves(abstract(sample_input))))
  if key in _SPECS:
    _SPECS.move_to_end(key)
    return _SPECS[key]
  spec = _SPECS[key] = infer_nnx_spec(merge(graph, state, rest), sample_input)
  while len(_SPECS) > _MAX_SPECS:
    _SPECS.popitem(last=False)
  return spec


def merge(graphdef, state: nnx.State, rest: nnx.State) -> nnx.Module:
  """The module of a merged state."""
  return nnx.merge(graphdef, state, rest, copy=True)
