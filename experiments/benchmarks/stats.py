"""Feature statistics: ``zipjax.compute_stats`` against plain forward passes.

Two ResNet-20s with random weights, random images. The baseline is what any pass over the
data costs: each model's jitted ``spec.apply`` on every batch. Statistics add the capture of
every space and an (N n)^2 second moment per space on top of those forward passes, so the
ratio says how much the statistics cost beyond running the models. Compilation is excluded
(one warm-up call of each first); the median of the repeats is reported.

Two rows per case, timed in the same rounds against the same baseline: the default
(``microbatch="auto"``: on the CPU, every batch in parts whose features take at most 32 MiB;
whole batches elsewhere) and whole batches (``microbatch=None``). The CPU allocator hands a
step whose working memory exceeds 32 MiB fresh pages on every call (the statistics step of two
ResNet-20s of width 1 over 128 images needs 116 MiB, over 32 images 29 MiB).

Target: ratio <= 1.3.
"""

from __future__ import annotations


import jax

import zipjax
from . import common

NAME = "stats"
TITLE = "Feature statistics vs plain forward passes"
BASELINE = "jitted spec.apply of both models"
TARGET = common.Target("<=", 1.3)

Case = common.PassCase
Settings = common.PassSettings


SETTINGS = {
    "smoke": Settings(cases=(Case("mlp", 16, 1, 8),), image_size=16, repeats=1,
                      budget_s=1.0),
    "quick": Settings(cases=(Case("resnet20", 1, 2, 32),), image_size=32, repeats=3,
                      budget_s=10.0),
    "full": Settings(cases=(Case("resnet20", 1, 4, 128), Case("resnet20", 2, 2, 128),
                            Case("resnet20", 4, 1, 128)),
                     image_size=32, repeats=3, budget_s=60.0),
}


def _auto_size(spec, variables, x) -> int | None:
  """The part size the default ``microbatch="auto"`` takes here (None: whole batches), or
  None if the library's internals have changed."""
  try:
    from zipjax._src import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
    from zipjax._src import spec as spec_lib  # pylint: disable=g-import-not-at-top
    from zipjax._src import stats as stats_lib  # pylint: disable=g-import-not-at-top
    models = tuple(spec_lib._model_vars(v) for v in variables)  # pylint: disable=protected-access
    return stats_lib.auto_microbatch(spec, models, x, sharding_lib.resolve_mesh(None))
  except Exception:  # pylint: disable=broad-except
    return None


def _measure(case: Case, s: Settings) -> list[common.Row]:
  _, spec, variables = common.shared_models(case.arch, case.width, s.image_size)
  batches = common.random_images(case.num_batches, case.batch_size, s.image_size)
  forward = jax.jit(spec.apply)
  fns = {
      "baseline": lambda: [forward(v, x) for x in batches for v in variables],
      "stats": lambda: zipjax.compute_stats(variables, spec, batches),
      "whole_batches": lambda: zipjax.compute_stats(variables, spec, batches, microbatch=None),
  }
  timing = common.time_calls(fns, repeats=s.repeats, budget_s=s.budget_s)
  label = (f"{common.model_label(case.arch, case.width)}, {case.num_batches}x"
           f"{case.batch_size} images {s.image_size}x{s.image_size}")
  auto = _auto_size(spec, variables, batches[0])
  data = {"arch": case.arch, "width": case.width, "num_batches": case.num_batches,
          "batch_size": case.batch_size, "image_size": s.image_size,
          "spaces": {sp.name: sp.width for sp in spec.spaces},
          "auto_microbatch": auto, **{k: v.to_json() for k, v in timing.items()}}
  notes = f"{len(spec.spaces)} spaces, median of {len(timing['stats'].times)}"
  parts = "whole batches" if auto is None or auto >= case.batch_size else f"parts of {auto}"
  return [common.Row(NAME, f"{label}, default ({parts})", timing["stats"].median, BASELINE,
                     timing["baseline"].median, target=TARGET, notes=notes, data=data),
          common.Row(NAME, f"{label}, microbatch=None (whole batches)",
                     timing["whole_batches"].median, BASELINE, timing["baseline"].median,
                     notes=notes, data=data)]


def run(scale: str, *, progress: bool = False) -> common.Result:
  s = SETTINGS[scale]
  return common.Result([row for case in common.progress_bar(s.cases, desc="stats",
                                                            enabled=progress)
                        for row in _measure(case, s)])
