"""Partial zips, N-model zips and the ensemble: heads, trunk sharing, FLOPs, bad stop points."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zipjax
from zipjax import match
from tests import zoo


def _rel_diff(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


# ResNet-50 is covered by the full-zip tests; its partial zips cost minutes of compilation.
@pytest.fixture(scope="module", params=["mlp", pytest.param("vgg11", marks=pytest.mark.slow),
                                        "resnet20"])
def case(request):
  spec, (va, vb), data = zoo.make(request.param)
  return (spec, zipjax.reset_batchnorm(va, spec, data), zipjax.reset_batchnorm(vb, spec, data),
          data)


def test_partial_self_merge_reproduces_every_head(case):
  spec, v, _, data = case
  ref = spec.apply(v, data[0])
  for stop in spec.stop_points:
    heads = zipjax.zip(v, v, spec, data=data, stop_at=stop)
    assert isinstance(heads, zipjax.MultiHead) and heads.num_heads == 2
    out = heads.apply(data[0])
    assert out.shape == (2,) + ref.shape
    for m in range(2):
      assert _rel_diff(out[m], ref) <= 1e-4, (stop, m)


def test_partial_zip_heads_are_source_models_past_the_stop(case):
  spec, va, vb, data = case
  stop = spec.stop_points[0]
  heads = zipjax.zip(va, vb, spec, data=data, stop_at=stop, reset_bn=False)
  trunk = spec.trunk_spaces(stop)
  flat_a, flat_b = zipjax.spec.validate(spec, va), zipjax.spec.validate(spec, vb)
  for m, flat in enumerate((flat_a, flat_b)):
    head = zipjax.spec.validate(spec, heads.head(m))
    for path, leaf in flat.items():
      reads_trunk = any(ax.space in trunk for ax in spec.leaves[path].values())
      if not spec.is_trunk_leaf(path, trunk) and not reads_trunk:
        np.testing.assert_array_equal(head[path], leaf)  # untouched head layer


def test_multihead_apply_equals_each_head_run_alone(case):
  spec, va, vb, data = case
  heads = zipjax.zip(va, vb, spec, data=data, stop_at=spec.stop_points[-1])
  out = heads.apply(data[0])
  for m in range(2):
    np.testing.assert_allclose(out[m], spec.apply(heads.head(m), data[0]), rtol=1e-5,
                               atol=1e-5)


def test_multihead_batchnorm_reset_equals_per_head_reset():
  spec, (va, vb), data = zoo.make("resnet20")
  raw = zipjax.zip(va, vb, spec, data=data, stop_at="stage2", reset_bn=False)
  reset = zipjax.reset_batchnorm(raw, spec, data)
  for m in range(2):
    alone = zipjax.reset_batchnorm(raw.head(m), spec, data)
    for a, b in zip(jax.tree_util.tree_leaves(reset.head(m)), jax.tree_util.tree_leaves(alone)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_trunk_is_computed_once():
  spec, (va, vb), data = zoo.make("resnet20")
  x = data[0]
  one = zipjax.metrics.flops(spec.apply, va, x)

  def cost(mh):
    return zipjax.metrics.flops(lambda v, x: mh.replace(variables=v).apply(x), mh.variables, x)

  ens = cost(zipjax.ensemble([va, vb], spec))
  assert ens == pytest.approx(2 * one, rel=0.02)
  previous = ens
  for stop in spec.stop_points:
    c = cost(zipjax.zip(va, vb, spec, data=data, stop_at=stop, reset_bn=False))
    assert one < c < previous  # the later the stop, the more is shared
    previous = c
  assert previous == pytest.approx(one, rel=0.02)  # only the linear heads are doubled


# Slow: test_zip's three-way self-merge checks N > 2 on every CI run.
@pytest.mark.slow
@pytest.mark.parametrize("num_models", [3, 4])
def test_n_way_self_merge_reproduces_model(num_models):
  spec, (v, _), data = zoo.make("resnet20")
  v = zipjax.reset_batchnorm(v, spec, data)
  ref = spec.apply(v, data[0])
  matcher = match.greedy(alpha=1.0, beta=0.5)  # alpha=1: merged features match again
  merged = zipjax.zip_many([v] * num_models, spec, data=data, matcher=matcher)
  assert _rel_diff(spec.apply(merged, data[0]), ref) <= 1e-4
  heads = zipjax.zip_many([v] * num_models, spec, data=data, matcher=matcher,
                          stop_at="stage2")
  out = heads.apply(data[0])
  assert out.shape[0] == num_models
  for m in range(num_models):
    assert _rel_diff(out[m], ref) <= 1e-4


def test_ensemble_stacks_source_outputs():
  spec, (va, vb), data = zoo.make("vgg11")
  out = zipjax.ensemble([va, vb], spec).apply(data[0])
  np.testing.assert_allclose(out[0], spec.apply(va, data[0]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[1], spec.apply(vb, data[0]), rtol=1e-5, atol=1e-5)


def test_invalid_stop_at_lists_valid_points():
  spec, (va, vb), data = zoo.make("resnet20")
  with pytest.raises(zipjax.SpecError, match=r"'stage1', 'stage2', 'stage3'"):
    zipjax.zip(va, vb, spec, data=data, stop_at="stage2_block1")
  with pytest.raises(zipjax.SpecError, match="not a stop point"):
    zipjax.zip(va, vb, spec, data=data, stop_at="logits")


def test_stop_points_are_checked_structurally():
  import dataclasses
  spec, _, _ = zoo.make("resnet20")
  with pytest.raises(zipjax.SpecError, match="bypasses 'stage2_block0'"):
    dataclasses.replace(spec, stop_points=("stage2_block0",))
