"""What every benchmark shares: scales, result rows, targets, timing, models and data.

A benchmark times a zipjax function (the *candidate*) against a *baseline* run in the same
process (a plain loop, a plain forward pass, a plain copy), and reports the ratio
``candidate time / baseline time``. Ratios measured side by side in one process stay
meaningful on a loaded or noisy machine, where absolute times do not.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

#: The settings a suite runs at, smallest first: ``smoke`` (seconds, for the tests),
#: ``quick`` (about a minute) and ``full`` (about ten minutes on a 2-core CPU).
SCALES = ("smoke", "quick", "full")


@dataclasses.dataclass(frozen=True)
class Target:
  """A goal for a row's ratio (candidate / baseline): ``ratio <op> value``."""

  op: str
  value: float
  label: str = ""

  def __post_init__(self):
    if self.op not in ("<=", ">="):
      raise ValueError(f"Target op must be '<=' or '>=', got {self.op!r}.")

  def met(self, ratio: float | None) -> bool | None:
    if ratio is None or not math.isfinite(ratio):
      return None
    return ratio <= self.value if self.op == "<=" else ratio >= self.value

  def __str__(self) -> str:
    text = f"{self.op} {self.value:g}"
    return f"{text} ({self.label})" if self.label else text


@dataclasses.dataclass
class Row:
  """One measurement: a candidate against its baseline.

  Attributes:
    benchmark: the benchmark's name.
    case: what was measured (sizes, model, setting).
    seconds: median time of the candidate (None if not measured).
    baseline: what the candidate is compared with.
    baseline_seconds: median time of the baseline (None if not measured).
    target: the goal for ``ratio``, if the benchmark has one for this row.
    notes: a short remark for the table (skipped, extrapolated, identical results ...).
    data: everything else worth keeping in the JSON (every repeat's time, sizes, checks).
    ratio: ``seconds / baseline_seconds`` unless given (e.g. a memory ratio).
    checks_ok: whether the row's correctness checks passed (None: none); a target counts as
      met only if they did.
    measure: what the ratio compares: 'time' or 'memory'.
  """

  benchmark: str
  case: str
  seconds: float | None
  baseline: str
  baseline_seconds: float | None
  target: Target | None = None
  notes: str = ""
  data: dict = dataclasses.field(default_factory=dict)
  ratio: float | None = None
  checks_ok: bool | None = None
  measure: str = "time"

  def __post_init__(self):
    if self.ratio is None and self.seconds is not None and self.baseline_seconds:
      self.ratio = self.seconds / self.baseline_seconds

  @property
  def met(self) -> bool | None:
    if self.target is None:
      return None
    met = self.target.met(self.ratio)
    return False if met is not None and self.checks_ok is False else met

  def to_json(self) -> dict:
    return {
        "benchmark": self.benchmark,
        "case": self.case,
        "seconds": finite_or_none(self.seconds),
        "baseline": self.baseline,
        "baseline_seconds": finite_or_none(self.baseline_seconds),
        "ratio": finite_or_none(self.ratio),
        "target": None if self.target is None else {
            "op": self.target.op, "value": self.target.value, "label": self.target.label},
        "met": self.met,
        "checks_ok": self.checks_ok,
        "measure": self.measure,
        "notes": self.notes,
        "data": jsonable(self.data),
    }


@dataclasses.dataclass
class Result:
  """What one benchmark returns: its rows and a summary (fits, checks, remarks)."""

  rows: list[Row]
  summary: dict = dataclasses.field(default_factory=dict)
  remarks: list[str] = dataclasses.field(default_factory=list)


def finite_or_none(x: Any) -> float | None:
  if x is None:
    return None
  x = float(x)
  return x if math.isfinite(x) else None


def jsonable(obj: Any) -> Any:
  """``obj`` with numpy scalars/arrays as Python values and non-finite floats as None."""
  if isinstance(obj, Mapping):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return jsonable(obj.tolist())
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return finite_or_none(obj)
  if obj is None or isinstance(obj, str):
    return obj
  return str(obj)


# ----------------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass(frozen=True)
class Timing:
  """Wall-clock times of the repeats of one function (warm-up excluded)."""

  times: tuple[float, ...]

  @property
  def median(self) -> float:
    return statistics.median(self.times)

  @property
  def min(self) -> float:
    return min(self.times)

  def to_json(self) -> dict:
    return {"median": self.median, "min": self.min, "times": list(self.times)}


