"""Official ZipIt! checkpoints: converted state dicts compute what the official PyTorch
models compute, checked against a plain-JAX transcription of those models (NCHW, PyTorch's
padding and BatchNorm)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zipjax
from zipjax import models

_EPS = 1e-5  # PyTorch's BatchNorm2d default


def _bn_state(rng, prefix, width):
  return {f"{prefix}.weight": rng.uniform(0.5, 1.5, width),
          f"{prefix}.bias": 0.1 * rng.standard_normal(width),
          f"{prefix}.running_mean": 0.1 * rng.standard_normal(width),
          f"{prefix}.running_var": rng.uniform(0.5, 2.0, width),
          f"{prefix}.num_batches_tracked": np.array(100)}


def _conv_state(rng, name, out, inp):
  return {name: rng.standard_normal((out, inp, 3, 3)) * np.sqrt(2 / (9 * inp))}


def official_resnet20_state(width=1, outputs=10, seed=0):
  """A state dict in the official names and shapes (models/resnets.py of gstoica27/ZipIt)."""
  rng = np.random.default_rng(seed)
  w0 = 16 * width
  state = {**_conv_state(rng, "conv1.weight", w0, 3), **_bn_state(rng, "bn1", w0)}
  prev = w0
  for s, w in enumerate((w0, 2 * w0, 4 * w0), start=1):
    for b in range(3):
      p = f"layer{s}.{b}"
      state.update(_conv_state(rng, f"{p}.conv1.weight", w, prev))
      state.update(_bn_state(rng, f"{p}.bn1", w))
      state.update(_conv_state(rng, f"{p}.conv2.weight", w, w))
      state.update(_bn_state(rng, f"{p}.bn2", w))
      if prev != w:
        state.update(_conv_state(rng, f"{p}.shortcut.0.weight", w, prev))
        state.update(_bn_state(rng, f"{p}.shortcut.1", w))
      prev = w
  state["linear.weight"] = rng.standard_normal((outputs, prev)) / np.sqrt(prev)
  state["linear.bias"] = 0.1 * rng.standard_normal(outputs)
  return {k: np.asarray(v, np.int64 if k.endswith("tracked") else np.float32)
          for k, v in state.items()}


def _conv_nchw(x, w, stride, bias=None):
  y = jax.lax.conv_general_dilated(x, jnp.asarray(w), (stride, stride), ((1, 1), (1, 1)),
                                   dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                   precision=jax.lax.Precision.HIGHEST)
  return y if bias is None else y + jnp.asarray(bias)[None, :, None, None]


def _bn_nchw(x, state, prefix):
  c = lambda k: jnp.asarray(state[f"{prefix}.{k}"])[None, :, None, None]  # noqa: E731
  return (x - c("running_mean")) / jnp.sqrt(c("running_var") + _EPS) * c("weight") + c("bias")


def torch_resnet20(state, x_nchw):
  """The official ResNet-20's forward pass in evaluation mode, transcribed."""
  relu = jax.nn.relu
  x = relu(_bn_nchw(_conv_nchw(x_nchw, state["conv1.weight"], 1), state, "bn1"))
  for s in (1, 2, 3):
    for b in range(3):
      p = f"layer{s}.{b}"
      stride = 2 if s > 1 and b == 0 else 1
      y = relu(_bn_nchw(_conv_nchw(x, state[f"{p}.conv1.weight"], stride), state, f"{p}.bn1"))
      y = _bn_nchw(_conv_nchw(y, state[f"{p}.conv2.weight"], 1), state, f"{p}.bn2")
      if f"{p}.shortcut.0.weight" in state:
        x = _bn_nchw(_conv_nchw(x, state[f"{p}.shortcut.0.weight"], stride), state,
                     f"{p}.shortcut.1")
      x = relu(y + x)
  pooled = x.mean(axis=(2, 3))
  return pooled @ jnp.asarray(state["linear.weight"]).T + jnp.asarray(state["linear.bias"])[None]


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((4, 32, 32, 3)).astype(np.float32)
  return x, np.ascontiguousarray(x.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("width,outputs", [(1, 10), (2, 512)])
def test_official_resnet20_computes_the_official_function(images, width, outputs):
  x, x_nchw = images
  state = official_resnet20_state(width, outputs)
  variables = models.from_official_resnet20(state)
  model, spec = models.resnet20(width, outputs, padding="pytorch")
  zipjax.spec.validate(spec, variables)
  ref = np.asarray(torch_resnet20(state, jnp.asarray(x_nchw)))
  np.testing.assert_allclose(np.asarray(model.apply(variables, x)), ref, rtol=1e-4, atol=1e-4)


def test_same_padding_is_another_function(images):
  x, x_nchw = images
  state = official_resnet20_state()
  variables = models.from_official_resnet20(state)
  ref = np.asarray(torch_resnet20(state, jnp.asarray(x_nchw)))
  same = np.asarray(models.resnet20(1, 10)[0].apply(variables, x))
  assert np.abs(same - ref).max() > 1e-2 * np.abs(ref).max()


def test_converted_resnet20_merges_exactly_with_itself(images):
  x, _ = images
  variables = models.from_official_resnet20(official_resnet20_state())
  model, spec = models.resnet20(1, 10, padding="pytorch")
  same = zipjax.zip(variables, variables, spec, data=[x], reset_bn=False)
  np.testing.assert_allclose(model.apply(same, x), model.apply(variables, x), rtol=1e-5,
                             atol=1e-5)


def official_vgg11_state(width=1, outputs=10, seed=0):
  rng = np.random.default_rng(seed)
  state, prev, index = {}, 3, 0
  for c in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
    if c == "M":
      index += 1  # MaxPool2d
      continue
    state.update(_conv_state(rng, f"features.{index}.weight", c * width, prev))
    state[f"features.{index}.bias"] = 0.1 * rng.standard_normal(c * width)
    prev, index = c * width, index + 2  # Conv2d, ReLU
  state["classifier.weight"] = rng.standard_normal((outputs, prev)) / np.sqrt(prev)
  state["classifier.bias"] = 0.1 * rng.standard_normal(outputs)
  return {k: np.asarray(v, np.float32) for k, v in state.items()}


def torch_vgg11(state, x_nchw):
  convs = sorted(int(k.split(".")[1]) for k in state if k.endswith("weight")
                 and k.startswith("features"))
  pools_after = {0, 1, 3, 5, 7}  # the convs (0-based) that a MaxPool2d follows
  x = x_nchw
  for i, index in enumerate(convs):
    x = jax.nn.relu(_conv_nchw(x, state[f"features.{index}.weight"], 1,
                               state[f"features.{index}.bias"]))
    if i in pools_after:
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
  x = x.reshape(x.shape[0], -1)
  return (x @ jnp.asarray(state["classifier.weight"]).T
          + jnp.asarray(state["classifier.bias"])[None])


def test_official_vgg_computes_the_official_function(images):
  x, x_nchw = images
  state = official_vgg11_state()
  variables = models.from_official_vgg(state)
  model, spec = models.vgg11(1, 10, batchnorm=False)
  zipjax.spec.validate(spec, variables)
  ref = np.asarray(torch_vgg11(state, jnp.asarray(x_nchw)))
  np.testing.assert_allclose(np.asarray(model.apply(variables, x)), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.pop("layer2.0.shortcut.0.weight"), "no 'layer2.0.shortcut.0.weight'"),
    (lambda s: s.update({"extra.weight": np.zeros(3, np.float32)}), "entries that .* does not"),
    (lambda s: s.update({"layer1.0.bn1.weight": np.ones(5, np.float32)}),
     r"'layer1.0.bn1.weight' has shape \(5,\), expected \(16,\)"),
])
def test_resnet20_state_dict_mistakes_are_named(edit, match):
  state = official_resnet20_state()
  edit(state)
  with pytest.raises(zipjax.SpecError, match=match):
    models.from_official_resnet20(state)


def test_dataparallel_prefix_is_dropped(images):
  state = {"module." + k: v for k, v in official_resnet20_state().items()}
  variables = models.from_official_resnet20(state)
  assert variables["params"]["head"]["kernel"].shape == (64, 10)


class NotATensor:
  """An object a checkpoint may pickle: loading it would run code."""


def test_torch_checkpoints_load_tensors_only(tmp_path):
  torch = pytest.importorskip("torch")
  state = official_resnet20_state()
  path = tmp_path / "resnet20.pt"
  torch.save({"module." + k: torch.from_numpy(v) for k, v in state.items()}, path)
  loaded = models.load_torch_checkpoint(path)
  assert set(loaded) == set(state)
  np.testing.assert_array_equal(loaded["linear.weight"], state["linear.weight"])

  torch.save({"x": NotATensor()}, tmp_path / "code.pt")  # pickled code: refused
  with pytest.raises(Exception, match="(?i)weights.only|unsupported"):
    models.load_torch_checkpoint(tmp_path / "code.pt")
