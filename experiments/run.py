"""Runs one experiment end to end: train (or resume) the source models, merge them with every
method, evaluate, and write the paper's Table 1 layout and the partial-zip plot.

  python -m experiments.run --config experiments/configs/cifar10_resnet20x4_clip.py:local
  python -m experiments.run --config digits_default --set train.epochs=5 --set num_runs=1

``python -m experiments`` runs the embedded default (scikit-learn's digits, no download).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from . import configs as configs_lib
from . import data as data_lib
from . import evaluate as eval_lib
from . import train as train_lib

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


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What every run of a config shares: the model, its spec, the class embeddings (None for
  'ce' heads) and the train and test sets of every class any run uses; where the tasks are
  different datasets, ``task_sets`` holds each task's (train, test) sets (and the train and
  test sets are the first task's)."""

  model: Any
  spec: Any
  class_embeddings: np.ndarray | None
  train_set: data_lib.Dataset
  test_set: data_lib.Dataset
  task_sets: tuple[tuple[data_lib.Dataset, data_lib.Dataset], ...] | None = None


def prepare(config: configs_lib.ExperimentConfig) -> Experiment:
  """Builds the model and loads the data of ``config``: one dataset split into class tasks,
  or one dataset per task."""
  configs_lib.validate(config)
  model, spec = config.model.build()
  if len(config.datasets) > 1:
    if config.head != "ce":
      raise NotImplementedError(
          f"{config.name}: models trained on different datasets are merged with 'ce' heads "
          f"(each using the first outputs of a shared head), got head={config.head!r}.")
    task_sets = tuple(d.load() for d in config.datasets)
    return Experiment(model, spec, None, task_sets[0][0], task_sets[0][1], task_sets)
  emb = class_embeddings(config)
  classes_all = sorted({int(c) for r in range(config.num_runs) for t in config.tasks(r)
                        for c in t})
  train_set, test_set = config.data.load(classes=classes_all)
  return Experiment(model, spec, emb, train_set, test_set)


def train_sources(config: configs_lib.ExperimentConfig, exp: Experiment, run_index: int, *,
                  checkpoints: str | None, progress: bool = True) -> list[Any]:
  """The source models of run ``run_index``, one per task: trained, or restored from
  ``checkpoints/run{r}_task{t}`` (None: no checkpoints)."""
  tasks = config.tasks(run_index)
  emb = exp.class_embeddings
  sources = []
  for t, classes in enumerate(tasks):
    ckpt = (None if checkpoints is None
            else os.path.join(checkpoints, f"run{run_index}_task{t}"))
    t0 = time.perf_counter()
    variables = train_lib.train(
        exp.model, exp.task_sets[t][0] if exp.task_sets else exp.train_set, classes, config.train_config(run_index, t),
        class_embeddings=None if emb is None else emb[classes], progress=progress,
        desc=f"run {run_index} model {t}", checkpoint_dir=ckpt)
    sources.append(variables)
    if progress:
      print(f"run {run_index}: model {t} on classes {list(map(int, classes))} ready in "
            f"{time.perf_counter() - t0:.0f}s", file=sys.stderr)
  return sources


def group_data(config: configs_lib.ExperimentConfig, exp: Experiment, run_index: int,
               group: Sequence[int], *,
               calibration: configs_lib.CalibrationConfig | None = None
               ) -> tuple[list[np.ndarray], data_lib.EvalBatches]:
  """(calibration batches, test batches) of the tasks in ``group`` of run ``run_index``;
  ``calibration`` replaces the config's calibration settings (for sweeps)."""
  tasks = config.tasks(run_index)
  cal = calibration or config.calibration
  if exp.task_sets is not None:  # the union of the group's datasets, labels offset
    offsets = _offsets(tasks, group)
    shares = np.diff(np.linspace(0, cal.num_images, len(group) + 1).round().astype(int))
    batches = []
    for t, share in zip(group, shares):
      batches += data_lib.calibration_batches(
          exp.task_sets[t][0], num_images=int(share), batch_size=cal.batch_size,
          seed=cal.seed + run_index, augmentation=cal.augmentation)
    test = _OffsetBatches([(data_lib.EvalBatches(exp.task_sets[t][1], config.eval_batch_size),
                            off) for t, off in zip(group, offsets)])
    return batches, test
  group_classes = np.concatenate([tasks[t] for t in group])
  batches = data_lib.calibration_batches(
      exp.train_set.subset(group_classes), num_images=cal.num_images,
      batch_size=cal.batch_size, seed=cal.seed + run_index, augmentation=cal.augmentation)
  test = data_lib.EvalBatches(exp.test_set.subset(group_classes), config.eval_batch_size)
  return batches, test


