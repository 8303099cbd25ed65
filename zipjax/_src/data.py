"""Calibration data: a re-iterable collection of input batches."""

from __future__ import annotations

import collections.abc
from typing import Any, Iterable, Iterator

from zipjax._src.errors import DataError


def batch_input(batch: Any) -> Any:
  """The model input of one batch: the batch itself, the first item of a tuple/list, or the
  'image' / 'x' entry of a dict."""
  if isinstance(batch, (tuple, list)):
    if not batch:
      raise DataError("A calibration batch is an empty tuple; expected (inputs, ...).")
    return batch[0]
  if isinstance(batch, collections.abc.Mapping):
    for k in ("image", "x", "inputs"):
      if k in batch:
        return batch[k]
    raise DataError(f"A calibration batch is a dict with keys {sorted(batch)}; zipjax reads "
                    "the input from 'image', 'x' or 'inputs'.")
  return batch


def check_reiterable(data: Iterable[Any]) -> None:
  """Raises DataError for one-shot iterators, which zip would exhaust on its first pass."""
  if data is None:
    raise DataError("`data` is None; pass a list of calibration batches.")
  if isinstance(data, collections.abc.Iterator) or iter(data) is data:
    raise DataError(
        f"`data` is a one-shot iterator ({type(data).__name__}); zipjax passes over the "
        "calibration data more than once (statistics, then BatchNorm reset). Pass a list of "
        "batches, or an object whose __iter__ starts over.")


def iterate(data: Iterable[Any], *, what: str) -> Iterator[Any]:
  """Yields the inputs of ``data``'s batches; raises if there are none."""
  check_reiterable(data)
  count = 0
  for batch in data:
    count += 1
    yield batch_input(batch)
  if count == 0:
    raise DataError(f"`data` gave no batches for {what}; pass at least one calibration batch.")
