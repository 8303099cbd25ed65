"""BatchNorm reset: ``zipjax.reset_batchnorm`` against train-mode forward passes.

The baseline is the pass Flax itself makes to update BatchNorm statistics,
``model.apply(v, x, train=True, mutable=['batch_stats'])`` jitted, on the same batches. The
reset does the same work (normalise with each batch's statistics, record them) and averages
the statistics over the pass, so the ratio should stay close to 1. No target is set.
"""

from __future__ import annotations


import jax

import zipjax
from . import common

NAME = "batchnorm"
TITLE = "BatchNorm reset vs train-mode forward passes"
BASELINE = "jitted train-mode apply (mutable batch_stats)"


Case = common.PassCase
Settings = common.PassSettings


SETTINGS = {
    "smoke": Settings(cases=(Case("mlp", 16, 1, 8),), image_size=16, repeats=1,
                      budget_s=1.0),
    "quick": Settings(cases=(Case("resnet20", 1, 2, 32),), image_size=32, repeats=3,
                      budget_s=5.0),
    "full": Settings(cases=(Case("resnet20", 1, 4, 128), Case("resnet20", 4, 1, 128)),
                     image_size=32, repeats=3, budget_s=30.0),
}


def _measure(case: Case, s: Settings) -> common.Row:
  model, spec, both = common.shared_models(case.arch, case.width, s.image_size)
  variables = both[0]
  batches = common.random_images(case.num_batches, case.batch_size, s.image_size)
  train_step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  fns = {
      "baseline": lambda: [train_step(variables, x) for x in batches],
      "reset": lambda: zipjax.reset_batchnorm(variables, spec, batches),
  }
  timing = common.time_calls(fns, repeats=s.repeats, budget_s=s.budget_s)
  label = (f"{common.model_label(case.arch, case.width)}, {case.num_batches}x"
           f"{case.batch_size} images {s.image_size}x{s.image_size}")
  return common.Row(
      NAME, label, timing["reset"].median, BASELINE, timing["baseline"].median,
      notes=f"median of {len(timing['reset'].times)}",
      data={"arch": case.arch, "width": case.width, "num_batches": case.num_batches,
            "batch_size": case.batch_size, "image_size": s.image_size,
            "reset": timing["reset"].to_json(), "baseline": timing["baseline"].to_json()})


def run(scale: str, *, progress: bool = False) -> common.Result:
  s = SETTINGS[scale]
  return common.Result([_measure(case, s) for case in
                        common.progress_bar(s.cases, desc="batchnorm", enabled=progress)])
