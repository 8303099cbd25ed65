"""Greedy matching: ``zipjax.match.greedy`` against the plain loop of the paper's algorithm.

The baseline is ``zipjax.match.greedy_reference``: one argmax over the whole (N*Om)^2 matrix
per merge, alpha-min updates, the beta budget. Both run on the same correlation matrix, of
features that share structure between the models (see :func:`feature_correlation`); the
merged groups must come out identical (M and U compared exactly). The plain loop costs about
(N*Om - Om) * (N*Om)^2, so above a size it is not run: its time is extrapolated from the
largest measured case of the same N and alpha, and the row says so.

Target: at Om = 1024, N = 2, beta = 0.5 (alpha 1 and 0.1), greedy is >= 20x faster than the
plain loop (ratio <= 0.05) with identical groups.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from . import common
from zipjax import match

NAME = "greedy"
TITLE = "Greedy matching vs the plain loop"
BASELINE = "plain loop (greedy_reference)"
TARGET = common.Target("<=", 0.05, ">= 20x faster, identical groups")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Sizes of one scale.

  Attributes:
    widths: Om, one model's width.
    num_models: N.
    alphas: repeated-matching factors.
    beta: the same-model budget.
    reference_max_dim: the plain loop runs where N * Om is at most this; above, its time is
      extrapolated.
    repeats: timed repeats of greedy (median reported).
    reference_repeats: timed repeats of a plain loop that takes under a second.
    budget_s: stop repeating greedy on one case after this many seconds (one run at least).
    target_width: the Om of the target rows (N = 2).
  """

  widths: tuple[int, ...]
  num_models: tuple[int, ...]
  alphas: tuple[float, ...]
  beta: float
  reference_max_dim: int
  repeats: int
  reference_repeats: int
  budget_s: float
  target_width: int


SETTINGS = {
    "smoke": Settings(widths=(16, 32), num_models=(2, 4), alphas=(1.0, 0.1), beta=0.5,
                      reference_max_dim=64, repeats=1, reference_repeats=1, budget_s=1.0,
                      target_width=32),
    "quick": Settings(widths=(64, 128, 256, 512), num_models=(2,), alphas=(1.0, 0.1),
                      beta=0.5, reference_max_dim=1024, repeats=3, reference_repeats=3,
                      budget_s=5.0, target_width=1024),
    "full": Settings(widths=(64, 128, 256, 512, 1024, 2048), num_models=(2, 4),
                     alphas=(1.0, 0.1), beta=0.5, reference_max_dim=2048, repeats=3,
                     reference_repeats=3, budget_s=15.0, target_width=1024),
}


