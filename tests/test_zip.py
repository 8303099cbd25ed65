"""zip / zip_many end to end: self-merges, permutation recovery, BatchNorm reset, bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zipjax
from zipjax import match
from zipjax import models
from zipjax import spec as S
from zipjax._src import spec as spec_lib
from tests import zoo

MATCHERS = {
    "greedy": match.greedy(),
    "greedy_alpha1_beta0": match.greedy(alpha=1.0, beta=0.0),
    "permute": match.permute(),
    "identity": match.identity(),
}


def _rel_diff(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.fixture(scope="module", params=zoo.NAMES)
def model_case(request):
  spec, (va, vb), data = zoo.make(request.param)
  return spec, zipjax.reset_batchnorm(va, spec, data), vb, data


@pytest.mark.parametrize("matcher,reset_bn", [(m, True) for m in MATCHERS] + [("greedy", False)])
def test_self_merge_reproduces_model(model_case, matcher, reset_bn):
  spec, v, _, data = model_case
  merged = zipjax.zip(v, v, spec, data=data, matcher=MATCHERS[matcher], reset_bn=reset_bn)
  for x in data:
    assert _rel_diff(spec.apply(merged, x), spec.apply(v, x)) <= 1e-5


@pytest.mark.parametrize("matcher,reset_bn", [("permute", True), ("greedy_alpha1_beta0", True),
                                              ("permute", False)])
def test_permutation_recovery(model_case, matcher, reset_bn):
  spec, v, _, data = model_case
  vp = zipjax.permute_spaces(v, spec, jax.random.key(7))
  merged = zipjax.zip(v, vp, spec, data=data, matcher=MATCHERS[matcher], reset_bn=reset_bn)
  for x in data:
    assert _rel_diff(spec.apply(merged, x), spec.apply(v, x)) <= 1e-5


def test_merged_tree_matches_inputs_and_is_deterministic(model_case):
  spec, va, vb, data = model_case
  m1 = zipjax.zip(va, vb, spec, data=data)
  m2 = zipjax.zip(va, vb, spec, data=data)
  assert jax.tree_util.tree_structure(m1) == jax.tree_util.tree_structure(va)
  for a, b, ref in zip(jax.tree_util.tree_leaves(m1), jax.tree_util.tree_leaves(m2),
                       jax.tree_util.tree_leaves(va)):
    assert a.shape == ref.shape and a.dtype == ref.dtype
    np.testing.assert_array_equal(a, b)


def test_three_way_self_merge():
  spec, (v, _), data = zoo.make("resnet20")
  v = zipjax.reset_batchnorm(v, spec, data)
  merged = zipjax.zip_many([v, v, v], spec, data=data, matcher=match.greedy(alpha=1.0))
  assert _rel_diff(spec.apply(merged, data[0]), spec.apply(v, data[0])) <= 1e-4


def test_inputs_are_not_mutated():
  spec, (va, vb), data = zoo.make("resnet20")
  va_np = jax.tree_util.tree_map(np.array, va)
  before = jax.tree_util.tree_map(np.copy, va_np)
  zipjax.zip(va_np, vb, spec, data=data)
  zipjax.reset_batchnorm(va_np, spec, data)
  for a, b in zip(jax.tree_util.tree_leaves(va_np), jax.tree_util.tree_leaves(before)):
    np.testing.assert_array_equal(a, b)


class _TwoLayer(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(4, name="d1")(x)
    h = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(h))
    S.capture(self, "h", h)
    return nn.BatchNorm(use_running_average=not train, name="bn2")(nn.Dense(3, name="d2")(h))


def _two_layer():
  module = _TwoLayer()
  leaves = {**S.dense("d1", None, "h"), **S.batchnorm("bn1", "h"), **S.dense("d2", "h", None),
            **S.batchnorm("bn2", "h2")}
  leaves[("batch_stats", "bn2", "mean")] = {}
  leaves[("batch_stats", "bn2", "var")] = {}
  leaves[("params", "bn2", "scale")] = {}
  leaves[("params", "bn2", "bias")] = {}
  return module, S.linen_spec(module, spaces=[S.Space("h", 4)], leaves=leaves)


@pytest.mark.parametrize("statistics", ["flax", "pytorch"])
def test_batchnorm_reset_equals_numpy_batch_statistics(statistics):
  """flax: batches weighted by size, biased variances; pytorch (momentum=None): every batch
  the same weight, unbiased variances."""
  module, spec = _two_layer()
  rng = np.random.default_rng(0)
  batches = [rng.normal(size=(n, 5)).astype(np.float32) for n in (32, 16)]
  v = zoo.init(module, seed=0, x=batches[0])
  p = jax.tree_util.tree_map(np.asarray, v["params"])
  means, vars_ = {"bn1": [], "bn2": []}, {"bn1": [], "bn2": []}
  for x in batches:
    x = x.astype(np.float64)
    z1 = x @ p["d1"]["kernel"] + p["d1"]["bias"]
    ddof = 1 if statistics == "pytorch" else 0
    means["bn1"].append(z1.mean(0))
    vars_["bn1"].append(z1.var(0, ddof=ddof))
    h = np.maximum((z1 - z1.mean(0)) / np.sqrt(z1.var(0) + 1e-5) * p["bn1"]["scale"]
                   + p["bn1"]["bias"], 0)
    z2 = h @ p["d2"]["kernel"] + p["d2"]["bias"]
    means["bn2"].append(z2.mean(0))
    vars_["bn2"].append(z2.var(0, ddof=ddof))
  reset = zipjax.reset_batchnorm(v, spec, batches, statistics=statistics)
  w = np.array([32, 16]) / 48 if statistics == "flax" else np.array([0.5, 0.5])
  for layer in ("bn1", "bn2"):
    np.testing.assert_allclose(reset["batch_stats"][layer]["mean"],
                               w @ np.stack(means[layer]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reset["batch_stats"][layer]["var"],
                               w @ np.stack(vars_[layer]), rtol=1e-5, atol=1e-6)


def test_zip_rejects_fewer_than_two_models():
  spec, (va, _), data = zoo.make("mlp")
  with pytest.raises(ValueError, match="at least 2"):
    zipjax.zip_many([va], spec, data=data)


def test_zip_rejects_different_architectures():
  spec, (va, _), data = zoo.make("mlp")
  _, (other, _), _ = zoo.make("resnet20")
  with pytest.raises(zipjax.MismatchError, match="only in model 0"):
    zipjax.zip(va, other, spec, data=data)


def test_zip_rejects_different_widths_listing_both_shapes():
  model, spec = models.mlp(widths=(32, 24), num_outputs=5)
  other, _ = models.mlp(widths=(16, 24), num_outputs=5)
  x = jnp.ones((2, 8, 8, 1))
  va, vb = zoo.init(model, seed=0, x=x), zoo.init(other, seed=0, x=x)
  with pytest.raises(zipjax.MismatchError, match=r"\(32,\) in model 0 but \(16,\) in model 1"):
    zipjax.zip(va, vb, spec, data=[x])


def test_zip_rejects_non_finite_parameters():
  spec, (va, vb), data = zoo.make("mlp")
  bad = jax.tree_util.tree_map(lambda a: a, vb)
  bad["params"]["dense0"]["bias"] = bad["params"]["dense0"]["bias"].at[0].set(jnp.inf)
  with pytest.raises(zipjax.MismatchError, match="params/dense0/bias"):
    zipjax.zip(va, bad, spec, data=data)


def test_apply_merges_checks_merge_shapes():
  spec, (va, vb), _ = zoo.make("mlp")
  merges = {s.name: match.identity()(np.eye(2 * s.width), num_models=2) for s in spec.spaces}
  merges["hidden0"] = match.identity()(np.eye(3 * 32), num_models=3)
  with pytest.raises(zipjax.MismatchError, match="hidden0"):
    zipjax.apply_merges([va, vb], spec, merges)


def test_apply_merges_rejects_non_finite_parameters():
  spec, (va, vb), _ = zoo.make("mlp")
  merges = {s.name: match.identity()(np.eye(2 * s.width), num_models=2) for s in spec.spaces}
  bad = jax.tree_util.tree_map(lambda a: a, vb)
  bad["params"]["dense1"]["kernel"] = bad["params"]["dense1"]["kernel"].at[0, 0].set(jnp.nan)
  with pytest.raises(zipjax.MismatchError, match=r"Model 1 .*params/dense1/kernel"):
    zipjax.apply_merges([va, bad], spec, merges)


# ----------------------------------------------------------------------------------------------
# Applying merges against a float64 numpy reference: W* = sum_m M_m(out) W_m U_m(in), with
# BatchNorm layers merged as affine maps.


def _random_corr(dim, seed):
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(4 * dim, dim // 2)) @ rng.normal(size=(dim // 2, dim))
  return np.corrcoef(feats, rowvar=False)


def _soft_merge(width, num_models, seed):
  """A merge that is no averaging of groups: every model's features mixed densely."""
  rng = np.random.default_rng(seed)
  M = rng.uniform(size=(width, num_models * width)).astype(np.float32)
  U = rng.normal(size=(num_models * width, width)).astype(np.float32)
  return match.DenseMerge(M / M.sum(1, keepdims=True), U)


