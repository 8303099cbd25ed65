"""Specs inferred from jaxprs: the zoo's declared specs recovered exactly, models outside the zoo
(plain functions and linen modules) checked by permutation, and clear errors for what the
analysis refuses."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zipjax
from zipjax import models

# name -> (factory, input shape of a batch)
ZOO = {
    "mlp": (models.mlp, (4, 8, 8, 1)),
    "vgg11": (lambda: models.vgg11(width=0.125), (4, 32, 32, 3)),
    "resnet20": (lambda: models.resnet20(width=0.5), (4, 8, 8, 3)),
    "resnet50": (lambda: models.resnet50(width=0.125, num_outputs=10), (4, 16, 16, 3)),
}


def _normal(seed, shape, scale=1.0, offset=0.0):
  """Gaussian test data drawn with numpy (jax.random would compile once per shape)."""
  value = offset + scale * np.random.default_rng(seed).standard_normal(shape)
  return jnp.asarray(value, jnp.float32)


def _const(value, shape):
  return jnp.asarray(np.full(shape, value, np.float32))


def _init(model, x, seed):
  """Random variables of ``model`` drawn with numpy: no XLA compilation, fast tests."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "var":
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif name == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
    elif len(leaf.shape) >= 2:
      value = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    else:
      value = 0.1 * rng.standard_normal(leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def _zoo(name):
  """(model, declared spec, input batch, variables a, variables b), built once per model."""
  factory, shape = ZOO[name]
  model, declared = factory()
  x = _normal(1, shape)
  return model, declared, x, _init(model, x, 2), _init(model, x, 3)


def _space_keys(spec, variables):
  """{space name: frozenset of (leaf path, axis >= 0, role)}."""
  flat = zipjax.spec.validate(spec, variables)
  keys = {n: set() for n in spec.space_names}
  for path, leaf in flat.items():
    for axis, ax in spec.leaf_axes(path, np.ndim(leaf)).items():
      keys[ax.space].add((path, axis, ax.role))
  return {n: frozenset(k) for n, k in keys.items()}


def _roles(spec, variables, space):
  """{(leaf path, axis): role} of one space."""
  return {(p, a): r for p, a, r in _space_keys(spec, variables)[space]}


def _assert_trees_equal(a, b, **tol):
  ta, tb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
  assert ta == tb, (ta, tb)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


# ----------------------------------------------------------------------------------------------
# The zoo: the inferred spec is the declared one.


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_spec_is_recovered(name):
  model, declared, x, va, _ = _zoo(name)
  inferred = zipjax.infer_linen_spec(model, va, x)
  ki, kd = _space_keys(inferred, va), _space_keys(declared, va)
  # Same grouping of (leaf, axis) into spaces, same roles, same network order, same stops.
  assert [ki[n] for n in inferred.space_names] == [kd[n] for n in declared.space_names]
  assert [ki[n] for n in inferred.stop_points] == [kd[n] for n in declared.stop_points]
  assert [s.width for s in inferred.spaces] == [s.width for s in declared.spaces]


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_features_are_the_declared_captures(name):
  model, declared, x, va, _ = _zoo(name)
  inferred = zipjax.infer_linen_spec(model, va, x)
  ki, kd = _space_keys(inferred, va), _space_keys(declared, va)
  # The same activations as the declared captures (after each ReLU), space axis last, also
  # for a batch size other than the traced one (the features function traces again).
  x = _normal(6, (x.shape[0] + 1,) + x.shape[1:])
  fi, fd = jax.jit(inferred.features)(va, x), jax.jit(declared.features)(va, x)
  by_key = {ki[n]: n for n in inferred.space_names}
  for n in declared.space_names:
    got = fi[by_key[kd[n]]]
    assert len(got) == len(fd[n]), n
    for a, b in zip(got, fd[n]):
      np.testing.assert_array_equal(a, b)


# zip is a function of the spec's leaves, roles, widths and features (all checked equal to
# the declared ones above, for every zoo model) and of the BatchNorm interceptor (the same for
# both), so two more zips add no coverage, only compile time: ResNet-50's (about 20 s on a
# 2-core CPU) are left out to keep this file fast.
@pytest.mark.parametrize("name", ["mlp", pytest.param("vgg11", marks=pytest.mark.slow),
                                  "resnet20"])
def test_zoo_zip_with_inferred_spec_equals_declared(name):
  model, declared, x, va, vb = _zoo(name)
  inferred = zipjax.infer_linen_spec(model, va, x)
  data = [x, _normal(5, x.shape)]  # two batches: statistics and BatchNorm reset accumulate
  got = zipjax.zip(va, vb, inferred, data=data, matcher=zipjax.match.permute())
  want = zipjax.zip(va, vb, declared, data=data, matcher=zipjax.match.permute())
  _assert_trees_equal(got, want, rtol=1e-6, atol=1e-6)


def test_batchnorm_leaves_get_out_and_var_roles():
  model, _, x, va, _ = _zoo("resnet20")
  spec = zipjax.infer_linen_spec(model, va, x)
  axes = spec.leaves[("batch_stats", "stem_bn", "mean")]
  assert [ax.role for ax in axes.values()] == ["out"]
  axes = spec.leaves[("batch_stats", "stem_bn", "var")]
  assert [ax.role for ax in axes.values()] == ["var"]
  assert spec.leaves[("params", "stem_conv", "kernel")].keys() == {3}  # input channels: no role


# ----------------------------------------------------------------------------------------------
# Models outside the zoo.


def _init_res_mlp(seed, d_in=6, d=8, hidden=12, out=3, blocks=2):
  seeds = iter(range(100 * seed, 100 * seed + 4 * blocks + 4))
  normal = lambda shape, scale=0.3: _normal(next(seeds), shape, scale)
  params = {"inp": {"w": normal((d_in, d)), "b": _const(0.0, (d,))}}
  for i in range(blocks):
    params[f"block{i}"] = {
        "ln": {"scale": _normal(100 * seed + 50 + i, (d,), 0.1, 1.0), "bias": _const(0.05, (d,))},
        "fc1": {"w": normal((d, hidden)), "b": _const(0.1, (hidden,))},
        "fc2": {"w": normal((hidden, d)), "b": normal((d,), 0.1)},
    }
  params["ln_f"] = {"scale": _const(1.0, (d,)), "bias": _const(0.0, (d,))}
  params["head"] = {"w": normal((d, out)), "b": _const(0.0, (out,))}
  return params


def _dense(p, x):
  return x @ p["w"] + p["b"][None, :]


def _layernorm(p, x):
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + 1e-5) * p["scale"][None, :] + p["bias"][None, :]


