"""Zipping two models outside the zoo with an inferred spec: a residual LayerNorm/GELU MLP.

Two copies of the MLP, from different initialisations, train on disjoint halves of the classes
of scikit-learn's digits (10 shared outputs, cross-entropy on global labels). Their spec is
inferred from the jaxpr, nothing is declared by hand, and they are merged with ZipIt!, with
Permute and by plain weight averaging, fully and (ZipIt!) partially. Each task is evaluated on
its own classes: the argmax over that task's five outputs.

    python -m experiments.infer_spec_digits [--epochs 40] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import numpy as np

import zipjax
from experiments import data as data_lib
from experiments import train as train_lib


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


def task_accuracy(outputs: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> float:
  """Accuracy over the images of ``classes``, predicting among ``classes`` only."""
  keep = np.isin(labels, classes)
  pred = classes[np.argmax(outputs[keep][:, classes], axis=-1)]
  return float(np.mean(pred == labels[keep]))


def run(*, epochs: int = 40, seed: int = 0, progress: bool = False) -> dict[str, Any]:
  """Trains the pair, zips it with an inferred spec; returns the spec and per-task accuracies."""
  train_ds, test_ds = data_lib.load_digits(seed=seed)
  tasks = data_lib.class_split(10, 2, seed=seed)
  model = ResidualMLP()
  config = train_lib.TrainConfig(epochs=epochs, batch_size=64, learning_rate=0.05,
                                 augmentation=False, warmup_epochs=2.0, seed=seed)
  variables = []
  for m, classes in enumerate(tasks):
    # All 10 outputs, trained on this task's images only: label i is output i.
    variables.append(train_lib.train(
        model, train_ds.subset(classes), list(range(10)),
        dataclasses.replace(config, seed=seed + 100 * m),
        progress=progress, desc=f"model {'AB'[m]}"))
  calib = data_lib.calibration_batches(train_ds, num_images=512, batch_size=128, seed=seed)
  spec = zipjax.infer_linen_spec(model, variables[0], calib[0])
  zipjax.check_spec(variables[0], spec, calib[0])

  eval_batches = data_lib.EvalBatches(test_ds, 256)
  x_test = np.concatenate([x for x, _ in eval_batches])
  y_test = np.concatenate([y for _, y in eval_batches])
  apply = jax.jit(spec.apply)

  def accuracies(outputs_per_task):
    return [task_accuracy(np.asarray(o), y_test, c) for o, c in zip(outputs_per_task, tasks)]

  results = {
      "model A": accuracies([apply(variables[0], x_test)] * 2),
      "model B": accuracies([apply(variables[1], x_test)] * 2),
  }
  for label, matcher in (("zipit", zipjax.match.greedy()), ("permute", zipjax.match.permute()),
                         ("weight average", zipjax.match.identity())):
    merged = zipjax.zip(variables[0], variables[1], spec, data=calib, matcher=matcher)
    results[label] = accuracies([apply(merged, x_test)] * 2)
  stop = spec.stop_points[-1]
  heads = zipjax.zip(variables[0], variables[1], spec, data=calib, stop_at=stop)
  out = np.asarray(heads.apply(x_test))  # (2, N, 10): task m reads head m
  results[f"zipit, partial at {stop}"] = accuracies([out[0], out[1]])
  return {"spec": spec, "tasks": tasks, "accuracy": results}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=40)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  res = run(epochs=args.epochs, seed=args.seed, progress=True)
  spec = res["spec"]
  print(f"inferred spec: {spec}")
  print("  spaces: " + ", ".join(f"{s.name} ({s.width})" for s in spec.spaces))
  print(f"tasks: A = classes {res['tasks'][0].tolist()}, B = classes {res['tasks'][1].tolist()}")
  print(f"{'':28s} {'task A':>8s} {'task B':>8s} {'mean':>8s}")
  for label, (a, b) in res["accuracy"].items():
    print(f"{label:28s} {a:8.3f} {b:8.3f} {(a + b) / 2:8.3f}")


if __name__ == "__main__":
  main()
