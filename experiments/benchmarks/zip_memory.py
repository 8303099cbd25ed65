"""Peak memory of ``zipjax.zip`` against the bytes it has to hold.

Two ResNet-50s (random weights) are zipped on small batches of random images in a fresh
Python process, so that earlier benchmarks leave no buffers or compiled programs behind. The
measure is the growth of the process's resident memory (RSS) during the call: its peak
(``VmHWM``, reset just before the call through ``/proc/self/clear_refs``; where that is not
available, ``ru_maxrss``) minus its RSS just before. XLA's buffers live outside the Python
heap, so ``tracemalloc`` would see none of them. The baseline is what a zip cannot avoid
holding: the two models' variables plus their statistics (per space an (N n)^2 float32 second
moment and the means).

The first call compiles every jitted program (the compiler's memory counts); the second call
runs them compiled. Each stage's peak in a third pass is kept in the JSON.

Target: peak growth <= 4x the bytes of the models and statistics.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from typing import Any, Callable

import jax

import zipjax
from . import common

NAME = "zip_memory"
TITLE = "zipjax.zip peak memory"
BASELINE = "bytes of models + statistics"


@dataclasses.dataclass(frozen=True)
class Settings:
  arch: str
  width: float
  num_outputs: int
  num_batches: int
  batch_size: int
  image_size: int
  timeout_s: float


SETTINGS = {
    "smoke": Settings("mlp", 16, 10, 1, 8, 16, timeout_s=300),
    "quick": Settings("resnet20", 1, 10, 1, 16, 32, timeout_s=300),
    "full": Settings("resnet50", 1, 1000, 2, 8, 64, timeout_s=900),
}


# ----------------------------------------------------------------------------------------------
# Measuring, in the worker process.


def _status() -> dict[str, int]:
  """VmRSS and VmHWM of this process in bytes (empty where /proc is missing)."""
  out = {}
  try:
    with open("/proc/self/status") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
          out[key] = int(value.split()[0]) * 1024
  except OSError:
    pass
  return out


def _reset_peak() -> bool:
  """Resets VmHWM to the current RSS (Linux >= 4.0); False where it cannot."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return "VmHWM" in _status()
  except OSError:
    return False


def _maxrss_bytes() -> int:
  scale = 1 if sys.platform == "darwin" else 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_growth(fn: Callable[[], Any]) -> tuple[Any, dict]:
  """Calls ``fn``; returns its result and the RSS peak growth during the call (bytes)."""
  resettable = _reset_peak()
  before = _status().get("VmRSS", 0)
  maxrss_before = _maxrss_bytes()
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  seconds = time.perf_counter() - start
  if resettable:
    growth, method = _status()["VmHWM"] - before, "VmHWM reset before the call"
  else:
    growth, method = _maxrss_bytes() - max(before, maxrss_before), (
        "ru_maxrss (peak since process start; may under-count)")
  return out, {"growth_bytes": max(growth, 0), "seconds": seconds, "method": method,
               "rss_before": before}


def measure(s: Settings) -> dict:
  """Everything the worker reports: sizes, and the peak growth of each call."""
  model, spec = common.build_model(s.arch, s.width, s.num_outputs)
  variables = common.init_models(model, 2, s.image_size)
  batches = common.random_images(s.num_batches, s.batch_size, s.image_size)
  jax.block_until_ready(batches)
  model_bytes = common.tree_bytes(variables)
  stats_bytes = common.stats_bytes(spec, 2)
  calls = {}
  zip_call = lambda: zipjax.zip(variables[0], variables[1], spec, data=batches)
  for name in ("first call", "second call"):
    merged, calls[name] = peak_growth(zip_call)
    del merged
  stages = {}
  stats, stages["compute_stats"] = peak_growth(
      lambda: zipjax.compute_stats(variables, spec, batches))
  merges, stages["compute_merges"] = peak_growth(
      lambda: zipjax.compute_merges(stats, num_models=2))
  del stats
  merged, stages["apply_merges"] = peak_growth(
      lambda: zipjax.apply_merges(variables, spec, merges))
  _, stages["reset_batchnorm"] = peak_growth(
      lambda: zipjax.reset_batchnorm(merged, spec, batches))
  return {"settings": dataclasses.asdict(s), "model_bytes": model_bytes,
          "stats_bytes": stats_bytes, "calls": calls, "stages": stages,
          "label": (f"{common.model_label(s.arch, s.width)}, {s.num_batches}x{s.batch_size} "
                    f"images {s.image_size}x{s.image_size}")}


def _measure_payload(payload: dict) -> dict:
  return measure(Settings(**payload))


# ----------------------------------------------------------------------------------------------
# The benchmark, in the suite's process.


def run_worker(s: Settings) -> dict:
  """Runs :func:`measure` in a fresh Python process."""
  return common.run_worker(__spec__.name, dataclasses.asdict(s),
                           timeout_s=s.timeout_s)


def run(scale: str, *, progress: bool = False) -> common.Result:
  s = SETTINGS[scale]
  if progress:
    print(f"zip_memory: zipping two {common.model_label(s.arch, s.width)} in a fresh process",
          file=sys.stderr)
  result = run_worker(s)
  held = result["model_bytes"] + result["stats_bytes"]
  target = common.Target("<=", 4.0)
  rows = []
  for name, call in result["calls"].items():
    growth = call["growth_bytes"]
    note = (f"peak growth {common.fmt_bytes(growth)} vs {common.fmt_bytes(held)} "
            f"({common.fmt_bytes(result['model_bytes'])} models + "
            f"{common.fmt_bytes(result['stats_bytes'])} statistics)")
    if name == "first call":
      note += "; includes compilation"
    rows.append(common.Row(NAME, f"{result['label']}: zip, {name}", call["seconds"], BASELINE,
                           None, target=target, notes=note, data={**result, "call": name},
                           ratio=growth / held, measure="memory"))
  remarks = ["zip_memory: peak RSS growth per stage (second pass, compiled): " + ", ".join(
      f"{k} {common.fmt_bytes(v['growth_bytes'])}" for k, v in result["stages"].items())
             + f"; measured by {next(iter(result['calls'].values()))['method']}."]
  return common.Result(rows, {"model_bytes": result["model_bytes"],
                              "stats_bytes": result["stats_bytes"],
                              "calls": result["calls"], "stages": result["stages"]}, remarks)


if __name__ == "__main__":
  sys.exit(common.worker_main(_measure_payload))