def res_mlp(params, x):
  """A pre-LayerNorm residual MLP with GELU, as a plain function of a params dict."""
  h = _dense(params["inp"], x)
  i = 0
  while f"block{i}" in params:
    p = params[f"block{i}"]
    y = jax.nn.gelu(_dense(p["fc1"], _layernorm(p["ln"], h)))
    h = h + _dense(p["fc2"], y)
    i += 1
  return _dense(params["head"], _layernorm(params["ln_f"], h))


class ResMLP(nn.Module):
  """The same residual MLP as a linen module."""

  width: int = 8
  hidden: int = 12
  blocks: int = 2
  num_outputs: int = 3

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.width, name="inp")(x)
    for i in range(self.blocks):
      y = nn.LayerNorm(name=f"ln{i}")(h)
      y = nn.gelu(nn.Dense(self.hidden, name=f"fc1_{i}")(y), approximate=False)
      h = h + nn.Dense(self.width, name=f"fc2_{i}")(y)
    return nn.Dense(self.num_outputs, name="head")(nn.LayerNorm(name="ln_f")(h))


def test_residual_mlp_plain_function():
  params = _init_res_mlp(0)
  x = _normal(1, (5, 6))
  spec = zipjax.infer_spec(res_mlp, params, x)
  zipjax.check_spec(params, spec, x)
  assert spec.name == "res_mlp"
  assert spec.space_names == ("block0/fc1", "block1/fc1", "inp")  # the stream ends last
  assert spec.stop_points == ("inp",)
  stream = _roles(spec, params, "inp")
  assert stream[(("inp", "w"), 1)] == "out"
  assert stream[(("block0", "ln", "scale"), 0)] == "out"
  assert stream[(("block1", "fc1", "w"), 0)] == "in"
  assert stream[(("block0", "fc2", "w"), 1)] == "out"
  assert stream[(("head", "w"), 0)] == "in"
  assert spec.leaves[("head", "b")] == {} and spec.leaves[("inp", "w")].keys() == {1}
  # Features of the stream: the LayerNorm outputs that the layers read, one per reader.
  feats = jax.eval_shape(spec.features, params, x)
  assert [f.shape for f in feats["inp"]] == [(5, 8)] * 3


