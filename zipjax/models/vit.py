"""A Vision Transformer whose attention heads are merged, not averaged.

Feature spaces:

- ``stream``: the residual stream, one space for the whole network (every block adds into
  it): the patch embedding, the class token and the position embedding write it, every
  LayerNorm acts on it, each block's attention output projection and second MLP layer write
  it, each block's query, key, value and first MLP layers read it.
- ``block{i}_qk``: block i's queries and keys, one space in ``num_heads`` groups (the
  heads): queries and keys share a merge, so each merged head's attention logits are the
  inner products of merged queries and keys.
- ``block{i}_vo``: block i's values, which its output projection reads (after attention
  weighs them), in the same heads.
- ``block{i}_mlp``: block i's MLP hidden units (after the GELU).

``block{i}_qk`` and ``block{i}_vo`` name the attention layer in ``Space.heads``: one pairing
of heads across models serves both (heads of one model may merge, as the matcher's
same-model budget allows), then each is matched within the paired heads.

The residual stream runs through every block, so a partial zip of this model has no place to
stop: the spec has no stop points.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from zipjax._src import nnx as nnx_lib
from zipjax._src import spec as S

#: How the image's tokens become the head's input: the class token's features, or the mean
#: of the patch tokens.
POOLS = ("cls", "mean")


def _check(width: int, num_heads: int, pool: str) -> None:
  if not float(width).is_integer():
    raise ValueError(f"A ViT's width is a whole number of features, got {width}.")
  if pool not in POOLS:
    raise ValueError(f"pool must be one of {POOLS}, got {pool!r}.")
  if num_heads < 1 or width % num_heads:
    raise ValueError(f"width {width} does not split into {num_heads} heads; choose a width "
                     "that is a multiple of num_heads.")


def _attend(q, k, v, num_heads: int):
  """Multi-head attention of (B, T, H * d) queries, keys and values; (B, T, H * d) out."""
  b, t, hd = q.shape
  split = lambda a: a.reshape(b, t, num_heads, hd // num_heads)  # noqa: E731
  logits = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / jnp.sqrt(hd / num_heads)
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, split(v)).reshape(b, t, hd)


def _tokens(x, pool: str, cls_token, pos_embedding):
  b = x.shape[0]
  x = x.reshape(b, -1, x.shape[-1])
  if pool == "cls":
    x = jnp.concatenate([jnp.broadcast_to(cls_token, (b, 1, x.shape[-1])), x], axis=1)
  return x + pos_embedding


def _pooled(x, pool: str):
  return x[:, 0] if pool == "cls" else x.mean(axis=1)


class Block(nn.Module):
  """Pre-LayerNorm transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

  num_heads: int
  mlp_dim: int
  index: int

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    i = self.index
    y = nn.LayerNorm(name="ln1")(x)
    q = nn.Dense(width, name="query")(y)
    k = nn.Dense(width, name="key")(y)
    v = nn.Dense(width, name="value")(y)
    S.capture(self, f"block{i}_qk", q)
    S.capture(self, f"block{i}_qk", k)
    o = _attend(q, k, v, self.num_heads)
    S.capture(self, f"block{i}_vo", o)
    x = x + nn.Dense(width, name="out")(o)
    h = nn.gelu(nn.Dense(self.mlp_dim, name="mlp1")(nn.LayerNorm(name="ln2")(x)))
    S.capture(self, f"block{i}_mlp", h)
    x = x + nn.Dense(width, name="mlp2")(h)
    S.capture(self, "stream", x)
    return x


class ViT(nn.Module):
  """A ViT for small images: patch embedding, class token or mean pooling, pre-LayerNorm
  blocks of multi-head self-attention and a GELU MLP, a final LayerNorm and a linear head."""

  width: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 256
  patch: int = 4
  num_outputs: int = 10
  pool: str = "cls"

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no dropout: the same function in training and inference
    _check(self.width, self.num_heads, self.pool)
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch, padding="VALID",
                name="embed")(x.astype(jnp.float32))
    num_tokens = (x.shape[1] * x.shape[2]) + (self.pool == "cls")
    init = nn.initializers.normal(0.02)
    cls_token = (self.param("cls_token", nn.initializers.zeros, (1, 1, self.width))
                 if self.pool == "cls" else None)
    pos = self.param("pos_embedding", init, (1, num_tokens, self.width))
    x = _tokens(x, self.pool, cls_token, pos)
    S.capture(self, "stream", x)
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_dim, i, name=f"block{i}")(x)
    x = nn.LayerNorm(name="ln")(x)
    return nn.Dense(self.num_outputs, name="head")(_pooled(x, self.pool))