def feature_correlation(width: int, num_models: int, *, seed: int = 0) -> np.ndarray:
  """A float32 (N*width, N*width) correlation matrix of features alike those of N networks
  trained separately.

  Every feature is a combination of k latent factors plus unit-variance noise. Each model's
  features mix, in a random order, a set of combinations common to all models (shared
  features, found again up to a permutation) with combinations of its own, in a proportion
  drawn per feature: some features have a close match in the other models, some do not, and
  features of one model correlate with each other through the shared factors. Float32, like
  ``zipjax.correlation``'s output, so ties happen as they do in practice.
  """
  rng = np.random.default_rng(seed)
  k = min(256, max(8, width // 2))
  shared = rng.standard_normal((width, k))
  blocks = []
  for _ in range(num_models):
    rho = rng.uniform(0.3, 0.95, size=(width, 1))
    own = rng.standard_normal((width, k))
    blocks.append(rho * shared[rng.permutation(width)] + np.sqrt(1.0 - rho**2) * own)
  loadings = np.concatenate(blocks) / np.sqrt(k)
  cov = loadings @ loadings.T
  cov[np.diag_indices_from(cov)] += 0.25
  std = np.sqrt(np.diag(cov))
  corr = cov / std[:, None] / std[None, :]
  return np.clip(corr, -1.0, 1.0).astype(np.float32)


def _same_groups(a: match.Merge, b: match.Merge) -> bool:
  return bool(np.array_equal(a.M, b.M) and np.array_equal(a.U, b.U))


def _plain_loop_cost(width: int, num: int) -> float:
  """Work of the plain loop, up to a constant: merges times matrix size."""
  dim = num * width
  return float(dim - width) * dim * dim


def run(scale: str, *, progress: bool = False) -> common.Result:
  s = SETTINGS[scale]
  cases = [(w, n) for n in s.num_models for w in s.widths]
  rows: list[common.Row] = []
  fast_times: dict[tuple[int, float], dict[int, float]] = {}
  ref_times: dict[tuple[int, float], dict[int, float]] = {}
  skipped = []
  bar = common.progress_bar(cases, desc="greedy", enabled=progress)
  for width, num in bar:
    corr = feature_correlation(width, num, seed=width + num)
    for alpha in s.alphas:
      fast = match.greedy(alpha=alpha, beta=s.beta)
      run_ref = num * width <= s.reference_max_dim
      timing, merge = _time_greedy(fast, corr, num, s)
      t_fast = timing.median
      data = {"Om": width, "N": num, "alpha": alpha, "beta": s.beta, "dim": num * width,
              "greedy": timing.to_json()}
      identical = None
      if run_ref:
        ref_timing, ref_merge = _time_reference(corr, num, alpha, s)
        identical = _same_groups(merge, ref_merge)
        t_ref = ref_timing.median
        data["reference"] = ref_timing.to_json()
        data["extrapolated"] = False
        ref_times.setdefault((num, alpha), {})[width] = t_ref
        notes = "groups identical" if identical else "GROUPS DIFFER"
      else:
        t_ref, notes = _extrapolate(ref_times, width, num, alpha)
        data["extrapolated"] = t_ref is not None
        data["reference"] = None if t_ref is None else {"extrapolated": t_ref}
        skipped.append(f"Om={width} N={num} alpha={alpha:g}")
      data["identical"] = identical
      fast_times.setdefault((num, alpha), {})[width] = t_fast
      is_target = num == 2 and width == s.target_width and run_ref
      rows.append(common.Row(
          NAME, f"Om={width} N={num} alpha={alpha:g} beta={s.beta:g}", t_fast, BASELINE, t_ref,
          target=TARGET if is_target else None, notes=notes, data=data,
          checks_ok=identical if is_target else None))
  return _summarise(rows, fast_times, ref_times, skipped, s)


def _time_greedy(fast: match.Matcher, corr: np.ndarray, num: int,
                 s: Settings) -> tuple[common.Timing, match.Merge]:
  """Times greedy ``s.repeats`` times (fewer once ``s.budget_s`` is spent, more, up to 25,
  while all of them took under half a second, for a steadier median); its last merge."""
  times = []
  while len(times) < s.repeats or (sum(times) < 0.5 and len(times) < 25):
    start = time.perf_counter()
    merge = fast(corr, num_models=num)
    times.append(time.perf_counter() - start)
    if sum(times) >= s.budget_s:
      break
  return common.Timing(tuple(times)), merge


def _time_reference(corr: np.ndarray, num: int, alpha: float,
                    s: Settings) -> tuple[common.Timing, match.Merge]:
  """Times the plain loop: once (its groups are compared), then more where it is cheap."""
  def reference():
    return match.greedy_reference(corr, num_models=num, alpha=alpha, beta=s.beta)

  start = time.perf_counter()
  merge = reference()
  times = (time.perf_counter() - start,)
  if times[0] < 1.0 and s.reference_repeats > 1:
    times += common.time_calls({"ref": reference}, repeats=s.reference_repeats - 1,
                               warmup=0)["ref"].times
  return common.Timing(times), merge


def _extrapolate(ref_times: dict, width: int, num: int,
                 alpha: float) -> tuple[float | None, str]:
  """The plain loop's time at (width, num), from the largest measured case with the same N
  and alpha, scaled by its cost (N*Om - Om) * (N*Om)^2."""
  measured = ref_times.get((num, alpha), {})
  if not measured:
    return None, "plain loop skipped (nothing to extrapolate from)"
  w0 = max(measured)
  t = measured[w0] * _plain_loop_cost(width, num) / _plain_loop_cost(w0, num)
  return t, f"plain loop skipped: ~{common.fmt_seconds(t)} extrapolated from Om={w0}"


def _summarise(rows, fast_times, ref_times, skipped, s: Settings) -> common.Result:
  growth = {}
  remarks = []
  for (num, alpha), times in fast_times.items():
    widths = sorted(times)
    all_fit = common.loglog_slope(widths, [times[w] for w in widths])
    big = [w for w in widths if w >= 256]
    big_fit = common.loglog_slope(big, [times[w] for w in big]) if len(big) >= 2 else None
    ref = ref_times.get((num, alpha), {})
    ref_fit = common.loglog_slope(sorted(ref), [ref[w] for w in sorted(ref)])
    key = f"N={num} alpha={alpha:g}"
    growth[key] = {"all_widths": all_fit, "widths_ge_256": big_fit, "plain_loop": ref_fit,
                   "widths": widths}
    text = f"Growth exponent of greedy's time in Om (log-log slope), {key}: " + (
        f"{all_fit:.2f}" if all_fit is not None else "-") + f" over Om {widths[0]}..{widths[-1]}"
    if big_fit is not None:
      text += f", {big_fit:.2f} over Om >= 256"
    if ref_fit is not None:
      text += f" (plain loop: {ref_fit:.2f} over the Om it ran)"
    remarks.append(text + ".")
  if skipped:
    remarks.append("Plain loop not run (time extrapolated by (N*Om - Om)*(N*Om)^2 from the "
                   "largest measured Om of the same N and alpha; groups not compared): "
                   + ", ".join(skipped) + ".")
  target_rows = [r for r in rows if r.target is not None]
  if not target_rows:
    remarks.append(f"Target (Om={s.target_width}, N=2) not measured at this scale; run the "
                   "full suite.")
  summary = {"growth_exponent": growth, "skipped_plain_loop": skipped,
             "target": [{"case": r.case, "ratio": r.ratio, "identical": r.data["identical"],
                         "met": r.met} for r in target_rows]}
  return common.Result(rows, summary, remarks)

