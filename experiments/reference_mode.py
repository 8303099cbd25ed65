"""The reference mode against zipjax's default on trained pairs, and the variations between.

Each variant changes one thing at a time between ``zipjax.zip``'s default and its reference
mode (``mode="official"``, the official ZipIt! merges): the matcher's alpha and beta, where a
residual stream's features are taken (after every block, or once where its stage ends), and
the matcher's budget rule. Each is merged fully and at every stop point of the config, on
the pairs of ``--runs`` (their source models restored from ``--checkpoints``, or trained
there; each run's rows kept in ``reference_vs_default_runs/``, so that what was evaluated
before is not evaluated again). Written: ``reference_vs_default.{csv,md}`` (every method,
mean ± std over pairs), ``reference_vs_default_avg.md`` (average per-task accuracy, variants
by stop) and ``reference_vs_default_pairs.md`` (each variant in each pair, the best in bold).
With ``--alpha-beta A/B`` the default at that alpha and beta is one more variant: choose it
on a held-out pair (``python -m experiments.sweeps --sweep alpha_beta``), read it on the
others:

  python -m experiments.reference_mode --config cifar10_resnet20x1_clip --runs 0,1,2 \\
      --alpha-beta 0.7/1 --checkpoints experiments/results/cifar10_resnet20x1_clip/training \\
      --out experiments/results/cifar10_resnet20x1_clip
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from . import configs as configs_lib
from . import evaluate as eval_lib
from . import run as run_lib
from . import sweeps
from zipjax import match

#: name -> (matcher factory, capture, mode).
VARIANTS = {
    "default": (match.greedy, "every", "zipjax"),
    "default, last captures": (match.greedy, "last", "zipjax"),
    "default, official alpha/beta": (lambda: match.greedy(alpha=0.3, beta=0.125), "every",
                                     "zipjax"),
    "official matcher, every capture": (match.official, "every", "zipjax"),
    "reference mode": (match.official, "last", "official"),
}


def variants(alpha_beta: tuple[float, float] | None = None) -> dict:
  """:data:`VARIANTS`, and with ``alpha_beta`` the default at that alpha and beta (chosen on
  a held-out pair by ``python -m experiments.sweeps --sweep alpha_beta``)."""
  out = dict(VARIANTS)
  if alpha_beta is not None:
    a, b = (float(v) for v in alpha_beta)
    out[f"default, alpha/beta {a:g}/{b:g}"] = (lambda: match.greedy(alpha=a, beta=b), "every",
                                               "zipjax")
  return out


def variant_methods(num_models: int, stop_points: Sequence[str | None],
                    chosen: dict | None = None) -> list[eval_lib.Method]:
  """The sources, every variant of ``chosen`` (default :data:`VARIANTS`) at every stop point
  (None: the full zip), the ensemble."""
  names = "ABCDEFGH"
  out = [eval_lib.Method(f"Model {names[m]}", "source", index=m) for m in range(num_models)]
  for variant, (factory, capture, mode) in (chosen or VARIANTS).items():
    for stop in stop_points:
      out.append(eval_lib.Method(f"{variant} ({stop or 'full'})", "merge", factory(),
                                 stop_at=stop, mode=mode, capture=capture))
  out.append(eval_lib.Method("Ensemble", "ensemble"))
  return out


def average_table(rows: Sequence[eval_lib.Row], stop_points: Sequence[str | None],
                  chosen: dict | None = None) -> str:
  """Markdown: average per-task accuracy (mean ± std over pairs), a variant of ``chosen``
  (default :data:`VARIANTS`) per row."""
  summary = {e["method"]: e for e in eval_lib.summarise(rows)}
  stops = [s or "full" for s in stop_points]
  lines = ["| variant | " + " | ".join(stops) + " |", "|---|" + "---|" * len(stops)]
  for variant in (chosen or VARIANTS):
    cells = [eval_lib._fmt(summary[f"{variant} ({s})"]["avg"]) for s in stops]  # pylint: disable=protected-access
    lines.append(f"| {variant} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def pair_table(rows: Sequence[eval_lib.Row], chosen: dict | None = None, *,
               stop: str | None = None, metric: str = "joint") -> str:
  """Markdown: ``metric`` ("joint" or "avg", in %) of each variant of ``chosen`` (default
  :data:`VARIANTS`) zipped up to ``stop`` (None: fully), a column per pair, and the best
  variant of each pair in bold: whether a variant wins in every pair or on average only."""
  label = stop or "full"
  pairs = sorted({r.pair for r in rows})
  value = {(r.method, r.pair): 100 * (r.joint if metric == "joint" else r.task_avg)
           for r in rows}
  variants_ = list(chosen or VARIANTS)
  best = {p: max(variants_, key=lambda v, p=p: value[(f"{v} ({label})", p)]) for p in pairs}
  lines = [f"| {metric}, {label} | " + " | ".join(f"pair {p}" for p in pairs) + " |",
           "|---|" + "---|" * len(pairs)]
  for v in variants_:
    cells = [(f"**{value[(f'{v} ({label})', p)]:.1f}**" if best[p] == v
              else f"{value[(f'{v} ({label})', p)]:.1f}") for p in pairs]
    lines.append(f"| {v} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="cifar10_resnet20x1_clip")
  parser.add_argument("--runs", default="0", help="comma-separated runs (pairs) to merge")
  parser.add_argument("--checkpoints", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--alpha-beta", default=None, metavar="ALPHA/BETA",
                      help="add the default at this alpha and beta (e.g. chosen on a held-out "
                           "pair with python -m experiments.sweeps --sweep alpha_beta)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  args = parser.parse_args(argv)
  alpha_beta = sweeps.parse_values("alpha_beta", args.alpha_beta) if args.alpha_beta else [None]
  if len(alpha_beta) != 1:
    parser.error(f"--alpha-beta takes one ALPHA/BETA pair, got {args.alpha_beta!r}.")
  chosen = variants(alpha_beta[0])
  config = configs_lib.override(configs_lib.load(args.config), *args.set)
  exp = run_lib.prepare(config)
  stops = config.merge.stop_points
  rows = run_lib.evaluate_runs(config, exp, [int(x) for x in args.runs.split(",")],
                               variant_methods(len(config.groups[0]), stops, chosen),
                               checkpoints=args.checkpoints,
                               done=os.path.join(args.out, "reference_vs_default_runs"))
  eval_lib.write_table(rows, args.out, name="reference_vs_default")
  avg = average_table(rows, stops, chosen)
  with open(os.path.join(args.out, "reference_vs_default_avg.md"), "w") as f:
    f.write(avg + "\n")
  per_pair = "\n\n".join(pair_table(rows, chosen, stop=stop, metric=metric)
                         for metric in ("joint", "avg") for stop in stops)
  with open(os.path.join(args.out, "reference_vs_default_pairs.md"), "w") as f:
    f.write(per_pair + "\n")
  print(avg + "\n\n" + per_pair)
  return 0


if __name__ == "__main__":
  sys.exit(main())
