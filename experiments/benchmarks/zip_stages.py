"""``zipjax.zip`` end to end, stage by stage, against plain forward passes.

Two ResNet-20s with random weights are zipped on random calibration images, timing the
public lower-level functions in the order ``zip`` calls them (``compute_stats``,
``compute_merges``, ``apply_merges``, ``reset_batchnorm``), then ``zipjax.zip`` itself. The
time ``zip`` takes beyond the four stages is its validation and overhead. The baseline is one
pass of both models over the calibration data (jitted ``spec.apply``), so every ratio reads
as "this many passes over the data". The stage-by-stage result is checked to be the same,
bit for bit, as ``zip``'s. No target is set.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

import zipjax
from . import common

NAME = "zip_stages"
TITLE = "zipjax.zip stage by stage"
BASELINE = "forward passes of both models"
STAGES = ("compute_stats", "compute_merges", "apply_merges", "reset_batchnorm")


@dataclasses.dataclass(frozen=True)
class Settings:
  arch: str
  width: float
  num_batches: int
  batch_size: int
  image_size: int
  repeats: int


SETTINGS = {
    "smoke": Settings(arch="mlp", width=16, num_batches=1, batch_size=8, image_size=16,
                      repeats=1),
    "quick": Settings(arch="resnet20", width=1, num_batches=2, batch_size=32, image_size=32,
                      repeats=2),
    "full": Settings(arch="resnet20", width=4, num_batches=2, batch_size=32, image_size=32,
                     repeats=3),
}


def _stages(spec: zipjax.Spec, variables: list, batches: list) -> tuple[dict, Any]:
  """Runs the four stages in sequence; returns each one's time and the merged variables."""
  times = {}
  start = time.perf_counter()
  stats = jax.block_until_ready(zipjax.compute_stats(variables, spec, batches))
  times["compute_stats"] = time.perf_counter() - start
  start = time.perf_counter()
  merges = zipjax.compute_merges(stats, num_models=len(variables))
  times["compute_merges"] = time.perf_counter() - start
  start = time.perf_counter()
  merged = jax.block_until_ready(zipjax.apply_merges(variables, spec, merges))
  times["apply_merges"] = time.perf_counter() - start
  start = time.perf_counter()
  merged = jax.block_until_ready(zipjax.reset_batchnorm(merged, spec, batches))
  times["reset_batchnorm"] = time.perf_counter() - start
  return times, merged


def _validation_call(spec: zipjax.Spec, variables: list):
  """The input checks ``zip`` starts with, if the library's internals can be reached."""
  try:
    from zipjax._src import spec as spec_lib  # pylint: disable=g-import-not-at-top
    check = spec_lib.check_models
    check(spec, variables)
    return lambda: check(spec, variables)
  except Exception:  # pylint: disable=broad-except
    return None


def _same(a: Any, b: Any) -> bool:
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  return ta == tb and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def run(scale: str, *, progress: bool = False) -> common.Result:
  s = SETTINGS[scale]
  _, spec, variables = common.shared_models(s.arch, s.width, s.image_size)
  batches = common.random_images(s.num_batches, s.batch_size, s.image_size)
  forward = jax.jit(spec.apply)
  validation = _validation_call(spec, variables)

  def baseline():
    return jax.block_until_ready([forward(v, x) for x in batches for v in variables])

  def whole():
    return jax.block_until_ready(zipjax.zip(variables[0], variables[1], spec, data=batches))

  rounds: dict[str, list[float]] = {k: [] for k in ("baseline", *STAGES, "zip", "validation")}
  same = True
  steps = range(s.repeats + 1)  # the first round warms up (compilation) and is not counted
  for r in common.progress_bar(steps, desc="zip_stages", enabled=progress):
    t_base = common.time_calls({"b": baseline}, repeats=1, warmup=0)["b"].median
    times, merged = _stages(spec, variables, batches)
    start = time.perf_counter()
    zipped = whole()
    t_zip = time.perf_counter() - start
    t_val = (common.time_calls({"v": validation}, repeats=1, warmup=0)["v"].median
             if validation is not None else None)
    same = same and _same(merged, zipped)
    if r == 0:
      continue
    rounds["baseline"].append(t_base)
    for k, v in times.items():
      rounds[k].append(v)
    rounds["zip"].append(t_zip)
    if t_val is not None:
      rounds["validation"].append(t_val)

  med = {k: (float(np.median(v)) if v else None) for k, v in rounds.items()}
  base = med["baseline"]
  label = (f"{common.model_label(s.arch, s.width)}, {s.num_batches}x{s.batch_size} images "
           f"{s.image_size}x{s.image_size}")
  data = {"arch": s.arch, "width": s.width, "num_batches": s.num_batches,
          "batch_size": s.batch_size, "image_size": s.image_size, "times": rounds,
          "identical_to_zip": same}
  rows = []
  for stage in STAGES:
    rows.append(common.Row(NAME, f"{label}: {stage}", med[stage], BASELINE, base, data=data))
  total = sum(med[k] for k in STAGES)
  rows.append(common.Row(NAME, f"{label}: sum of the 4 stages", total, BASELINE, base,
                         notes="same variables as zip" if same else "DIFFERS FROM zip",
                         data=data))
  rows.append(common.Row(NAME, f"{label}: zipjax.zip (whole call)", med["zip"], BASELINE, base,
                         data=data))
  rows.append(common.Row(NAME, f"{label}: validation and overhead (zip - stages)",
                         max(med["zip"] - total, 0.0), BASELINE, base,
                         notes="derived; noisy", data=data))
  if med["validation"] is not None:
    rows.append(common.Row(NAME, f"{label}: validation (check_models)", med["validation"],
                           BASELINE, base, notes="internal check zip starts with", data=data))
  shares = {k: med[k] / total for k in STAGES} if total else {}
  remarks = ["zip stages (share of the 4 stages): " + ", ".join(
      f"{k} {100 * v:.0f}%" for k, v in shares.items()) + "."]
  return common.Result(rows, {"shares": shares, "identical_to_zip": same}, remarks)