def _numpy_zip(spec, variables_list, merges, batchnorm="affine"):
  """Every leaf merged by its axes' M and U in float64; BatchNorm layers as their affine maps
  a x + c, or (``batchnorm="leaves"``) each of their leaves like any other."""
  affine = spec.batchnorm_layers() if batchnorm == "affine" else ()
  flats = [{p: np.asarray(x, np.float64) for p, x in spec_lib.flatten(v).items()}
           for v in variables_list]
  for bn in affine:  # the affine map a x + c in place of scale and bias
    for f in flats:
      a = f[bn.scale] / np.sqrt(f[bn.var] + 1e-5)
      f[bn.scale], f[bn.bias] = a, f[bn.bias] - a * f[bn.mean]
  out = {}
  for path in flats[0]:
    x = np.stack([f[path] for f in flats])
    axes = spec.leaf_axes(path, x.ndim - 1)
    for axis, ax in axes.items():
      ms, us = merges[ax.space].blocks()
      mats = ms if ax.role != "in" else [u.T for u in us]
      x = np.stack([np.moveaxis(np.tensordot(mats[m].astype(np.float64),
                                             np.moveaxis(x[m], axis, 0), axes=(1, 0)), 0, axis)
                    for m in range(len(flats))])
    out[path] = x.sum(0) if any(a.role != "in" for a in axes.values()) else x.mean(0)
  for bn in affine:
    a = out[bn.scale]
    out[bn.scale] = a * np.sqrt(out[bn.var] + 1e-5)
    out[bn.bias] = out[bn.bias] + a * out[bn.mean]
  return out


