"""Metrics of merged models: per-task and joint accuracy, and FLOPs.

Outputs are either one model's, shape (B, D), or one per head, shape (N, B, D) (what
``MultiHead.apply`` returns). A task is a set of class indices; task t is read from head t.
Heads are CLIP-style (D-dim features compared by cosine similarity with class embeddings)
or give logits over their task's classes, in the order of the task's class list.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np


class Accuracy(NamedTuple):
  """joint: over all classes of all tasks; per_task[t]: on task t's images and classes."""

  joint: float
  per_task: tuple[float, ...]

  @property
  def task_avg(self) -> float:
    return float(np.mean(self.per_task))


def clip_logits(outputs: np.ndarray, class_embeddings: np.ndarray, *,
                logit_scale: float = 1.0) -> np.ndarray:
  """Scaled cosine similarity of outputs (..., D) to class embeddings (K, D)."""
  outputs = np.asarray(outputs, np.float64)
  norm = np.linalg.norm(outputs, axis=-1, keepdims=True)
  feats = outputs / np.where(norm > 0, norm, 1.0)
  emb = np.asarray(class_embeddings, np.float64)
  emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  return logit_scale * feats @ emb.T


def _softmax(z: np.ndarray) -> np.ndarray:
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def accuracy(outputs: Any, labels: np.ndarray, tasks: Sequence[Sequence[int]], *,
             class_embeddings: np.ndarray | None = None,
             logit_scale: float = 1.0,
             task_columns: Sequence[Sequence[int]] | None = None) -> Accuracy:
  """Per-task and joint accuracy.

  Args:
    outputs: (B, D) for one model or (N, B, D) for N heads, N == len(tasks).
    labels: (B,) global class indices.
    tasks: the class indices of each task (disjoint).
    class_embeddings: (num_classes, D) embeddings indexed by global class for CLIP-style
      heads; None for heads that give logits over their task's classes.
    logit_scale: temperature of CLIP-style logits (matters for the joint softmax).
    task_columns: for heads that give logits: which of a head's outputs are task t's logits,
      in the order of ``tasks[t]`` (default: all of them). For models that share one wide
      head and each use its first outputs, as when the tasks are different datasets.

  Joint accuracy: a single CLIP-style model picks the nearest class embedding among all
  classes; otherwise each task's logits (from its head) go through a softmax over that task,
  and the argmax over the concatenated class probabilities is the prediction (the paper's
  rule for heads with separate label sets).
  """
  outputs = np.asarray(outputs)
  labels = np.asarray(labels)
  tasks = [np.asarray(t) for t in tasks]
  all_classes = np.concatenate(tasks)
  if len(np.unique(all_classes)) != len(all_classes):
    raise ValueError(f"Tasks share classes: {[t.tolist() for t in tasks]}.")
  multi = outputs.ndim == 3
  if multi and outputs.shape[0] != len(tasks):
    raise ValueError(f"{outputs.shape[0]} heads for {len(tasks)} tasks; give one head per "
                     "task, or a single model's outputs (B, D).")

  def task_logits(t: int) -> np.ndarray:
    out = outputs[t] if multi else outputs
    if class_embeddings is not None:
      return clip_logits(out, np.asarray(class_embeddings)[tasks[t]], logit_scale=logit_scale)
    if task_columns is not None:
      out = out[..., np.asarray(task_columns[t])]
    if out.shape[-1] != len(tasks[t]):
      raise ValueError(f"Head for task {t} gives {out.shape[-1]} logits but the task has "
                       f"{len(tasks[t])} classes; pass task_columns to use part of a wider "
                       "head.")
    return np.asarray(out, np.float64)

  per_task = []
  for t, classes in enumerate(tasks):
    mask = np.isin(labels, classes)
    if not mask.any():
      raise ValueError(f"No images of task {t} (classes {classes.tolist()}) among the labels.")
    pred = classes[task_logits(t)[mask].argmax(-1)]
    per_task.append(float((pred == labels[mask]).mean()))
  if class_embeddings is not None and not multi:
    logits = clip_logits(outputs, np.asarray(class_embeddings)[all_classes],
                         logit_scale=logit_scale)
    joint_pred = all_classes[logits.argmax(-1)]
  else:
    probs = np.concatenate([_softmax(task_logits(t)) for t in range(len(tasks))], axis=-1)
    joint_pred = all_classes[probs.argmax(-1)]
  keep = np.isin(labels, all_classes)
  return Accuracy(float((joint_pred[keep] == labels[keep]).mean()), tuple(per_task))


def flops(fn: Callable, *args: Any) -> float:
  """FLOPs of one call of ``fn(*args)`` from XLA's cost analysis of the compiled program."""
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  if not cost or "flops" not in cost:
    raise RuntimeError("This JAX backend reports no FLOPs in its cost analysis.")
  return float(cost["flops"])
