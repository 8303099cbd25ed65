"""The official ZipIt! matching, reproduced: the reference that published numbers come from.

The official code (gstoica27/ZipIt, ``match_tensors_zipit``) differs from
:func:`zipjax.match.greedy` where the same-model budget runs out, and in two epsilons:

- correlation: cov / max(std_i std_j, 1e-7) (:func:`official_correlation`; zipjax's has no
  epsilon and gives dead features their own rule);
- budget: each model may make floor(floor((N-1) n / N) * beta + 1e-4) same-model merges,
  checked only *after* a merge, so a budget of 0 still allows one; a merged feature belongs
  to the model of its lowest-index member; when a model's budget is spent, every current pair
  of that model's features is set to -inf, which merged features of other models inherit
  through alpha * min (the -inf "leaks"), while pairs made later are not blocked;
- with alpha <= 0 the merged feature is not scaled; instead the rows of the two members'
  models, taken as position ranges of the *shrunk* matrix (ranges that no longer line up
  with the models once features were removed), are set to -inf;
- when no finite pair is left, the first position is "merged" with itself: its column of the
  unmerge matrix is doubled and then dropped (a feature lost), and the budget of the model
  of the feature now at that position is charged;
- M = P^T / (|g| + 1e-5), U = P (P the 0/1 membership matrix, n merged features).

Everything runs in float32 in the official order of operations, ties going to the first
maximum in row-major order.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from zipjax._src.merge import DenseMerge

#: The official defaults of ``match_tensors_zipit``.
OFFICIAL_ALPHA = 0.3
OFFICIAL_BETA = 0.125


def official_correlation(covariance: np.ndarray) -> np.ndarray:
  """The official correlation of a covariance matrix (float32): cov / max(std std^T, 1e-7).

  A dead feature (zero variance) correlates 0 with every feature; nothing is clipped."""
  cov = np.asarray(covariance, np.float32)
  std = np.sqrt(np.diagonal(cov))
  return cov / np.maximum(np.outer(std, std), np.float32(1e-7))


def official_budget(beta: float, num_models: int, width: int) -> int:
  """Same-model merges each model may make in the official code (see the module docstring)."""
  total = num_models * width
  r = 1 - 1 / num_models
  remainder = int(total * (1 - r) + 1e-4)
  return int(((total - remainder) // num_models) * beta + 1e-4)


def _ranges(active: np.ndarray, model: int, size: int) -> np.ndarray:
  """The original indices at current positions [model * size, (model + 1) * size)."""
  return active[model * size:(model + 1) * size]


def official_zipit_merge(corr: np.ndarray, *, num_models: int, alpha: float = OFFICIAL_ALPHA,
                         beta: float = OFFICIAL_BETA) -> DenseMerge:
  """The official ZipIt! matching of one space, on its (N*n, N*n) correlation ``corr``.

  Returns a DenseMerge with M (n, N*n) = P^T / (|g| + 1e-5) and U = P, as the official code
  builds them (its merge times N then the models' average cancel out).
  """
  sims = np.array(corr, np.float32)  # a copy: the loop writes into it
  dim = sims.shape[0]
  if sims.shape != (dim, dim) or dim % num_models:
    raise ValueError(f"corr must be square with a multiple of {num_models} rows, got "
                     f"{sims.shape}.")
  r = 1 - 1 / num_models
  remainder = int(dim * (1 - r) + 1e-4)
  size = dim // int(1 / (1 - r) + 0.5)
  members = np.eye(dim, dtype=np.float32)  # P: column j = original feature j's group
  label = np.arange(dim) // size  # the model of each group's lowest-index member
  budget = np.full(num_models, official_budget(beta, num_models, size), np.int64)
  alive = np.ones(dim, bool)
  np.fill_diagonal(sims, -np.inf)
  a = np.float32(alpha)
  for _ in range(dim - remainder):
    active = np.flatnonzero(alive)
    flat = int(np.argmax(sims))
    if sims.flat[flat] == -np.inf:  # no finite pair: the current matrix's argmax is 0
      i = j = int(active[0])
    else:  # the pair, lower index first (alpha <= 0 makes the matrix asymmetric)
      i, j = sorted(divmod(flat, dim))
    origin_i, origin_j = label[i], label[j]
    members[:, i] += members[:, j]
    # The merged feature's column, then (with j's column gone) its row.
    sims[:, i] = np.minimum(sims[:, i], sims[:, j])
    if alpha <= 0:
      sims[_ranges(active, origin_i, size), i] = -np.inf
      sims[_ranges(active, origin_j, size), i] = -np.inf
    else:
      sims[:, i] *= a
    alive[j] = False
    sims[:, j] = -np.inf
    after = np.flatnonzero(alive)
    row = np.minimum(sims[i, :], sims[j, :])
    row[~alive] = -np.inf
    sims[i, :] = row
    if alpha <= 0:
      sims[i, _ranges(after, origin_i, size)] = -np.inf
      sims[i, _ranges(after, origin_j, size)] = -np.inf
    else:
      sims[i, :] *= a
    sims[j, :] = -np.inf
    if origin_i == origin_j:
      # The model charged is that of the feature now at i's position (i itself, unless i
      # was just removed by a merge with itself).
      position = int(np.searchsorted(active, i))
      origin = label[after[position]] if position < len(after) else origin_i
      budget[origin] -= 1
      if budget[origin] <= 0:
        own = after[label[after] == origin]
        sims[np.ix_(own, own)] = -np.inf
    if i == j:  # the self-merge above doubled i's column; it is dropped with i
      sims[i, :] = -np.inf
  active = np.flatnonzero(alive)
  unmerge = members[:, active]
  merge = unmerge / (unmerge.sum(axis=0, keepdims=True) + np.float32(1e-5))
  return DenseMerge(merge.T, unmerge)


@dataclasses.dataclass(frozen=True)
class OfficialMatcher:
  """The official ZipIt! matcher (see :func:`official`). A :class:`Matcher` on a given
  correlation, and an :class:`OwnCorrelation`: ``compute_merges`` and ``zip`` feed it the
  official correlation of the features' covariance."""

  alpha: float = OFFICIAL_ALPHA
  beta: float = OFFICIAL_BETA

  def __call__(self, corr, *, num_models: int) -> DenseMerge:
    return official_zipit_merge(np.asarray(corr), num_models=num_models, alpha=self.alpha,
                                beta=self.beta)

  def correlation(self, covariance) -> np.ndarray:
    return official_correlation(covariance)

  @property
  def __name__(self) -> str:  # like the other matchers, which are functions
    return f"official(alpha={self.alpha}, beta={self.beta})"


def official(*, alpha: float = OFFICIAL_ALPHA, beta: float = OFFICIAL_BETA) -> OfficialMatcher:
  """The official ZipIt! matcher (``match_tensors_zipit`` of gstoica27/ZipIt), quirks
  included (see the module docstring): the reference mode for reproducing published numbers.

  On the same correlation it makes the same merges as the official code, bit for bit (tested
  against merges recorded from it); ``zip`` and ``compute_merges`` give it the official
  correlation of the features' covariance (:func:`official_correlation`). Its merges are
  :class:`DenseMerge`s, ``M = P^T / (|g| + 1e-5)``.

  Args:
    alpha: how strongly merged features attract further merges (official default 0.3; any
      value, <= 0 switching to the official code's blocking of model ranges).
    beta: the same-model budget fraction (official default 0.125).

  Example::

    spec = zipjax.spec.last_captures(spec)   # the streams where the official code samples them
    merged = zipjax.zip(a, b, spec, data=batches, matcher=zipjax.match.official())
  """
  return OfficialMatcher(float(alpha), float(beta))
