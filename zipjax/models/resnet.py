"""ResNets: CIFAR ResNet-20 and ImageNet ResNet-50, both with a width multiplier.

Each stage's residual stream is one feature space: the stem (or the stage's projection
shortcut) and every block's last BatchNorm write it, every block's first conv reads it.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

from zipjax._src import nnx as nnx_lib
from zipjax._src import spec as S


def _bn(train: bool, name: str):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)


#: How ResNet-20's 3x3 convolutions pad: "same" (XLA's SAME: a stride-2 conv on 32 pixels
#: pads 0 before and 1 after) or "pytorch" (1 on every side, as PyTorch's padding=1 and the
#: official ZipIt! models do). Same shapes, different functions.
PADDINGS = {"same": "SAME", "pytorch": ((1, 1), (1, 1))}


def _padding(padding: str):
  if padding not in PADDINGS:
    raise ValueError(f"padding must be one of {sorted(PADDINGS)}, got {padding!r}.")
  return PADDINGS[padding]


class BasicBlock(nn.Module):
  """3x3 conv, BN, ReLU, 3x3 conv, BN, plus a shortcut (3x3 conv + BN where shapes change)."""

  features: int
  strides: int
  stream: str
  inner: str
  padding: str = "same"

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(nn.Conv, self.features, (3, 3), use_bias=False,
                             padding=_padding(self.padding))
    y = conv(strides=self.strides, name="conv1")(x)
    y = nn.relu(_bn(train, "bn1")(y))
    S.capture(self, self.inner, y)
    y = _bn(train, "bn2")(conv(name="conv2")(y))
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(strides=self.strides, name="shortcut_conv")(x)
      x = _bn(train, "shortcut_bn")(x)
    y = nn.relu(y + x)
    S.capture(self, self.stream, y)
    return y


class ResNet20(nn.Module):
  width: float = 1.0
  num_outputs: int = 10
  padding: str = "same"

  @nn.compact
  def __call__(self, x, train: bool = False):
    widths = _resnet20_widths(self.width)
    x = nn.Conv(widths[0], (3, 3), use_bias=False, padding=_padding(self.padding),
                name="stem_conv")(x.astype(jnp.float32))
    x = nn.relu(_bn(train, "stem_bn")(x))
    S.capture(self, "stage1", x)
    for s, w in enumerate(widths, start=1):
      for b in range(3):
        x = BasicBlock(w, 2 if (s > 1 and b == 0) else 1, stream=f"stage{s}",
                       inner=f"stage{s}_block{b}", padding=self.padding,
                       name=f"stage{s}_block{b}")(x, train)
    return nn.Dense(self.num_outputs, name="head")(x.mean(axis=(1, 2)))


def _resnet20_widths(width: float) -> list[int]:
  return [max(1, int(round(c * width))) for c in (16, 32, 64)]


@functools.lru_cache(maxsize=None)
def resnet20(width: float = 1.0, num_outputs: int = 10, *,
             padding: str = "same") -> tuple[ResNet20, S.Spec]:
  """CIFAR ResNet-20 with 16w/32w/64w channels; stop points are the ends of the 3 stages.

  The shortcut of a stage's first block is a 3x3 conv + BatchNorm, as in the official ZipIt!
  models. ``padding="pytorch"`` pads every 3x3 conv by 1 on each side, as PyTorch does: the
  architecture of the official checkpoints (see ``zipjax.models.from_official_resnet20``);
  the default "same" pads a stride-2 conv 0 before and 1 after.

  Cached: the same arguments give the same (module, spec) objects, so the programs zipjax
  compiled for one call serve the next (a spec is hashed by identity)."""
  module = ResNet20(width=width, num_outputs=num_outputs, padding=padding)
  spaces, leaves = _resnet20_spec_parts(width, collection="params")
  return module, S.linen_spec(module, spaces=spaces, leaves=leaves,
                              stop_points=[f"stage{s}" for s in (1, 2, 3)],
                              name=f"resnet20x{width:g}")


def _resnet20_spec_parts(width: float, *, collection: str | None):
  """The spaces and leaves of ResNet-20: linen's paths, or NNX's (``collection=None``)."""
  conv = functools.partial(S.conv, bias=False, collection=collection)
  bn = functools.partial(S.batchnorm, collection=collection)
  widths = _resnet20_widths(width)
  spaces, leaves = [], {}
  leaves.update(conv("stem_conv", None, "stage1"))
  leaves.update(bn("stem_bn", "stage1"))
  prev = "stage1"
  for s, w in enumerate(widths, start=1):
    stream = f"stage{s}"
    for b in range(3):
      blk = inner = f"stage{s}_block{b}"
      spaces.append(S.Space(inner, w))
      leaves.update(conv(f"{blk}/conv1", prev, inner))
      leaves.update(bn(f"{blk}/bn1", inner))
      leaves.update(conv(f"{blk}/conv2", inner, stream))
      leaves.update(bn(f"{blk}/bn2", stream))
      if prev != stream:
        leaves.update(conv(f"{blk}/shortcut_conv", prev, stream))
        leaves.update(bn(f"{blk}/shortcut_bn", stream))
      prev = stream
    spaces.append(S.Space(stream, w))  # network order: after the stage's inner spaces
  leaves.update(S.dense("head", prev, None, collection=collection))
  return spaces, leaves


class NNXBasicBlock(nnx.Module):
  """:class:`BasicBlock` as an NNX module, with the same names."""

  def __init__(self, in_features: int, features: int, strides: int, stream: str, inner: str,
               *, rngs: nnx.Rngs, padding: str = "same"):
    conv = functools.partial(nnx.Conv, kernel_size=(3, 3), use_bias=False,
                             padding=_padding(padding), rngs=rngs)
    bn = functools.partial(nnx.BatchNorm, momentum=0.9, use_fast_variance=False, rngs=rngs)
    self.stream, self.inner = stream, inner
    self.conv1 = conv(in_features, features, strides=strides)
    self.bn1 = bn(features)
    self.conv2 = conv(features, features)
    self.bn2 = bn(features)
    self.projects = strides != 1 or in_features != features
    if self.projects:
      self.shortcut_conv = conv(in_features, features, strides=strides)
      self.shortcut_bn = bn(features)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    S.capture(self, self.inner, y)
    y = self.bn2(self.conv2(y))
    if self.projects:
      x = self.shortcut_bn(self.shortcut_conv(x))
    y = nnx.relu(y + x)
    S.capture(self, self.stream, y)
    return y


class NNXResNet20(nnx.Module):
  """:class:`ResNet20` as an NNX module: the same layers, names and function, so the state of
  one holds the linen model's ``params`` and ``batch_stats`` without their collection keys.
  ``module.train()`` / ``module.eval()`` switch BatchNorm as usual."""

  def __init__(self, width: float = 1.0, num_outputs: int = 10, *, rngs: nnx.Rngs,
               padding: str = "same"):
    widths = _resnet20_widths(width)
    self.stem_conv = nnx.Conv(3, widths[0], (3, 3), use_bias=False, padding=_padding(padding),
                              rngs=rngs)
    self.stem_bn = nnx.BatchNorm(widths[0], momentum=0.9, use_fast_variance=False, rngs=rngs)
    self.blocks = []
    prev = widths[0]
    for s, w in enumerate(widths, start=1):
      for b in range(3):
        name = f"stage{s}_block{b}"
        setattr(self, name, NNXBasicBlock(prev, w, 2 if (s > 1 and b == 0) else 1,
                                          stream=f"stage{s}", inner=name, rngs=rngs,
                                          padding=padding))
        self.blocks.append(name)
        prev = w
    self.head = nnx.Linear(prev, num_outputs, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem_bn(self.stem_conv(x.astype(jnp.float32))))
    S.capture(self, "stage1", x)
    for name in self.blocks:
      x = getattr(self, name)(x)
    return self.head(x.mean(axis=(1, 2)))


def nnx_resnet20(width: float = 1.0, num_outputs: int = 10, *, rngs: nnx.Rngs,
                 padding: str = "same") -> tuple[NNXResNet20, S.Spec]:
  """CIFAR ResNet-20 as a Flax NNX module, initialised from ``rngs``, and its spec
  (``padding`` as in :func:`resnet20`).

  The spec is shared by every module of these arguments (cached, like :func:`resnet20`'s), so
  zips of other pairs reuse the programs compiled for the first. Merges exactly like the
  linen :func:`resnet20` on the same weights.

  Example::

    model_a, spec = zipjax.models.nnx_resnet20(width=4, rngs=nnx.Rngs(0))
    model_b, _ = zipjax.models.nnx_resnet20(width=4, rngs=nnx.Rngs(1))
    ...  # train both
    merged = zipjax.zip(model_a, model_b, spec, data=batches)   # an NNXResNet20
  """
  return (NNXResNet20(width, num_outputs, rngs=rngs, padding=padding),
          _nnx_resnet20_spec(width, num_outputs, padding))


@functools.lru_cache(maxsize=None)
def _nnx_resnet20_spec(width: float, num_outputs: int, padding: str = "same") -> S.Spec:
  abstract = nnx.eval_shape(lambda: NNXResNet20(width, num_outputs, rngs=nnx.Rngs(0),
                                                padding=padding))
  spaces, leaves = _resnet20_spec_parts(width, collection=None)
  return nnx_lib.nnx_spec(abstract, spaces=spaces, leaves=leaves,
                          stop_points=[f"stage{s}" for s in (1, 2, 3)],
                          name=f"nnx_resnet20x{width:g}")


class Bottleneck(nn.Module):
  """1x1, 3x3 (strided), 1x1 convs with BN, plus a 1x1 conv + BN projection shortcut."""

  planes: int
  strides: int
  stream: str
  inner: str

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.Conv(self.planes, (1, 1), use_bias=False, name="conv1")(x)
    y = nn.relu(_bn(train, "bn1")(y))
    S.capture(self, self.inner + "_a", y)
    y = nn.Conv(self.planes, (3, 3), strides=self.strides, use_bias=False, name="conv2")(y)
    y = nn.relu(_bn(train, "bn2")(y))
    S.capture(self, self.inner + "_b", y)
    y = nn.Conv(4 * self.planes, (1, 1), use_bias=False, name="conv3")(y)
    y = _bn(train, "bn3")(y)
    if self.strides != 1 or x.shape[-1] != 4 * self.planes:
      x = nn.Conv(4 * self.planes, (1, 1), strides=self.strides, use_bias=False,
                  name="shortcut_conv")(x)
      x = _bn(train, "shortcut_bn")(x)
    y = nn.relu(y + x)
    S.capture(self, self.stream, y)
    return y


_RESNET50_BLOCKS = (3, 4, 6, 3)


def _resnet50_planes(width: float) -> list[int]:
  return [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]


class ResNet50(nn.Module):
  width: float = 1.0
  num_outputs: int = 1000

  @nn.compact
  def __call__(self, x, train: bool = False):
    planes = _resnet50_planes(self.width)
    x = nn.Conv(planes[0], (7, 7), strides=2, padding=3, use_bias=False,
                name="stem_conv")(x.astype(jnp.float32))
    x = nn.relu(_bn(train, "stem_bn")(x))
    S.capture(self, "stem", x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for s, (p, n) in enumerate(zip(planes, _RESNET50_BLOCKS), start=1):
      for b in range(n):
        x = Bottleneck(p, 2 if (s > 1 and b == 0) else 1, stream=f"stage{s}",
                       inner=f"stage{s}_block{b}", name=f"stage{s}_block{b}")(x, train)
    return nn.Dense(self.num_outputs, name="head")(x.mean(axis=(1, 2)))


@functools.lru_cache(maxsize=None)
def resnet50(width: float = 1.0, num_outputs: int = 1000) -> tuple[ResNet50, S.Spec]:
  """ImageNet ResNet-50 (v1.5) with a channel multiplier; stop points: stem, stage1..4.

  Cached: the same arguments give the same (module, spec) objects, so the programs zipjax
  compiled for one call serve the next (a spec is hashed by identity)."""
  module = ResNet50(width=width, num_outputs=num_outputs)
  planes = _resnet50_planes(width)
  spaces = [S.Space("stem", planes[0])]
  leaves = {**S.conv("stem_conv", None, "stem", bias=False), **S.batchnorm("stem_bn", "stem")}
  prev = "stem"
  for s, (p, n) in enumerate(zip(planes, _RESNET50_BLOCKS), start=1):
    stream = f"stage{s}"
    for b in range(n):
      blk = f"stage{s}_block{b}"
      a, c = blk + "_a", blk + "_b"
      spaces += [S.Space(a, p), S.Space(c, p)]
      leaves.update(S.conv(f"{blk}/conv1", prev, a, bias=False))
      leaves.update(S.batchnorm(f"{blk}/bn1", a))
      leaves.update(S.conv(f"{blk}/conv2", a, c, bias=False))
      leaves.update(S.batchnorm(f"{blk}/bn2", c))
      leaves.update(S.conv(f"{blk}/conv3", c, stream, bias=False))
      leaves.update(S.batchnorm(f"{blk}/bn3", stream))
      if prev != stream:
        leaves.update(S.conv(f"{blk}/shortcut_conv", prev, stream, bias=False))
        leaves.update(S.batchnorm(f"{blk}/shortcut_bn", stream))
      prev = stream
    spaces.append(S.Space(stream, 4 * p))  # network order: after the stage's inner spaces
  leaves.update(S.dense("head", prev, None))
  return module, S.linen_spec(module, spaces=spaces, leaves=leaves,
                              stop_points=["stem"] + [f"stage{s}" for s in (1, 2, 3, 4)],
                              name=f"resnet50x{width:g}")
