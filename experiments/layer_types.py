"""Zipping models outside the zoo, with inferred specs: one small pair per layer type.

Pairs of the same architecture train from different initialisations on disjoint halves of the
classes of scikit-learn's digits (8x8 images, bundled: no download; 10 shared outputs,
cross-entropy on global labels). Each pair's spec is inferred from the jaxpr, nothing is
declared by hand, and it is merged by weight averaging, Permute, ZipIt! and a partial ZipIt!,
next to the two source models and their ensemble. Each task is evaluated on its own classes
(the argmax over its five outputs); the table gives the mean over tasks and pairs.

    python -m experiments.layer_types [--pairs 2] [--epochs 30] [--out DIR]

The architectures: a residual LayerNorm/GELU MLP; a CNN whose last conv is max-pooled and
flattened into a Dense layer; a CNN with GroupNorm; a CNN with a depthwise conv and two
branches concatenated, average-pooled and flattened; a CNN of grouped convs (4 and 8 groups).

``--models a,b`` reruns those columns only and keeps the others of the table in ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

import zipjax
from . import data as data_lib
from . import train as train_lib


class ResidualMLP(nn.Module):
  """Pre-LayerNorm residual MLP with GELU on flattened images."""

  width: int = 64
  hidden: int = 128
  blocks: int = 2
  num_outputs: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no train-time behaviour
    h = nn.Dense(self.width, name="embed")(x.reshape(x.shape[0], -1))
    for i in range(self.blocks):
      y = nn.LayerNorm(name=f"block{i}_ln")(h)
      y = nn.gelu(nn.Dense(self.hidden, name=f"block{i}_fc1")(y))
      h = h + nn.Dense(self.width, name=f"block{i}_fc2")(y)
    return nn.Dense(self.num_outputs, name="head")(nn.LayerNorm(name="final_ln")(h))


class FlattenCNN(nn.Module):
  """Two convs, max pooling, the feature map flattened into a Dense layer."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(nn.Conv(32, (3, 3), name="conv1")(x))
    x = nn.relu(nn.Conv(32, (3, 3), name="conv2")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(64, name="fc1")(x.reshape(x.shape[0], -1)))
    return nn.Dense(10, name="head")(x)


class GroupNormCNN(nn.Module):
  """Three convs, each followed by GroupNorm (8 groups) and ReLU, global average pooling."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    for i, width in enumerate((32, 64, 64)):
      x = nn.Conv(width, (3, 3), strides=1 if i == 0 else 2, name=f"conv{i}")(x)
      x = nn.relu(nn.GroupNorm(num_groups=8, name=f"gn{i}")(x))
    return nn.Dense(10, name="head")(x.mean(axis=(1, 2)))


class BranchCNN(nn.Module):
  """A stem, a depthwise conv, two branches concatenated, average pooling, flatten."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(nn.Conv(32, (3, 3), name="stem")(x))
    x = nn.relu(nn.Conv(32, (3, 3), feature_group_count=32, name="depthwise")(x))
    a = nn.relu(nn.Conv(24, (1, 1), name="branch_a")(x))
    b = nn.relu(nn.Conv(16, (3, 3), name="branch_b")(x))
    x = nn.avg_pool(jnp.concatenate([a, b], axis=-1), (2, 2), strides=(2, 2))
    return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))


