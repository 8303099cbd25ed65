"""Matchers: greedy against the plain loop of the paper's algorithm, and each invariant."""

import numpy as np
import pytest
import scipy.optimize

from zipjax import match


def random_corr(dim, seed, *, quantise=False):
  """A random correlation matrix (optionally rounded to create many ties)."""
  rng = np.random.default_rng(seed)
  f = rng.normal(size=(4 * dim, dim)) @ rng.normal(size=(dim, dim))
  corr = np.corrcoef(f.T)
  if quantise:
    corr = np.round(corr, 1)
  return corr


def groups_of(merge):
  return [tuple(np.flatnonzero(row)) for row in np.asarray(merge.M)]


def assert_greedy_equals_plain_loop(corr, N, alpha, beta):
  """greedy's merge is exactly the plain loop's (greedy_reference), M and U."""
  fast = match.greedy(alpha=alpha, beta=beta)(corr, num_models=N)
  ref = match.greedy_reference(corr, num_models=N, alpha=alpha, beta=beta)
  np.testing.assert_array_equal(fast.M, ref.M)
  np.testing.assert_array_equal(fast.U, ref.U)


CASES = [(n, N, alpha, beta, q)
         for n in (1, 4, 16, 33)
         for N in (2, 3)
         for alpha, beta in ((1.0, 0.0), (0.5, 0.5), (0.1, 1.0), (0.3, 0.25))
         for q in (False, True)]


@pytest.mark.parametrize("n,N,alpha,beta,quantise", CASES)
def test_greedy_equals_plain_loop(n, N, alpha, beta, quantise):
  corr = random_corr(N * n, seed=n * 10 + N, quantise=quantise)
  assert_greedy_equals_plain_loop(corr, N, alpha, beta)


def twin_corr(n, N, seed, *, sign=1.0):
  """Features of N models that share most of their structure, each model's in its own order:
  the setting where greedy takes long runs of merges from one sorting of the row maxima.
  ``sign=-1`` flips every off-diagonal value negative, where merged values grow."""
  rng = np.random.default_rng(seed)
  shared = rng.normal(size=(8 * n, n))
  feats = [shared[:, rng.permutation(n)] * rng.uniform(0.3, 1.0, n)
           + rng.normal(size=(8 * n, n)) for _ in range(N)]
  corr = np.corrcoef(np.concatenate(feats, 1), rowvar=False).astype(np.float32)
  if sign < 0:
    corr = -np.abs(corr)
    np.fill_diagonal(corr, 1.0)
  return corr


@pytest.mark.parametrize("n,N", [(96, 2), (48, 4)])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.5), (0.1, 0.5), (0.5, 1.0), (0.7, 0.0)])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("quantise", [False, True])
def test_greedy_equals_plain_loop_on_wide_structured_spaces(n, N, alpha, beta, sign, quantise):
  corr = twin_corr(n, N, seed=n + N, sign=sign)
  if quantise:  # many exact ties, broken by the lowest row, then column
    corr = np.round(corr, 1)
  assert_greedy_equals_plain_loop(corr, N, alpha, beta)


@pytest.mark.parametrize("seed", range(40))
def test_greedy_equals_plain_loop_on_random_settings(seed):
  """Random widths, model counts, matrices (ties, all-negative), alpha and beta."""
  rng = np.random.default_rng(seed)
  n, N = int(rng.integers(1, 41)), int(rng.integers(2, 5))
  kind = seed % 4
  if kind < 2:
    corr = random_corr(N * n, seed, quantise=kind == 1)
  else:
    corr = twin_corr(n, N, seed, sign=1.0 if seed % 8 < 4 else -1.0)
    if kind == 3:
      corr = np.round(corr, 1)
  alpha = float(rng.choice([1.0, 0.9, 0.5, 0.3, 0.1, 0.01]))
  beta = float(rng.choice([0.0, 0.1, 0.25, 0.5, 0.75, 1.0]))
  assert_greedy_equals_plain_loop(corr, N, alpha, beta)


@pytest.mark.parametrize("seed", range(12))
def test_greedy_equals_plain_loop_with_dead_features(seed):
  """Dead features correlate exactly 1 with each other and 0 with the rest (as
  zipjax.correlation defines them): long runs of exact ties, where a batch's rows lose their
  partners to earlier merges and pair again at the same value."""
  rng = np.random.default_rng(seed)
  n, N = int(rng.integers(4, 41)), int(rng.integers(2, 5))
  corr = np.array(random_corr(N * n, seed) if seed % 2 else twin_corr(n, N, seed), np.float32)
  dead = rng.random(N * n) < rng.uniform(0.1, 0.6)
  corr[dead] = 0.0
  corr[:, dead] = 0.0
  corr[np.ix_(dead, dead)] = 1.0
  np.fill_diagonal(corr, 1.0)
  alpha, beta = [(1.0, 0.5), (0.5, 0.0), (0.1, 1.0), (0.5, 0.25)][seed % 4]
  assert_greedy_equals_plain_loop(corr, N, alpha, beta)


