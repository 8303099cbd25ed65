"""Data-parallel statistics and BatchNorm reset: 8 devices agree with 1, and XLA all-reduces.

The 8 devices are simulated CPU devices. Their number is fixed when the backend starts, so the
comparison runs in a subprocess (this file run as a script) with
``--xla_force_host_platform_device_count=8``; it writes its measurements as JSON, and the tests
here assert on them.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import zipjax
from zipjax._src import sharding as sharding_lib

RTOL = 1e-5
NUM_DEVICES = 8


def _max_rel_diff(a, b) -> float:
  """max |a - b| / max |a| over matching leaves of two trees (0 for equal trees)."""
  diffs = []
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    assert u.shape == v.shape
    diffs.append(float(np.max(np.abs(u - v), initial=0.0) / max(np.max(np.abs(u), initial=0.0),
                                                                  1e-12)))
  return max(diffs, default=0.0)


def _hlo_collectives(compiled_text: str) -> dict[str, int]:
  return {op: compiled_text.count(f" {op}(") for op in ("all-reduce", "all-gather")}


def _worker() -> dict:
  """Runs in a process with 8 devices; returns {check: measurement}."""
  jax.config.update("jax_numpy_rank_promotion", "raise")
  from zipjax import models  # pylint: disable=g-import-not-at-top
  from zipjax._src import batchnorm as bn_lib  # pylint: disable=g-import-not-at-top
  from zipjax._src import spec as spec_lib  # pylint: disable=g-import-not-at-top
  from zipjax._src import stats as stats_lib  # pylint: disable=g-import-not-at-top

  devices = jax.local_devices()
  assert len(devices) == NUM_DEVICES, devices
  one = Mesh(np.asarray(devices[:1]), ("data",))
  two_d = Mesh(np.asarray(devices).reshape(4, 2), ("data", "model"))
  model, spec = models.resnet20(width=0.5, num_outputs=5)
  x = np.asarray(jax.random.normal(jax.random.key(0), (28, 16, 16, 3)))
  va, vb = (jax.jit(model.init)(jax.random.key(m), x[:2]) for m in (1, 2))
  # Batches of 16 and 12: 12 is not a multiple of 8 (split, or replicated for BatchNorm).
  data = [x[:16], x[16:]]
  out: dict = {"devices": len(devices)}

  s1 = zipjax.compute_stats([va, vb], spec, data, mesh=one)
  s8 = zipjax.compute_stats([va, vb], spec, data)  # default: all local devices
  s2d = zipjax.compute_stats([va, vb], spec, data[:1], spaces=["stage1", "stage3"], mesh=two_d)
  out["stats_count_equal"] = all(int(s1[n].count) == int(s8[n].count) for n in s1)
  out["stats_mean"] = _max_rel_diff({n: s.mean for n, s in s1.items()},
                                    {n: s.mean for n, s in s8.items()})
  out["stats_m2"] = max(_max_rel_diff(s1[n].m2, s8[n].m2) for n in s1)
  s1_even = zipjax.compute_stats([va, vb], spec, data[:1], mesh=one)
  out["stats_m2_2d_mesh"] = max(_max_rel_diff(s1_even[n].m2, s2d[n].m2) for n in s2d)
  out["stats_on_one_device"] = all(len(a.sharding.device_set) == 1
                                   for a in jax.tree_util.tree_leaves(s8))

  # microbatch="auto" with a budget under one example's features: one example a device.
  budget, stats_lib.CPU_STEP_FEATURE_BYTES = stats_lib.CPU_STEP_FEATURE_BYTES, 1
  step, sizes = stats_lib._stats_step, []  # pylint: disable=protected-access
  stats_lib._stats_step = lambda *a: sizes.append(a[-1].shape[0]) or step(*a)
  s8_auto = zipjax.compute_stats([va, vb], spec, data)
  stats_lib._stats_step, stats_lib.CPU_STEP_FEATURE_BYTES = step, budget
  out["auto_part_sizes"] = sizes
  out["stats_m2_auto"] = max(_max_rel_diff(s1[n].m2, s8_auto[n].m2) for n in s1)

  import warnings  # pylint: disable=import-outside-toplevel
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    b1 = zipjax.reset_batchnorm(va, spec, data, mesh=one)
    out["bn_one_device_warnings"] = len(caught)
    b8 = zipjax.reset_batchnorm(va, spec, data)  # the batch of 12 is computed whole
  out["bn_uneven_warnings"] = [str(w.message) for w in caught]
  warnings.filterwarnings("ignore", message="BatchNorm reset: a batch of 12")  # checked above
  out["bn"] = _max_rel_diff(b1["batch_stats"], b8["batch_stats"])
  out["bn_changed"] = max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in zip(
      jax.tree_util.tree_leaves(va["batch_stats"]), jax.tree_util.tree_leaves(b8["batch_stats"])))

  full1 = zipjax.zip(va, vb, spec, data=data, mesh=one)
  full8 = zipjax.zip(va, vb, spec, data=data)
  out["full_zip"] = _max_rel_diff(full1, full8)
  out["full_zip_outputs"] = _max_rel_diff(spec.apply(full1, data[0]), spec.apply(full8, data[0]))

  part1 = zipjax.zip(va, vb, spec, data=data[:1], stop_at="stage2", mesh=one)
  part8 = zipjax.zip(va, vb, spec, data=data[:1], stop_at="stage2")
  out["partial_zip"] = _max_rel_diff(part1.variables, part8.variables)
  out["partial_zip_outputs"] = _max_rel_diff(part1.apply(data[0]), part8.apply(data[0]))

  # The compiled steps: the sharded batch axis is all-reduced, and no device gathers the batch.
  mesh = sharding_lib.resolve_mesh(None)
  rep = sharding_lib.replicated(mesh)
  x = sharding_lib.place_batch(data[0], mesh)
  pair, stats = sharding_lib.replicate(
      ((va, vb),
       {n: stats_lib.init_stats(2 * spec.width(n)) for n in spec.space_names}), mesh)
  out["x_shards"] = len({str(s.index) for s in x.addressable_shards})
  step = stats_lib._stats_step  # pylint: disable=protected-access
  out["hlo_stats"] = _hlo_collectives(
      step.lower(spec, spec.space_names, rep, stats, pair, x).compile().as_text())

  def bn_hlo(stacked, variables):
    sums = {p: np.zeros(np.shape(v), np.float32) for p, v in spec_lib.flatten(variables).items()
            if p[0] == "batch_stats"}
    return _hlo_collectives(bn_lib._accumulate.lower(  # pylint: disable=protected-access
        spec, stacked, rep, False, sharding_lib.replicate(sums, mesh),
        sharding_lib.replicate(variables, mesh), x, np.float32(16)).compile().as_text())

  out["hlo_bn"] = bn_hlo(frozenset(), va)
  out["hlo_bn_heads"] = bn_hlo(part8.stacked, part8.variables)
  return out


@functools.cache
def _results() -> dict:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root,
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                        + f" --xla_force_host_platform_device_count={NUM_DEVICES}").strip())
  proc = subprocess.run([sys.executable, "-W", "error", os.path.abspath(__file__)], cwd=root,
                        env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results() -> dict:
  return _results()


@pytest.mark.slow  # the 8-device worker: ~60 s
def test_worker_has_8_devices(results):
  assert results["devices"] == NUM_DEVICES
  assert results["x_shards"] == NUM_DEVICES


@pytest.mark.slow  # the 8-device worker: ~60 s
def test_stats_agree(results):
  assert results["stats_count_equal"]
  assert results["stats_mean"] < RTOL
  assert results["stats_m2"] < RTOL
  assert results["stats_m2_2d_mesh"] < RTOL
  assert results["stats_on_one_device"]


@pytest.mark.slow  # the 8-device worker: ~60 s
def test_auto_microbatch_takes_a_multiple_of_the_devices(results):
  # Batches of 16 and 12 in parts of 8 (one example a device); the last part of 4 is uneven
  # over 8 devices and runs replicated.
  assert results["auto_part_sizes"] == [8, 8, 8, 4]
  assert results["stats_m2_auto"] < RTOL


@pytest.mark.slow  # the 8-device worker: ~60 s
def test_batchnorm_reset_agrees(results):
  assert results["bn"] < RTOL
  # The uneven batch of 12 on 8 devices: said once, with the fix; nothing on one device.
  assert results["bn_one_device_warnings"] == 0
  (warning,) = results["bn_uneven_warnings"]
  assert "batch of 12 examples is not a multiple of the mesh's 8 devices" in warning
  assert "multiple of 8" in warning
  assert results["bn_changed"] > 1e-3  # the reset did something


@pytest.mark.slow  # the 8-device worker: ~60 s
def test_full_and_partial_zip_agree(results):
  assert results["full_zip"] < RTOL
  assert results["full_zip_outputs"] < 1e-4
  assert results["partial_zip"] < RTOL
  assert results["partial_zip_outputs"] < 1e-4


@pytest.mark.slow  # the 8-device worker: ~60 s
@pytest.mark.parametrize("step", ["hlo_stats", "hlo_bn", "hlo_bn_heads"])
def test_xla_all_reduces_the_sharded_batch(results, step):
  assert results[step]["all-reduce"] > 0
  assert results[step]["all-gather"] == 0


def test_one_device_is_the_plain_path():
  if len(jax.local_devices()) == 1:
    assert sharding_lib.resolve_mesh(None) is None
  assert sharding_lib.resolve_mesh(Mesh(np.asarray(jax.devices()[:1]), ("data",))) is None


def test_one_device_mesh_equals_default_bit_for_bit():
  from tests import zoo  # pylint: disable=g-import-not-at-top
  spec, (va, vb), data = zoo.make("mlp", batch=8)
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  a = zipjax.compute_stats([va, vb], spec, data)
  b = zipjax.compute_stats([va, vb], spec, data, mesh=mesh)
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(u, v)


def test_mesh_must_be_a_mesh():
  with pytest.raises(TypeError, match="jax.sharding.Mesh"):
    sharding_lib.resolve_mesh(jax.devices())


if __name__ == "__main__":
  print(json.dumps(_worker()))
