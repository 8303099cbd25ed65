"""VGG for 32x32 images: conv (+ BatchNorm) + ReLU stacks, max-pooling, one linear classifier."""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from zipjax._src import spec as S

_CONFIGS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"),
}


def _widths(config: Sequence, width: float) -> list[int]:
  return [max(1, int(round(c * width))) for c in config if c != "M"]


class VGG(nn.Module):
  config: tuple
  width: float = 1.0
  num_outputs: int = 10
  batchnorm: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(jnp.float32)
    widths = iter(_widths(self.config, self.width))
    i = 0
    for c in self.config:
      if c == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      x = nn.Conv(next(widths), (3, 3), name=f"conv{i}")(x)
      if self.batchnorm:
        x = nn.BatchNorm(use_running_average=not train, name=f"bn{i}")(x)
      x = nn.relu(x)
      S.capture(self, f"conv{i}", x)
      i += 1
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_outputs, name="head")(x)


@functools.lru_cache(maxsize=None)  # the same objects for the same arguments (see resnet20)
def _vgg(name: str, width: float, num_outputs: int, batchnorm: bool) -> tuple[VGG, S.Spec]:
  config = _CONFIGS[name]
  module = VGG(config=config, width=width, num_outputs=num_outputs, batchnorm=batchnorm)
  widths = _widths(config, width)
  names = [f"conv{i}" for i in range(len(widths))]
  leaves, prev = {}, None
  for n in names:
    leaves.update(S.conv(n, prev, n))
    if batchnorm:
      leaves.update(S.batchnorm(f"bn{n[4:]}", n))
    prev = n
  leaves.update(S.dense("head", prev, None))
  return module, S.linen_spec(module, spaces=[S.Space(n, w) for n, w in zip(names, widths)],
                              leaves=leaves, stop_points=names,
                              name=f"{name}x{width:g}" + ("" if batchnorm else "_nobn"))


def vgg11(width: float = 1.0, num_outputs: int = 10, *,
          batchnorm: bool = True) -> tuple[VGG, S.Spec]:
  """VGG-11 with channel multiplier ``width``; every conv is a stop point.

  ``batchnorm=False``: no BatchNorm (the convs' biases only), the architecture of the
  official ZipIt! VGG checkpoints (see ``zipjax.models.from_official_vgg``)."""
  return _vgg("vgg11", width, num_outputs, batchnorm)


def vgg16(width: float = 1.0, num_outputs: int = 10, *,
          batchnorm: bool = True) -> tuple[VGG, S.Spec]:
  """VGG-16 with channel multiplier ``width``; every conv is a stop point (``batchnorm`` as
  in :func:`vgg11`)."""
  return _vgg("vgg16", width, num_outputs, batchnorm)
