"""Small instances of every zoo model, shared by the tests.

``make`` is cached: every test module gets the same spec object for a model, so the jitted
passes (cached per spec) compile once per session. Callers must not mutate what it returns.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zipjax import models

# name -> (factory, input shape of one image)
ZOO = {
    "mlp": (lambda: models.mlp(widths=(32, 24), num_outputs=5), (8, 8, 1)),
    "vgg11": (lambda: models.vgg11(width=0.125, num_outputs=5), (32, 32, 3)),
    "vgg16": (lambda: models.vgg16(width=0.0625, num_outputs=5), (32, 32, 3)),
    "resnet20": (lambda: models.resnet20(width=0.5, num_outputs=5), (16, 16, 3)),
    "resnet50": (lambda: models.resnet50(width=0.125, num_outputs=5), (32, 32, 3)),
}


#: The zoo models, ResNet-50 behind the slow marker (it takes a third of the zoo's time; the
#: tests of inferred specs and a -m slow run still cover it).
NAMES = [pytest.param(n, marks=pytest.mark.slow) if n == "resnet50" else n for n in ZOO]


@functools.lru_cache(maxsize=None)
def make(name, *, num_models=2, batch=16, num_batches=2, seed=0):
  """(spec, (variables, ...), calibration batches) for one zoo model."""
  factory, shape = ZOO[name]
  model, spec = factory()
  rng = np.random.default_rng([seed, 0])
  x = jnp.asarray(rng.standard_normal((batch * num_batches,) + shape, np.float32))
  variables = tuple(init(model, x[:2], seed=(seed, m + 1)) for m in range(num_models))
  data = [x[i * batch:(i + 1) * batch] for i in range(num_batches)]
  return spec, variables, data


def init(model, x, *, seed) -> dict:
  """Variables of a linen model drawn as flax initialises them (LeCun-normal kernels, zero
  biases, unit scales and BatchNorm variances; other leaves of 2 or more axes as kernels),
  with numpy: ``model.init`` compiles a program per model, seconds on a CPU."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path[-1:], simple=True)
    if name in ("scale", "var", "bias", "mean") or leaf.ndim < 2:
      fill = 1.0 if name in ("scale", "var") else 0.0
      return jnp.asarray(np.full(leaf.shape, fill, leaf.dtype))
    scale = 1 / np.sqrt(np.prod(leaf.shape[:-1]))  # a kernel: (..., fan in, out)
    return jnp.asarray((rng.standard_normal(leaf.shape) * scale).astype(leaf.dtype))

  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  return jax.tree_util.tree_map_with_path(draw, shapes)
