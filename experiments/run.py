"""Runs one experiment end to end: train (or resume) the source models, merge them with every
method, evaluate, and write the paper's Table 1 layout and the partial-zip plot.

  python -m experiments.run --config experiments/configs/cifar10_resnet20x4_clip.py:local
  python -m experiments.run --config digits_default --set train.epochs=5 --set num_runs=1

``python -m experiments`` runs the embedded default (scikit-learn's digits, no download).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Sequence

import numpy as np

from experiments import configs as configs_lib
from experiments import data as data_lib
from experiments import evaluate as eval_lib
from experiments import train as train_lib

def methods_for(config: configs_lib.ExperimentConfig, num_models: int):
  """The Table 1 rows of one group, from the config's methods and stop points."""
  merge = config.merge
  return eval_lib.table_methods(num_models, methods=merge.methods,
                                stop_points=merge.stop_points, alpha=merge.alpha,
                                beta=merge.beta)


def class_embeddings(config: configs_lib.ExperimentConfig) -> np.ndarray | None:
  """(num_classes, D) CLIP-style class embeddings, or None for cross-entropy heads."""
  if config.head != "clip":
    return None
  if config.data.class_embeddings:
    _, emb = data_lib.load_class_embeddings(config.data.class_embeddings)
    return emb
  num_classes = config.split.num_classes if config.split else config.data.num_classes
  return data_lib.random_class_embeddings(num_classes, config.model.num_outputs, seed=0)


def run(config: configs_lib.ExperimentConfig, *, out_dir: str | None = None,
        progress: bool = True) -> tuple[list[eval_lib.Row], str]:
  """Runs ``config``; returns every row and the Markdown table (also written to out_dir)."""
  configs_lib.validate(config)
  if len(config.datasets) > 1:
    raise NotImplementedError(
        f"{config.name}: merging models trained on different datasets needs per-task test sets; "
        "the runner handles class-split experiments (one dataset) so far.")
  out_dir = out_dir or config.output_dir
  os.makedirs(out_dir, exist_ok=True)
  model, spec = config.model.build()
  emb = class_embeddings(config)
  classes_all = sorted({int(c) for r in range(config.num_runs) for t in config.tasks(r)
                        for c in t})
  train_set, test_set = config.data.load(classes=classes_all)
  rows: list[eval_lib.Row] = []
  pair = 0
  for r in range(config.num_runs):
    tasks = config.tasks(r)
    sources = []
    for t, classes in enumerate(tasks):
      ckpt = os.path.join(out_dir, "checkpoints", f"run{r}_task{t}")
      t0 = time.perf_counter()
      variables = train_lib.train(
          model, train_set, classes, config.train_config(r, t),
          class_embeddings=None if emb is None else emb[classes], progress=progress,
          desc=f"run {r} model {t}", checkpoint_dir=ckpt)
      sources.append(variables)
      if progress:
        print(f"run {r}: model {t} on classes {list(map(int, classes))} ready in "
              f"{time.perf_counter() - t0:.0f}s", file=sys.stderr)
    for group in config.groups:
      group_classes = np.concatenate([tasks[t] for t in group])
      cal = config.calibration
      calibration = data_lib.calibration_batches(
          train_set.subset(group_classes), num_images=cal.num_images,
          batch_size=cal.batch_size, seed=cal.seed + r, augmentation=cal.augmentation)
      test = data_lib.EvalBatches(test_set.subset(group_classes), config.eval_batch_size)
      rows += eval_lib.evaluate_methods(
          spec, [sources[t] for t in group], tasks=[tasks[t] for t in group],
          calibration=calibration, test=test, methods=methods_for(config, len(group)),
          class_embeddings=emb, logit_scale=config.train.logit_scale, pair=pair,
          progress=progress)
      pair += 1
  md = eval_lib.write_table(rows, out_dir)
  if any(r.method.startswith("ZipIt! (partial") for r in rows):
    eval_lib.plot_partial(rows, spec, os.path.join(out_dir, "partial_zip.png"),
                          title=f"{config.name}: accuracy vs layers zipped")
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(_jsonable(config), f, indent=1, default=str)
  return rows, md


def _jsonable(obj):
  return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def main(argv: Sequence[str] | None = None, *, default: str = "digits_default") -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=default,
                      help="a config module name or path, optionally with :arg (e.g. :local)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a config field, e.g. --set train.epochs=3")
  parser.add_argument("--out", default=None, help="output folder (default: the config's)")
  parser.add_argument("--quiet", action="store_true", help="no progress bars")
  args = parser.parse_args(argv)
  config = configs_lib.override(configs_lib.load(args.config), *args.set)
  start = time.perf_counter()
  _, md = run(config, out_dir=args.out, progress=not args.quiet)
  out = args.out or config.output_dir
  print(f"\n{config.name}: {config.num_pairs} model group(s), "
        f"{time.perf_counter() - start:.0f}s\n")
  print(md)
  print(f"\nwritten: {out}/results.md, results.csv, results_rows.csv"
        + (", partial_zip.png" if os.path.exists(os.path.join(out, "partial_zip.png")) else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