class GroupedCNN(nn.Module):
  """A stem, then grouped convs of 4 and 8 groups (ResNeXt-style), global average pooling."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(nn.Conv(32, (3, 3), name="stem")(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=2, feature_group_count=4, name="grouped1")(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=2, feature_group_count=8, name="grouped2")(x))
    return nn.Dense(10, name="head")(x.mean(axis=(1, 2)))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "residual_mlp": ResidualMLP,
    "flatten_cnn": FlattenCNN,
    "groupnorm_cnn": GroupNormCNN,
    "branch_cnn": BranchCNN,
    "grouped_cnn": GroupedCNN,
}
METHODS = ("model A", "model B", "weight average", "permute", "zipit", "zipit partial",
           "ensemble")


def task_accuracy(outputs: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> float:
  """Accuracy over the images of ``classes``, predicting among ``classes`` only."""
  keep = np.isin(labels, classes)
  pred = classes[np.argmax(outputs[keep][:, classes], axis=-1)]
  return float(np.mean(pred == labels[keep]))


def run_pair(name: str, *, seed: int, epochs: int, progress: bool = False) -> dict[str, Any]:
  """Trains one pair of ``MODELS[name]`` and zips it; returns its spec and the per-task
  accuracies of every method: {method: (task A, task B)}."""
  train_ds, test_ds = data_lib.load_digits(seed=seed)
  tasks = data_lib.class_split(10, 2, seed=seed)
  model = MODELS[name]()
  config = train_lib.TrainConfig(epochs=epochs, batch_size=64, learning_rate=0.05,
                                 augmentation=False, warmup_epochs=2.0, seed=seed)
  variables = []
  for m, classes in enumerate(tasks):
    # All 10 outputs, trained on this task's images only: label i is output i.
    variables.append(train_lib.train(
        model, train_ds.subset(classes), list(range(10)),
        dataclasses.replace(config, seed=seed + 100 * m), progress=False,
        desc=f"{name} {'AB'[m]}"))
  calib = data_lib.calibration_batches(train_ds, num_images=512, batch_size=128, seed=seed)
  spec = zipjax.infer_linen_spec(model, variables[0], calib[0])
  zipjax.check_spec(variables[0], spec, calib[0])

  eval_batches = data_lib.EvalBatches(test_ds, 256)
  x_test = np.concatenate([x for x, _ in eval_batches])
  y_test = np.concatenate([y for _, y in eval_batches])
  apply = jax.jit(spec.apply)

  def accuracies(outputs_per_task):
    return tuple(task_accuracy(np.asarray(o), y_test, c) for o, c in zip(outputs_per_task, tasks))

  results = {"model A": accuracies([apply(variables[0], x_test)] * 2),
             "model B": accuracies([apply(variables[1], x_test)] * 2)}
  for label, matcher in (("weight average", zipjax.match.identity()),
                         ("permute", zipjax.match.permute()), ("zipit", zipjax.match.greedy())):
    merged = zipjax.zip(variables[0], variables[1], spec, data=calib, matcher=matcher)
    results[label] = accuracies([apply(merged, x_test)] * 2)
  stop = spec.stop_points[len(spec.stop_points) // 2] if spec.stop_points else None
  if stop is not None:
    out = np.asarray(zipjax.zip(variables[0], variables[1], spec, data=calib,
                                stop_at=stop).apply(x_test))
    results["zipit partial"] = accuracies([out[0], out[1]])
  ens = np.asarray(zipjax.ensemble(variables, spec).apply(x_test))
  results["ensemble"] = accuracies([ens[0] + ens[1]] * 2)
  return {"spec": spec, "stop_at": stop, "accuracy": results}


def run(*, models=tuple(MODELS), pairs: int = 2, epochs: int = 30,
        progress: bool = False) -> list[dict[str, Any]]:
  """Every model's pairs; one row per (model, method) with the mean per-task accuracy over
  the pairs, and the spaces the inferred spec merges."""
  rows = []
  jobs = [(name, seed) for name in models for seed in range(pairs)]
  found: dict[str, list] = {name: [] for name in models}
  for name, seed in tqdm.tqdm(jobs, desc="pairs", disable=not progress):
    found[name].append(run_pair(name, seed=seed, epochs=epochs))
  for name, results in found.items():
    spec = results[0]["spec"]
    spaces = ", ".join(
        f"{s.name} ({s.width}" + (f", {s.groups} groups" if s.groups > 1 else "")
        + (", made of spaces" if s.parts else "") + ")" for s in spec.spaces)
    for method in METHODS:
      per_pair = [np.mean(r["accuracy"][method]) for r in results if method in r["accuracy"]]
      if per_pair:
        rows.append({"model": name, "method": method, "per_task_accuracy": float(np.mean(per_pair)),
                     "pairs": len(per_pair), "stop_at": results[0]["stop_at"] or "",
                     "spaces": spaces})
  return rows


def read(out: str) -> list[dict[str, Any]]:
  """The rows of ``out/layer_types.csv`` ([] if there is none)."""
  path = os.path.join(out, "layer_types.csv")
  if not os.path.exists(path):
    return []
  with open(path, newline="") as f:
    return [{**r, "per_task_accuracy": float(r["per_task_accuracy"]), "pairs": int(r["pairs"])}
            for r in csv.DictReader(f)]


def write(rows: list[dict[str, Any]], out: str) -> None:
  """rows as ``layer_types.csv`` and a Markdown table ``README.md`` in ``out``."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "layer_types.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  models = list(dict.fromkeys(r["model"] for r in rows))
  acc = {(r["model"], r["method"]): r["per_task_accuracy"] for r in rows}
  lines = ["# Models outside the zoo, one pair per layer type (digits, 5+5 classes)", "",
           "Per-task accuracy (%), mean over tasks and pairs; specs inferred. Regenerate with "
           "`python -m experiments.layer_types`.", "",
           "| method | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
  for method in METHODS:
    cells = [f"{100 * acc[(m, method)]:.1f}" if (m, method) in acc else "–" for m in models]
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  lines += ["", "Spaces merged (inferred):", ""]
  for m in models:
    r = next(r for r in rows if r["model"] == m)
    lines.append(f"- **{m}** (partial zip at `{r['stop_at']}`): {r['spaces']}")
  with open(os.path.join(out, "README.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pairs", type=int, default=2)
  parser.add_argument("--epochs", type=int, default=30)
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--out", default="experiments/results/layer_types_digits")
  args = parser.parse_args(argv)
  models = args.models.split(",")
  unknown = [m for m in models if m not in MODELS]
  if unknown:
    parser.error(f"unknown models {unknown}; choose from {list(MODELS)}")
  rows = run(models=models, pairs=args.pairs, epochs=args.epochs, progress=True)
  kept = [r for r in read(args.out) if r["model"] not in models]
  write(kept + rows, args.out)
  print(open(os.path.join(args.out, "README.md")).read())


if __name__ == "__main__":
  main()
