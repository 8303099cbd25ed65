"""Models users bring, written here and not in the zoo: any pytree comes back as it went in,
Flax NNX modules merge like linen ones, and every mistake gets an error that names it."""

import dataclasses
import typing
import warnings

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zipjax
from zipjax import models
from zipjax._src import nnx as nnx_lib
from zipjax._src import spec as spec_lib
from tests import zoo


def _batches(shape, count=2, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(count)]


# ------------------------------------------------------------------------------------------------
# Plain JAX: parameters as a list of (W, b) tuples, and other pytrees.


def _mlp_apply(params, x):
  h = x.reshape(x.shape[0], -1)
  for i, (w, b) in enumerate(params):
    h = h @ w + b[None]
    if i < len(params) - 1:
      h = jax.nn.relu(h)
  return h


def _mlp_params(seed, sizes=(12, 16, 16, 3)):
  rng = np.random.default_rng(seed)
  return [(jnp.asarray(rng.standard_normal((i, o)) / np.sqrt(i), jnp.float32),
           jnp.asarray(0.1 * rng.standard_normal(o), jnp.float32))
          for i, o in zip(sizes[:-1], sizes[1:])]


def test_list_of_tuples_comes_back_as_list_of_tuples():
  pa, pb = _mlp_params(0), _mlp_params(1)
  data = _batches((8, 12))
  spec = zipjax.infer_spec(_mlp_apply, pa, data[0])
  assert [s.width for s in spec.spaces] == [16, 16]
  assert ("0", "0") in spec.leaves  # leaves are named by their key paths
  zipjax.check_spec(pa, spec, data[0])
  merged = zipjax.zip(pa, pb, spec, data=data)
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(pa)
  assert isinstance(merged, list) and all(isinstance(layer, tuple) for layer in merged)
  assert _mlp_apply(merged, data[0]).shape == (8, 3)
  same = zipjax.zip(pa, pa, spec, data=data)
  for u, v in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(pa)):
    np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6)


class Layer(typing.NamedTuple):
  w: jax.Array
  b: jax.Array


@flax.struct.dataclass
class Net:
  hidden: Layer
  out: Layer


def _net_apply(net, x):
  return jax.nn.relu(x @ net.hidden.w + net.hidden.b[None]) @ net.out.w + net.out.b[None]


@pytest.mark.parametrize("wrap", ["namedtuple_dataclass", "frozendict", "dict"])
def test_other_pytrees_come_back_with_their_structure(wrap):
  def make(seed):
    (w1, b1), (w2, b2) = _mlp_params(seed, (12, 16, 3))
    net = Net(Layer(w1, b1), Layer(w2, b2))
    if wrap == "frozendict":
      return flax.core.FrozenDict({"params": {"h": {"w": w1, "b": b1}, "o": {"w": w2, "b": b2}}})
    if wrap == "dict":
      return {"params": {"h": {"w": w1, "b": b1}, "o": {"w": w2, "b": b2}}}
    return net

  def apply(v, x):
    if isinstance(v, Net):
      return _net_apply(v, x)
    p = v["params"]
    return _net_apply(Net(Layer(p["h"]["w"], p["h"]["b"]), Layer(p["o"]["w"], p["o"]["b"])), x)

  va, vb = make(0), make(1)
  data = _batches((8, 12))
  spec = zipjax.infer_spec(apply, va, data[0])
  merged = zipjax.zip(va, vb, spec, data=data)
  assert type(merged) is type(va)
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(va)
  perm = zipjax.permute_spaces(va, spec, jax.random.key(1))
  assert jax.tree_util.tree_structure(perm) == jax.tree_util.tree_structure(va)
  np.testing.assert_allclose(apply(perm, data[0]), apply(va, data[0]), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Flax NNX


class NNXCNN(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, (3, 3), rngs=rngs)
    self.bn2 = nnx.BatchNorm(16, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.fc = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.fc(self.drop(x.mean((1, 2))))


def _trained_looking(module, seed):
  """Statistics and biases away from their init values, so resets and merges show."""
  graphdef, state, rest = nnx.split(module, (nnx.Param, nnx.BatchStat), ...)
  rng = np.random.default_rng(seed)
  pure = nnx.to_pure_dict(state)

  def perturb(path, x):
    x = np.asarray(x)
    if path[-1].key == "var":
      return jnp.asarray(rng.uniform(0.5, 2.0, x.shape), x.dtype)
    return jnp.asarray(x + 0.2 * rng.standard_normal(x.shape), x.dtype)

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(perturb, pure))
  return nnx.merge(graphdef, state, rest)


@pytest.fixture(scope="module")
def nnx_pair():
  a = _trained_looking(NNXCNN(nnx.Rngs(0)), 0)
  b = _trained_looking(NNXCNN(nnx.Rngs(1)), 1)
  return a, b, _batches((4, 8, 8, 3), count=3)


def _eval_out(module, x):
  module.eval()
  return np.asarray(module(x))


def test_nnx_modules_zip_to_a_module(nnx_pair):
  a, b, data = nnx_pair
  merged_state = lambda m: jax.tree.map(np.array, nnx.state(m, (nnx.Param, nnx.BatchStat)))
  before = [merged_state(m) for m in (a, b)]
  flags = [(m.bn1.use_running_average, m.drop.deterministic) for m in (a, b)]
  merged = zipjax.zip(a, b, data=data)
  assert isinstance(merged, NNXCNN) and merged is not a and merged is not b
  assert _eval_out(merged, data[0]).shape == (4, 4)
  # The inputs are not modified: neither their state nor their train/eval flags.
  for m, old, flag in zip((a, b), before, flags):
    jax.tree.map(np.testing.assert_array_equal, merged_state(m), old)
    assert (m.bn1.use_running_average, m.drop.deterministic) == flag


class Scaled(nnx.Module):
  """A Linear layer and a fixed (non-parameter) scale: state outside what zipjax merges."""

  def __init__(self, scale, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(5, 8, rngs=rngs)
    self.fc2 = nnx.Linear(8, 3, rngs=rngs)
    self.scale = nnx.Variable(jnp.full((5,), scale, jnp.float32))

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x * self.scale[...][None])))


