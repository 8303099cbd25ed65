"""Specs: validation, permutation symmetry, and check_spec catching wrong specs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zipjax
from zipjax import spec as S
from tests import zoo


@pytest.mark.parametrize("name", zoo.NAMES)
def test_check_spec_passes_on_zoo(name):
  spec, (v, _), data = zoo.make(name)
  zipjax.check_spec(v, spec, data[0], key=jax.random.key(3))


@pytest.mark.parametrize("name", zoo.NAMES)
def test_permute_spaces_preserves_function_and_changes_weights(name):
  spec, (v, _), data = zoo.make(name)
  vp = zipjax.permute_spaces(v, spec, jax.random.key(1))
  assert jax.tree_util.tree_structure(vp) == jax.tree_util.tree_structure(v)
  changed = jax.tree_util.tree_leaves(
      jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), v, vp))
  assert any(changed)
  np.testing.assert_allclose(spec.apply(vp, data[0]), spec.apply(v, data[0]), rtol=1e-4,
                             atol=1e-5)


def _broken_resnet_spec():
  spec, (v, _), data = zoo.make("resnet20")
  leaves = dict(spec.leaves)
  # conv2 of a block writes the residual stream; pretend it writes the block's inner space.
  path = ("params", "stage2_block1", "conv2", "kernel")
  leaves[path] = {-2: S.Axis("stage2_block1", S.IN), -1: S.Axis("stage2_block1", S.OUT)}
  return dataclasses.replace(spec, leaves=leaves), v, data


def test_check_spec_fails_on_wrong_spec_and_names_the_space():
  spec, v, data = _broken_resnet_spec()
  with pytest.raises(zipjax.SpecError, match="stage2_block1") as err:
    zipjax.check_spec(v, spec, data[0])
  assert "changes the model's outputs" in str(err.value)


def test_validate_lists_missing_and_extra_leaves():
  spec, (v, _), _ = zoo.make("mlp")
  leaves = dict(spec.leaves)
  del leaves[("params", "head", "bias")]
  leaves[("params", "nope", "kernel")] = {}
  bad = dataclasses.replace(spec, leaves=leaves)
  with pytest.raises(zipjax.SpecError) as err:
    S.validate(bad, v)
  msg = str(err.value)
  assert "params/head/bias" in msg and "params/nope/kernel" in msg and "Fix" in msg


def test_validate_reports_width_mismatch_with_both_sides():
  spec, (v, _), _ = zoo.make("mlp")
  bad = dataclasses.replace(spec, spaces=(S.Space("hidden0", 31), S.Space("hidden1", 24)))
  with pytest.raises(zipjax.SpecError, match=r"size 32 .* width 31"):
    S.validate(bad, v)


def test_spec_rejects_unknown_space_and_stop_point():
  spec, _, _ = zoo.make("mlp")
  leaves = dict(spec.leaves)
  leaves[("params", "head", "bias")] = {-1: S.Axis("logits", S.OUT)}
  with pytest.raises(zipjax.SpecError, match="unknown space 'logits'"):
    dataclasses.replace(spec, leaves=leaves)
  with pytest.raises(zipjax.SpecError, match="Stop points"):
    dataclasses.replace(spec, stop_points=("hidden7",))


def test_axis_rejects_unknown_role():
  with pytest.raises(zipjax.SpecError, match="role"):
    S.Axis("s", "sideways")


def test_model_init_does_not_record_features():
  spec, (v, _), _ = zoo.make("resnet20")
  assert set(v) == {"params", "batch_stats"}
  assert spec.stop_points == ("stage1", "stage2", "stage3")
