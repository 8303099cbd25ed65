"""The zip a notebook user makes: the first ``zipjax.zip`` in a fresh process, compiling included.

Two pairs of models of one architecture (random weights) are zipped in a fresh Python process:
pair A (first call: everything compiles), pair A again (the baseline: nothing compiles, the
same work), then pair B with another matcher setting (greedy alpha=0.3, beta=0.125: other
merges of the same widths). Each call's XLA compilations are counted with JAX's public
monitoring events (``/jax/core/compile/backend_compile_duration``).

Rows: the first call and the call on pair B, each against the repeat. Target for pair B:
no program compiled and at most 1.2x the repeat.
"""

from __future__ import annotations

import dataclasses
import sys

import jax

import zipjax
from . import common

NAME = "first_zip"
TITLE = "First zip in a fresh process"
BASELINE = "the same zip, repeated"


@dataclasses.dataclass(frozen=True)
class Settings:
  arch: str
  width: float
  num_outputs: int
  num_images: int
  batch_size: int
  image_size: int
  timeout_s: float


SETTINGS = {
    "smoke": (Settings("mlp", 16, 10, 16, 8, 16, timeout_s=300),),
    "quick": (Settings("resnet20", 1, 10, 128, 64, 32, timeout_s=300),),
    "full": (Settings("resnet20", 4, 10, 500, 128, 32, timeout_s=900),
             Settings("resnet50", 1, 1000, 16, 8, 64, timeout_s=900)),
}


def measure(payload: dict) -> dict:
  """Times the three calls and counts their compilations (in the worker process)."""
  s = Settings(**payload)
  call = common.compile_counter()
  model, spec = common.build_model(s.arch, s.width, s.num_outputs)
  variables = common.init_models(model, 4, s.image_size)
  num_batches = -(-s.num_images // s.batch_size)
  images = common.random_images(1, s.num_images, s.image_size)[0]
  data = [images[i * s.batch_size:(i + 1) * s.batch_size] for i in range(num_batches)]
  jax.block_until_ready((variables, data))
  calls = {}
  for name, (a, b), matcher in (
      ("first", (0, 1), None), ("repeat", (0, 1), None),
      ("other pair", (2, 3), zipjax.match.greedy(alpha=0.3, beta=0.125))):
    _, calls[name] = call(lambda a=a, b=b, matcher=matcher: zipjax.zip(
        variables[a], variables[b], spec, data=data, matcher=matcher))
  return {"settings": dataclasses.asdict(s), "calls": calls,
          "label": (f"{common.model_label(s.arch, s.width)}, {s.num_images} images "
                    f"{s.image_size}x{s.image_size} in batches of {s.batch_size}")}


def run(scale: str, *, progress: bool = False) -> common.Result:
  rows = []
  for s in SETTINGS[scale]:
    if progress:
      print(f"first_zip: {common.model_label(s.arch, s.width)} in a fresh process",
            file=sys.stderr)
    result = common.run_worker(__spec__.name, dataclasses.asdict(s),
                               timeout_s=s.timeout_s)
    calls = result["calls"]
    base = calls["repeat"]["seconds"]
    for name, target in (("first", None), ("other pair", common.Target("<=", 1.2))):
      call = calls[name]
      rows.append(common.Row(
          NAME, f"{result['label']}: {name}", call["seconds"], BASELINE, base, target=target,
          notes=(f"{call['compiles']} programs compiled in {call['compile_seconds']:.1f} s; "
                 f"the repeat compiled {calls['repeat']['compiles']}"),
          data=result))
  return common.Result(rows)


if __name__ == "__main__":
  sys.exit(common.worker_main(measure))