def test_nnx_zip_reuses_its_inferred_spec(monkeypatch):
  from zipjax._src import nnx as nnx_lib  # pylint: disable=import-outside-toplevel
  calls = []
  infer = nnx_lib.infer_nnx_spec
  monkeypatch.setattr(nnx_lib, "infer_nnx_spec", lambda *a, **k: calls.append(1) or infer(*a, **k))
  monkeypatch.setattr(nnx_lib, "_SPECS", type(nnx_lib._SPECS)())  # pylint: disable=protected-access
  data = _batches((6, 5))
  a, b = Scaled(1.0, nnx.Rngs(0)), Scaled(1.0, nnx.Rngs(1))
  first = zipjax.zip(a, b, data=data)
  again = zipjax.zip(a, b, data=data)
  assert len(calls) == 1  # same structure, shapes, other state and input shapes
  np.testing.assert_array_equal(first(data[0]), again(data[0]))
  zipjax.zip(a, b, data=_batches((4, 5)))  # other input shapes: inferred again
  assert len(calls) == 2
  c, d = Scaled(2.0, nnx.Rngs(0)), Scaled(2.0, nnx.Rngs(1))  # another fixed scale
  scaled = zipjax.zip(c, d, data=data)
  assert len(calls) == 3
  assert scaled.scale[...][0] == 2.0


def test_nnx_self_merge_is_exact(nnx_pair):
  a, _, data = nnx_pair
  same = zipjax.zip(a, a, data=data, reset_bn=False)
  np.testing.assert_array_equal(_eval_out(same, data[0]), _eval_out(a, data[0]))


