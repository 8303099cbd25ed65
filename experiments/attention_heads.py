"""How to merge attention heads: the candidates, on trained ViT pairs.

Every variant zips the pairs fully with ZipIt!'s greedy matcher within heads; they differ in
how the heads are paired across models (``zipjax.match.pair_groups``): on the correlation of
their attention maps (zipjax's default), on the similarity of the heads' queries and keys
and of their values together or of either alone, one to one across
models (a linear assignment: no two heads of one model merged), or not at all (head g with
head g); and against them attention left unmerged and Permute. Writes
``attention_heads.{csv,md}`` (every variant, mean ± std over pairs; each run's rows kept in
``attention_heads_runs/``, so that a variant added later is evaluated alone; delete them
when the source models are trained again):

  python -m experiments.attention_heads --config cifar10_vit_clip --runs 0,1 \\
      --checkpoints runs/cifar10_vit_clip/checkpoints --out experiments/results/cifar10_vit_clip
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Mapping, Sequence

import numpy as np

import zipjax
from . import configs as configs_lib
from . import evaluate as eval_lib
from . import run as run_lib
from zipjax import match


def pairing_merges(*, on: Sequence[str], heads: Callable | None = None,
                   matchers: Mapping[str, Callable] | None = None) -> Callable:
  """``merges(stats, spec, sources, calibration)``: greedy within heads, the heads of each
  attention layer paired by ``heads`` (default: the greedy matcher) on the similarity of the
  layer's spaces whose names end with one of ``on`` ("qk", "vo"), or with ``on=("maps",)`` on
  the correlation of the heads' attention maps (the statistics' ``FeatureStats.heads``, as
  ``zipjax.zip`` pairs them by default). ``matchers`` ({space name suffix: matcher}, e.g.
  ``{"stream": match.permute()}``) replaces greedy for the spaces whose names end with a
  key."""
  greedy = match.greedy()
  heads = heads or greedy
  matchers = dict(matchers or {})

  def matcher_of(name):
    return next((m for k, m in matchers.items() if name.endswith(k)), greedy)

  def merges(stats, spec, sources, calibration):
    del calibration  # everything is in the statistics
    num_models = len(sources)
    out = {}
    for name, s in stats.items():
      if spec.space(name).heads is None:
        out.update(zipjax.compute_merges({name: s}, num_models=num_models,
                                         matcher=matcher_of(name), spec=spec))
    layers = {}
    for name in stats:
      if spec.space(name).heads is not None:
        layers.setdefault(spec.space(name).heads, []).append(name)
    for names in layers.values():
      corr = {n: np.asarray(zipjax.correlation(stats[n])) for n in names}
      groups = spec.space(names[0]).groups
      if on == ("maps",):
        maps = next(stats[n].heads for n in names if stats[n].heads is not None)
        pairing = match.pair_groups(heads, num_models=num_models, groups=groups,
                                    similarity=np.asarray(zipjax.correlation(maps)))
      else:
        pairing = match.pair_groups(heads, [corr[n] for n in names if n.endswith(tuple(on))],
                                    num_models=num_models, groups=groups)
      for n in names:
        out[n] = match.match_in_groups(matcher_of(n), corr[n], num_models=num_models,
                                       groups=groups, pairing=pairing)
    return out

  return merges


def variant_methods(num_models: int) -> list[eval_lib.Method]:
  """The sources, every variant (a full zip), the ensemble."""
  names = "ABCDEFGH"
  out = [eval_lib.Method(f"Model {names[m]}", "source", index=m) for m in range(num_models)]
  out += [
      eval_lib.Method("heads paired on Q/K and V/O", "merge", match.greedy(),
                      pair_heads="features"),
      eval_lib.Method("heads paired on attention maps (default)", "merge", match.greedy()),
      eval_lib.Method("heads paired on Q/K", "merge", merges=pairing_merges(on=("qk",))),
      eval_lib.Method("heads paired on V/O", "merge", merges=pairing_merges(on=("vo",))),
      eval_lib.Method("heads paired one to one (permute)", "merge",
                      merges=pairing_merges(on=("qk", "vo"), heads=match.permute())),
      eval_lib.Method("heads paired on attention maps, one to one", "merge",
                      merges=pairing_merges(on=("maps",), heads=match.permute())),
      eval_lib.Method("heads paired on attention maps, residual stream by permute", "merge",
                      merges=pairing_merges(on=("maps",), matchers={"stream": match.permute()})),
      eval_lib.Method("heads in place", "merge", match.greedy(), attention="in_place"),
      eval_lib.Method("residual stream by permute, the rest greedy", "merge",
                      merges=pairing_merges(on=("qk", "vo"),
                                            matchers={"stream": match.permute()})),
      eval_lib.Method("residual stream greedy, the rest by permute", "merge",
                      merges=pairing_merges(on=("qk", "vo"), heads=match.permute(),
                                            matchers={"qk": match.permute(),
                                                      "vo": match.permute(),
                                                      "mlp": match.permute()})),
      eval_lib.Method("greedy, beta 0.25", "merge", match.greedy(beta=0.25),
                      pair_heads="features"),
      eval_lib.Method("Permute, heads paired on Q/K and V/O", "merge", match.permute(),
                      pair_heads="features"),
      eval_lib.Method("Permute, heads paired on attention maps", "merge", match.permute()),
      eval_lib.Method("attention unmerged", "merge", match.greedy(), attention="unmerged"),
      eval_lib.Method("Ensemble", "ensemble"),
  ]
  return out


def _selected(methods: list[eval_lib.Method], only: str | None) -> list[eval_lib.Method]:
  if not only:
    return methods
  parts = only.split(",")
  return [m for m in methods if m.kind != "merge" or any(p in m.name for p in parts)]


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="cifar10_vit_clip")
  parser.add_argument("--runs", default="0,1", help="comma-separated runs (pairs) to merge")
  parser.add_argument("--checkpoints", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  parser.add_argument("--only", default=None,
                      help="comma-separated parts of variant names: run only those (and the "
                      "source models and the ensemble)")
  parser.add_argument("--name", default="attention_heads",
                      help="the table's name: OUT/NAME.{md,csv} and OUT/NAME_rows.csv")
  args = parser.parse_args(argv)
  config = configs_lib.override(configs_lib.load(args.config), *args.set)
  exp = run_lib.prepare(config)
  methods = _selected(variant_methods(len(config.groups[0])), args.only)
  rows = run_lib.evaluate_runs(config, exp, [int(x) for x in args.runs.split(",")], methods,
                               checkpoints=args.checkpoints,
                               done=os.path.join(args.out, "attention_heads_runs"))
  print(eval_lib.write_table(rows, args.out, name=args.name))
  return 0


if __name__ == "__main__":
  sys.exit(main())