def _spec_parts(width: int, depth: int, num_heads: int, mlp_dim: int, pool: str, *,
                collection: str | None):
  dense = functools.partial(S.dense, collection=collection)
  ln = functools.partial(S.layernorm, collection=collection)
  p = () if collection is None else (collection,)
  spaces, leaves = [], {}
  leaves.update(S.conv("embed", None, "stream", collection=collection))
  if pool == "cls":
    leaves[p + ("cls_token",)] = {-1: S.Axis("stream", S.OUT)}
  leaves[p + ("pos_embedding",)] = {-1: S.Axis("stream", S.OUT)}
  for i in range(depth):
    blk, qk, vo, mlp = f"block{i}", f"block{i}_qk", f"block{i}_vo", f"block{i}_mlp"
    spaces += [S.Space(qk, width, groups=num_heads, heads=blk),
               S.Space(vo, width, groups=num_heads, heads=blk), S.Space(mlp, mlp_dim)]
    leaves.update(ln(f"{blk}/ln1", "stream"))
    leaves.update(dense(f"{blk}/query", "stream", qk))
    leaves.update(dense(f"{blk}/key", "stream", qk))
    leaves.update(dense(f"{blk}/value", "stream", vo))
    leaves.update(dense(f"{blk}/out", vo, "stream"))
    leaves.update(ln(f"{blk}/ln2", "stream"))
    leaves.update(dense(f"{blk}/mlp1", "stream", mlp))
    leaves.update(dense(f"{blk}/mlp2", mlp, "stream"))
  leaves.update(ln("ln", "stream"))
  leaves.update(dense("head", "stream", None))
  spaces.append(S.Space("stream", width))  # written by every block: listed last
  return spaces, leaves


@functools.lru_cache(maxsize=None)
def vit(width: int = 128, depth: int = 4, num_heads: int = 4, mlp_dim: int = 256,
        patch: int = 4, num_outputs: int = 10, *, pool: str = "cls") -> tuple[ViT, S.Spec]:
  """A ViT (flax.linen) and its spec: attention heads, MLP units and the residual stream
  merged (see the module docstring).

  Arguments:
    width: the residual stream's width; a multiple of ``num_heads`` (head size width /
      num_heads).
    depth: the number of blocks.
    num_heads: attention heads per block.
    mlp_dim: hidden units of each block's MLP.
    patch: the side of the square patches the image is cut into (its sides a multiple).
    num_outputs: the head's outputs.
    pool: "cls" (a class token) or "mean" (the mean of the patch tokens).

  Returns:
    ``(module, spec)``; ``module.init(key, x)`` takes images (B, H, W, C). Cached: the same
    arguments give the same objects, so the programs compiled for one zip serve the next.

  Raises:
    ValueError: a width that is not a multiple of num_heads, or an unknown pool.

  Example::

    model, spec = zipjax.models.vit(width=128, depth=4, num_heads=4)
    va, vb = model.init(key_a, x), model.init(key_b, x)   # then train both
    merged = zipjax.zip(va, vb, spec, data=batches)
  """
  _check(width, num_heads, pool)
  width = int(width)
  module = ViT(width, depth, num_heads, mlp_dim, patch, num_outputs, pool)
  spaces, leaves = _spec_parts(width, depth, num_heads, mlp_dim, pool, collection="params")
  return module, S.linen_spec(module, spaces=spaces, leaves=leaves,
                              name=f"vit{width}x{depth}h{num_heads}")


