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


def first_input(data: Iterable[Any], *, what: str) -> Any:
  """The model input of ``data``'s first batch; raises DataError if there is none."""
  for x in iterate(data, what=what):
    return x
  raise AssertionError("unreachable: iterate raises on empty data")


def iterate(data: Iterable[Any], *, what: str) -> Iterator[Any]:
  """Yields the inputs of ``data``'s batches; raises if there are none."""
  check_reiterable(data)
  count = 0
  for batch in data:
    count += 1
    yield batch_input(batch)
  if count == 0:
    raise DataError(f"`data` gave no batches for {what}: it is empty, or an object whose "
                    "__iter__ does not start over (zipjax passes over it more than once). "
                    "Pass at least one calibration batch, e.g. a list of batches.")


def _describe(x: Any) -> str:
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return f"an array of shape {tuple(x.shape)} and dtype {x.dtype}"
  if isinstance(x, (tuple, list)):
    return f"a {type(x).__name__} of {len(x)}: (" + ", ".join(_describe(v) for v in x[:3]) + (
        ", ..." if len(x) > 3 else "") + ")"
  if isinstance(x, collections.abc.Mapping):
    return f"a dict with keys {sorted(x)[:6]}"
  return f"a {type(x).__name__}"


def _is_array(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "ndim")


_FORM = ("Calibration data is a re-iterable collection of batches, each a model input with a "
         "leading batch axis (or an (inputs, labels) tuple, or a dict with an 'image', 'x' or "
         "'inputs' entry): e.g. data=[x[i:i + 128] for i in range(0, len(x), 128)].")


def check_form(data: Any) -> None:
  """Raises DataError for calibration data of the wrong form: a single array, a single
  (inputs, labels) batch, a single dict batch, or a one-shot iterator."""
  if data is None:
    raise DataError("`data` is None. " + _FORM)
  if _is_array(data):
    raise DataError(f"`data` is one array ({_describe(data)}), so zipjax would feed each of "
                    f"its {len(data) if data.ndim else 0} rows as a batch. Pass a list of "
                    "batches: [x] for one batch. " + _FORM)
  if isinstance(data, collections.abc.Mapping):
    raise DataError(f"`data` is one dict batch ({_describe(data)}); pass [batch]. " + _FORM)
  if isinstance(data, (tuple, list)) and 1 < len(data) <= 3 and all(_is_array(v) for v in data) \
      and len({v.ndim for v in data}) > 1:
    raise DataError(f"`data` looks like one (inputs, labels) batch ({_describe(data)}): its "
                    "items have different ranks, so they cannot be batches of one model's "
                    f"inputs. Pass [(x, y)] for one batch. " + _FORM)
  check_reiterable(data)


def check_fits(data: Any, apply: Any, variables: Any, *, example: Any = None) -> None:
  """Raises DataError naming the calibration data if the model cannot run on its first batch
  (traced, not run). ``example``: the input the spec was made on, for the message."""
  import jax  # pylint: disable=g-import-not-at-top

  first = first_input(data, what="the calibration data")
  try:
    jax.eval_shape(apply, variables, first)
  except Exception as e:  # pylint: disable=broad-except
    lines = [f"The calibration data does not fit the model: on its first batch "
             f"({_describe(first)}) the model raised {type(e).__name__}: "
             f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}"]
    if example is not None:
      lines.append(f"The spec was made on inputs like {_describe(example)}.")
      if _is_array(first) and _is_array(example) and first.ndim == example.ndim and sorted(
          first.shape[1:]) == sorted(example.shape[1:]) and first.shape[1:] != example.shape[1:]:
        lines.append("Same sizes in another order: channels first (NCHW) where the model "
                     "takes channels last (NHWC)? Transpose the batches.")
    lines.append(_FORM)
    raise DataError("\n".join(lines)) from e