def test_nnx_batchnorm_reset_recomputes_statistics(nnx_pair):
  a, b, data = nnx_pair
  kept = zipjax.zip(a, b, data=data, reset_bn=False)
  reset = zipjax.zip(a, b, data=data)
  assert not np.allclose(nnx.state(kept, nnx.BatchStat)["bn1"]["mean"][...],
                         nnx.state(reset, nnx.BatchStat)["bn1"]["mean"][...])
  # bn1's statistics: the average over the (equal-sized) batches of its input's batch
  # statistics, as a BatchNorm in training mode computes them.
  reset.eval()
  h = [reset.conv1(x) for x in data]
  np.testing.assert_allclose(nnx.state(reset, nnx.BatchStat)["bn1"]["mean"][...],
                             np.mean([b.mean((0, 1, 2)) for b in h], 0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(nnx.state(reset, nnx.BatchStat)["bn1"]["var"][...],
                             np.mean([b.var((0, 1, 2)) for b in h], 0), rtol=1e-4, atol=1e-5)


def test_nnx_pytorch_style_reset_takes_unbiased_variances(nnx_pair):
  a, _, data = nnx_pair
  spec = zipjax.infer_nnx_spec(a, data[0])
  _, state, _ = nnx_lib.split(a)
  flax_style = zipjax.reset_batchnorm(state, spec, data)
  pytorch_style = zipjax.reset_batchnorm(state, spec, data, statistics="pytorch")
  count = data[0].shape[0] * data[0].shape[1] * data[0].shape[2]  # batch x spatial at bn1
  np.testing.assert_allclose(pytorch_style["bn1"]["var"][...],
                             flax_style["bn1"]["var"][...] * count / (count - 1), rtol=1e-6)
  np.testing.assert_array_equal(pytorch_style["bn1"]["mean"][...],
                                flax_style["bn1"]["mean"][...])
  with pytest.raises(ValueError, match="statistics must be one of"):
    zipjax.reset_batchnorm(state, spec, data, statistics="torch")


def test_nnx_modules_zip_in_the_reference_mode(nnx_pair):
  a, b, data = nnx_pair
  merged = zipjax.zip(a, b, data=data, mode="official")
  assert type(merged) is type(a)
  assert np.isfinite(_eval_out(merged, data[0])).all()


def test_nnx_partial_zip_gives_heads(nnx_pair):
  a, b, data = nnx_pair
  spec = zipjax.infer_nnx_spec(a, data[0])
  heads = zipjax.zip(a, b, spec, data=data, stop_at=spec.stop_points[0])
  out = np.asarray(heads.apply(data[0]))
  assert out.shape == (2, 4, 4)


def _linen_to_nnx(module, variables):
  """An NNX module holding linen variables ({'params', 'batch_stats'} merged by path)."""
  graphdef, state, rest = nnx.split(module, (nnx.Param, nnx.BatchStat), ...)
  pure = flax.core.unfreeze(variables["params"])

  def add(tree, stats):
    for k, v in stats.items():
      if isinstance(v, dict):
        add(tree.setdefault(k, {}), v)
      else:
        tree[k] = v

  add(pure, flax.core.unfreeze(variables["batch_stats"]))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state, rest)


def test_nnx_resnet20_merges_like_linen():
  linen_model, linen_spec = models.resnet20(width=0.5, num_outputs=5)
  x = _batches((4, 16, 16, 3), count=2, seed=3)
  va = zoo.init(linen_model, seed=0, x=x[0])
  vb = zoo.init(linen_model, seed=1, x=x[0])
  va = zipjax.reset_batchnorm(va, linen_spec, x)  # statistics away from 0 and 1
  vb = zipjax.reset_batchnorm(vb, linen_spec, x)
  nnx_a, nnx_spec = models.nnx_resnet20(width=0.5, num_outputs=5, rngs=nnx.Rngs(0))
  nnx_a = _linen_to_nnx(nnx_a, va)
  nnx_b = _linen_to_nnx(models.nnx_resnet20(width=0.5, num_outputs=5, rngs=nnx.Rngs(1))[0], vb)
  np.testing.assert_allclose(_eval_out(nnx_a, x[0]), linen_model.apply(va, x[0]),
                             rtol=1e-5, atol=1e-5)
  merged_linen = zipjax.zip(va, vb, linen_spec, data=x)
  merged_nnx = zipjax.zip(nnx_a, nnx_b, nnx_spec, data=x)
  assert isinstance(merged_nnx, models.resnet.NNXResNet20)
  np.testing.assert_allclose(_eval_out(merged_nnx, x[1]), linen_model.apply(merged_linen, x[1]),
                             rtol=1e-4, atol=1e-4)
  zipjax.check_spec(nnx_a, nnx_spec, x[0])


def test_nnx_resnet20_pads_like_linen():
  linen_model, _ = models.resnet20(width=0.25, num_outputs=3, padding="pytorch")
  x = _batches((2, 8, 8, 3), count=1, seed=4)[0]
  v = zoo.init(linen_model, seed=0, x=x)
  module, spec = models.nnx_resnet20(width=0.25, num_outputs=3, rngs=nnx.Rngs(0),
                                     padding="pytorch")
  assert spec is models.nnx_resnet20(0.25, 3, rngs=nnx.Rngs(1), padding="pytorch")[1]
  assert spec is not models.nnx_resnet20(0.25, 3, rngs=nnx.Rngs(1))[1]
  np.testing.assert_allclose(_eval_out(_linen_to_nnx(module, v), x), linen_model.apply(v, x),
                             rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Layers beyond the zoo: flatten, concatenation, pooling, GroupNorm, grouped and depthwise
# convolutions


class FlattenCNN(nn.Module):
  """Conv -> max pool -> flatten -> Dense: the Dense reads the conv's space at every position."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
    x = nn.relu(nn.Conv(8, (3, 3), name="conv2")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(3, name="fc")(x)


class GroupNormCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.GroupNorm(num_groups=2, name="gn1")(nn.Conv(8, (3, 3), name="conv1")(x)))
    x = nn.relu(nn.GroupNorm(num_groups=4, name="gn2")(nn.Conv(8, (3, 3), name="conv2")(x)))
    return nn.Dense(3, name="fc")(x.mean((1, 2)))


class BranchCNN(nn.Module):
  """Depthwise conv, two branches concatenated, average pooling, flatten."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name="stem")(x))
    x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=8, name="depthwise")(x))
    a = nn.relu(nn.Conv(6, (1, 1), name="branch_a")(x))
    b = nn.relu(nn.Conv(4, (3, 3), name="branch_b")(x))
    x = nn.avg_pool(jnp.concatenate([a, b], axis=-1), (2, 2), strides=(2, 2))
    return nn.Dense(3, name="fc")(x.reshape(x.shape[0], -1))