class NNXBlock(nnx.Module):
  """:class:`Block` as an NNX module, with the same names."""

  def __init__(self, width: int, num_heads: int, mlp_dim: int, index: int, *,
               rngs: nnx.Rngs):
    self.num_heads, self.index = num_heads, index
    self.ln1 = nnx.LayerNorm(width, rngs=rngs)
    self.query = nnx.Linear(width, width, rngs=rngs)
    self.key = nnx.Linear(width, width, rngs=rngs)
    self.value = nnx.Linear(width, width, rngs=rngs)
    self.out = nnx.Linear(width, width, rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, rngs=rngs)
    self.mlp1 = nnx.Linear(width, mlp_dim, rngs=rngs)
    self.mlp2 = nnx.Linear(mlp_dim, width, rngs=rngs)

  def __call__(self, x):
    i = self.index
    y = self.ln1(x)
    q, k, v = self.query(y), self.key(y), self.value(y)
    S.capture(self, f"block{i}_qk", q)
    S.capture(self, f"block{i}_qk", k)
    o = _attend(q, k, v, self.num_heads)
    S.capture(self, f"block{i}_vo", o)
    x = x + self.out(o)
    h = nnx.gelu(self.mlp1(self.ln2(x)))
    S.capture(self, f"block{i}_mlp", h)
    x = x + self.mlp2(h)
    S.capture(self, "stream", x)
    return x


class NNXViT(nnx.Module):
  """:class:`ViT` as an NNX module: the same layers, names and function, so its state holds
  the linen model's ``params`` without the collection key."""

  def __init__(self, width: int = 128, depth: int = 4, num_heads: int = 4, mlp_dim: int = 256,
               patch: int = 4, num_outputs: int = 10, *, image_size: int = 32,
               channels: int = 3, pool: str = "cls", rngs: nnx.Rngs):
    _check(width, num_heads, pool)
    self.pool = pool
    self.embed = nnx.Conv(channels, width, (patch, patch), strides=patch, padding="VALID",
                          rngs=rngs)
    num_tokens = (image_size // patch) ** 2 + (pool == "cls")
    if pool == "cls":
      self.cls_token = nnx.Param(jnp.zeros((1, 1, width)))
    self.pos_embedding = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (1, num_tokens, width)))
    self.blocks = []
    for i in range(depth):
      setattr(self, f"block{i}", NNXBlock(width, num_heads, mlp_dim, i, rngs=rngs))
      self.blocks.append(f"block{i}")
    self.ln = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, num_outputs, rngs=rngs)

  def __call__(self, x):
    x = self.embed(x.astype(jnp.float32))
    cls_token = self.cls_token[...] if self.pool == "cls" else None
    x = _tokens(x, self.pool, cls_token, self.pos_embedding[...])
    S.capture(self, "stream", x)
    for name in self.blocks:
      x = getattr(self, name)(x)
    return self.head(_pooled(self.ln(x), self.pool))


def nnx_vit(width: int = 128, depth: int = 4, num_heads: int = 4, mlp_dim: int = 256,
            patch: int = 4, num_outputs: int = 10, *, image_size: int = 32, channels: int = 3,
            pool: str = "cls", rngs: nnx.Rngs) -> tuple[NNXViT, S.Spec]:
  """:func:`vit` as a Flax NNX module initialised from ``rngs`` (for ``image_size`` square
  images of ``channels`` channels), and its spec (cached: shared by every module of these
  arguments). Merges like the linen :func:`vit` on the same weights.

  Example::

    model_a, spec = zipjax.models.nnx_vit(rngs=nnx.Rngs(0))
    model_b, _ = zipjax.models.nnx_vit(rngs=nnx.Rngs(1))
    merged = zipjax.zip(model_a, model_b, spec, data=batches)   # an NNXViT
  """
  _check(width, num_heads, pool)
  width = int(width)
  args = (width, depth, num_heads, mlp_dim, patch, num_outputs, image_size, channels, pool)
  return (NNXViT(*args[:6], image_size=image_size, channels=channels, pool=pool, rngs=rngs),
          _nnx_vit_spec(*args))


@functools.lru_cache(maxsize=None)
def _nnx_vit_spec(width, depth, num_heads, mlp_dim, patch, num_outputs, image_size, channels,
                  pool) -> S.Spec:
  abstract = nnx.eval_shape(lambda: NNXViT(
      width, depth, num_heads, mlp_dim, patch, num_outputs, image_size=image_size,
      channels=channels, pool=pool, rngs=nnx.Rngs(0)))
  spaces, leaves = _spec_parts(width, depth, num_heads, mlp_dim, pool, collection=None)
  return nnx_lib.nnx_spec(abstract, spaces=spaces, leaves=leaves,
                          name=f"nnx_vit{width}x{depth}h{num_heads}")