def test_residual_mlp_plain_function_zips_and_stops():
  params_a = _init_res_mlp(0)
  x = _normal(1, (32, 6))
  spec = zipjax.infer_spec(res_mlp, params_a, x)
  # Zipping a model with itself reproduces it, fully or up to a stop point.
  merged = zipjax.zip(params_a, params_a, spec, data=[x])
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params_a)
  np.testing.assert_allclose(spec.apply(merged, x), res_mlp(params_a, x), rtol=1e-4,
                             atol=1e-5)
  heads = zipjax.zip(params_a, params_a, spec, data=[x], stop_at=spec.stop_points[0])
  np.testing.assert_allclose(heads.apply(x)[0], res_mlp(params_a, x), rtol=1e-4, atol=1e-5)


def test_residual_mlp_linen_module():
  model = ResMLP()
  x = _normal(1, (5, 6))
  variables = _init(model, x, 0)
  spec = zipjax.infer_linen_spec(model, variables, x)
  zipjax.check_spec(variables, spec, x)
  assert len(spec.spaces) == 3 and spec.stop_points == ("inp",)
  assert spec.leaves[("params", "ln0", "scale")] == {0: zipjax.spec.Axis("inp", "out")}


class BranchCNN(nn.Module):
  """Two branches concatenated along channels, a depthwise conv, pooling."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name="stem")(x))
    x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=8, name="depthwise")(x))
    a = nn.relu(nn.Conv(6, (1, 1), name="branch_a")(x))
    b = nn.relu(nn.Conv(4, (3, 3), name="branch_b")(x))
    x = jnp.concatenate([a, b], axis=-1)
    x = nn.relu(nn.Conv(8, (3, 3), name="mix")(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(8, (3, 3), name="conv")(x))
    return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


def test_cnn_with_concatenated_branches():
  model = BranchCNN()
  x = _normal(1, (2, 8, 8, 3))
  variables = _init(model, x, 0)
  spec = zipjax.infer_linen_spec(model, variables, x)
  zipjax.check_spec(variables, spec, x)
  assert spec.space_names == ("stem", "branch_a", "branch_b", "concat(branch_a,branch_b)",
                               "mix", "conv")
  # Each branch is a space; their concatenation is a space made of the two, read by `mix`.
  cat = spec.space("concat(branch_a,branch_b)")
  assert cat.parts == (("branch_a", 1), ("branch_b", 1)) and cat.width == 10
  assert spec.leaves[("params", "branch_a", "kernel")] == {
      2: zipjax.spec.Axis("stem", "in"), 3: zipjax.spec.Axis("branch_a", "out")}
  assert spec.leaves[("params", "mix", "kernel")] == {
      2: zipjax.spec.Axis("concat(branch_a,branch_b)", "in"), 3: zipjax.spec.Axis("mix", "out")}
  # The depthwise conv stays in the stem's space, its kernel's channel axis written with M.
  assert spec.leaves[("params", "depthwise", "kernel")] == {3: zipjax.spec.Axis("stem", "out")}
  assert spec.stop_points == ("stem", "mix", "conv")
  assert not spec.unmerged
  # A copy with every space permuted is recovered exactly.
  vp = zipjax.permute_spaces(variables, spec, jax.random.key(2))
  back = zipjax.zip(variables, vp, spec, data=[x], matcher=zipjax.match.permute(),
                    reset_bn=False)
  np.testing.assert_allclose(model.apply(back, x), model.apply(variables, x), rtol=1e-5,
                             atol=1e-6)


class ScanBlock(nn.Module):

  @nn.compact
  def __call__(self, h, _):
    y = nn.gelu(nn.Dense(8, name="fc1")(nn.LayerNorm(name="ln")(h)))
    return h + nn.Dense(4, name="fc2")(y), None


class ScanRemat(nn.Module):
  """Blocks under nn.scan (parameters stacked on a leading axis), then a rematerialised layer."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(4, name="inp")(x)
    blocks = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3)
    h, _ = blocks(name="blocks")(h, None)
    h = nn.relu(nn.remat(nn.Dense)(6, name="remat")(h))
    return nn.Dense(3, name="head")(h)


