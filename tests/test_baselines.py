"""Baseline matchers: weight matching, optimal matching, k-means."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zipjax
from zipjax import match
from tests import zoo
from tests.test_match import groups_of, random_corr


def _perfect_matchings(items):
  if not items:
    yield []
    return
  first, rest = items[0], items[1:]
  for k, other in enumerate(rest):
    for tail in _perfect_matchings(rest[:k] + rest[k + 1:]):
      yield [(first, other)] + tail


def _pair_score(corr, groups):
  return sum(corr[g[0], g[1]] for g in groups)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", range(3))
def test_optimal_equals_brute_force(n, seed):
  corr = random_corr(2 * n, seed=seed)
  best = max(_pair_score(corr, m) for m in _perfect_matchings(list(range(2 * n))))
  merge = match.optimal()(corr, num_models=2)
  groups = groups_of(merge)
  assert all(len(g) == 2 for g in groups)
  assert _pair_score(corr, groups) == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_optimal_never_worse_than_greedy(seed):
  n = 24
  corr = np.abs(random_corr(2 * n, seed=seed))  # positive: greedy with tiny alpha only pairs
  np.fill_diagonal(corr, 1.0)
  greedy_groups = groups_of(match.greedy(alpha=1e-6, beta=1.0)(corr, num_models=2))
  assert all(len(g) == 2 for g in greedy_groups)
  optimal_groups = groups_of(match.optimal()(corr, num_models=2))
  assert _pair_score(corr, optimal_groups) >= _pair_score(corr, greedy_groups) - 1e-9


def test_optimal_refuses_large_widths_and_more_models():
  with pytest.raises(ValueError, match="max_width"):
    match.optimal(max_width=8)(np.eye(18), num_models=2)
  with pytest.raises(ValueError, match="exactly 2"):
    match.optimal()(np.eye(9), num_models=3)


def test_kmeans_is_deterministic_and_well_formed():
  corr = random_corr(40, seed=4)
  a = match.kmeans(seed=1)(corr, num_models=2)
  b = match.kmeans(seed=1)(corr, num_models=2)
  np.testing.assert_array_equal(a.M, b.M)
  assert a.M.shape == (20, 40)
  np.testing.assert_array_equal(a.U.sum(1), np.ones(40))
  assert (a.U.sum(0) >= 1).all()  # no empty cluster


def test_kmeans_groups_identical_features():
  base = random_corr(6, seed=0)
  corr = np.block([[base, base], [base, base]])
  groups = groups_of(match.kmeans()(corr, num_models=2))
  assert sorted(groups) == [(j, 6 + j) for j in range(6)]


def test_weight_matching_recovers_permutation_exactly():
  spec, (va, _), data = zoo.make("resnet20")
  perms = {s.name: np.asarray(jax.random.permutation(jax.random.key(i), s.width))
           for i, s in enumerate(spec.spaces)}
  vp = zipjax.permute_spaces(va, spec, perms=perms)
  merges = match.weight_matching()(spec, [va, vp], spaces=spec.space_names)
  for name, perm in perms.items():
    inverse = np.argsort(perm)  # vp channel inverse[j] is va channel j
    assert groups_of(merges[name]) == [(j, spec.width(name) + inverse[j])
                                       for j in range(spec.width(name))]
  merged = zipjax.apply_merges([va, vp], spec, merges)
  # params come back exactly; BatchNorm variances get M^2 (a guess that the reset replaces).
  for a, b in zip(jax.tree_util.tree_leaves(merged["params"]),
                  jax.tree_util.tree_leaves(va["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_weight_matching_refuses_more_than_two_models():
  spec, (va, vb), data = zoo.make("mlp")
  with pytest.raises(ValueError, match="exactly 2"):
    zipjax.zip_many([va, vb, va], spec, data=data, matcher=match.weight_matching())


@pytest.mark.parametrize("matcher", [match.weight_matching(), match.optimal(), match.kmeans()],
                         ids=lambda m: m.__name__)
def test_baselines_self_merge(matcher):
  spec, (v, _), data = zoo.make("resnet20")
  v = zipjax.reset_batchnorm(v, spec, data)
  merged = zipjax.zip(v, v, spec, data=data, matcher=matcher)
  ref = spec.apply(v, data[0])
  assert float(jnp.max(jnp.abs(spec.apply(merged, data[0]) - ref))) <= 1e-4 * float(
      jnp.max(jnp.abs(ref)))