class GroupedConvCNN(nn.Module):
  """A grouped convolution (4 groups) reading a space that a GroupNorm splits into 2: the
  space is matched in 4 groups, which nest in the GroupNorm's 2."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.GroupNorm(num_groups=2, name="gn1")(nn.Conv(8, (3, 3), name="conv1")(x)))
    x = nn.relu(nn.Conv(12, (3, 3), feature_group_count=4, name="grouped")(x))
    return nn.Dense(3, name="fc")(x.mean((1, 2)))


LAYERS = {
    "flatten": (FlattenCNN, {"flatten(conv2)": (("conv2", 16),)}, {}),
    "groupnorm": (GroupNormCNN, {}, {"conv1": 2, "conv2": 4}),
    "grouped_conv": (GroupedConvCNN, {}, {"conv1": 4, "grouped": 4}),
    "branches": (BranchCNN, {"flatten(concat(branch_a,branch_b))": (("branch_a", 1),
                                                                   ("branch_b", 1)) * 16},
                 {}),
}


@pytest.fixture(scope="module", params=sorted(LAYERS))
def layer_model(request):
  cls, made, groups = LAYERS[request.param]
  model = cls()
  x = _batches((4, 8, 8, 3), count=2, seed=5)
  va = zoo.init(model, seed=0, x=x[0])
  spec = zipjax.infer_linen_spec(model, va, x[0])
  return model, spec, va, x, made, groups


def test_layer_spec_structure(layer_model):
  _, spec, va, x, made, groups = layer_model
  assert {s.name: s.parts for s in spec.spaces if s.parts} == made
  assert {s.name: s.groups for s in spec.spaces if s.groups > 1} == groups
  assert not spec.unmerged  # nothing left unaligned
  zipjax.check_spec(va, spec, x[0])


def test_layer_self_merge_is_exact(layer_model):
  _, spec, va, x, _, _ = layer_model
  same = zipjax.zip(va, va, spec, data=x, reset_bn=False)
  for u, v in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(va)):
    np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)


def test_layer_permuted_copy_is_recovered(layer_model):
  model, spec, va, x, _, _ = layer_model
  vp = zipjax.permute_spaces(va, spec, jax.random.key(7))
  assert not np.allclose(jax.tree_util.tree_leaves(vp)[1], jax.tree_util.tree_leaves(va)[1])
  np.testing.assert_allclose(model.apply(vp, x[0]), model.apply(va, x[0]), rtol=1e-5, atol=1e-5)
  back = zipjax.zip(va, vp, spec, data=x, matcher=zipjax.match.permute(), reset_bn=False)
  np.testing.assert_allclose(model.apply(back, x[1]), model.apply(va, x[1]), rtol=1e-5,
                             atol=1e-5)


def test_composed_merge_is_block_diagonal_for_group_and_dense_merges():
  from zipjax._src import merge as merge_lib  # pylint: disable=g-import-not-at-top
  a = zipjax.match.GroupMerge(np.array([[0, 1, 1], [2, 0, 1]]))
  b = zipjax.match.GroupMerge(np.array([[1, 0], [0, 1]]))
  grouped = merge_lib.compose([(a, 2), (b, 1)])
  dense = merge_lib.compose([(zipjax.match.DenseMerge(a.M, a.U), 2),
                             (zipjax.match.DenseMerge(b.M, b.U), 1)])
  assert isinstance(grouped, zipjax.match.GroupMerge)
  assert isinstance(dense, zipjax.match.DenseMerge)
  for got in (grouped, dense):
    mg, ug = got.blocks()
    for m in range(2):
      ma, ua = [blk[m] for blk in a.blocks()]
      mb, ub = [blk[m] for blk in b.blocks()]
      np.testing.assert_array_equal(mg[m], _block_diag(ma, ma, mb))
      np.testing.assert_array_equal(ug[m], _block_diag(ua, ua, ub))


def _block_diag(*blocks):
  n = sum(b.shape[0] for b in blocks)
  out, i = np.zeros((n, n), np.float32), 0
  for b in blocks:
    out[i:i + b.shape[0], i:i + b.shape[1]] = b
    i += b.shape[0]
  return out


def test_groupnorm_groups_are_matched_group_by_group():
  model = GroupNormCNN()
  x = _batches((4, 8, 8, 3))
  va, vb = zoo.init(model, seed=0, x=x[0]), zoo.init(model, seed=1, x=x[0])
  spec = zipjax.infer_linen_spec(model, va, x[0])
  stats = zipjax.compute_stats([va, vb], spec, x)
  merges = zipjax.compute_merges(stats, num_models=2, groups={"conv1": 2})
  groups = np.asarray(merges["conv1"].groups)
  assert (groups[:, :4] < 4).all() and (groups[:, 4:] >= 4).all()
  # A permutation across groups is not a symmetry of the model (why groups are kept).
  swap = np.array([4, 1, 2, 3, 0, 5, 6, 7])  # channels 0 and 4 change groups
  swapped = zipjax.permute_spaces(va, spec, perms={"conv1": swap})
  assert not np.allclose(model.apply(swapped, x[0]), model.apply(va, x[0]), atol=1e-4)


def _grouped_conv_pair():
  model = GroupedConvCNN()
  x = _batches((4, 8, 8, 3), count=2, seed=5)
  va, vb = zoo.init(model, seed=0, x=x[0]), zoo.init(model, seed=1, x=x[0])
  return model, zipjax.infer_linen_spec(model, va, x[0]), va, vb, x


def test_grouped_conv_inferred_spec_is_the_declared_one():
  _, spec, va, _, _ = _grouped_conv_pair()
  S = zipjax.spec
  declared = {**S.conv("conv1", None, "conv1"), **S.layernorm("gn1", "conv1"),
              **S.conv("grouped", "conv1", "grouped", groups=4), **S.dense("fc", "grouped", None)}
  shapes = {p: np.ndim(v) for p, v in spec_lib.flatten(va).items()}
  declared_spec = dataclasses.replace(spec, leaves=declared)
  assert {p: spec.leaf_axes(p, n) for p, n in shapes.items()} == {
      p: declared_spec.leaf_axes(p, n) for p, n in shapes.items()}
  kernel = spec.leaves[("params", "grouped", "kernel")]
  assert kernel[2] == S.Axis("conv1", S.IN, groups=4, by=3)


def test_grouped_conv_merges_as_its_block_diagonal_plain_conv():
  """A real merge of a grouped convolution equals the merge of the plain convolution whose
  kernel is the grouped one's, block-diagonal: the groups of both spaces are kept."""
  _, spec, va, vb, x = _grouped_conv_pair()
  stats = zipjax.compute_stats([va, vb], spec, x)
  with pytest.raises(zipjax.MismatchError, match="mixes features of different groups"):
    zipjax.apply_merges([va, vb], spec, zipjax.compute_merges(stats, num_models=2))
  merges = zipjax.compute_merges(stats, num_models=2, spec=spec)
  for name in ("conv1", "grouped"):
    ids = np.asarray(merges[name].groups)
    size = spec.width(name) // 4
    assert (ids // size == np.arange(ids.shape[1]) // size).all()  # each group stays whole
  grouped = zipjax.apply_merges([va, vb], spec, merges)
  plain_spec = dataclasses.replace(spec, leaves={
      **spec.leaves, ("params", "grouped", "kernel"): {
          2: zipjax.spec.Axis("conv1", "in"), 3: zipjax.spec.Axis("grouped", "out")}})
  expand = lambda v: {**v, "params": {**v["params"], "grouped": {  # noqa: E731
      **v["params"]["grouped"], "kernel": zipjax.spec.expand_groups(
          v["params"]["grouped"]["kernel"], 2, 3, 4)}}}
  plain = zipjax.apply_merges([expand(va), expand(vb)], plain_spec, merges)
  np.testing.assert_allclose(expand(grouped)["params"]["grouped"]["kernel"],
                             plain["params"]["grouped"]["kernel"], rtol=1e-6, atol=1e-7)
  assert np.abs(np.asarray(plain["params"]["grouped"]["kernel"])).max() > 0


@pytest.mark.parametrize("spaces,groups,match", [
    ((("conv1", 1), ("grouped", 4)), 4, "'conv1', must be matched within those groups"),
    ((("conv1", 4), ("grouped", 1)), 4, "its `by` axis writes, 'grouped', must be matched"),
    ((("conv1", 2), ("grouped", 2)), 2, "needs 4, and axis -1 a multiple of 2"),
])
def test_declared_grouped_conv_errors(spaces, groups, match):
  model, spec, va, _, x = _grouped_conv_pair()
  S = zipjax.spec
  leaves = {**S.conv("conv1", None, "conv1"), **S.layernorm("gn1", "conv1"),
            **S.conv("grouped", "conv1", "grouped", groups=groups),
            **S.dense("fc", "grouped", None)}
  with pytest.raises(zipjax.SpecError, match=match):
    declared = S.linen_spec(model, spaces=[S.Space(n, spec.width(n), groups=g)
                                           for n, g in spaces], leaves=leaves)
    zipjax.check_spec(va, declared, x[0])


def test_explain_names_the_group_slice():
  _, spec, va, _, _ = _grouped_conv_pair()
  rows = {"/".join(r.path): r for r in zipjax.explain(va, spec).leaves}
  assert "U of conv1 (one of 4 groups, by axis 3)" in rows["params/grouped/kernel"].detail


# ------------------------------------------------------------------------------------------------
# Nothing silent


class CumsumCNN(nn.Module):
  """A cumulative sum along the channels: the order of conv1's features matters."""

  @nn.compact
  def __call__(self, x):
    x = jnp.cumsum(nn.relu(nn.Conv(8, (3, 3), name="conv1")(x)), axis=-1)
    return nn.Dense(3, name="fc")(x.mean((1, 2)))


@pytest.fixture(scope="module")
def unmergeable():
  model = CumsumCNN()
  x = _batches((4, 8, 8, 3))
  va, vb = zoo.init(model, seed=0, x=x[0]), zoo.init(model, seed=1, x=x[0])
  return zipjax.infer_linen_spec(model, va, x[0]), va, vb, x


def test_spec_merging_no_space_is_refused(unmergeable):
  spec, va, vb, x = unmergeable
  assert not spec.spaces
  with pytest.raises(zipjax.SpecError, match="merges no feature space.*weight averaging"):
    zipjax.zip(va, vb, spec, data=x)


def test_unmerged_weights_are_reported_with_their_reason(unmergeable):
  spec, va, _, _ = unmergeable
  report = zipjax.explain(va, spec)
  rows = {"/".join(r.path): r for r in report.leaves}
  assert rows["params/conv1/kernel"].status == "averaged"
  assert rows["params/conv1/kernel"].unmerged
  assert "cumsum along this axis" in rows["params/conv1/kernel"].detail
  assert "test_user_models.py" in rows["params/conv1/kernel"].detail  # the user's code line
  assert "params/fc/kernel" in str(report)


def test_zip_warns_when_features_are_only_averaged():
  class Partly(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(8, name="fc1")(x))
      x = nn.relu(nn.Dense(8, name="fc2")(x))
      y = jnp.concatenate([x, x[:, :2]], axis=-1)  # a concatenation pins fc2's space
      return nn.Dense(3, name="out")(y)

  model = Partly()
  x = _batches((8, 5))
  va, vb = zoo.init(model, seed=0, x=x[0]), zoo.init(model, seed=1, x=x[0])
  spec = zipjax.infer_linen_spec(model, va, x[0])
  assert spec.space_names == ("fc1",)
  with pytest.warns(zipjax.UnmergedWarning, match="params/fc2/kernel"):
    zipjax.zip(va, vb, spec, data=x)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", zipjax.UnmergedWarning)
    zipjax.zip(va, vb, spec, data=x)


# ------------------------------------------------------------------------------------------------
# check_spec finds what init values hide


class BNNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), name="conv1")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn1")(x))
    zipjax.spec.capture(self, "h", x)
    return nn.Dense(3, name="fc")(x.mean((1, 2)))


