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
from zipjax._src import match as match_lib
from zipjax._src import spec as spec_lib
from zipjax._src import zipping
from tests import zoo

MATCHERS = {
    "greedy": match.greedy(),
    "greedy_alpha1_beta0": match.greedy(alpha=1.0, beta=0.0),
    "permute": match.permute(),
    "identity": match.identity(),
}


def _rel_diff(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.fixture(scope="module", params=list(zoo.ZOO))
def model_case(request):
  spec, (va, vb), data = zoo.make(request.param)
  return spec, zipjax.reset_batchnorm(spec, va, data), vb, data


@pytest.mark.parametrize("matcher", list(MATCHERS))
def test_self_merge_reproduces_model(model_case, matcher):
  spec, v, _, data = model_case
  merged = zipjax.zip(v, v, spec, data=data, matcher=MATCHERS[matcher])
  for x in data:
    assert _rel_diff(spec.apply(merged, x), spec.apply(v, x)) <= 1e-4


@pytest.mark.parametrize("matcher", ["permute", "greedy_alpha1_beta0"])
def test_permutation_recovery(model_case, matcher):
  spec, v, _, data = model_case
  vp = zipjax.permute_spaces(v, spec, jax.random.key(7))
  merged = zipjax.zip(v, vp, spec, data=data, matcher=MATCHERS[matcher])
  for x in data:
    assert _rel_diff(spec.apply(merged, x), spec.apply(v, x)) <= 1e-4


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
  v = zipjax.reset_batchnorm(spec, v, data)
  merged = zipjax.zip_many([v, v, v], spec, data=data, matcher=match.greedy(alpha=1.0))
  assert _rel_diff(spec.apply(merged, data[0]), spec.apply(v, data[0])) <= 1e-4


def test_inputs_are_not_mutated():
  spec, (va, vb), data = zoo.make("resnet20")
  va_np = jax.tree_util.tree_map(np.array, va)
  before = jax.tree_util.tree_map(np.copy, va_np)
  zipjax.zip(va_np, vb, spec, data=data)
  zipjax.reset_batchnorm(spec, va_np, data)
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


def test_batchnorm_reset_equals_numpy_batch_statistics():
  module, spec = _two_layer()
  rng = np.random.default_rng(0)
  batches = [rng.normal(size=(n, 5)).astype(np.float32) for n in (32, 16)]
  v = module.init(jax.random.key(0), batches[0])
  p = jax.tree_util.tree_map(np.asarray, v["params"])
  means, vars_ = {"bn1": [], "bn2": []}, {"bn1": [], "bn2": []}
  for x in batches:
    x = x.astype(np.float64)
    z1 = x @ p["d1"]["kernel"] + p["d1"]["bias"]
    means["bn1"].append(z1.mean(0))
    vars_["bn1"].append(z1.var(0))
    h = np.maximum((z1 - z1.mean(0)) / np.sqrt(z1.var(0) + 1e-5) * p["bn1"]["scale"]
                   + p["bn1"]["bias"], 0)
    z2 = h @ p["d2"]["kernel"] + p["d2"]["bias"]
    means["bn2"].append(z2.mean(0))
    vars_["bn2"].append(z2.var(0))
  reset = zipjax.reset_batchnorm(spec, v, batches)
  w = np.array([32, 16]) / 48
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
  va, vb = model.init(jax.random.key(0), x), other.init(jax.random.key(0), x)
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
    zipjax.apply_merges(spec, [va, vb], merges)


def test_apply_merges_rejects_non_finite_parameters():
  spec, (va, vb), _ = zoo.make("mlp")
  merges = {s.name: match.identity()(np.eye(2 * s.width), num_models=2) for s in spec.spaces}
  bad = jax.tree_util.tree_map(lambda a: a, vb)
  bad["params"]["dense1"]["kernel"] = bad["params"]["dense1"]["kernel"].at[0, 0].set(jnp.nan)
  with pytest.raises(zipjax.MismatchError, match=r"Model 1 .*params/dense1/kernel"):
    zipjax.apply_merges(spec, [va, bad], merges)


# ----------------------------------------------------------------------------------------------
# The zip kernel against a float64 numpy reference: W* = sum_m M_m(out) W_m U_m(in).


def _random_corr(dim, seed):
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(4 * dim, dim // 2)) @ rng.normal(size=(dim // 2, dim))
  return np.corrcoef(feats, rowvar=False)


def _soft_merge(width, num_models, seed):
  """A merge that is no averaging of groups: every model's features mixed densely."""
  rng = np.random.default_rng(seed)
  M = rng.uniform(size=(width, num_models * width)).astype(np.float32)
  U = rng.normal(size=(num_models * width, width)).astype(np.float32)
  return match.Merge(M / M.sum(1, keepdims=True), U)


def _numpy_zip(spec, variables_list, merges):
  flats = [spec_lib.flatten(v) for v in variables_list]
  out = {}
  for path in flats[0]:
    x = np.stack([np.asarray(f[path], np.float64) for f in flats])
    axes = spec.leaf_axes(path, x.ndim - 1)
    for axis, ax in axes.items():
      ms, us = merges[ax.space].blocks()
      mats = {"out": ms, "var": [a * a for a in ms], "in": [u.T for u in us]}[ax.role]
      x = np.stack([np.moveaxis(np.tensordot(mats[m].astype(np.float64),
                                             np.moveaxis(x[m], axis, 0), axes=(1, 0)), 0, axis)
                    for m in range(len(flats))])
    out[path] = x.sum(0) if any(a.role != "in" for a in axes.values()) else x.mean(0)
  return out


MERGE_KINDS = {
    # alpha = beta = 1: long chains, several members of one model in a group (gathers, K > 1)
    "greedy_chains": lambda corr, n: match.greedy(alpha=1.0, beta=1.0)(corr, num_models=n),
    "greedy": lambda corr, n: match.greedy()(corr, num_models=n),
    "permute": lambda corr, n: match.permute()(corr, num_models=n),
    "soft": None,  # dense blocks
}


def _merges(spec, num_models, kind):
  return {s.name: (_soft_merge(s.width, num_models, i) if kind == "soft"
                   else MERGE_KINDS[kind](_random_corr(num_models * s.width, i), num_models))
          for i, s in enumerate(spec.spaces)}


@pytest.fixture
def fresh_programs():
  """The zip programs split and traced anew, before the test and after it, failed or not:
  they depend on the thresholds a test may change."""
  zipping._programs.cache_clear()
  zipping._zip_leaves_program.clear_cache()
  yield
  zipping._programs.cache_clear()
  zipping._zip_leaves_program.clear_cache()


@pytest.fixture(params=["fused", "blocks", "blocks, two members on the last axis"])
def gather_path(request, monkeypatch, fresh_programs):
  """The zip kernels' ways to apply group merges: small leaves gather every member in one
  fused loop, larger ones the first members, then blocks of further members, or on a last
  axis whose groups often have several members of a model, the first two members, then
  blocks of the rest. The test models are small: "blocks" sends every leaf the larger
  leaves' way with further members of the last axis in blocks, the third setting with two
  members of every group of the last axis in the main loop."""
  del fresh_programs
  if request.param != "fused":
    monkeypatch.setattr(zipping, "_SMALL_GATHERS", 0)
    monkeypatch.setattr(zipping, "_TWO_MEMBERS_SHARE", 0.0 if "two" in request.param else 2.0)
  return request.param


def test_small_leaves_take_the_fused_path_and_the_fixture_sends_them_to_blocks(gather_path):
  # The zoo's leaves are all small enough for one fused loop: without the "blocks" setting,
  # the blocks and scatters would go untested.
  spec, variables, _ = zoo.make("resnet20", num_models=2)
  merges = _merges(spec, 2, "greedy_chains")
  hlo = jax.jit(lambda f: zipping._zip_leaves(spec, None, f, zipping.prepare_merges(merges))[0]
                ).lower(tuple(spec_lib.flatten(v) for v in variables)).as_text()
  assert ("scatter" in hlo) == (gather_path != "fused")


def test_two_members_on_the_last_axis_leave_fewer_scatters(monkeypatch, fresh_programs):
  # The fixture's two "blocks" settings must take different paths: with two members a group
  # in the main loop, a last axis scatters only the groups with three or more members.
  del fresh_programs
  monkeypatch.setattr(zipping, "_SMALL_GATHERS", 0)
  spec, variables, _ = zoo.make("resnet20", num_models=2)
  merges = _merges(spec, 2, "greedy_chains")
  flats = tuple(spec_lib.flatten(v) for v in variables)
  scatters = {}
  for share in (2.0, 0.0):
    monkeypatch.setattr(zipping, "_TWO_MEMBERS_SHARE", share)
    zipping._programs.cache_clear()
    zipping._zip_leaves_program.clear_cache()
    hlo = jax.jit(lambda f: zipping._zip_leaves(spec, None, f, zipping.prepare_merges(merges))[0]
                  ).lower(flats).as_text()
    scatters[share] = hlo.count("stablehlo.scatter")
  assert 0 < scatters[0.0] < scatters[2.0], scatters


@pytest.mark.parametrize("kind", list(MERGE_KINDS))
@pytest.mark.parametrize("name,num_models", [("mlp", 2), ("mlp", 3), ("resnet20", 2)])
def test_apply_merges_equals_numpy_reference(name, num_models, kind, gather_path):
  del gather_path
  spec, variables, _ = zoo.make(name, num_models=num_models)
  merges = _merges(spec, num_models, kind)
  if kind == "greedy_chains":  # the case this test exists for: a model gives a group several
    assert max(int(zipping.as_groups(m).mask.sum(-1).max()) for m in merges.values()) > 1
  got = spec_lib.flatten(zipjax.apply_merges(spec, list(variables), merges))
  want = _numpy_zip(spec, variables, merges)
  assert got.keys() == want.keys()
  for path in want:
    np.testing.assert_allclose(got[path], want[path], rtol=2e-5, atol=2e-6 * np.abs(
        want[path]).max(), err_msg=spec_lib.fmt_path(path))


@pytest.mark.parametrize("dim", [48, 12])  # 12: three models of width 4
def test_as_groups_is_exactly_the_merge(dim):
  corr = _random_corr(dim, 0)
  for matcher in (match.greedy(alpha=1.0, beta=1.0), match.greedy(), match.identity()):
    merge = matcher(corr, num_models=3)
    groups = zipping.as_groups(merge)
    (idx, mask, rows, rows_idx, rows_mask, rows_inv_size, inv_size, rows2, rows2_idx,
     rows2_mask, rows2_inv_size) = (np.asarray(a) for a in groups)
    if dim == 48 and matcher.__name__.startswith("greedy(alpha=1.0, beta=1.0)"):  # chains
      assert rows2_mask.any(), "no group with three members of a model: rows2 untested"
    size = mask.sum((0, 2))  # each group's members over all models
    n = merge.M.shape[0]
    for m, (mb, ub) in enumerate(zip(*merge.blocks())):
      for start, stop, r, r_idx, r_mask, r_inv_size in (
          (1, 2, rows, rows_idx, rows_mask, rows_inv_size),
          (2, None, rows2, rows2_idx, rows2_mask, rows2_inv_size)):
        several = np.flatnonzero(mask[m].sum(1) > start)
        assert len(np.unique(r[m])) == r.shape[1]  # distinct rows, padded with other groups
        real = r_mask[m].any(1)
        np.testing.assert_array_equal(r[m][real], several)
        np.testing.assert_array_equal(r_idx[m][real], idx[m, several, start:stop])
        np.testing.assert_array_equal(r_mask[m][real], mask[m, several, start:stop])
        np.testing.assert_array_equal(r_inv_size[m], 1 / size[r[m]])
      np.testing.assert_array_equal(inv_size, 1 / size)
      # The kernels' two ways to split the members (padding included) are U exactly: the
      # first members, the rows' second members and the rows2's members after them; the
      # first two members and the rows2's members after them.
      for main, parts in ((1, ((rows, rows_idx, rows_mask), (rows2, rows2_idx, rows2_mask))),
                          (2, ((rows2, rows2_idx, rows2_mask),))):
        dense = np.zeros((n, n), np.float32)
        for k in range(min(main, idx.shape[-1])):
          np.add.at(dense, (np.arange(n), idx[m, :, k]), mask[m, :, k])
        for r, r_idx, r_mask in parts:
          for k in range(r_idx.shape[-1]):
            np.add.at(dense, (r[m], r_idx[m, :, k]), r_mask[m, :, k])
        np.testing.assert_array_equal(dense, ub.T)
      dense = np.zeros((n, n), np.float32)
      for k in range(idx.shape[-1]):
        np.add.at(dense, (np.arange(n), idx[m, :, k]), mask[m, :, k])
      np.testing.assert_array_equal(dense, ub.T)
      np.testing.assert_array_equal(dense / size[:, None], mb)
  assert zipping.as_groups(_soft_merge(16, 2, 0)) is None


@pytest.mark.parametrize("name,num_models,partial,kind", [
    ("mlp", 3, False, "greedy_chains"), ("mlp", 3, False, "greedy"),
    ("mlp", 3, False, "permute"), ("mlp", 3, True, "greedy_chains"),
    ("resnet20", 2, True, "greedy_chains")])
def test_every_value_of_every_model_reaches_the_zipped_leaf(name, num_models, partial, kind,
                                                            gather_path):
  # The kernel clears a leaf as finite from one sum over its zipped result. That catches a
  # NaN or inf anywhere in any model only if every value reaches the result with a weight
  # that is not 0. Group merges weigh by 1, 1/|g| or 1/|g|^2 > 0, so the gradient of the
  # result's sum must be positive at every value of every model, trunk and head leaves alike.
  spec, variables, _ = zoo.make(name, num_models=num_models)
  trunk = (frozenset(spec.trunk_spaces(spec.stop_points[len(spec.stop_points) // 2]))
           if partial else None)
  merges = _merges(spec, num_models, kind)
  plans = zipping.prepare_merges({k: v for k, v in merges.items() if trunk is None or k in trunk})

  def total(flats):
    out, _ = zipping._zip_leaves(spec, trunk, flats, plans)
    return sum(jnp.sum(x) for x in out.values())

  grads = jax.grad(total)(tuple(spec_lib.flatten(v) for v in variables))
  for m, flat in enumerate(grads):
    for path, g in flat.items():
      assert np.all(np.asarray(g) > 0), f"model {m}, {spec_lib.fmt_path(path)}"


@pytest.mark.parametrize("kind", ["greedy_chains", "soft"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_apply_merges_finds_a_non_finite_value_at_a_further_member(kind, bad, gather_path):
  spec, (va, vb), _ = zoo.make("resnet20")
  merges = _merges(spec, 2, kind)
  leaf = "params/stage2_block0/conv2/kernel"  # reads and writes a merged space
  path = tuple(leaf.split("/"))
  axes = spec.leaf_axes(path, 4)
  (in_axis,) = [a for a, ax in axes.items() if ax.role == "in"]
  feature = 0
  if kind == "greedy_chains":  # a feature of model 1 that is not the first of its group
    groups = zipping.as_groups(merges[axes[in_axis].space])
    rows = np.flatnonzero(np.asarray(groups.mask)[1, :, 1] > 0)
    feature = int(np.asarray(groups.idx)[1, rows[0], 1])
  flat = spec_lib.flatten(vb)
  index = [0] * 4
  index[in_axis] = feature
  flat[path] = flat[path].at[tuple(index)].set(bad)
  with pytest.raises(zipjax.MismatchError, match=r"Model 1 .*" + leaf):
    zipjax.apply_merges(spec, [va, spec_lib.unflatten(flat)], merges)


def test_as_groups_of_merges_built_from_groups_equals_the_scan_of_m_and_u():
  corr = _random_corr(48, 1)
  for matcher in (match.greedy(alpha=1.0, beta=1.0), match.greedy(), match.identity(),
                  match.permute()):
    merge = matcher(corr, num_models=3)
    assert match_lib.merge_groups(merge) is not None  # the fast path is taken
    plain = match.Merge(merge.M.copy(), merge.U.copy())
    assert match_lib.merge_groups(plain) is None  # writeable arrays: scanned
    for fast, scanned in zip(zipping.as_groups(merge), zipping.as_groups(plain)):
      np.testing.assert_array_equal(fast, scanned)


def test_packed_groups_unpack_to_the_same_arrays_inside_jit():
  # apply_merges sends the Groups of all spaces as two arrays (int32 and float32 fields) and
  # slices each space's fields out inside the kernel; identity merges have no further
  # members (K = 1, P = 0), greedy chains have several.
  groups = {name: zipping.as_groups(matcher(_random_corr(48, i), num_models=3))
            for i, (name, matcher) in enumerate([("chains", match.greedy(alpha=1.0, beta=1.0)),
                                                 ("identity", match.identity()),
                                                 ("greedy", match.greedy())])}
  packed = zipping._PackedGroups.pack_all(groups)
  assert len(jax.tree_util.tree_leaves(packed)) == 2 * len(groups)
  assert len({id(a) for a in jax.tree_util.tree_leaves(packed)}) == 2  # shared
  unpacked = jax.jit(lambda p: {k: v.unpack() for k, v in p.items()})(jax.device_put(packed))
  for space in groups:
    for name, want, got in zip(zipping.Groups._fields, groups[space], unpacked[space]):
      assert got.dtype == want.dtype, (space, name)
      np.testing.assert_array_equal(got, want, err_msg=f"{space} {name}")


def test_prepare_merges_sends_all_group_merges_in_two_arrays():
  spec, _, _ = zoo.make("mlp", num_models=2)
  merges = _merges(spec, 2, "greedy")
  merges[spec.space_names[0]] = _soft_merge(spec.width(spec.space_names[0]), 2, 0)  # dense
  plans = zipping.prepare_merges(merges)
  assert list(plans.device) == list(merges)
  assert isinstance(plans.device[spec.space_names[0]], tuple)
  assert spec.space_names[0] not in plans.members
  packed = [p for p in plans.device.values() if isinstance(p, zipping._PackedGroups)]
  assert len(packed) == len(merges) - 1
  assert len({id(a) for p in packed for a in (p.ints, p.floats)}) == 2
  for name, p in plans.device.items():
    if isinstance(p, zipping._PackedGroups):
      groups = zipping.as_groups(merges[name])
      for field, want, got in zip(zipping.Groups._fields, groups,
                                  jax.jit(lambda q: q.unpack())(p)):
        np.testing.assert_array_equal(got, want, err_msg=f"{name} {field}")
      # The small leaves' members: the same members, K rounded up with weight-0 padding.
      members = plans.members[name]
      k, rounded = groups.idx.shape[2], members.idx.shape[2]
      assert (rounded == 1) == (k == 1) and rounded >= k
      assert rounded == 1 or (rounded >= 4 and rounded & (rounded - 1) == 0)  # 4, 8, ...
      np.testing.assert_array_equal(members.idx[:, :, :k], groups.idx)
      np.testing.assert_array_equal(members.mask[:, :, :k], groups.mask)
      assert not members.mask[:, :, k:].any()


def test_programs_of_small_leaves_are_found_compiled_for_other_merges(monkeypatch,
                                                                      fresh_programs):
  # Greedy merges of other models have other sizes K and P. The programs of small leaves
  # take neither P nor the exact K, so they compile once; here every leaf counts as small.
  del fresh_programs
  monkeypatch.setattr(zipping, "_SMALL_GATHERS", 2**30)
  spec, variables, _ = zoo.make("resnet20", num_models=2)
  flats = tuple(spec_lib.flatten(v) for v in variables)
  assert all(zipping._is_small(x.size, len(spec.leaf_axes(p, x.ndim)))
             for p, x in flats[0].items())
  sizes, shapes = [], set()
  for seed in range(3):
    merges = {s.name: match.greedy()(_random_corr(2 * s.width, 100 * seed + i), num_models=2)
              for i, s in enumerate(spec.spaces)}
    shapes.add(tuple(zipping.as_groups(m).rows.shape for m in merges.values()))
    zipping._zip_leaves(spec, None, flats, zipping.prepare_merges(merges))
    sizes.append(zipping._zip_leaves_program._cache_size())
  assert len(shapes) == 3  # the merges' P differ: programs taking P would compile again
  assert sizes == [sizes[0]] * 3


def test_merges_built_from_groups_are_read_only():
  merge = match.merge_from_groups([[0, 2], [1, 3]], 4)
  with pytest.raises(ValueError, match="read-only"):
    merge.M[0, 0] = 1.0
  with pytest.raises(ValueError, match="read-only"):
    merge.U[0, 0] = 0.0
  assert repr(merge).startswith("Merge(M=")


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_scatter_add_on_any_axis_equals_numpy(axis):
  rng = np.random.default_rng(axis)
  y = rng.normal(size=(5, 6, 7)).astype(np.float32)
  rows = np.array([3, 1, 3, 0], np.int32)  # unsorted, with a repeat: the two add up
  block_shape = [len(rows) if a == axis else d for a, d in enumerate(y.shape)]
  block = rng.normal(size=block_shape).astype(np.float32)
  want = np.moveaxis(y.copy(), axis, 0)
  np.add.at(want, rows, np.moveaxis(block, axis, 0))
  got = zipping._scatter_add(jnp.asarray(y), axis, jnp.asarray(rows), jnp.asarray(block))
  np.testing.assert_allclose(got, np.moveaxis(want, 0, axis), rtol=1e-6)


def test_gather_of_leaves_too_big_for_flat_indices_takes_axis_by_axis(monkeypatch):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 6, 5)).astype(np.float32))
  ops = {1: (jnp.asarray(rng.integers(0, 6, size=(4, 2)), jnp.int32),
             jnp.asarray(rng.uniform(size=(4, 2)), jnp.float32)),
         2: (jnp.asarray(rng.integers(0, 5, size=(5, 3)), jnp.int32),
             jnp.asarray(rng.uniform(size=(5, 3)), jnp.float32))}
  flat = zipping._gather(x, ops)
  monkeypatch.setattr(zipping, "_FLAT_INDEX_LIMIT", 1)
  by_axis = zipping._gather(x, ops)
  want = np.asarray(x)
  for axis, (idx, w) in ops.items():
    idx, w = np.asarray(idx), np.asarray(w)
    shape = [1] * 3
    shape[axis] = idx.shape[0]
    want = sum(np.take(want, idx[:, k], axis=axis) * w[:, k].reshape(shape)
               for k in range(idx.shape[1]))
  np.testing.assert_allclose(flat, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(by_axis, want, rtol=1e-5, atol=1e-6)
