"""What a zip does to every leaf: zipped, only averaged, or kept per model, and why."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np

from zipjax._src import spec as spec_lib
from zipjax._src.errors import SpecError, UnmergedWarning, fmt_path

ZIPPED = "zipped"
AVERAGED = "averaged"
PER_MODEL = "per model"

_MATRIX = {spec_lib.OUT: "M", spec_lib.IN: "U", spec_lib.VAR: "M (BatchNorm variance)"}
_NO_SPACE = "touches no merged space (the model's input or output)"


@dataclasses.dataclass(frozen=True)
class LeafReport:
  """One leaf: its path, shape, what the zip does to it and why."""

  path: spec_lib.Path
  shape: tuple[int, ...]
  status: str  # "zipped", "averaged" or "per model"
  detail: str
  unmerged: bool  # axes carrying features stay unmerged: averaged without alignment


@dataclasses.dataclass(frozen=True)
class Explanation:
  """The table :func:`explain` returns; ``str()`` of it is the table to print."""

  spec_name: str
  leaves: tuple[LeafReport, ...]
  stop_at: str | None = None

  def count(self, status: str) -> int:
    return sum(r.status == status for r in self.leaves)

  @property
  def unaligned(self) -> tuple[LeafReport, ...]:
    """Leaves with axes that carry features but are averaged without alignment."""
    return tuple(r for r in self.leaves if r.unmerged)

  def __str__(self) -> str:
    rows = [(fmt_path(r.path), "x".join(map(str, r.shape)) or "scalar", r.status, r.detail)
            for r in self.leaves]
    head = ("leaf", "shape", "zip", "how / why")
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(head[:3])]
    lines = [f"{self.spec_name}: {self.count(ZIPPED)} leaves zipped, "
             f"{self.count(AVERAGED)} only averaged, {self.count(PER_MODEL)} kept per model"
             + (f" (partial zip at {self.stop_at!r})" if self.stop_at else "")]
    fmt = "  ".join(f"{{:{w}s}}" for w in widths) + "  {}"
    lines.append(fmt.format(*head))
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)

  def _repr_pretty_(self, p, cycle):  # IPython / notebooks print the table
    p.text(str(self))


def explain(variables: Any, spec: spec_lib.Spec, *, stop_at: str | None = None) -> Explanation:
  """How a zip with ``spec`` treats every leaf of ``variables``, and why.

  A leaf is *zipped* when an axis of it writes or reads a merged space (its axes are listed
  with the space and the matrix they get, M or U); *averaged* when it touches no merged
  space, so the zip averages it element by element; *per model* when a partial zip at
  ``stop_at`` keeps it in every model's head. For specs from :func:`zipjax.infer_spec`, an
  axis that carries features but stays unmerged gives its reason (a reshape, a
  concatenation, a layer type zipjax does not merge yet, ...): those weights are averaged
  without aligning their features, which usually costs accuracy.

  Arguments:
    variables: one model's variables (any pytree of arrays, or an NNX state).
    spec: the models' spec.
    stop_at: explain a partial zip at this stop point.

  Returns:
    An :class:`Explanation`: ``print()`` it for the table; ``.leaves`` holds one
    :class:`LeafReport` per leaf.

  Example::

    >>> print(zipjax.explain(variables, spec))   # doctest: +SKIP
    MLP: 4 leaves zipped, 1 only averaged, 0 kept per model
    leaf               shape   zip       how / why
    params/fc1/kernel  784x64  zipped    axis 1: M of fc1
    ...
  """
  spec_lib.check_order(variables, spec, "explain(variables, spec)")
  flat = spec_lib.validate(spec, variables)
  trunk = None if stop_at is None else frozenset(spec.trunk_spaces(stop_at))
  rows = []
  for path, leaf in flat.items():
    shape = tuple(np.shape(leaf))
    axes = spec.leaf_axes(path, len(shape))
    notes = {a % max(len(shape), 1): why for a, why in spec.unmerged.get(path, {}).items()}
    if trunk is not None and not spec.is_trunk_leaf(path, trunk):
      rows.append(LeafReport(path, shape, PER_MODEL, f"after {stop_at!r}: in every head", False))
      continue
    parts = [f"axis {a}: {_MATRIX[ax.role]} of {ax.space}"
             + (f" (one of {ax.groups} groups, by axis {ax.by})" if ax.groups > 1 else "")
             for a, ax in sorted(axes.items()) if trunk is None or ax.space in trunk]
    parts += [f"axis {a} averaged: {why}" for a, why in sorted(notes.items())]
    if axes:
      rows.append(LeafReport(path, shape, ZIPPED, "; ".join(parts), bool(notes)))
    else:
      rows.append(LeafReport(path, shape, AVERAGED, "; ".join(parts) or _NO_SPACE, bool(notes)))
  return Explanation(spec.name, tuple(rows), stop_at)


def check_merges_something(spec: spec_lib.Spec) -> None:
  """Raises if ``spec`` merges no space: a zip would only average the weights."""
  if spec.spaces:
    return
  reasons = sorted({why for axes in spec.unmerged.values() for why in axes.values()})
  raise SpecError(
      f"Spec {spec.name!r} merges no feature space, so a zip would only average the weights "
      "element by element (plain weight averaging)."
      + (" Why its feature axes stay unmerged:\n  " + "\n  ".join(reasons[:8])
         if reasons else " Declare its spaces (zipjax.spec.Space) and the leaves' axes.")
      + "\nIf weight averaging is what you want, average the trees yourself: "
      "jax.tree.map(lambda *w: sum(w) / len(w), *models).")


def warn_unmerged(report: Explanation) -> None:
  """One UnmergedWarning listing the leaves averaged without alignment, if any."""
  bad = report.unaligned
  if not bad:
    return
  lines = [f"  {fmt_path(r.path)}: {r.detail}" for r in bad[:6]]
  more = f"\n  ... and {len(bad) - 6} more" if len(bad) > 6 else ""
  warnings.warn(UnmergedWarning(
      f"{len(bad)} leaves of {report.spec_name!r} have axes that carry features but are only "
      "averaged, without aligning the models' features (this usually costs accuracy):\n"
      + "\n".join(lines) + more
      + "\nPrint zipjax.explain(variables, spec) for every leaf; silence with "
      "warnings.simplefilter('ignore', zipjax.UnmergedWarning)."), stacklevel=3)