def timed(fn: Callable[[], Any]) -> float:
  """Seconds one call of ``fn`` takes, its result ready."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def compile_counter() -> Callable[[Callable[[], Any]], tuple[Any, dict]]:
  """A function that calls ``fn()``, waits for its result, and returns it with the call's
  seconds, the number of XLA programs compiled during it and their compile seconds (counted
  with JAX's monitoring events; the listener stays registered for the process)."""
  compiles: list[float] = []

  def listener(event, seconds, **kwargs):
    del kwargs
    if event == COMPILE_EVENT:
      compiles.append(seconds)

  jax.monitoring.register_event_duration_secs_listener(listener)

  def call(fn: Callable[[], Any]) -> tuple[Any, dict]:
    before = len(compiles)
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, {"seconds": time.perf_counter() - start, "compiles": len(compiles) - before,
                 "compile_seconds": sum(compiles[before:])}

  return call


def time_calls(fns: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 1,
               budget_s: float | None = None) -> dict[str, Timing]:
  """Times functions side by side: after ``warmup`` calls of each (compilation), ``repeats``
  rounds that call each once, in turn, so that a change of machine load hits all alike.

  Every result is passed to ``jax.block_until_ready`` inside the timing. With ``budget_s``,
  rounds stop early (after at least one) once the timed rounds took that long.
  """
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times: dict[str, list[float]] = {k: [] for k in fns}
  spent = 0.0
  for _ in range(max(1, repeats)):
    for name, fn in fns.items():
      t = timed(fn)
      times[name].append(t)
      spent += t
    if budget_s is not None and spent >= budget_s:
      break
  return {k: Timing(tuple(v)) for k, v in times.items()}


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
  """The least-squares slope of log(y) against log(x): the growth exponent of y in x."""
  pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y and y > 0]
  if len({p[0] for p in pts}) < 2:
    return None
  lx, ly = np.array(pts).T
  return float(np.polyfit(lx, ly, 1)[0])


def progress_bar(items: Iterable[Any], *, desc: str, enabled: bool, total: int | None = None):
  """``items`` wrapped in a tqdm bar on stderr when ``enabled``."""
  if not enabled:
    return items
  import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(items, desc=desc, total=total, leave=False)


# ----------------------------------------------------------------------------------------------
# Models and data


#: Architectures the benchmarks build: the ResNets they are about, and a 2-layer MLP (hidden
#: width ``width``) that compiles in a moment, for the smoke scale that checks the suite runs.
ARCHS = ("resnet20", "resnet50", "mlp")


def build_model(arch: str, width: float, num_outputs: int | None = None):
  """(module, spec) of ``arch`` (one of ARCHS) at ``width``."""
  from zipjax import models  # pylint: disable=g-import-not-at-top
  kwargs = {} if num_outputs is None else {"num_outputs": num_outputs}
  if arch == "mlp":
    return models.mlp(widths=(int(width), int(width)), **kwargs)
  if arch not in ARCHS:
    raise ValueError(f"Unknown architecture {arch!r}; expected one of {ARCHS}.")
  return {"resnet20": models.resnet20, "resnet50": models.resnet50}[arch](width=width, **kwargs)


def model_label(arch: str, width: float) -> str:
  if arch == "mlp":
    return f"MLP({int(width)}, {int(width)})"
  return f"{'ResNet-20' if arch == 'resnet20' else 'ResNet-50'}x{width:g}"


def init_models(model: Any, num: int, image_size: int, *, seed: int = 0) -> list[dict]:
  """``num`` independently initialised variables of ``model`` (random weights)."""
  x = np.zeros((1, image_size, image_size, 3), np.float32)
  init = jax.jit(model.init)
  variables = [init(jax.random.PRNGKey(seed + m), x) for m in range(num)]
  return jax.block_until_ready(variables)


@functools.lru_cache(maxsize=4)
def shared_models(arch: str, width: float, image_size: int, num: int = 2
                  ) -> tuple[Any, Any, tuple[dict, ...]]:
  """(module, spec, variables of ``num`` models), built once per process and shared by the
  benchmarks, so that a program one benchmark compiled (keyed by the spec) is not compiled
  again by the next on the same shapes."""
  model, spec = build_model(arch, width)
  return model, spec, tuple(init_models(model, num, image_size))