def test_scan_and_remat():
  model = ScanRemat()
  x = _normal(1, (5, 7))
  va = _init(model, x, 0)
  spec = zipjax.infer_linen_spec(model, va, x)
  zipjax.check_spec(va, spec, x)
  assert spec.space_names == ("blocks/fc1", "inp", "remat")
  # Stacked leaves: the layer axis is untouched, the others shared by all layers.
  assert spec.leaves[("params", "blocks", "fc1", "kernel")] == {
      1: zipjax.spec.Axis("inp", "in"), 2: zipjax.spec.Axis("blocks/fc1", "out")}
  assert spec.leaves[("params", "blocks", "ln", "scale")] == {1: zipjax.spec.Axis("inp", "out")}
  feats = jax.eval_shape(spec.features, va, x)
  assert [f.shape for f in feats["blocks/fc1"]] == [(3, 5, 8)]  # one capture per layer
  assert [f.shape for f in feats["inp"]] == [(3, 5, 4), (5, 4)]
  # A permute zip of a model with a permuted copy of itself recovers the model.
  vp = zipjax.permute_spaces(va, spec, jax.random.key(4))
  merged = zipjax.zip(va, vp, spec, data=[x], matcher=zipjax.match.permute())
  assert jax.tree_util.tree_map(jnp.shape, merged) == jax.tree_util.tree_map(jnp.shape, va)
  np.testing.assert_allclose(spec.apply(merged, x), spec.apply(va, x), rtol=1e-4, atol=1e-5)


def bn_cnn(variables, x):
  """A plain-function conv net with a hand-written inference-mode BatchNorm."""
  p, s = variables["params"], variables["batch_stats"]
  dn = ("NHWC", "HWIO", "NHWC")
  h = jax.lax.conv_general_dilated(x, p["conv1"], (1, 1), "SAME", dimension_numbers=dn)
  c = lambda v: v.reshape(1, 1, 1, -1)
  h = (h - c(s["mean"])) * jax.lax.rsqrt(c(s["var"]) + 1e-5) * c(p["scale"]) + c(p["bias"])
  h = jax.nn.relu(h)
  h = jax.lax.conv_general_dilated(h, p["conv2"], (1, 1), "SAME", dimension_numbers=dn)
  return jnp.max(h, axis=(1, 2))


def test_plain_function_batchnorm_variance_role():
  variables = {
      "params": {"conv1": _normal(10, (3, 3, 2, 5)), "conv2": _normal(11, (3, 3, 5, 4)),
                 "scale": _normal(12, (5,), 0.1, 1.0), "bias": _normal(13, (5,), 0.1)},
      "batch_stats": {"mean": _normal(14, (5,), 0.1),
                      "var": jnp.asarray(np.exp(np.asarray(_normal(15, (5,)))))},
  }
  x = _normal(1, (2, 6, 6, 2))
  spec = zipjax.infer_spec(bn_cnn, variables, x)
  zipjax.check_spec(variables, spec, x)
  assert spec.batchnorm_stats(variables, x) == {}
  (name,) = spec.space_names
  assert _roles(spec, variables, name) == {
      (("params", "conv1"), 3): "out", (("params", "conv2"), 2): "in",
      (("params", "scale"), 0): "out", (("params", "bias"), 0): "out",
      (("batch_stats", "mean"), 0): "out", (("batch_stats", "var"), 0): "var"}