def group_tasks(config: configs_lib.ExperimentConfig, exp: Experiment, run_index: int,
                group: Sequence[int]) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
  """(each task's classes as labelled in ``group_data``'s test set, each task's columns of a
  shared head or None): class-split tasks keep their dataset's class indices; tasks that are
  different datasets are numbered one after the other, each using its head's first outputs."""
  tasks = config.tasks(run_index)
  if exp.task_sets is None:
    return [tasks[t] for t in group], None
  offsets = _offsets(tasks, group)
  return ([off + np.arange(len(tasks[t])) for t, off in zip(group, offsets)],
          [np.arange(len(tasks[t])) for t in group])


def _offsets(tasks: Sequence[np.ndarray], group: Sequence[int]) -> list[int]:
  sizes = [len(tasks[t]) for t in group]
  return [int(o) for o in np.cumsum([0] + sizes[:-1])]


class _OffsetBatches:
  """Re-iterable (x, y + offset) batches of several datasets' evaluation batches in turn."""

  def __init__(self, parts: Sequence[tuple[Any, int]]):
    self.parts = list(parts)

  def __iter__(self):
    for batches, offset in self.parts:
      for x, y in batches:
        yield x, np.asarray(y) + offset

  def __len__(self):
    return sum(len(b) for b, _ in self.parts)


def run(config: configs_lib.ExperimentConfig, *, out_dir: str | None = None,
        progress: bool = True, checkpoints: str | None = None, train_only: bool = False,
        done: str | None = None) -> tuple[list[eval_lib.Row], str]:
  """Runs ``config``; returns every row and the Markdown table (also written to out_dir).

  Source models are checkpointed in ``checkpoints`` (default ``out_dir/checkpoints``).
  ``train_only`` trains (or restores) every run's source models first and stops there: no
  merge, no table (the rows are empty and the table is ``""``). ``done``: keep each run's
  rows there and take them from there, as :func:`evaluate_runs` does.
  """
  exp = prepare(config)
  out_dir = out_dir or config.output_dir
  os.makedirs(out_dir, exist_ok=True)
  checkpoints = checkpoints or os.path.join(out_dir, "checkpoints")
  spec, emb = exp.spec, exp.class_embeddings
  rows: list[eval_lib.Row] = []
  if train_only:
    for r in range(config.num_runs):
      train_sources(config, exp, r, checkpoints=checkpoints, progress=progress)
    return [], ""
  pair = 0
  for r in range(config.num_runs):
    sources = None
    for g, group in enumerate(config.groups):
      def evaluate(methods, r=r, group=group, pair=pair):
        nonlocal sources
        if sources is None:
          sources = train_sources(config, exp, r, checkpoints=checkpoints, progress=progress)
        calibration, test = group_data(config, exp, r, group)
        group_task_classes, columns = group_tasks(config, exp, r, group)
        return eval_lib.evaluate_methods(
            spec, [sources[t] for t in group], tasks=group_task_classes,
            calibration=calibration, test=test, methods=methods, class_embeddings=emb,
            logit_scale=config.train.logit_scale, task_columns=columns, pair=pair,
            progress=progress)
      rows += _rows_of(done, config, r, g, methods_for(config, len(group)), pair, evaluate)
      pair += 1
  md = eval_lib.write_table(rows, out_dir)
  if any(r.method.startswith("ZipIt! (partial") for r in rows):
    eval_lib.plot_partial(rows, spec, os.path.join(out_dir, "partial_zip.png"),
                          title=f"{config.name}: accuracy vs layers zipped")
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(_jsonable(config), f, indent=1, default=str)
  return rows, md


def evaluate_runs(config: configs_lib.ExperimentConfig, exp: Experiment, runs: Sequence[int],
                  methods: Sequence[eval_lib.Method], *, checkpoints: str | None,
                  progress: bool = True, done: str | None = None) -> list[eval_lib.Row]:
  """``methods`` on the first group of each of ``runs`` (its source models restored from
  ``checkpoints``, or trained there), pairs numbered in the order of ``runs``: the loop of
  experiments that compare their own methods on a config's pairs.

  ``done``: a folder where each run's rows are kept once evaluated, and taken from by a later
  call with the same config, so that an evaluation spans several invocations as training
  does. A row is taken for the method that made it (same name, same matcher and options); a
  method added or changed since is evaluated alone and its row added to the others. Delete
  a file to evaluate its run again, or a method's line of it to evaluate that method again.
  """
  rows = []
  group = config.groups[0]
  for pair, r in enumerate(runs):
    def evaluate(todo, r=r, pair=pair):
      sources = train_sources(config, exp, r, checkpoints=checkpoints, progress=progress)
      calibration, test = group_data(config, exp, r, group)
      tasks, columns = group_tasks(config, exp, r, group)
      return eval_lib.evaluate_methods(
          exp.spec, [sources[t] for t in group], tasks=tasks, calibration=calibration,
          test=test, methods=todo, class_embeddings=exp.class_embeddings,
          logit_scale=config.train.logit_scale, task_columns=columns, pair=pair,
          progress=progress)
    rows += _rows_of(done, config, r, 0, methods, pair, evaluate)
  return rows