MERGE_KINDS = {
    # alpha = beta = 1: long chains, several members of one model in a group
    "greedy_chains": lambda corr, n: match.greedy(alpha=1.0, beta=1.0)(corr, num_models=n),
    "greedy": lambda corr, n: match.greedy()(corr, num_models=n),
    "permute": lambda corr, n: match.permute()(corr, num_models=n),
    "soft": None,  # dense M and U
}


def _merges(spec, num_models, kind, seed=0):
  return {s.name: (_soft_merge(s.width, num_models, seed + i) if kind == "soft"
                   else MERGE_KINDS[kind](_random_corr(num_models * s.width, seed + i),
                                          num_models))
          for i, s in enumerate(spec.spaces)}


def _with_trained_batchnorm(spec, variables, seed):
  """Variables whose BatchNorm statistics and affine parameters are far from init values."""
  rng = np.random.default_rng(seed)
  flat = dict(spec_lib.flatten(variables))
  for bn in spec.batchnorm_layers():
    shape = np.shape(flat[bn.var])
    flat[bn.var] = rng.uniform(0.1, 3.0, shape).astype(np.float32)
    for p in (bn.mean, bn.scale, bn.bias):
      flat[p] = rng.normal(size=shape).astype(np.float32)
  return spec_lib.unflatten(flat)


@pytest.mark.parametrize("kernel", ["segment_sum", "einsum"])
@pytest.mark.parametrize("kind", list(MERGE_KINDS))
@pytest.mark.parametrize("name,num_models", [("mlp", 2), ("mlp", 3), ("resnet20", 2)])
def test_apply_merges_equals_numpy_reference(name, num_models, kind, kernel):
  spec, variables, _ = zoo.make(name, num_models=num_models)
  variables = [_with_trained_batchnorm(spec, v, m) for m, v in enumerate(variables)]
  merges = _merges(spec, num_models, kind)
  if kind == "greedy_chains":  # the case it exists for: a model gives a group several members
    assert any((np.bincount(m.groups[0], minlength=m.width) > 1).any() for m in merges.values())
  got = spec_lib.flatten(zipjax.apply_merges(variables, spec, merges, kernel=kernel))
  want = _numpy_zip(spec, variables, merges)
  assert got.keys() == want.keys()
  for path in want:
    np.testing.assert_allclose(got[path], want[path], rtol=2e-5, atol=2e-6 * np.abs(
        want[path]).max(), err_msg=spec_lib.fmt_path(path))


