"""How to merge attention heads: the candidates, on trained ViT pairs.

Every variant zips the pairs fully with ZipIt!'s greedy matcher within heads; they differ in
how the heads are paired across models (``zipjax.match.pair_groups``): on the similarity of
the heads' queries and keys and of their values together (zipjax's default), on either
alone, one to one across models (a linear assignment: no two heads of one model merged), or
not at all (head g with head g); and against them attention left unmerged. Writes
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
  the correlation of the heads' attention maps (:func:`attention_maps`). ``matchers`` ({space name suffix:
  matcher}, e.g. ``{"stream": match.permute()}``) replaces greedy for the spaces whose names
  end with a key."""
  greedy = match.greedy()
  heads = heads or greedy
  matchers = dict(matchers or {})

  def matcher_of(name):
    return next((m for k, m in matchers.items() if name.endswith(k)), greedy)

  def merges(stats, spec, sources, calibration):
    num_models = len(sources)
    maps = attention_maps(spec, sources, calibration) if on == ("maps",) else None
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
      if maps is None:
        pairing = match.pair_groups(heads, [corr[n] for n in names if n.endswith(tuple(on))],
                                    num_models=num_models, groups=groups)
      else:  # the heads' attention maps, correlated like features
        pairing = np.asarray(heads(maps[spec.space(names[0]).heads],
                                   num_models=num_models).groups)
      for n in names:
        out[n] = match.match_in_groups(matcher_of(n), corr[n], num_models=num_models,
                                       groups=groups, pairing=pairing)
    return out

  return merges


def attention_maps(spec, sources, calibration) -> dict:
  """{attention layer: (N * h, N * h) correlation of the models' heads' attention maps} on the
  first calibration batch, from the layer's queries and keys (its query/key space's two
  captures, in that order)."""
  x = next(iter(calibration))
  x = x[0] if isinstance(x, tuple) else x
  maps = {}
  for variables in sources:
    feats = spec.features(variables, x)
    for s in spec.spaces:
      if s.heads is None or not s.name.endswith("qk"):
        continue
      q, k = (np.asarray(a, np.float64) for a in feats[s.name])
      b, t, width = q.shape
      q = q.reshape(b, t, s.groups, width // s.groups)
      k = k.reshape(b, t, s.groups, width // s.groups)
      logits = np.einsum("bqhd,bkhd->hbqk", q, k) / np.sqrt(width // s.groups)
      logits -= logits.max(-1, keepdims=True)
      weights = np.exp(logits)
      weights /= weights.sum(-1, keepdims=True)
      maps.setdefault(s.heads, []).append(weights.reshape(s.groups, -1))
  return {layer: np.corrcoef(np.concatenate(m)) for layer, m in maps.items()}


def variant_methods(num_models: int) -> list[eval_lib.Method]:
  """The sources, every variant (a full zip), the ensemble."""
  names = "ABCDEFGH"
  out = [eval_lib.Method(f"Model {names[m]}", "source", index=m) for m in range(num_models)]
  out += [
      eval_lib.Method("heads paired on Q/K and V/O (default)", "merge", match.greedy()),
      eval_lib.Method("heads paired on Q/K", "merge", merges=pairing_merges(on=("qk",))),
      eval_lib.Method("heads paired on V/O", "merge", merges=pairing_merges(on=("vo",))),
      eval_lib.Method("heads paired one to one (permute)", "merge",
                      merges=pairing_merges(on=("qk", "vo"), heads=match.permute())),
      eval_lib.Method("heads paired on attention maps", "merge",
                      merges=pairing_merges(on=("maps",))),
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
      eval_lib.Method("greedy, beta 0.25", "merge", match.greedy(beta=0.25)),
      eval_lib.Method("Permute (heads and features one to one)", "merge", match.permute()),
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