@pytest.mark.parametrize("compact", [0, 3, 10**6], ids=["never", "default", "every-batch"])
@pytest.mark.parametrize("n,N,alpha,beta", [(64, 2, 1.0, 0.5), (64, 2, 0.1, 0.5),
                                            (24, 4, 0.5, 1.0), (24, 4, 0.7, 0.0),
                                            (40, 3, 0.3, 0.25)])
@pytest.mark.parametrize("quantise", [False, True])
def test_greedy_compaction_keeps_the_plain_loop_result(monkeypatch, compact, n, N, alpha, beta,
                                                       quantise):
  from zipjax._src import match as match_lib  # pylint: disable=g-import-not-at-top
  calls = []
  compacted = match_lib._compacted

  def counted(*args):
    calls.append(len(args[1]))
    return compacted(*args)

  monkeypatch.setattr(match_lib, "_COMPACT", compact)
  monkeypatch.setattr(match_lib, "_CHUNK", 7)  # several chunks, the last one short
  monkeypatch.setattr(match_lib, "_compacted", counted)
  corr = twin_corr(n, N, seed=n + N + 1)
  if quantise:
    corr = np.round(corr, 1)
  assert_greedy_equals_plain_loop(corr, N, alpha, beta)
  if compact == 0:
    assert not calls
  else:
    assert calls and all(a > b for a, b in zip(calls, calls[1:])), calls
    if compact > 3 and N > 2:  # the case covers compacting again and again
      assert len(calls) > 2, calls


def test_compacted_equals_the_in_place_update():
  from zipjax._src import match as match_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  dim, alpha = 40, np.float32(0.3)
  a = rng.normal(size=(dim, dim)).astype(np.float32)
  C = match_lib._symmetrise(a)
  np.fill_diagonal(C, -np.inf)
  I, J = np.array([9, 2, 30]), np.array([17, 5, 31])
  new = alpha * np.minimum(C[I], C[J])
  # The in-place update, on a plain copy: merged rows, merged columns, their block.
  ref = np.array(C)
  ref[I] = new
  ref[:, I] = new.T
  ref[np.ix_(I, I)] = alpha * np.minimum(new[:, I], new[:, J])
  keep = np.setdiff1d(np.arange(dim), J)
  out, rowmax, rowarg = match_lib._compacted(C, keep, np.searchsorted(keep, I), J, new, alpha)
  want = ref[np.ix_(keep, keep)]
  np.testing.assert_array_equal(out, want)
  np.testing.assert_array_equal(out, out.T)
  np.testing.assert_array_equal(rowarg, want.argmax(1))
  np.testing.assert_array_equal(rowmax, want.max(1))
  assert np.shares_memory(out, C)  # written over C's own memory


def test_lazily_equals_zip_of_lists():
  from zipjax._src import match as match_lib  # pylint: disable=g-import-not-at-top
  for length in (0, 1, 3, 4, 11, 12, 13, 100):
    a, b = np.arange(length), np.arange(length) * 2.0
    got = list(match_lib._lazily(a, b, chunk=4))
    assert got == list(zip(a.tolist(), b.tolist()))
    assert all(type(x) is int and type(y) is float for x, y in got)


def test_greedy_does_not_modify_its_input():
  corr = twin_corr(16, 2, seed=0)
  before = corr.copy()
  match.greedy()(corr, num_models=2)
  np.testing.assert_array_equal(corr, before)


def _check_merge_invariants(merge, n, N):
  M, U = np.asarray(merge.M), np.asarray(merge.U)
  assert M.shape == (n, N * n) and U.shape == (N * n, n)
  # Every original feature belongs to exactly one merged feature.
  np.testing.assert_array_equal(U.sum(1), np.ones(N * n))
  # U copies back (0/1) and M averages the same members.
  assert set(np.unique(U)) <= {0.0, 1.0}
  np.testing.assert_allclose(M.sum(1), np.ones(n), rtol=1e-6)
  np.testing.assert_allclose(M, U.T / U.sum(0)[:, None], rtol=1e-6)


@pytest.mark.parametrize("matcher", [match.greedy(), match.greedy(alpha=1.0, beta=0.0),
                                     match.permute(), match.identity()],
                         ids=lambda m: m.__name__)
