"""A multi-layer perceptron on flattened inputs."""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from zipjax._src import spec as S


class MLP(nn.Module):
  """Dense + ReLU layers, then a linear output layer."""

  widths: Sequence[int] = (128, 128)
  num_outputs: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no train-time behaviour
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)
    for i, w in enumerate(self.widths):
      x = nn.relu(nn.Dense(w, name=f"dense{i}")(x))
      S.capture(self, f"hidden{i}", x)
    return nn.Dense(self.num_outputs, name="head")(x)


def mlp(widths: Sequence[int] = (128, 128), num_outputs: int = 10) -> tuple[MLP, S.Spec]:
  """An MLP and its spec: one space per hidden layer, each a valid stop point.

  Cached: the same arguments give the same (module, spec) objects (see ``resnet20``)."""
  return _mlp(tuple(int(w) for w in widths), num_outputs)


@functools.lru_cache(maxsize=None)
def _mlp(widths: tuple[int, ...], num_outputs: int) -> tuple[MLP, S.Spec]:
  module = MLP(widths=widths, num_outputs=num_outputs)
  names = [f"hidden{i}" for i in range(len(widths))]
  leaves = {}
  prev = None
  for i, name in enumerate(names):
    leaves.update(S.dense(f"dense{i}", prev, name))
    prev = name
  leaves.update(S.dense("head", prev, None))
  spaces = [S.Space(n, w) for n, w in zip(names, widths)]
  return module, S.linen_spec(module, spaces=spaces, leaves=leaves, stop_points=names,
                              name=f"mlp{tuple(widths)}")
