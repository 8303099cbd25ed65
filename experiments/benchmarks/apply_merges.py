"""Applying merges: ``zipjax.apply_merges`` against a jitted copy of the same trees.

Two models with random weights are zipped with one Merge per space: identity merges (weight
averaging) and greedy merges (``zipjax.match.greedy()`` on correlations of features with
shared structure, see ``greedy.feature_correlation``). The baseline is the least any zip must
do, read both models and write a tree: ``jax.jit(lambda t: tree_map(lambda x: x * 1.0, t))``
on both models' variables.

Two rows per case: the whole public call (it also validates the inputs and turns the merges
into gather indices) and, where the library's internal kernel can be reached, the jitted
kernel alone on inputs prepared as the call prepares them. Compilation is excluded. All
merge kinds of one architecture are timed in the same rounds against one baseline, and every
row compares fastest repeats (the JSON keeps every time): the copy's time is bimodal, its
output buffers fresh pages from the kernel or reused memory. The median copy of the same
ResNet-20x8 trees took 13 ms in one case and 30-45 ms in every round of the next, and that of
two ResNet-50s 11 ms in one run and 72 ms in another, which made a kernel 4x the fast copy read
0.7x.

Target: ratio <= 3.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

import zipjax
from experiments.benchmarks import common
from experiments.benchmarks import greedy as greedy_bench
from zipjax import match

NAME = "apply_merges"
TITLE = "Applying merges vs a jitted copy"
BASELINE = "jitted copy of both trees"
TARGET = common.Target("<=", 3.0)


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


SETTINGS = {
    "smoke": Settings(cases=(Case("mlp", 16, 10, 16),), merges=("identity", "greedy"),
                      repeats=1, budget_s=1.0),
    "quick": Settings(cases=(Case("resnet20", 2, 10, 32),), merges=("identity", "greedy"),
                      repeats=3, budget_s=5.0),
    "full": Settings(cases=(Case("resnet20", 8, 10, 32), Case("resnet50", 1, 1000, 64)),
                     merges=("identity", "greedy"), repeats=7, budget_s=25.0),
}


def make_merges(spec: zipjax.Spec, num_models: int, kind: str, *,
                seed: int = 0) -> dict[str, match.Merge]:
  """One Merge per space: 'identity' (weight averaging) or 'greedy' (``match.greedy()`` on
  synthetic correlations of features with shared structure)."""
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
      raise ValueError(f"Unknown merges kind {kind!r}; expected 'identity' or 'greedy'.")
  return merges


def kernel_call(spec: zipjax.Spec, variables: list, merges: Mapping[str, match.Merge]
                ) -> tuple[Callable[[], Any] | None, str]:
  """A call of the library's jitted zip kernel alone, on inputs prepared as ``apply_merges``
  prepares them (flat variables, merges as gather indices on the device), or None and why
  not if the library's internals have changed."""
  try:
    from zipjax._src import spec as spec_lib  # pylint: disable=g-import-not-at-top
    from zipjax._src import zipping  # pylint: disable=g-import-not-at-top
    flats = tuple(spec_lib.flatten(v) for v in variables)
    plans = zipping.prepare_merges(merges)
    kernel = zipping._zip_leaves  # pylint: disable=protected-access
    call = lambda: kernel(spec, None, flats, plans)
    jax.block_until_ready(call())
    return call, ""
  except Exception as e:  # pylint: disable=broad-except
    return None, f"kernel not timed ({type(e).__name__}: {e})"[:200]


def _measure(case: Case, spec: zipjax.Spec, variables: list, s: Settings) -> list[common.Row]:
  """Every merge kind of one architecture timed in the same rounds against one baseline."""
  copy = jax.jit(lambda t: jax.tree_util.tree_map(lambda x: x * 1.0, t))
  fns = {"baseline": lambda: copy(variables)}
  why = {}
  for kind in s.merges:
    merges = make_merges(spec, 2, kind)
    fns[f"{kind}: apply_merges"] = (
        lambda merges=merges: zipjax.apply_merges(spec, variables, merges))
    kernel, why[kind] = kernel_call(spec, variables, merges)
    if kernel is not None:
      fns[f"{kind}: kernel"] = kernel
  timing = common.time_calls(fns, repeats=s.repeats, budget_s=s.budget_s)
  base = timing["baseline"].min
  nbytes = common.tree_bytes(variables)
  rows = []
  for kind in s.merges:
    label = f"{common.model_label(case.arch, case.width)} ({kind} merges)"
    data = {"arch": case.arch, "width": case.width, "num_outputs": case.num_outputs,
            "merges": kind, "bytes_of_models": nbytes, "leaves": len(spec.leaves),
            **{k.split(": ")[-1]: v.to_json() for k, v in timing.items()
               if k == "baseline" or k.startswith(kind + ":")}}
    rows.append(common.Row(NAME, label + ": whole call",
                           timing[f"{kind}: apply_merges"].min, BASELINE, base,
                           target=TARGET, notes=f"{common.fmt_bytes(nbytes)} of models, fastest of {len(timing['baseline'].times)}",
                           data=data))
    if f"{kind}: kernel" in timing:
      rows.append(common.Row(NAME, label + ": jitted kernel only",
                             timing[f"{kind}: kernel"].min, BASELINE, base, target=TARGET,
                             notes="_zip_leaves, fastest repeats", data=data))
    else:
      rows.append(common.Row(NAME, label + ": jitted kernel only", None, BASELINE, base,
                             notes=why[kind], data=data))
  return rows


def run(scale: str, *, progress: bool = False) -> common.Result:
  s = SETTINGS[scale]
  rows = []
  for case in common.progress_bar(s.cases, desc="apply_merges", enabled=progress):
    model, spec = common.build_model(case.arch, case.width, case.num_outputs)
    rows += _measure(case, spec, common.init_models(model, 2, case.image_size), s)
  return common.Result(rows)