def _bn_spec(drop=(), width=8):
  module = BNNet()
  leaves = {**zipjax.spec.conv("conv1", None, "h"), **zipjax.spec.batchnorm("bn1", "h"),
            **zipjax.spec.dense("fc", "h", None)}
  for path in drop:
    leaves[path] = {}
  return module, zipjax.spec.linen_spec(module, spaces=[zipjax.spec.Space("h", width)],
                                        leaves=leaves)


@pytest.mark.parametrize("left_out", [("batch_stats", "bn1", "mean"),
                                      ("batch_stats", "bn1", "var"),
                                      ("params", "conv1", "bias")])
def test_check_spec_catches_leaves_left_out_on_init_values(left_out):
  module, spec = _bn_spec(drop=[left_out])
  x = _batches((4, 8, 8, 3))[0]
  v = zoo.init(module, seed=0, x=x)
  with pytest.raises(zipjax.SpecError, match="permuting its spaces changes"):
    zipjax.check_spec(v, spec, x)
  zipjax.check_spec(v, _bn_spec()[1], x)  # the full spec passes


def test_check_spec_catches_a_misspelt_capture():
  class Misspelt(BNNet):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(8, (3, 3), name="conv1")(x)
      x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn1")(x))
      zipjax.spec.capture(self, "hh", x)
      return nn.Dense(3, name="fc")(x.mean((1, 2)))

  _, good = _bn_spec()
  module = Misspelt()
  spec = zipjax.spec.linen_spec(module, spaces=good.spaces, leaves=good.leaves)
  x = _batches((4, 8, 8, 3))[0]
  v = zoo.init(module, seed=0, x=x)
  with pytest.raises(zipjax.SpecError, match=r"\['h'\] are never captured.*\['hh'\]"):
    zipjax.check_spec(v, spec, x)


