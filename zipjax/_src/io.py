"""Saving and loading zipped models (full and partial zips, NNX modules) with orbax."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from zipjax._src import spec as spec_lib
from zipjax._src.multihead import MultiHead

_FORMAT = "zipjax.save/1"


def _orbax():
  try:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("zipjax.save/load write orbax checkpoints: pip install "
                      "'zipjax[orbax]' (or orbax-checkpoint).") from e
  return ocp


def _checkpointer(ocp):
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
      arrays=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler()))


def save(path: str | os.PathLike, model: Any, *, overwrite: bool = False) -> None:
  """Writes a model to the directory ``path`` (an orbax checkpoint).

  Arguments:
    path: a directory that does not exist yet (or ``overwrite=True``).
    model: variables (any pytree of arrays), an NNX module (its parameters and BatchNorm
      statistics), or a :class:`zipjax.MultiHead` from a partial zip.
    overwrite: replace an existing checkpoint at ``path``.

  Example::

    zipjax.save(os.path.join(out_dir, "merged"), merged)
    merged = zipjax.load(os.path.join(out_dir, "merged"), like=variables_a)
  """
  from zipjax._src import nnx as nnx_lib  # pylint: disable=g-import-not-at-top
  ocp = _orbax()
  meta: dict = {"format": _FORMAT, "kind": "variables"}
  if isinstance(model, MultiHead):
    meta.update(kind="multihead", stop_at=model.stop_at,
                stacked=sorted(list(p) for p in model.stacked), spec=model.spec.name)
    tree = model.variables
  elif nnx_lib.is_module(model):
    meta["kind"] = "nnx"
    tree = nnx_lib.split(model)[1]
  else:
    tree = model
  flat = spec_lib.flatten(tree)
  arrays = spec_lib.unflatten({p: np.asarray(v) for p, v in flat.items()})
  _checkpointer(ocp).save(os.path.abspath(path), force=overwrite, args=ocp.args.Composite(
      arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)))


def load(path: str | os.PathLike, *, like: Any = None, spec: spec_lib.Spec | None = None) -> Any:
  """Reads a model written by :func:`save`.

  Arguments:
    path: the checkpoint directory.
    like: a model of the same architecture whose structure the result takes: variables of
      one source model (a list of tuples comes back as a list of tuples; for a partial zip,
      the structure of its variables), or an NNX module (the result is a new module of its
      class, ``like`` is not modified). Without it, variables come back as nested dicts.
    spec: for a partial zip, the source models' spec (its code is not saved): the result is
      a :class:`zipjax.MultiHead` whose ``apply(x)`` gives one output per head.

  Raises:
    ValueError: a partial zip loaded without ``spec``, an NNX module loaded without an NNX
      ``like``, or leaves that differ from ``like``'s.
  """
  from zipjax._src import nnx as nnx_lib  # pylint: disable=g-import-not-at-top
  ocp = _orbax()
  restored = _checkpointer(ocp).restore(os.path.abspath(path), args=ocp.args.Composite(
      arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  meta = restored["meta"]
  if meta.get("format") != _FORMAT:
    raise ValueError(f"{path} is not a checkpoint written by zipjax.save.")
  flat = {p: jax.numpy.asarray(v) for p, v in spec_lib.flatten(restored["arrays"]).items()}
  graphdef = rest = None
  if nnx_lib.is_module(like):
    graphdef, like_state, rest = nnx_lib.split(like)
    like = like_state
  elif meta["kind"] == "nnx":
    raise ValueError(f"{path} holds an NNX module's state; pass like=<a module of its class>.")
  if like is not None:
    expected = set(spec_lib.flatten(like))
    if expected != set(flat):
      only_saved = sorted("/".join(p) for p in set(flat) - expected)[:6]
      only_like = sorted("/".join(p) for p in expected - set(flat))[:6]
      raise ValueError(f"The checkpoint at {path} does not match `like`: only saved "
                       f"{only_saved}, only in like {only_like}.")
  tree = spec_lib.unflatten(flat, like)
  if meta["kind"] == "multihead":
    if spec is None:
      raise ValueError(f"{path} holds a partial zip (at {meta['stop_at']!r}); pass "
                       f"spec=<the source models' spec, {meta['spec']!r}> to load it.")
    return MultiHead(tree, spec, frozenset(tuple(p) for p in meta["stacked"]),
                     meta["stop_at"])
  if graphdef is not None:
    return nnx_lib.merge(graphdef, tree, rest)
  return tree
