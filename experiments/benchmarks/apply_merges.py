"""Applying merges: ``zipjax.apply_merges`` against a jitted copy of the same trees.

Two models with random weights are zipped with one merge per space: identity merges (weight
averaging), greedy merges on synthetic correlations of features with shared structure
(``greedy.feature_correlation``), and greedy merges of the models' own features (their
statistics on random images, as ``zipjax.zip`` computes them). The baseline is the least any
zip must do, read both models and write a tree: ``jax.jit(lambda t: tree_map(lambda x: x *
1.0, t))`` on both models' variables.

Rows per case and merge kind: the whole public call (default kernel) and the jitted program
alone with each kernel ("segment_sum", "einsum"), compilation excluded, the median of the
repeats; then two single first calls, compilation included: on the merges from empty caches,
then on other merges of the kind (another seed), which must find the program compiled.
Everything is measured in a fresh process with glibc told to keep the memory it frees
(``common.STEADY_ALLOCATOR_ENV``): under the default allocator the copy's output buffers got
fresh pages on some calls and reused memory on others, and the baseline was not one number.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any, Callable, Mapping

import jax
import numpy as np

import zipjax
from . import common
from . import greedy as greedy_bench
from zipjax import match

NAME = "apply_merges"
TITLE = "Applying merges vs a jitted copy"
BASELINE = "jitted copy of both trees"

# Merge kinds: {name: how the rows call them}.
KINDS = {
    "identity": "identity merges",
    "greedy": "greedy merges, synthetic correlations",
    "features": "greedy merges of the models' features",
}


@dataclasses.dataclass(frozen=True)
class Case:
  arch: str
  width: float
  num_outputs: int
  image_size: int  # only for initialising the variables


@dataclasses.dataclass(frozen=True)
class Settings:
  cases: tuple[Case, ...]
  merges: tuple[str, ...]
  repeats: int
  budget_s: float
  timeout_s: float = 900.0

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> Settings:
    return cls(**{**d, "cases": tuple(Case(**c) for c in d["cases"]),
                  "merges": tuple(d["merges"])})


SETTINGS = {
    "smoke": Settings(cases=(Case("mlp", 16, 10, 16),), merges=tuple(KINDS),
                      repeats=1, budget_s=1.0, timeout_s=300.0),
    "quick": Settings(cases=(Case("resnet20", 2, 10, 32),), merges=tuple(KINDS),
                      repeats=3, budget_s=5.0, timeout_s=300.0),
    "full": Settings(cases=(Case("resnet20", 8, 10, 32), Case("resnet50", 1, 1000, 64)),
                     merges=tuple(KINDS), repeats=15, budget_s=60.0),
}


def make_merges(spec: zipjax.Spec, num_models: int, kind: str, *, seed: int = 0,
                variables: list | None = None, image_size: int | None = None
                ) -> dict[str, match.Merge]:
  """One Merge per space: 'identity' (weight averaging), 'greedy' (``match.greedy()`` on
  synthetic correlations of features with shared structure) or 'features' (``zip``'s merges
  of ``variables``: greedy on their statistics over 16 random images of ``image_size``)."""
  if kind == "features":
    if variables is None or image_size is None:
      raise ValueError("make_merges(kind='features') needs the models' variables and the "
                       "image_size of their inputs.")
    stats = zipjax.compute_stats(variables, spec,
                                 common.random_images(2, 8, image_size, seed=seed))
    return zipjax.compute_merges(stats, num_models=num_models)
  merges = {}
  for i, space in enumerate(spec.spaces):
    dim = num_models * space.width
    if kind == "identity":
      merges[space.name] = match.identity()(np.eye(dim, dtype=np.float32),
                                            num_models=num_models)
    elif kind == "greedy":
      corr = greedy_bench.feature_correlation(space.width, num_models, seed=seed + i)
      merges[space.name] = match.greedy()(corr, num_models=num_models)
    else:
      raise ValueError(f"Unknown merges kind {kind!r}; expected one of {list(KINDS)}.")
  return merges


def kernel_call(spec: zipjax.Spec, variables: list, merges: Mapping[str, match.Merge],
                kernel: str) -> tuple[Callable[[], Any] | None, str]:
  """A call of the library's jitted merge program alone with ``kernel``, on inputs prepared
  as ``apply_merges`` prepares them, or None and why not if the library's internals changed."""
  try:
    from zipjax._src import apply as apply_lib  # pylint: disable=g-import-not-at-top
    from zipjax._src import spec as spec_lib  # pylint: disable=g-import-not-at-top
    flats = tuple(spec_lib.flatten(v) for v in variables)
    merges = jax.device_put(dict(merges))
    call = lambda: apply_lib.merge_flats(spec, None, flats, merges, kernel)
    jax.block_until_ready(call())
    return call, ""
  except Exception as e:  # pylint: disable=broad-except
    return None, f"kernel not timed ({type(e).__name__}: {e})"[:200]