@pytest.mark.parametrize("N", [2, 3, 4])
def test_merge_invariants(matcher, N):
  n = 12
  _check_merge_invariants(matcher(random_corr(N * n, seed=N), num_models=N), n, N)


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("N", [2, 3])
def test_greedy_respects_same_model_budget(beta, N):
  n = 16
  # Strong within-model correlations tempt greedy to merge inside models.
  corr = random_corr(N * n, seed=3)
  for m in range(N):
    blk = slice(m * n, (m + 1) * n)
    corr[blk, blk] = np.clip(corr[blk, blk] + 0.5, -1, 1)
  np.fill_diagonal(corr, 1.0)
  merge = match.greedy(alpha=0.2, beta=beta)(corr, num_models=N)
  budget = match.same_model_budget(beta, N, n)
  # Replay the merges: count same-model merges charged to each owner.
  within = np.zeros(N, int)
  for members in groups_of(merge):
    # A group of k members took k-1 merges; each merge joins the group (owned by the model
    # of its lowest member) with a feature; same-model iff that feature's model is the owner.
    owner = members[0] // n
    within[owner] += sum(1 for i in members[1:] if i // n == owner)
  assert (within <= budget).all(), (within, budget)
  if beta == 0.0:
    assert within.sum() == 0


def test_greedy_self_merge_pairs_twins():
  n = 10
  corr = random_corr(n, seed=1)
  full = np.block([[corr, corr], [corr, corr]])
  merge = match.greedy(alpha=0.5, beta=0.5)(full, num_models=2)
  assert groups_of(merge) == [(j, n + j) for j in range(n)]


def test_permute_matches_scipy_assignment():
  n = 20
  corr = random_corr(2 * n, seed=7)
  rows, cols = scipy.optimize.linear_sum_assignment(-corr[:n, n:])
  merge = match.permute()(corr, num_models=2)
  assert groups_of(merge) == [(r, n + c) for r, c in zip(rows, cols)]


def test_identity_is_weight_averaging():
  merge = match.identity()(np.eye(6), num_models=3)
  ms, us = merge.blocks()
  for m in range(3):
    np.testing.assert_allclose(ms[m], np.eye(2) / 3)
    np.testing.assert_array_equal(us[m], np.eye(2))


@pytest.mark.parametrize("kwargs", [dict(alpha=0.0), dict(alpha=1.5), dict(beta=-0.1),
                                    dict(beta=2.0)])
def test_greedy_rejects_bad_options(kwargs):
  with pytest.raises(ValueError, match="greedy"):
    match.greedy(**kwargs)


def test_matchers_reject_bad_correlations():
  m = match.greedy()
  with pytest.raises(ValueError, match="square"):
    m(np.zeros((4, 6)), num_models=2)
  with pytest.raises(ValueError, match="equal blocks"):
    m(np.eye(5), num_models=2)
  with pytest.raises(ValueError, match="at least 2"):
    m(np.eye(4), num_models=1)
  bad = np.eye(4)
  bad[0, 1] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    m(bad, num_models=2)


def test_matchers_do_not_mutate_input():
  corr = random_corr(16, seed=2)
  before = corr.copy()
  for m in (match.greedy(), match.permute(), match.identity()):
    m(corr, num_models=2)
  np.testing.assert_array_equal(corr, before)


@pytest.mark.parametrize("dim", [1, 5, 128, 300])
def test_symmetrise_equals_plain_formula(dim):
  from zipjax._src import match as match_lib  # pylint: disable=g-import-not-at-top
  a = np.random.default_rng(dim).normal(size=(dim, dim)).astype(np.float32)
  np.testing.assert_array_equal(match_lib._symmetrise(a), (a + a.T) / 2)


def test_merge_from_groups_equals_a_loop_over_groups():
  groups = [[0, 4], [1], [2, 3, 5]]
  merge = match.merge_from_groups(groups, 6)
  M = np.zeros((3, 6), np.float32)
  U = np.zeros((6, 3), np.float32)
  for g, members in enumerate(groups):
    for f in members:
      M[g, f] = np.float32(1.0 / len(members))
      U[f, g] = 1.0
  np.testing.assert_array_equal(merge.M, M)
  np.testing.assert_array_equal(merge.U, U)
  assert merge.M.dtype == merge.U.dtype == np.float32


@pytest.mark.parametrize("groups,dim,message", [
    ([[0, 1], [2, 3, 4], []], 6, "Group 2 of 3 is empty"),
    ([[0, 1], [1, 2], [3, 4, 5]], 6, "feature 1 is in 2"),
    ([[0, 1], [3]], 4, "feature 2 is in 0"),
    ([[0, 1], [2, 4]], 4, r"features 0..3; got \[4\]"),
    ([[0], [1], [2]], 4, r"must be N\*n"),
])
def test_merge_from_groups_rejects_groups_that_do_not_split_the_features(groups, dim, message):
  with pytest.raises(ValueError, match=message):
    match.merge_from_groups(groups, dim)
