"""The paper's analysis sweeps over one experiment's source models: Fig. 8 (ZipIt!'s
same-model budget beta), Fig. 9 (model width), Fig. 10 (amount of calibration data, with and
without augmentation) and Table 4 (matching algorithms, with their matching time); and the
search of ZipIt!'s alpha and beta on a grid, which the paper runs on a held-out pair (Sec. 5:
"we hold one split out for hyperparameter search and report mean and standard deviation on
the rest"; ``--set num_runs=1`` keeps the first pair only).

  python -m experiments.sweeps --config cifar10_resnet20x1_sweeps --sweep beta --out DIR
  python -m experiments.sweeps --config cifar10_resnet20x1_sweeps --sweep matchers --out DIR
  python -m experiments.sweeps --config cifar10_resnet20x1_sweeps --sweep calibration --out DIR
  python -m experiments.sweeps --config cifar10_resnet20x1_sweeps --sweep width \\
      --values 0.5,1,2 --out DIR
  python -m experiments.sweeps --config digits_default:local --sweep beta --out runs/sweep_beta
  python -m experiments.sweeps --config cifar10_resnet20x1_clip --sweep alpha_beta \\
      --set num_runs=1 --checkpoints experiments/results/cifar10_resnet20x1_clip/training \\
      --out experiments/results/cifar10_resnet20x1_clip/alpha_beta

Every sweep trains (or restores) the config's source models with the runner's steps
(``experiments.run``): run r's models are checkpointed in ``CHECKPOINTS/run{r}_task{t}``
(default ``OUT/checkpoints``; the width sweep uses ``CHECKPOINTS/width{w}/run{r}_task{t}``),
so the beta, calibration and matcher sweeps share one set of trained models, and a sweep
pointed at the checkpoints of ``python -m experiments.run`` (``--checkpoints``) trains nothing.
Protocol as in Table 1: every model, the sources included, has its BatchNorm statistics reset
on the calibration images; accuracies are mean ± std over the config's model pairs.

Outputs in OUT: ``{sweep}.md`` / ``{sweep}.csv`` (mean ± std per value and method),
``{sweep}_rows.csv`` (every pair), ``{sweep}.png`` and ``config.json``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from . import configs as configs_lib
from . import evaluate as eval_lib
from . import run as run_lib
from zipjax import match

SWEEPS = ("beta", "width", "calibration", "matchers", "alpha_beta")

DEFAULT_VALUES: dict[str, tuple] = {
    "beta": (0.0, 0.25, 0.5, 0.75, 1.0),
    "width": (0.5, 1.0, 2.0),
    "calibration": (8, 32, 128, 512, 2000),
    "matchers": ("identity", "permute", "kmeans", "optimal", "greedy_noalpha", "greedy",
                 "greedy_alpha1"),
    "alpha_beta": tuple((a, b) for a in (0.1, 0.3, 0.5, 0.7, 1.0)
                        for b in (0.0, 0.125, 0.25, 0.5, 1.0)),
}
"""The swept values when ``--values`` is not given."""

VALUE_LABEL = {"beta": "beta", "width": "width", "calibration": "images",
               "matchers": "matcher", "alpha_beta": "alpha/beta"}


def matcher_by_name(name: str, *, alpha: float = 0.5, beta: float = 0.5
                    ) -> tuple[str, Any]:
  """(table label, matcher) for a Table 4 row name."""
  table = {
      "identity": ("Identity (W.Avg)", match.identity),
      "permute": ("Permute", match.permute),
      "kmeans": ("K-Means", match.kmeans),
      "optimal": ("Optimal (zip)", match.optimal),
      # alpha -> 0: a merged feature is (almost) never matched again: plain greedy pairing.
      "greedy_noalpha": (f"Greedy (zip, alpha→0, beta={beta:g})",
                         lambda: match.greedy(alpha=1e-6, beta=beta)),
      "greedy": (f"Greedy (zip, alpha={alpha:g}, beta={beta:g})",
                 lambda: match.greedy(alpha=alpha, beta=beta)),
      "greedy_alpha1": (f"Greedy (zip, alpha=1, beta={beta:g})",
                        lambda: match.greedy(alpha=1.0, beta=beta)),
      "git_rebasin": ("Git Re-Basin (weights)", match.weight_matching),
  }
  if name not in table:
    raise ValueError(f"Unknown matcher {name!r}; known: {sorted(table)}.")
  label, factory = table[name]
  return label, factory()


@dataclasses.dataclass(frozen=True)
class Record:
  """One model of one pair at one sweep value."""

  sweep: str
  value: Any
  row: eval_lib.Row


def _pairs(config: configs_lib.ExperimentConfig, exp: run_lib.Experiment, *,
           checkpoints: str | None, progress: bool):
  """Yields (pair index, run index, group, sources of the group, tasks of the group)."""
  pair = 0
  for r in range(config.num_runs):
    tasks = config.tasks(r)
    sources = run_lib.train_sources(config, exp, r, checkpoints=checkpoints, progress=progress)
    for group in config.groups:
      yield pair, r, group, [sources[t] for t in group], [tasks[t] for t in group]
      pair += 1


def _variant_records(sweep: str, config, exp, variants_of, *, checkpoints, progress,
                     calibrations=(None,)) -> list[Record]:
  out = []
  for pair, r, group, sources, tasks in _pairs(config, exp, checkpoints=checkpoints,
                                               progress=progress):
    for cal in calibrations:
      calibration, test = run_lib.group_data(config, exp, r, group, calibration=cal)
      results = eval_lib.evaluate_matchers(
          exp.spec, sources, tasks=tasks, calibration=calibration, test=test,
          variants=variants_of(cal), class_embeddings=exp.class_embeddings,
          logit_scale=config.train.logit_scale, pair=pair, progress=progress)
      out += [Record(sweep, v.value, row) for v, row in results]
  return out


def sweep_beta(config: configs_lib.ExperimentConfig, *, values: Sequence[float],
               stop_points: Sequence[str | None] = (None,), checkpoints: str | None = None,
               progress: bool = True) -> list[Record]:
  """Fig. 8: ZipIt! (greedy, the config's alpha) at each same-model budget beta, fully
  zipped and at each partial ``stop_points``."""
  return _greedy_sweep("beta", config, [(float(b), config.merge.alpha, b) for b in values],
                       stop_points=stop_points, checkpoints=checkpoints, progress=progress)


def _greedy_sweep(sweep: str, config, points, *, stop_points, checkpoints, progress
                  ) -> list[Record]:
  """ZipIt! (greedy) at each (value, alpha, beta) of ``points``, at each stop point."""
  exp = run_lib.prepare(config)

  def variants(_):
    return [eval_lib.Variant(value, _zip_name(stop),
                             match.greedy(alpha=float(a), beta=float(b)), stop)
            for value, a, b in points for stop in stop_points]

  return _variant_records(sweep, config, exp, variants, checkpoints=checkpoints,
                          progress=progress)


def sweep_alpha_beta(config: configs_lib.ExperimentConfig, *,
                     values: Sequence[tuple[float, float]],
                     stop_points: Sequence[str | None] = (None,),
                     checkpoints: str | None = None, progress: bool = True) -> list[Record]:
  """ZipIt! (greedy) at each (alpha, beta) of ``values``, fully zipped and at each partial
  ``stop_points``; the feature statistics are computed once per pair. Pick the best value
  with :func:`best_value` on a held-out pair and report it on the others."""
  return _greedy_sweep("alpha_beta", config,
                       [((float(a), float(b)), a, b) for a, b in values],
                       stop_points=stop_points, checkpoints=checkpoints, progress=progress)


def best_value(records: Sequence[Record], *, method: str = "ZipIt! (full)",
               metric: str = "joint") -> tuple[Any, tuple[float, float]]:
  """The swept value whose ``method`` has the highest mean ``metric`` ("joint" or "avg")
  over the records' pairs, and that (mean, std) in percent; the first such value on a tie.

  Raises:
    ValueError: no record of ``method``.
  """
  best = None
  for e in summarise(records):
    if e["method"] == method and (best is None or e[metric][0] > best[1][0]):
      best = (e["value"], e[metric])
  if best is None:
    raise ValueError(f"No record of {method!r}; methods: "
                     f"{sorted({r.row.method for r in records})}.")
  return best


def _zip_name(stop: str | None) -> str:
  return "ZipIt! (full)" if stop is None else f"ZipIt! (partial, {stop})"


def sweep_matchers(config: configs_lib.ExperimentConfig, *, values: Sequence[str],
                   checkpoints: str | None = None, progress: bool = True) -> list[Record]:
  """Table 4: full zips with each matching algorithm; ``seconds`` is the time of the matcher
  calls over every space (the feature statistics are computed once, not timed)."""
  exp = run_lib.prepare(config)
  chosen = [matcher_by_name(v, alpha=config.merge.alpha, beta=config.merge.beta)
            for v in values]

  def variants(_):
    return [eval_lib.Variant(label, label, m, None) for label, m in chosen]

  return _variant_records("matchers", config, exp, variants, checkpoints=checkpoints,
                          progress=progress)


def sweep_calibration(config: configs_lib.ExperimentConfig, *, values: Sequence[int],
                      augmentations: Sequence[bool] = (False, True),
                      checkpoints: str | None = None, progress: bool = True) -> list[Record]:
  """Fig. 10: ZipIt! (full) and Permute against the number of calibration images (drawn
  with the config's seed: smaller sets are prefixes of larger ones, before augmentation),
  with and without augmentation."""
  exp = run_lib.prepare(config)
  base = config.calibration
  cals = [dataclasses.replace(base, num_images=int(n), batch_size=min(base.batch_size, int(n)),
                              augmentation=aug)
          for aug in augmentations for n in values]
  zipit = match.greedy(alpha=config.merge.alpha, beta=config.merge.beta)
  permute = match.permute()

  def variants(cal):
    suffix = ", augmented" if cal.augmentation else ""
    return [eval_lib.Variant(cal.num_images, f"ZipIt! (full){suffix}", zipit),
            eval_lib.Variant(cal.num_images, f"Permute{suffix}", permute)]

  return _variant_records("calibration", config, exp, variants, checkpoints=checkpoints,
                          progress=progress, calibrations=cals)


def sweep_width(config: configs_lib.ExperimentConfig, *, values: Sequence[float],
                checkpoints: str, progress: bool = True) -> list[Record]:
  """Fig. 9: at each model width multiplier, new source models (trained or restored from
  ``checkpoints/width{w}``) and the Table 1 rows: each source, W.Avg, Permute, ZipIt! (full)
  and the ensemble. ``seconds`` is the build time (statistics + matching + BatchNorm reset)."""
  out = []
  exp0 = None
  for w in values:
    cw = configs_lib.validate(dataclasses.replace(
        config, model=dataclasses.replace(config.model, width=float(w))))
    if exp0 is None:
      exp0 = run_lib.prepare(cw)
    model, spec = cw.model.build()
    exp = dataclasses.replace(exp0, model=model, spec=spec)
    for pair, r, group, sources, tasks in _pairs(
        cw, exp, checkpoints=os.path.join(checkpoints, f"width{float(w):g}"),
        progress=progress):
      calibration, test = run_lib.group_data(cw, exp, r, group)
      methods = eval_lib.table_methods(
          len(group), methods=("ensemble", "weight_avg", "permute", "zipit"),
          alpha=cw.merge.alpha, beta=cw.merge.beta)
      rows = eval_lib.evaluate_methods(
          spec, sources, tasks=tasks, calibration=calibration, test=test,
          methods=methods,
          class_embeddings=exp.class_embeddings, logit_scale=cw.train.logit_scale,
          pair=pair, progress=progress)
      out += [Record("width", float(w), row) for row in rows]
  return out


# ------------------------------------------------------------------------------------------
# Tables and plots.


def summarise(records: Sequence[Record]) -> list[dict[str, Any]]:
  """Mean ± std over pairs per (value, method), in first-seen order."""
  keys = list(dict.fromkeys((r.value, r.row.method) for r in records))
  out = []
  for value, method in keys:
    rows = [r.row for r in records if r.value == value and r.row.method == method]
    entry = eval_lib.summarise(rows)[0]
    out.append({"value": value, **entry})
  return out


def _value_str(value) -> str:
  if isinstance(value, tuple):
    return "/".join(_value_str(v) for v in value)
  return f"{value:g}" if isinstance(value, float) else str(value)


def write_sweep(records: Sequence[Record], out_dir: str, sweep: str) -> str:
  """Writes ``{sweep}_rows.csv``, ``{sweep}.csv`` and ``{sweep}.md``; returns the Markdown."""
  os.makedirs(out_dir, exist_ok=True)
  tasks = len(records[0].row.per_task)
  with open(os.path.join(out_dir, f"{sweep}_rows.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow([VALUE_LABEL[sweep], "method", "pair", "joint",
                *[f"task{t}" for t in range(tasks)], "avg", "gflops", "seconds"])
    for rec in records:
      r = rec.row
      w.writerow([_value_str(rec.value), r.method, r.pair, f"{r.joint:.5f}",
                  *[f"{a:.5f}" for a in r.per_task], f"{r.task_avg:.5f}", f"{r.gflops:.6g}",
                  f"{r.seconds:.4f}"])
  summary = summarise(records)
  seconds = "Build s" if sweep == "width" else "Match s"
  keys = [k for k in summary[0] if k not in ("pairs",)]
  if sweep == "matchers":
    keys.remove("value")
  with open(os.path.join(out_dir, f"{sweep}.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow([VALUE_LABEL[sweep] if k == "value" else k for k in keys] + ["pairs"])
    for e in summary:
      w.writerow([(f"{e[k][0]:.2f} ± {e[k][1]:.2f}" if isinstance(e[k], tuple)
                   else _value_str(e[k])) for k in keys] + [e["pairs"]])
  header = {"value": VALUE_LABEL[sweep], "method": "Method", "gflops": "FLOPs/img",
            "joint": "Joint", "avg": "Avg", "seconds": seconds}
  lines = ["| " + " | ".join(header.get(k, k.replace("task", "Task ")) for k in keys) + " |",
           "|" + "---|" * len(keys)]
  for e in summary:
    cells = []
    for k in keys:
      v = e[k]
      if k == "value":
        cells.append(_value_str(v))
      elif k == "seconds":
        cells.append(f"{v:.3g}")
      elif k == "gflops":
        cells.append(eval_lib.format_flops(v))
      else:
        cells.append(eval_lib._fmt(v))  # pylint: disable=protected-access
    lines.append("| " + " | ".join(cells) + " |")
  md = "\n".join(lines)
  with open(os.path.join(out_dir, f"{sweep}.md"), "w") as f:
    f.write(md + "\n")
  return md


def plot_sweep(records: Sequence[Record], path: str, sweep: str, *, title: str = "") -> None:
  """Joint and per-task average accuracy (mean ± std over pairs) against the swept value,
  one line per method; the matcher sweep as bars, with each matcher's time."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  summary = summarise(records)
  methods = list(dict.fromkeys(e["method"] for e in summary))
  if sweep == "alpha_beta":
    _plot_grid(plt, summary, path, title or sweep)
    return
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  if sweep == "matchers":
    xs = np.arange(len(summary))
    for ax, metric, name in ((axes[0], "joint", "joint"), (axes[1], "avg", "per-task avg")):
      mean = [e[metric][0] for e in summary]
      std = [e[metric][1] for e in summary]
      ax.bar(xs, mean, yerr=std, capsize=3, color="tab:blue", alpha=0.8)
      ax.set_xticks(xs, [e["method"] for e in summary], rotation=30, ha="right", fontsize=8)
      ax.set_title(f"{name} accuracy")
      for x, e, m, sd in zip(xs, summary, mean, std):
        ax.text(x, m + sd + 0.8, f"{e['seconds']:.2g}s", ha="center", fontsize=7)
    axes[0].set_ylabel("accuracy (%)  (labels: matching time)")
  else:
    for ax, metric, name in ((axes[0], "joint", "joint"), (axes[1], "avg", "per-task avg")):
      for method in methods:
        es = [e for e in summary if e["method"] == method]
        xs = [float(e["value"]) for e in es]
        ax.errorbar(xs, [e[metric][0] for e in es], yerr=[e[metric][1] for e in es],
                    fmt="o-" if "ZipIt" in method else "s--", capsize=3, label=method)
      ax.set_title(f"{name} accuracy")
      ax.set_xlabel({"beta": "same-model merge budget beta", "width": "width multiplier",
                     "calibration": "calibration images"}[sweep])
      if sweep in ("calibration", "width"):
        ax.set_xscale("log", base=2 if sweep == "width" else 10)
        vals = sorted({float(e["value"]) for e in summary})
        ax.set_xticks(vals, [_value_str(v) for v in vals])
      ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize=7, loc="best")
  fig.suptitle(title or sweep)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _plot_grid(plt, summary, path: str, title: str) -> None:
  """Heat maps of the alpha/beta grid: joint and per-task average accuracy of each method."""
  methods = list(dict.fromkeys(e["method"] for e in summary))
  alphas = sorted({e["value"][0] for e in summary})
  betas = sorted({e["value"][1] for e in summary})
  fig, axes = plt.subplots(len(methods), 2, figsize=(10, 3.8 * len(methods)), squeeze=False)
  for row, method in enumerate(methods):
    by = {e["value"]: e for e in summary if e["method"] == method}
    for ax, metric, name in ((axes[row, 0], "joint", "joint"), (axes[row, 1], "avg", "per-task avg")):
      grid = np.full((len(alphas), len(betas)), np.nan)
      for (a, b), e in by.items():
        grid[alphas.index(a), betas.index(b)] = e[metric][0]
      im = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
      for i in range(len(alphas)):
        for j in range(len(betas)):
          if np.isfinite(grid[i, j]):
            ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=8,
                    color="white" if grid[i, j] < np.nanmean(grid) else "black")
      ax.set_xticks(range(len(betas)), [_value_str(b) for b in betas])
      ax.set_yticks(range(len(alphas)), [_value_str(a) for a in alphas])
      ax.set_xlabel("same-model budget beta")
      ax.set_ylabel("alpha")
      ax.set_title(f"{method}: {name} accuracy (%)", fontsize=9)
      fig.colorbar(im, ax=ax)
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ------------------------------------------------------------------------------------------
# Entry point.


