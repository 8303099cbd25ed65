"""Accuracy metrics against hand-computed cases, and FLOPs."""

import jax.numpy as jnp
import numpy as np
import pytest

from zipjax import metrics

TASKS = [[0, 2], [1, 3]]


def test_clip_single_head_per_task_and_joint():
  emb = np.eye(4)
  labels = np.array([0, 2, 1, 3])
  # Image 0 -> class 0; image 1 -> closer to class 1 than 2 (wrong, across tasks) but 2 beats
  # 0 within its task; image 2 -> class 1; image 3 -> class 1 (wrong in both senses).
  out = np.array([[1, 0, 0, 0], [0, .9, .5, 0], [0, 1, 0, 0], [0, 1, 0, .2]], float)
  acc = metrics.accuracy(out, labels, TASKS, class_embeddings=emb)
  assert acc.per_task == (1.0, 0.5)
  assert acc.joint == 0.5
  assert acc.task_avg == 0.75


def test_multi_head_logits_joint_uses_softmax_per_task():
  labels = np.array([0, 1])
  heads = np.zeros((2, 2, 2))
  heads[0] = [[3.0, 0.0], [0.1, 0.0]]  # task 0 head: sure of class 0 on image 0
  heads[1] = [[0.0, 0.0], [5.0, 0.0]]  # task 1 head: sure of class 1 on image 1
  acc = metrics.accuracy(heads, labels, TASKS)
  assert acc.per_task == (1.0, 1.0)
  # Image 0: p(0)=.95 vs p(1)=p(3)=.5 -> 0. Image 1: p(1)=.99 vs p(0)=.52 -> 1.
  assert acc.joint == 1.0


def test_task_columns_pick_each_task_from_a_shared_wide_head():
  # Two datasets of 2 and 3 classes, numbered 0-1 and 2-4, each using the first outputs of
  # a 6-wide head; output 5 is used by no task and must not count.
  tasks = [[0, 1], [2, 3, 4]]
  labels = np.array([1, 4, 2])
  out = np.array([[0.0, 2.0, 0.0, 9.0, 9.0, 9.0],   # task 0: column 1 -> class 1, right
                  [0.0, 0.0, 3.0, 9.0, 9.0, 9.0],   # task 1: column 2 -> class 4, right
                  [5.0, 0.0, 1.0, 0.0, 0.0, 9.0]])  # task 1: column 0 -> class 2, right
  acc = metrics.accuracy(out, labels, tasks, task_columns=[[0, 1], [0, 1, 2]])
  assert acc.per_task == (1.0, 1.0)
  # Joint: per-task softmax over each task's own columns. Image 0: p(class 1) = .88 against
  # task 1's .33 -> right. Image 1: task 0's .5 against p(class 4) = .90 -> right. Image 2:
  # .99 for class 0 against .58 for class 2 -> wrong.
  assert acc.joint == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="pass task_columns"):
    metrics.accuracy(out, labels, tasks)


def test_accuracy_rejects_bad_shapes():
  with pytest.raises(ValueError, match="3 heads for 2 tasks"):
    metrics.accuracy(np.zeros((3, 2, 2)), np.array([0, 1]), TASKS)
  with pytest.raises(ValueError, match="share classes"):
    metrics.accuracy(np.zeros((2, 2)), np.array([0, 1]), [[0, 1], [1, 2]])
  with pytest.raises(ValueError, match="gives 3 logits"):
    metrics.accuracy(np.zeros((2, 3)), np.array([0, 1]), TASKS)


def test_flops_of_a_matmul():
  a = jnp.ones((8, 16))
  b = jnp.ones((16, 4))
  assert metrics.flops(jnp.matmul, a, b) == pytest.approx(2 * 8 * 16 * 4, rel=0.01)