@pytest.mark.parametrize("kind,kernel", [("greedy", "segment_sum"), ("soft", "einsum")])
def test_apply_merges_batchnorm_leaves_equals_numpy_reference(kind, kernel):
  """batchnorm="leaves" (the official code's merge): scale, bias, mean and variance each
  merged with M, like any leaf that writes the space."""
  spec, variables, _ = zoo.make("resnet20")
  variables = [_with_trained_batchnorm(spec, v, m) for m, v in enumerate(variables)]
  merges = _merges(spec, 2, kind)
  got = spec_lib.flatten(zipjax.apply_merges(variables, spec, merges, kernel=kernel,
                                             batchnorm="leaves"))
  want = _numpy_zip(spec, variables, merges, batchnorm="leaves")
  affine = _numpy_zip(spec, variables, merges)
  bn = spec.batchnorm_layers()[0]
  assert not np.allclose(want[bn.scale], affine[bn.scale], rtol=1e-3)  # the two differ
  assert got.keys() == want.keys()
  for path in want:
    np.testing.assert_allclose(got[path], want[path], rtol=2e-5, atol=2e-6 * np.abs(
        want[path]).max(), err_msg=spec_lib.fmt_path(path))
  with pytest.raises(ValueError, match="batchnorm must be one of"):
    zipjax.apply_merges(variables, spec, merges, batchnorm="official")


@pytest.mark.parametrize("name", zoo.NAMES)
def test_apply_merges_of_copies_is_exact_without_a_reset(name):
  # A self-merge and a permuted copy, merged by identity / the permutation: every leaf comes
  # back, BatchNorm layers included, with no statistics recomputed.
  spec, (v, _), _ = zoo.make(name)
  v = _with_trained_batchnorm(spec, v, 0)
  perms = spec_lib.random_permutations(spec, jax.random.key(1))
  vp = zipjax.permute_spaces(v, spec, perms=perms)
  identity = {s.name: match.merge_from_groups([[j, s.width + j] for j in range(s.width)],
                                              2 * s.width) for s in spec.spaces}
  # feature j of the copy is feature perm[j] of the model: merge it with that one
  undo = {s.name: match.merge_from_groups(
      [[j, s.width + int(np.argsort(perms[s.name])[j])] for j in range(s.width)], 2 * s.width)
      for s in spec.spaces}
  for kernel in ("segment_sum", "einsum"):
    for other, merges in ((v, identity), (vp, undo)):
      merged = zipjax.apply_merges([v, other], spec, merges, kernel=kernel)
      for path, x in spec_lib.flatten(merged).items():
        np.testing.assert_allclose(x, spec_lib.flatten(v)[path], rtol=1e-6, atol=1e-7,
                                   err_msg=f"{kernel} {spec_lib.fmt_path(path)}")


@pytest.mark.parametrize("name,num_models,partial,kind", [
    ("mlp", 3, False, "greedy_chains"), ("mlp", 3, False, "soft"),
    ("mlp", 3, True, "greedy"), ("resnet20", 2, True, "greedy_chains"),
    ("resnet20", 2, False, "greedy_chains")])