def test_slices_and_tied_weights_stay_unmerged():

  def model(p, x):
    h = jax.nn.relu(x @ p["w1"])  # merged: written by w1, read by w2
    g = jax.nn.relu(h @ p["w2"])
    g = g[:, :3] @ p["w3"]  # a slice of g's features: g's space is unmergeable
    e = jax.nn.relu(x @ p["tied"])  # tied: the same axis writes and reads this space
    return g + e @ p["tied"].T

  p = {"w1": _normal(10, (4, 6)), "w2": _normal(11, (6, 5)), "w3": _normal(12, (3, 4)),
       "tied": _normal(13, (4, 7))}
  x = _normal(1, (3, 4))
  spec = zipjax.infer_spec(model, p, x)
  zipjax.check_spec(p, spec, x)
  assert spec.space_names == ("w1",)
  assert spec.leaves[("w2",)] == {0: zipjax.spec.Axis("w1", "in")}
  assert spec.leaves[("w3",)] == {} and spec.leaves[("tied",)] == {}


# ----------------------------------------------------------------------------------------------
# What the analysis refuses.


def test_unknown_primitive_names_primitive_equation_and_source_line():

  def spectral(p, x):
    h = jax.nn.relu(x @ p["w"])
    return jnp.abs(jnp.fft.fft(h)) @ p["v"]  # fft: not in the analysis's table

  p = {"w": _const(1.0, (3, 4)), "v": _const(1.0, (4, 2))}
  with pytest.raises(zipjax.SpecError) as err:
    zipjax.infer_spec(spectral, p, _const(1.0, (2, 3)))
  msg = str(err.value)
  assert "primitive `fft`" in msg and "equation:" in msg and "fft_lengths" in msg
  assert f"{__file__}:" in msg and "spectral" in msg


def test_sort_along_a_merged_feature_axis_is_refused():

  def sorted_features(p, x):
    h = jax.nn.relu(x @ p["w"])
    return h @ p["v"] + jnp.sort(h, axis=-1) @ p["u"]

  p = {"w": _const(1.0, (3, 4)), "v": _const(1.0, (4, 2)), "u": _const(1.0, (4, 2))}
  with pytest.raises(zipjax.SpecError, match=r"(?s)sorted along this axis.*primitive: sort"):
    zipjax.infer_spec(sorted_features, p, _const(1.0, (2, 3)))
  # Sorting along a pinned axis (the batch) is fine.
  spec = zipjax.infer_spec(lambda p, x: jnp.sort(jax.nn.relu(x @ p["w"]), axis=0) @ p["v"],
                           p, _const(1.0, (2, 3)))
  assert spec.space_names == ("w",)


class Attention(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8, name="embed")(x)
    h = h + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(h)
    return nn.Dense(3, name="head")(h.mean(axis=1))


def test_attention_is_refused_or_left_unmerged():
  model = Attention()
  x = _normal(1, (2, 5, 7))
  variables = _init(model, x, 0)
  # flax's MultiHeadDotProductAttention keeps the heads on a kernel axis of their own.
  with pytest.raises(zipjax.SpecError, match="(?s)form zipjax does not merge.*DenseGeneral"):
    zipjax.infer_linen_spec(model, variables, x)
  with pytest.raises(zipjax.SpecError, match="attention='refuse'"):
    zipjax.infer_linen_spec(model, variables, x, attention="refuse")
  spec = zipjax.infer_spec(model, variables, x, attention="unmerged")
  zipjax.check_spec(variables, spec, x)
  assert spec.space_names == ("embed",)  # the residual stream only
  assert spec.leaves[("params", "attn", "query", "kernel")] == {
      0: zipjax.spec.Axis("embed", "in")}
  assert spec.leaves[("params", "attn", "out", "kernel")] == {
      2: zipjax.spec.Axis("embed", "out")}
