"""The reference matcher reproduces the official ZipIt! matching exactly: M and U recorded
from the official code (tests/fixtures/record_official_zipit.py) on fixed covariances."""

import os

import numpy as np
import pytest

from zipjax import match
from tests import zoo

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "official_zipit.npz")


def _cases():
  data = np.load(FIXTURE)
  count = len([k for k in data.files if k.endswith("_cov")])
  return [tuple(data[f"case{k}_{part}"] for part in ("cov", "params", "M", "U"))
          for k in range(count)]


CASES = _cases()


@pytest.mark.parametrize("cov,params,M,U", CASES,
                         ids=[f"N{int(p[0])}-n{int(p[1])}-a{p[2]:g}-b{p[3]:g}"
                              for _, p, _, _ in CASES])
def test_official_merges_are_reproduced_exactly(cov, params, M, U):
  models, _, alpha, beta = params
  merge = match.official(alpha=alpha, beta=beta)(match.official_correlation(cov),
                                                 num_models=int(models))
  np.testing.assert_array_equal(np.asarray(merge.U), U)
  np.testing.assert_array_equal(np.asarray(merge.M), M)


def test_fixture_covers_the_quirks():
  """The recorded cases include spent budgets that leak -inf into merged features, alpha 0
  (stale model ranges) and a zero budget (one same-model merge still made)."""
  budgets = {match.official_budget(p[3], int(p[0]), int(p[1])) for _, p, _, _ in CASES}
  assert 0 in budgets and 1 in budgets
  assert any(p[2] == 0 for _, p, _, _ in CASES)
  # A zero budget still allows one same-model merge per model: some column of U has two
  # members of one model.
  _, params, _, U = next(c for c in CASES if c[1][3] == 0 and c[1][2] > 0)
  n = int(params[1])
  assert max(U[:n].sum(0).max(), U[n:].sum(0).max()) >= 2


def test_official_budget_rounds_as_the_official_code():
  assert [match.official_budget(b, 2, n) for b, n in
          [(0.075, 64), (0.125, 64), (0.075, 256), (0.125, 16), (1.0, 64), (0.0, 64)]] == [
              2, 4, 9, 1, 32, 0]


def test_official_correlation_gives_dead_features_zero():
  cov = np.diag(np.array([1.0, 0.0, 4.0], np.float32))
  cov[0, 2] = cov[2, 0] = 1.0
  corr = match.official_correlation(cov)
  assert corr[1].tolist() == [0.0, 0.0, 0.0] and corr[0, 2] == np.float32(0.5)


def test_last_captures_sample_each_stream_where_its_stage_ends():
  import zipjax  # pylint: disable=import-outside-toplevel
  model, spec = zipjax.models.resnet20(1, 10)
  x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  variables = zoo.init(model, seed=0, x=x)
  every = spec.features(variables, x)
  last = zipjax.spec.last_captures(spec).features(variables, x)
  assert len(every["stage2"]) == 3 and len(every["stage1"]) == 4  # the stem, then 3 blocks
  assert {k: len(v) for k, v in last.items()} == {k: 1 for k in every}
  for k in every:
    np.testing.assert_array_equal(last[k][0], every[k][-1])


def test_compute_merges_gives_the_official_matcher_the_official_correlation():
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import zipjax  # pylint: disable=import-outside-toplevel
  cov, params, M, U = CASES[0]
  stats = zipjax.FeatureStats(jnp.asarray(2), jnp.zeros(cov.shape[0]), jnp.asarray(cov))
  matcher = match.official(alpha=params[2], beta=params[3])
  assert isinstance(matcher, match.OwnCorrelation) and matcher.__name__.startswith("official(")
  merge = zipjax.compute_merges({"s": stats}, num_models=int(params[0]), matcher=matcher)["s"]
  np.testing.assert_array_equal(np.asarray(merge.U), U)
  np.testing.assert_array_equal(np.asarray(merge.M), M)


def _official_pipeline(models, spec, data, *, stop_at=None):
  """The reference mode spelled out with the public functions it stands for."""
  import zipjax  # pylint: disable=import-outside-toplevel
  spec = zipjax.spec.last_captures(spec)
  models = [zipjax.reset_batchnorm(m, spec, data, statistics="pytorch") for m in models]
  stats = zipjax.compute_stats(models, spec, data)
  merges = zipjax.compute_merges(stats, num_models=len(models), matcher=match.official())
  merged = zipjax.apply_merges(models, spec, merges, stop_at=stop_at, batchnorm="leaves")
  return zipjax.reset_batchnorm(merged, spec, data, statistics="pytorch")


def test_official_mode_is_the_official_pipeline():
  import jax  # pylint: disable=import-outside-toplevel
  import zipjax  # pylint: disable=import-outside-toplevel

  spec, (va, vb), data = zoo.make("resnet20", num_batches=1)
  merged = zipjax.zip(va, vb, spec, data=data, mode="official")
  expected = _official_pipeline([va, vb], spec, data)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         merged, expected)


def test_official_mode_refuses_other_matchers_and_unknown_modes():
  import zipjax  # pylint: disable=import-outside-toplevel

  spec, (va, vb), data = zoo.make("mlp")
  with pytest.raises(ValueError, match=r"match.official\(alpha=..., beta=...\)"):
    zipjax.zip(va, vb, spec, data=data, mode="official", matcher=match.greedy())
  with pytest.raises(ValueError, match="mode must be one of"):
    zipjax.zip(va, vb, spec, data=data, mode="paper")