def test_apply_merges_finds_a_non_finite_value_in_any_leaf_of_any_model(name, num_models,
                                                                        partial, kind):
  # The program clears the models as finite from one sum over its result: every value of
  # every model must reach the result. A NaN or inf in any leaf is named, trunk or head.
  spec, variables, _ = zoo.make(name, num_models=num_models)
  stop = spec.stop_points[len(spec.stop_points) // 2] if partial else None
  merges = _merges(spec, num_models, kind)
  rng = np.random.default_rng(0)
  flat = spec_lib.flatten(variables[-1])
  for i, path in enumerate(flat):
    bad = dict(flat)
    index = tuple(int(rng.integers(d)) for d in np.shape(flat[path]))
    bad[path] = jnp.asarray(flat[path]).at[index].set(np.nan if i % 2 else np.inf)
    models = list(variables[:-1]) + [spec_lib.unflatten(bad)]
    with pytest.raises(zipjax.MismatchError, match=f"Model {num_models - 1} .*"
                       + spec_lib.fmt_path(path)):
      zipjax.apply_merges(models, spec, merges, stop_at=stop)


def _compiles_during(fn):
  """How many XLA programs ``fn()`` compiles (JAX's public monitoring events)."""
  seen = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      seen.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    jax.block_until_ready(fn())
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return len(seen)


@pytest.mark.parametrize("stop_at", [None, pytest.param("stage2", marks=pytest.mark.slow)])
def test_zip_of_another_pair_compiles_no_new_program(stop_at):
  # The programs depend on the architecture, the number of models and the batch shapes, not
  # on the weights or the merges: a zip of other models, with another matcher, compiles
  # nothing once one zip ran.
  spec, variables, data = zoo.make("resnet20", num_models=4)
  jax.clear_caches()  # other tests compiled these programs: start from none
  first = _compiles_during(lambda: zipjax.zip(variables[0], variables[1], spec, data=data,
                                              stop_at=stop_at))
  again = _compiles_during(lambda: zipjax.zip(variables[2], variables[3], spec, data=data,
                                              stop_at=stop_at,
                                              matcher=match.greedy(alpha=0.3, beta=0.125)))
  assert first > 0 and again == 0, (first, again)


def test_zoo_factories_give_the_same_spec_for_the_same_arguments():
  # Specs hash by identity and the passes are compiled per spec: a second call of a factory
  # in a notebook must find them compiled.
  for factory, args in ((models.resnet20, (0.25,)), (models.resnet50, (0.0625,)),
                        (models.vgg11, (0.125,)), (models.mlp, ([8, 8],))):
    assert factory(*args)[1] is factory(*args)[1]
  assert models.mlp([8, 8])[1] is models.mlp((8, 8))[1]
  assert models.resnet20(0.25)[1] is not models.resnet20(0.5)[1]


# ----------------------------------------------------------------------------------------------
# Merge types


def test_group_merge_m_and_u_average_and_copy_the_groups():
  merge = match.merge_from_groups([[0, 3], [1, 2, 5], [4]], 6)  # two models of width 3
  np.testing.assert_array_equal(merge.groups, [[0, 1, 1], [0, 2, 1]])
  want_m = np.zeros((3, 6), np.float32)
  for g, members in enumerate([[0, 3], [1, 2, 5], [4]]):
    want_m[g, members] = 1 / len(members)
  np.testing.assert_array_equal(merge.M, want_m)
  np.testing.assert_array_equal(merge.U, (want_m > 0).T.astype(np.float32))
  np.testing.assert_array_equal(merge.sizes, [2, 3, 1])
  assert merge.members() == [[0, 3], [1, 2, 5], [4]]
  assert (merge.num_models, merge.width) == (2, 3)
  ms, us = merge.blocks()
  np.testing.assert_array_equal(np.concatenate(ms, 1), merge.M)
  np.testing.assert_array_equal(np.concatenate(us, 0), merge.U)


def test_group_merge_is_read_only_and_a_pytree():
  merge = match.GroupMerge(np.array([[1, 0], [0, 1]]))
  with pytest.raises(ValueError, match="read-only"):
    merge.groups[0, 0] = 1
  leaves, treedef = jax.tree_util.tree_flatten(merge)
  assert len(leaves) == 1 and leaves[0].dtype == np.int32
  back = jax.jit(lambda m: m)(merge)
  assert isinstance(back, match.GroupMerge)
  np.testing.assert_array_equal(back.groups, merge.groups)
  assert treedef == jax.tree_util.tree_structure(match.GroupMerge(np.zeros((2, 2), int) + [0, 1]))


@pytest.mark.parametrize("groups,message", [
    (np.zeros((2, 3)), "integer"),
    (np.array([[0, 1, 3], [0, 1, 2]]), "0..2"),
    (np.array([[0, 1, 1], [0, 1, 1]]), "Merged feature 2 has no members"),
    (np.array([0, 1]), r"\(N, n\)"),
])
def test_group_merge_rejects_bad_groups(groups, message):
  with pytest.raises(ValueError, match=message):
    match.GroupMerge(groups)


def test_dense_merge_checks_shapes_and_apply_merges_checks_widths():
  with pytest.raises(ValueError, match="M of shape"):
    match.DenseMerge(np.zeros((4, 6)), np.zeros((6, 4)))
  spec, (va, vb), _ = zoo.make("mlp")
  merges = _merges(spec, 2, "soft")
  merges["hidden0"] = _soft_merge(spec.width("hidden0"), 3, 0)
  with pytest.raises(zipjax.MismatchError, match="hidden0.*for 3 models"):
    zipjax.apply_merges([va, vb], spec, merges)
  merges["hidden0"] = np.eye(4)
  with pytest.raises(TypeError, match="GroupMerge or DenseMerge"):
    zipjax.apply_merges([va, vb], spec, merges)


def test_apply_merges_rejects_an_unknown_kernel():
  spec, (va, vb), _ = zoo.make("mlp")
  with pytest.raises(ValueError, match="Unknown kernel 'gather'"):
    zipjax.apply_merges([va, vb], spec, _merges(spec, 2, "greedy"), kernel="gather")
