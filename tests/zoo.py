"""Small instances of every zoo model, shared by the tests.

``make`` is cached: every test module gets the same spec object for a model, so the jitted
passes (cached per spec) compile once per session. Callers must not mutate what it returns.
"""

import functools

import jax
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
  key = jax.random.key(seed)
  x = jax.random.normal(key, (batch * num_batches,) + shape)
  variables = tuple(model.init(jax.random.fold_in(key, m + 1), x[:2])
                    for m in range(num_models))
  data = [x[i * batch:(i + 1) * batch] for i in range(num_batches)]
  return spec, variables, data
