"""Error types and path formatting shared by every stage."""

from __future__ import annotations

from typing import Any, Sequence


class SpecError(ValueError):
  """A spec does not describe the variables or the model it is used with."""


class MismatchError(ValueError):
  """Source models (or a model and its spec) disagree in structure or shape."""


class DataError(ValueError):
  """Calibration data is unusable: one-shot, empty, of the wrong form or shape, or producing
  non-finite values."""


class UnmergedWarning(UserWarning):
  """Some weights are only averaged: axes that carry features stay unmerged (see
  :func:`zipjax.explain`)."""


def fmt_path(path: Sequence[Any]) -> str:
  """('params', 'conv1', 'kernel') -> 'params/conv1/kernel'."""
  return "/".join(str(p) for p in path)


def key_name(key: Any) -> str:
  """The plain name of one jax.tree_util path entry."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)