# ------------------------------------------------------------------------------------------------
# Calibration data checked up front


@pytest.fixture(scope="module")
def bn_pair():
  module, spec = _bn_spec()
  x = _batches((4, 8, 8, 3), count=2)
  va = zoo.init(module, seed=0, x=x[0])
  vb = zoo.init(module, seed=1, x=x[0])
  return spec, va, vb, x


@pytest.mark.parametrize("kind,match", [
    ("one_array", r"one array .*\[x\] for one batch"),
    ("x_y_tuple", r"one \(inputs, labels\) batch.*\[\(x, y\)\]"),
    ("dict", r"one dict batch"),
    ("empty", r"no batches"),
    ("iterator", r"one-shot iterator"),
    ("nchw", r"does not fit the model.*\(4, 3, 8, 8\)"),
    ("no_batch_axis", r"does not fit the model"),
])
def test_bad_calibration_data_is_named(bn_pair, kind, match):
  spec, va, vb, x = bn_pair
  labels = jnp.zeros(4, jnp.int32)
  data = {
      "one_array": x[0],
      "x_y_tuple": (x[0], labels),
      "dict": {"image": x[0]},
      "empty": [],
      "iterator": iter(x),
      "nchw": [jnp.transpose(x[0], (0, 3, 1, 2))],
      "no_batch_axis": [x[0].reshape(4, -1)],
  }[kind]
  with pytest.raises(zipjax.DataError, match=match):
    zipjax.zip(va, vb, spec, data=data)