KERNELS = ("segment_sum", "einsum")


def _time_case(case: Case, s: Settings) -> dict:
  """Every merge kind of one architecture timed in the same rounds against one baseline (in
  the worker process)."""
  model, spec = common.build_model(case.arch, case.width, case.num_outputs)
  variables = common.init_models(model, 2, case.image_size)
  copy = jax.jit(lambda t: jax.tree_util.tree_map(lambda x: x * 1.0, t))
  fns = {"baseline": lambda: copy(variables)}
  why, merges_of = {}, {}
  make = functools.partial(make_merges, spec, 2, variables=variables,
                           image_size=case.image_size)
  for kind in s.merges:
    merges = merges_of[kind] = make(kind)
    fns[f"{kind}: apply_merges"] = (
        lambda merges=merges: zipjax.apply_merges(variables, spec, merges))
    for k in KERNELS:
      call, why[f"{kind}: {k}"] = kernel_call(spec, variables, merges, k)
      if call is not None:
        fns[f"{kind}: {k}"] = call
  timing = common.time_calls(fns, repeats=s.repeats, budget_s=s.budget_s)
  # First calls, compilation included: on the merges, then on other merges of the kind
  # (another seed). After the timing, from empty caches for each kind: compiling first
  # changes the process's memory, and with it the copy baseline.
  first_calls = {}
  for kind in s.merges:
    others = make(kind, seed=1)
    jax.clear_caches()
    first_calls[kind] = [common.timed(lambda m=m: zipjax.apply_merges(variables, spec, m))
                         for m in (merges_of[kind], others)]
  return {"case": dataclasses.asdict(case), "label": common.model_label(case.arch, case.width),
          "bytes_of_models": common.tree_bytes(variables), "leaves": len(spec.leaves),
          "why_no_kernel": why, "first_calls": first_calls,
          "timing": {k: v.to_json() for k, v in timing.items()}}


def measure(payload: Mapping[str, Any]) -> dict:
  s = Settings.from_json(payload)
  return {"cases": [_time_case(case, s) for case in s.cases]}


def _rows(result: Mapping[str, Any], s: Settings) -> list[common.Row]:
  timing = result["timing"]
  base = timing["baseline"]["median"]
  case, nbytes = result["case"], result["bytes_of_models"]
  rows = []
  for kind in s.merges:
    label = f"{result['label']} ({KINDS[kind]})"
    data = {**case, "merges": kind, "bytes_of_models": nbytes, "leaves": result["leaves"],
            "allocator_env": common.STEADY_ALLOCATOR_ENV,
            **{k.split(": ")[-1]: v for k, v in timing.items()
               if k == "baseline" or k.startswith(kind + ":")}}
    call = timing[f"{kind}: apply_merges"]["median"]
    rows.append(common.Row(NAME, label + ": whole call", call, BASELINE, base,
                           notes=f"{common.fmt_bytes(nbytes)} of models", data=data))
    firsts = ("first call (compiling)", "first call on other merges of the kind")
    for what, seconds in zip(firsts, result["first_calls"][kind]):
      rows.append(common.Row(NAME, f"{label}: {what}", seconds, "none (compilation included)",
                             None, notes="one call", data=data))
    for k in KERNELS:
      key = f"{kind}: {k}"
      if key in timing:
        rows.append(common.Row(NAME, f"{label}: program only, {k}", timing[key]["median"],
                               BASELINE, base, notes="merge_flats", data=data))
      else:
        rows.append(common.Row(NAME, f"{label}: program only, {k}", None, BASELINE, base,
                               notes=result["why_no_kernel"][key], data=data))
  return rows


def run(scale: str, *, progress: bool = False) -> common.Result:
  s = SETTINGS[scale]
  if progress:
    print("apply_merges: timing in a fresh process with a steady allocator", file=sys.stderr)
  result = common.run_worker(__spec__.name, dataclasses.asdict(s),
                             timeout_s=s.timeout_s, env=common.STEADY_ALLOCATOR_ENV)
  return common.Result([row for case in result["cases"] for row in _rows(case, s)])


if __name__ == "__main__":
  sys.exit(common.worker_main(measure))