def _rows_path(done: str, config, run_index: int, group: int) -> str:
  """Where a run's group's rows are kept: named by a digest of the config, so that rows of
  another config are never taken; each row's method is checked by :func:`_method_digest`."""
  # A run's rows do not depend on how many runs there are: a table of 3 pairs takes those
  # of a table of 2.
  settings = {k: v for k, v in _jsonable(config).items() if k != "num_runs"}
  return os.path.join(done, f"run{run_index}_group{group}_{_digest(settings)}.csv")


def _method_digest(method: eval_lib.Method) -> str:
  """A digest of what a method does (its matcher by its name, which says its options), so
  that a kept row is taken only for the method that made it, not another of the same name."""
  fields = {f.name: _name_of(getattr(method, f.name)) for f in dataclasses.fields(method)}
  if fields["pair_heads"] == "attention":  # added later: at its default, rows kept before
    del fields["pair_heads"]               # it (models without attention) keep their digests
  return _digest(fields)


def _digest(obj) -> str:
  key = json.dumps(obj, sort_keys=True, default=str)
  return hashlib.sha256(key.encode()).hexdigest()[:12]


def _name_of(value):
  if not callable(value):
    return value
  return getattr(value, "__name__", None) or getattr(value, "name", None) or repr(value)


def _rows_of(done, config, run_index, group, methods, pair, evaluate) -> list[eval_lib.Row]:
  """A run's group's rows, one per method in the order of ``methods``: those kept in ``done``
  by the same method (renumbered as ``pair``), the others from ``evaluate(missing methods)``,
  then all kept (the rows of methods not asked for this time too)."""
  if done is None:
    return evaluate(methods)
  path = _rows_path(done, config, run_index, group)
  digests_path = path[:-len(".csv")] + ".methods.json"
  kept, digests = {}, {}
  if os.path.exists(path):
    kept = {row.method: dataclasses.replace(row, pair=pair) for row in eval_lib.read_rows(path)}
    if os.path.exists(digests_path):
      with open(digests_path) as f:
        digests = json.load(f)
  wanted = {m.name: _method_digest(m) for m in methods}
  missing = [m for m in methods if m.name not in kept or digests.get(m.name) != wanted[m.name]]
  if kept:
    print(f"run {run_index}: rows kept in {path}"
          + (f"; evaluating {[m.name for m in missing]}" if missing else "")
          + " (delete the file, or a method's line, to evaluate it again)")
  if missing:
    kept.update((row.method, row) for row in evaluate(missing))
    digests.update(wanted)
    os.makedirs(done, exist_ok=True)
    # A kept row of no known method (its digest lost) is dropped, not carried on.
    names = [m.name for m in methods] + [n for n in kept if n not in wanted and n in digests]
    kept_digests = {n: digests[n] for n in names}
    eval_lib.write_rows([kept[n] for n in names], path)
    with open(digests_path, "w") as f:
      json.dump(kept_digests, f, indent=1, sort_keys=True)
  return [kept[m.name] for m in methods]


def merged_groups(config: configs_lib.ExperimentConfig) -> str:
  """'3 pairs of source models merged' (or groups, for groups of more than 2)."""
  count = config.num_pairs
  what = "pair" if {len(g) for g in config.groups} == {2} else "group"
  return f"{count} {what}{'s' if count != 1 else ''} of source models merged"


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
  parser.add_argument("--checkpoints", default=None,
                      help="folder of the source models' checkpoints (default: OUT/checkpoints)")
  parser.add_argument("--quiet", action="store_true", help="no progress bars")
  parser.add_argument("--train-only", action="store_true",
                      help="train (or resume) every run's source models, then stop")
  parser.add_argument("--keep-evaluated", default=None, metavar="DIR",
                      help="keep each run's rows in DIR, and take the rows of runs evaluated "
                           "before with the same config from there")
  args = parser.parse_args(argv)
  config = configs_lib.override(configs_lib.load(args.config), *args.set)
  start = time.perf_counter()
  _, md = run(config, out_dir=args.out, progress=not args.quiet,
              checkpoints=args.checkpoints, train_only=args.train_only,
              done=args.keep_evaluated)
  out = args.out or config.output_dir
  if args.train_only:
    print(f"\n{config.name}: the source models of {config.num_runs} run(s) are trained, "
          f"{time.perf_counter() - start:.0f} s")
    return 0
  print(f"\n{config.name}: {merged_groups(config)}, {time.perf_counter() - start:.0f} s\n")
  print(md)
  print(f"\nwritten: {out}/results.md, results.csv, results_rows.csv"
        + (", partial_zip.png" if os.path.exists(os.path.join(out, "partial_zip.png")) else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