def test_nchw_hint_when_the_spec_knows_its_input():
  model = BNNet()
  x = _batches((4, 8, 8, 3))
  va, vb = zoo.init(model, seed=0, x=x[0]), zoo.init(model, seed=1, x=x[0])
  spec = zipjax.infer_linen_spec(model, va, x[0])
  with pytest.raises(zipjax.DataError, match="channels first"):
    zipjax.zip(va, vb, spec, data=[jnp.transpose(x[0], (0, 3, 1, 2))])


# ------------------------------------------------------------------------------------------------
# API


def test_star_import_leaves_the_builtin_zip():
  namespace: dict = {}
  exec("from zipjax import *", namespace)  # pylint: disable=exec-used
  assert "zip" not in namespace
  assert zipjax.zip.__doc__.count("\n") > 20


def test_uncalled_matcher_factory(bn_pair):
  spec, va, vb, x = bn_pair
  with pytest.raises(TypeError, match=r"factory.*greedy\(\)"):
    zipjax.zip(va, vb, spec, data=x, matcher=zipjax.match.greedy)
  with pytest.raises(TypeError, match=r"factory.*weight_matching\(\)"):
    zipjax.zip(va, vb, spec, data=x, matcher=zipjax.match.weight_matching)


@pytest.mark.parametrize("call", ["zip", "check_spec", "reset_batchnorm", "compute_stats",
                                  "explain", "zip_many"])