def random_images(num_batches: int, batch_size: int, image_size: int, *,
                  seed: int = 0) -> list[jax.Array]:
  """Calibration batches of standard-normal images, already on the device."""
  rng = np.random.default_rng(seed)
  return [jax.device_put(rng.standard_normal((batch_size, image_size, image_size, 3),
                                             dtype=np.float32))
          for _ in range(num_batches)]


def tree_bytes(tree: Any) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree)))


def stats_bytes(spec: Any, num_models: int) -> int:
  """Bytes of the feature statistics of every space: float32 (N n)^2 second moment + mean."""
  return int(sum(4 * ((num_models * s.width) ** 2 + num_models * s.width) for s in spec.spaces))


# ----------------------------------------------------------------------------------------------
# Formatting


def fmt_seconds(s: float | None) -> str:
  if s is None:
    return "-"
  if s < 1e-3:
    return f"{s * 1e6:.0f} us"
  if s < 1.0:
    return f"{s * 1e3:.1f} ms"
  return f"{s:.2f} s"


def fmt_ratio(r: float | None, measure: str = "time") -> str:
  if r is None:
    return "-"
  if 0.0 < r < 1.0 and measure == "time":
    return f"{r:.3g} ({1 / r:.3g}x faster)"
  return f"{r:.3g}"


def fmt_bytes(b: float | None) -> str:
  if b is None:
    return "-"
  if abs(b) < 2**20:
    return f"{b / 2**10:.0f} KiB"
  return f"{b / 2**20:.0f} MiB"


@dataclasses.dataclass(frozen=True)
class PassCase:
  """One model and the calibration batches of a pass-over-data benchmark."""

  arch: str
  width: float
  num_batches: int
  batch_size: int


@dataclasses.dataclass(frozen=True)
class PassSettings:
  """The cases of a pass-over-data benchmark at one scale."""

  cases: tuple[PassCase, ...]
  image_size: int
  repeats: int
  budget_s: float


# ----------------------------------------------------------------------------------------------
# Benchmarks that measure in a fresh process.

_WORKER_MARKER = "BENCHMARK_WORKER_RESULT "

#: glibc told to keep what is freed: no block from mmap (each fresh from the kernel, page
#: faults and all, and returned on free) and no trimming of the heap. Jitted calls whose
#: outputs are large then reuse memory on every call instead of getting fresh pages on some
#: calls and not others; other C libraries ignore these variables.
STEADY_ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def _repo_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_worker(module: str, payload: Mapping[str, Any], *, timeout_s: float,
               env: Mapping[str, str] | None = None) -> dict:
  """Runs ``python -m module --worker JSON(payload)`` in a fresh process (same interpreter,
  same niceness, the environment plus ``env``) and returns the JSON its
  :func:`worker_main` printed."""
  full_env = {**os.environ, **(env or {})}
  root = _repo_root()
  full_env["PYTHONPATH"] = root + (os.pathsep + full_env["PYTHONPATH"]
                                   if full_env.get("PYTHONPATH") else "")
  cmd = [sys.executable, "-m", module, "--worker", json.dumps(payload)]
  proc = subprocess.run(cmd, cwd=root, env=full_env, capture_output=True, text=True,
                        timeout=timeout_s, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(_WORKER_MARKER)]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"The {module} worker failed (exit code {proc.returncode}):\n"
                       + (proc.stderr or proc.stdout)[-3000:])
  return json.loads(lines[-1][len(_WORKER_MARKER):])


def worker_main(measure: Callable[[dict], Mapping[str, Any]],
                argv: Sequence[str] | None = None) -> int:
  """The worker side of :func:`run_worker`: ``measure(payload)``, printed as JSON."""
  parser = argparse.ArgumentParser(description="benchmark worker (one fresh process)")
  parser.add_argument("--worker", required=True, help="the payload as JSON")
  args = parser.parse_args(argv)
  print(_WORKER_MARKER + json.dumps(jsonable(measure(json.loads(args.worker)))), flush=True)
  return 0