def parse_values(sweep: str, text: str | None) -> tuple:
  if not text:
    return DEFAULT_VALUES[sweep]
  parts = [p.strip() for p in text.split(",") if p.strip()]
  if sweep == "matchers":
    return tuple(parts)
  if sweep == "calibration":
    return tuple(int(p) for p in parts)
  if sweep == "alpha_beta":
    out = []
    for p in parts:
      a, slash, b = p.partition("/")
      if not slash:
        raise ValueError(f"alpha_beta values are ALPHA/BETA pairs (e.g. 0.3/0.125), got {p!r}.")
      out.append((float(a), float(b)))
    return tuple(out)
  return tuple(float(p) for p in parts)


def run_sweep(config: configs_lib.ExperimentConfig, sweep: str, *,
              values: Sequence[Any] | None = None, out_dir: str | None = None,
              checkpoints: str | None = None, stop_points: Sequence[str | None] = (None,),
              progress: bool = True) -> tuple[list[Record], str]:
  """Runs one sweep and writes its table and plot to ``out_dir``; returns the records and
  the Markdown table."""
  if sweep not in SWEEPS:
    raise ValueError(f"Unknown sweep {sweep!r}; one of {SWEEPS}.")
  if len(config.datasets) > 1:
    raise NotImplementedError(
        f"{config.name}: the sweeps run on class-split experiments (one dataset); run "
        "multi-dataset configs with python -m experiments.run.")
  values = tuple(values) if values is not None else DEFAULT_VALUES[sweep]
  out_dir = out_dir or os.path.join(config.output_dir, f"sweep_{sweep}")
  checkpoints = checkpoints or os.path.join(out_dir, "checkpoints")
  if sweep == "beta":
    records = sweep_beta(config, values=values, stop_points=stop_points,
                         checkpoints=checkpoints, progress=progress)
  elif sweep == "matchers":
    records = sweep_matchers(config, values=values, checkpoints=checkpoints, progress=progress)
  elif sweep == "alpha_beta":
    records = sweep_alpha_beta(config, values=values, stop_points=stop_points,
                               checkpoints=checkpoints, progress=progress)
  elif sweep == "calibration":
    records = sweep_calibration(config, values=values, checkpoints=checkpoints,
                                progress=progress)
  else:
    records = sweep_width(config, values=values, checkpoints=checkpoints, progress=progress)
  md = write_sweep(records, out_dir, sweep)
  plot_sweep(records, os.path.join(out_dir, f"{sweep}.png"), sweep,
             title=f"{config.name}: {dict(beta='Fig. 8, beta', width='Fig. 9, width', calibration='Fig. 10, calibration data', matchers='Table 4, matching algorithms', alpha_beta='alpha and beta')[sweep]}"
             f" ({config.num_pairs} pair{'s' if config.num_pairs > 1 else ''})")
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump({"sweep": sweep, "values": list(values), "stop_points": list(stop_points),
               "config": dataclasses.asdict(config)}, f, indent=1, default=str)
  return records, md


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="digits_default",
                      help="a config module name or path, optionally with :arg (e.g. :local)")
  parser.add_argument("--sweep", required=True, choices=SWEEPS)
  parser.add_argument("--values", default=None,
                      help="comma-separated swept values (default: "
                           + "; ".join(f"{k}: {','.join(map(_value_str, v))}"
                                       for k, v in DEFAULT_VALUES.items())
                           + "; alpha_beta values are ALPHA/BETA pairs)")
  parser.add_argument("--stop-points", default="None",
                      help="beta and alpha_beta sweeps: comma-separated stop points, None = full zip "
                           "(e.g. None,stage2)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a config field, e.g. --set train.epochs=3")
  parser.add_argument("--out", default=None, help="output folder (default: the config's "
                      "output_dir/sweep_SWEEP)")
  parser.add_argument("--checkpoints", default=None,
                      help="source model checkpoints (default: OUT/checkpoints); e.g. the "
                           "runner's OUT/checkpoints to reuse its models")
  parser.add_argument("--quiet", action="store_true", help="no progress bars")
  args = parser.parse_args(argv)
  config = configs_lib.override(configs_lib.load(args.config), *args.set)
  stops = tuple(None if s.strip() in ("None", "none", "full") else s.strip()
                for s in args.stop_points.split(","))
  start = time.perf_counter()
  out = args.out or os.path.join(config.output_dir, f"sweep_{args.sweep}")
  records, md = run_sweep(config, args.sweep, values=parse_values(args.sweep, args.values),
                          out_dir=out, checkpoints=args.checkpoints, stop_points=stops,
                          progress=not args.quiet)
  print(f"\n{config.name}: {args.sweep} sweep, {run_lib.merged_groups(config)}, "
        f"{time.perf_counter() - start:.0f} s\n")
  print(md)
  if args.sweep == "alpha_beta":
    for metric in ("joint", "avg"):
      value, (mean, std) = best_value(records, metric=metric)
      print(f"best alpha/beta by ZipIt! (full) {metric} accuracy: {_value_str(value)} "
            f"({mean:.2f} ± {std:.2f})")
  print(f"\nwritten: {out}/{args.sweep}.md, {args.sweep}.csv, {args.sweep}_rows.csv, "
        f"{args.sweep}.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