def test_wrong_argument_order(bn_pair, call):
  spec, va, vb, x = bn_pair
  with pytest.raises(TypeError, match="wrong order"):
    {"zip": lambda: zipjax.zip(spec, va, vb, data=x),
     "zip_many": lambda: zipjax.zip_many(spec, [va, vb], data=x),
     "check_spec": lambda: zipjax.check_spec(spec, va, x[0]),
     "reset_batchnorm": lambda: zipjax.reset_batchnorm(spec, va, x),
     "compute_stats": lambda: zipjax.compute_stats(spec, [va, vb], x),
     "explain": lambda: zipjax.explain(spec, va)}[call]()


def test_zip_many_of_a_dict(bn_pair):
  spec, va, vb, x = bn_pair
  with pytest.raises(TypeError, match=r"dict with keys \['a', 'b'\].*list\(models.values\(\)\)"):
    zipjax.zip_many({"a": va, "b": vb}, spec, data=x)


@pytest.mark.parametrize("kwargs", [{"alpha": None}, {"beta": "0.5"}, {"alpha": True}])
def test_greedy_options_of_the_wrong_type(kwargs):
  with pytest.raises(TypeError, match="must be a number"):
    zipjax.match.greedy(**kwargs)


def test_mixed_dtypes_are_refused(bn_pair):
  spec, va, vb, x = bn_pair
  vb16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), vb)
  with pytest.raises(zipjax.MismatchError, match="float32 in model 0 but bfloat16 in model 1"):
    zipjax.zip(va, vb16, spec, data=x)


def test_infer_linen_spec_takes_the_analysis_options():
  model = BNNet()
  x = _batches((4, 8, 8, 3))[0]
  v = zoo.init(model, seed=0, x=x)
  spec = zipjax.infer_linen_spec(model, v, x, attention="unmerged", name="bn-net")
  assert spec.name == "bn-net"


def test_infer_spec_of_an_nnx_module_points_to_infer_nnx_spec(nnx_pair):
  a, _, data = nnx_pair
  with pytest.raises(TypeError, match="infer_nnx_spec"):
    zipjax.infer_spec(a, None, data[0])


def test_zip_of_variables_without_a_spec(bn_pair):
  _, va, vb, x = bn_pair
  with pytest.raises(TypeError, match="needs the models' spec"):
    zipjax.zip(va, vb, data=x)



# ------------------------------------------------------------------------------------------------
# Save and load


_LOAD_SCRIPT = """
import sys, numpy as np, jax, zipjax
sys.path.insert(0, {root!r})
from tests.test_user_models import _mlp_apply, _mlp_params, _batches
x = _batches((8, 12))[0]
like = _mlp_params(0)
spec = zipjax.infer_spec(_mlp_apply, like, x)
full = zipjax.load({full!r}, like=like)
assert isinstance(full, list) and isinstance(full[0], tuple), type(full)
heads = zipjax.load({partial!r}, spec=spec, like=like)
np.save({out!r}, np.concatenate([np.asarray(_mlp_apply(full, x))[None],
                                 np.asarray(heads.apply(x))]))
"""


def test_save_and_load_in_a_fresh_process(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  pa, pb = _mlp_params(0), _mlp_params(1)
  data = _batches((8, 12))
  spec = zipjax.infer_spec(_mlp_apply, pa, data[0])
  merged = zipjax.zip(pa, pb, spec, data=data)
  heads = zipjax.zip(pa, pb, spec, data=data, stop_at=spec.stop_points[0])
  zipjax.save(tmp_path / "full", merged)
  zipjax.save(tmp_path / "partial", heads)
  out = tmp_path / "out.npy"
  root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
  script = _LOAD_SCRIPT.format(root=root, full=str(tmp_path / "full"),
                               partial=str(tmp_path / "partial"), out=str(out))
  subprocess.run([sys.executable, "-c", script], check=True, cwd=root,
                 env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
  got = np.load(out)
  np.testing.assert_allclose(got[0], _mlp_apply(merged, data[0]), rtol=1e-6)
  np.testing.assert_allclose(got[1:], heads.apply(data[0]), rtol=1e-6)
  with pytest.raises(ValueError, match="partial zip.*spec="):
    zipjax.load(tmp_path / "partial")


def test_save_and_load_an_nnx_module(nnx_pair, tmp_path):
  a, b, data = nnx_pair
  merged = zipjax.zip(a, b, data=data)
  zipjax.save(tmp_path / "m", merged)
  back = zipjax.load(tmp_path / "m", like=NNXCNN(nnx.Rngs(5)))
  assert isinstance(back, NNXCNN)
  np.testing.assert_array_equal(_eval_out(back, data[0]), _eval_out(merged, data[0]))
