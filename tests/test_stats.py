"""Feature statistics against numpy float64, their numerics, and bad calibration data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zipjax
from tests import zoo
from zipjax import models
from zipjax._src import spec as spec_lib
from zipjax._src import stats as stats_lib


@pytest.fixture(scope="module")
def resnet_pair():
  model, spec = models.resnet20(width=0.5)
  x = jax.random.normal(jax.random.key(0), (12, 16, 16, 3))
  va = zoo.init(model, seed=1, x=x[:2])
  vb = zoo.init(model, seed=2, x=x[:2])
  return spec, va, vb, [x[:8], x[8:]]


@pytest.mark.parametrize("width,num_models", [(0.5, 2), (1.0, 3)])
def test_stats_equal_numpy_float64(width, num_models):
  # Width 1 has spaces of 16, 32 and 64 channels: second moments block by block (up to 32)
  # and in one product of the concatenated features (64).
  model, spec = models.resnet20(width=width)
  data = list(jax.random.normal(jax.random.key(0), (2, 6, 16, 16, 3)))
  variables = [zoo.init(model, seed=1 + m, x=data[0][:2]) for m in range(num_models)]
  stats = zipjax.compute_stats(variables, spec, data)
  widths = {spec.width(n) for n in ("stage1", "stage2_block1", "stage3")}
  assert min(widths) <= stats_lib._BLOCKS_MAX_WIDTH  # pylint: disable=protected-access
  if width == 1.0:
    assert max(widths) > stats_lib._BLOCKS_MAX_WIDTH  # pylint: disable=protected-access
  for name in ("stage1", "stage2_block1", "stage3"):
    samples = []
    for x in data:
      per_model = [np.concatenate([np.asarray(f, np.float64).reshape(-1, f.shape[-1])
                                   for f in spec.features(v, x)[name]]) for v in variables]
      samples.append(np.concatenate(per_model, axis=1))
    f = np.concatenate(samples)
    s = stats[name]
    assert int(s.count) == f.shape[0]
    np.testing.assert_allclose(s.mean, f.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s.covariance, np.cov(f.T), rtol=1e-4, atol=1e-5)


def test_stream_space_counts_every_capture(resnet_pair):
  spec, va, vb, data = resnet_pair
  stats = zipjax.compute_stats([va, vb], spec, data, spaces=["stage1"])
  # Stem + 3 blocks capture stage1 at 16x16 for each of the 12 images.
  assert int(stats["stage1"].count) == 4 * 12 * 16 * 16


def test_update_is_stable_with_large_offsets():
  rng = np.random.default_rng(0)
  f = (1e4 + rng.normal(size=(4000, 3)) * np.array([1.0, 2.0, 0.5])).astype(np.float32)
  s = stats_lib.init_stats(3)
  for chunk in np.split(f, 8):
    s = stats_lib.update_stats(s, jnp.asarray(chunk))
  np.testing.assert_allclose(s.covariance, np.cov(f.astype(np.float64).T), rtol=1e-3,
                             atol=1e-3)


def test_correlation_defines_dead_features():
  rng = np.random.default_rng(0)
  live = rng.normal(size=(100, 2))
  f = np.concatenate([live, np.zeros((100, 2)), np.full((100, 1), 3.0)], axis=1)
  s = stats_lib.update_stats(stats_lib.init_stats(5), jnp.asarray(f, jnp.float32))
  corr = np.asarray(zipjax.correlation(s))
  assert np.isfinite(corr).all()
  np.testing.assert_array_equal(np.diag(corr), np.ones(5))
  # Dead features are interchangeable with dead features of the same value only.
  assert corr[2, 3] == 1.0 and corr[2, 4] == 0.0 and corr[0, 2] == 0.0
  np.testing.assert_allclose(corr[:2, :2], np.corrcoef(live.T), rtol=1e-5)


def test_identical_features_correlate_exactly_one():
  f = np.random.default_rng(1).normal(size=(256, 3)).astype(np.float32)
  s = stats_lib.update_stats(stats_lib.init_stats(6), jnp.asarray(np.concatenate([f, f], 1)))
  corr = np.asarray(zipjax.correlation(s))
  np.testing.assert_allclose(np.diag(corr[:3, 3:]), np.ones(3), rtol=0, atol=1e-6)


def test_nan_features_raise(resnet_pair):
  spec, va, vb, data = resnet_pair
  bad = [data[0].at[0, 0, 0, 0].set(jnp.nan)]
  with pytest.raises(zipjax.DataError, match="not finite"):
    zipjax.compute_stats([va, vb], spec, bad)


def test_one_shot_iterator_and_empty_data_raise(resnet_pair):
  spec, va, vb, data = resnet_pair
  with pytest.raises(zipjax.DataError, match="one-shot iterator"):
    zipjax.compute_stats([va, vb], spec, iter(data))
  with pytest.raises(zipjax.DataError, match="generator"):
    zipjax.zip(va, vb, spec, data=(x for x in data))
  with pytest.raises(zipjax.DataError, match="no batches"):
    zipjax.compute_stats([va, vb], spec, [])


def test_batches_may_be_tuples_or_dicts(resnet_pair):
  spec, va, vb, data = resnet_pair
  plain = zipjax.compute_stats([va, vb], spec, data, spaces=["stage3"])
  labels = np.zeros(8)
  for wrapped in ([(x, labels) for x in data], [{"image": x} for x in data]):
    got = zipjax.compute_stats([va, vb], spec, wrapped, spaces=["stage3"])
    np.testing.assert_array_equal(got["stage3"].m2, plain["stage3"].m2)


@pytest.mark.parametrize("microbatch", [3, 4, 8])
def test_microbatches_give_the_statistics_of_whole_batches(resnet_pair, microbatch):
  # Batches of 8 and 4 images: parts of 3 leave uneven remainders, 4 splits the first batch
  # only, 8 splits neither. Chan's update makes the statistics independent of the batching
  # up to float rounding.
  spec, va, vb, data = resnet_pair
  whole = zipjax.compute_stats([va, vb], spec, data, spaces=["stage1", "stage3"])
  parts = zipjax.compute_stats([va, vb], spec, data, spaces=["stage1", "stage3"],
                               microbatch=microbatch)
  for name in ("stage1", "stage3"):
    assert int(parts[name].count) == int(whole[name].count)
    np.testing.assert_allclose(parts[name].mean, whole[name].mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(parts[name].m2, whole[name].m2, rtol=1e-4,
                               atol=1e-4 * float(jnp.abs(whole[name].m2).max()))


def _record_step_sizes(monkeypatch) -> list[int]:
  """The batch size of every statistics step from now on, in order."""
  sizes = []
  step = stats_lib._stats_step  # pylint: disable=protected-access

  def counting_step(*args):
    sizes.append(args[-1].shape[0])
    return step(*args)

  monkeypatch.setattr(stats_lib, "_stats_step", counting_step)
  return sizes


def test_microbatches_run_one_step_per_part(resnet_pair, monkeypatch):
  spec, va, vb, data = resnet_pair
  sizes = _record_step_sizes(monkeypatch)
  zipjax.compute_stats([va, vb], spec, [(x, None) for x in data], spaces=["stage3"],
                       microbatch=3, mesh=jax.sharding.Mesh(jax.devices()[:1], ("data",)))
  assert sizes == [3, 3, 2, 3, 1]
  sizes.clear()
  zipjax.compute_stats([va, vb], spec, data, spaces=["stage3"], microbatch=np.int64(4))
  assert sizes == [4, 4, 4]


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "32", "Auto"])
def test_microbatch_must_be_a_positive_int(resnet_pair, bad):
  spec, va, vb, data = resnet_pair
  with pytest.raises(ValueError, match="microbatch must be a positive int"):
    zipjax.compute_stats([va, vb], spec, data, microbatch=bad)


def test_zip_passes_microbatch_to_the_statistics(resnet_pair, monkeypatch):
  spec, va, vb, data = resnet_pair
  seen = {}
  compute = stats_lib.compute_stats

  def recording(*args, **kwargs):
    seen.update(kwargs)
    return compute(*args, **kwargs)

  monkeypatch.setattr(stats_lib, "compute_stats", recording)
  merged = zipjax.zip(va, vb, spec, data=data, microbatch=4)
  assert seen["microbatch"] == 4
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(va)


def _mlp():
  """The zoo MLP: spaces of 32 and 24 channels, captured once an example."""
  spec, variables, data = zoo.make("mlp")
  per_example = 4 * len(variables) * sum(space.width for space in spec.spaces)
  return spec, tuple(spec_lib._model_vars(v) for v in variables), data, per_example


@pytest.mark.parametrize("budget,expected", [(0.5, 1), (1, 1), (5, 4), (8, 8), (1000, 512)])
def test_auto_microbatch_is_the_largest_power_of_two_whose_features_fit(
    monkeypatch, budget, expected):
  spec, models_, data, per_example = _mlp()
  monkeypatch.setattr(stats_lib, "CPU_STEP_FEATURE_BYTES", int(budget * per_example))
  assert stats_lib.auto_microbatch(spec, models_, data[0], None) == expected


def test_auto_microbatch_takes_whole_batches_off_the_cpu(monkeypatch):
  spec, models_, data, _ = _mlp()

  class Accelerator:
    platform = "tpu"

  monkeypatch.setattr(jax, "devices", lambda *args: [Accelerator()])
  assert stats_lib.auto_microbatch(spec, models_, data[0], None) is None


def test_statistics_take_auto_parts_by_default(monkeypatch):
  spec, models_, data, per_example = _mlp()
  variables = zoo.make("mlp")[1]
  whole = zipjax.compute_stats(variables, spec, data, microbatch=None)
  monkeypatch.setattr(stats_lib, "CPU_STEP_FEATURE_BYTES", 5 * per_example)
  sizes = _record_step_sizes(monkeypatch)
  parts = zipjax.compute_stats(variables, spec, data)
  assert [x.shape[0] for x in data] == [16, 16]
  assert sizes == [4] * 8
  for name in whole:
    assert int(parts[name].count) == int(whole[name].count)
    np.testing.assert_allclose(parts[name].m2, whole[name].m2, rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(whole[name].m2).max()))
