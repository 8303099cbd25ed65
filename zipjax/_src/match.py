"""Matchers: from one space's correlation matrix to a merge.

A matcher is a pure function ``matcher(corr, num_models=N) -> Merge``. ``corr`` is the
(N*n, N*n) correlation of the N models' concatenated features, model by model. The merge
(``zipjax._src.merge``) holds M (n, N*n), which averages the members of each merged feature,
and U (N*n, n), which copies a merged feature back to each of its members. Factories with
keyword-only options build matchers, like optax's transformations::

    matcher = zipjax.match.greedy(alpha=0.5, beta=0.5)
    merge = matcher(corr, num_models=2)
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
import numbers
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import scipy.optimize

from zipjax._src.merge import GroupMerge
from zipjax._src.merge import Merge
from zipjax._src.merge import merge_from_groups


class Matcher(Protocol):
  """A per-space matcher: the (N*n, N*n) correlation of N models' features to a Merge."""

  def __call__(self, corr: np.ndarray, *, num_models: int) -> Merge:
    ...


@runtime_checkable
class OwnCorrelation(Protocol):
  """A matcher that computes its correlation from the covariance itself (the official
  ZipIt! matcher): ``compute_merges`` calls it on ``matcher.correlation(covariance)``
  instead of zipjax's :func:`zipjax.correlation`."""

  def correlation(self, covariance: np.ndarray) -> np.ndarray:
    ...


@dataclasses.dataclass(frozen=True)
class WholeModelMatcher:
  """A matcher that reads every space's weights at once instead of one space's correlation
  (Git Re-Basin's weight matching): ``matcher(spec, variables_list, spaces=...)`` returns
  {space: Merge}. ``zip`` computes no feature statistics for it."""

  fn: Callable[..., dict[str, Merge]]
  name: str

  def __call__(self, spec, variables_list, *, spaces) -> dict[str, Merge]:
    return self.fn(spec, variables_list, spaces=spaces)

  @property
  def __name__(self) -> str:  # like the per-space matchers, which are functions
    return self.name

  def __repr__(self) -> str:
    return self.name


@dataclasses.dataclass(frozen=True)
class BySpace:
  """Per-space matchers chosen by space name (see :func:`by_space`): ``compute_merges`` and
  ``zip`` match space ``s`` with ``matcher_for(s)``, and pair an attention layer's heads with
  the matcher of its first space."""

  matchers: tuple[tuple[str, Callable], ...]
  default: Callable

  def matcher_for(self, space: str) -> Callable:
    """The matcher of ``space``."""
    return dict(self.matchers).get(space, self.default)

  def check_spaces(self, names: Sequence[str]) -> None:
    """Raises ValueError if a space this names is not among ``names``."""
    unknown = [s for s, _ in self.matchers if s not in names]
    if unknown:
      raise ValueError(f"by_space names spaces {unknown} that the models do not have; their "
                       f"spaces are {list(names)}.")

  @property
  def __name__(self) -> str:  # like the per-space matchers, which are functions
    parts = [f"{s!r}: {describe(m)}" for s, m in self.matchers]
    return f"by_space({{{', '.join(parts)}}}, default={describe(self.default)})"

  def __repr__(self) -> str:
    return self.__name__


def by_space(matchers: Mapping[str, Callable], *, default: Callable | None = None) -> BySpace:
  """Different per-space matchers for different spaces.

  Arguments:
    matchers: {space name: matcher}, e.g. ``{"stream": zipjax.match.permute()}``: those
      spaces are matched with those matchers.
    default: the matcher of every other space (default ``greedy()``).

  Returns:
    A :class:`BySpace` for ``zipjax.zip(..., matcher=)`` and ``zipjax.compute_merges``, which
    refuse it if it names a space the models do not have.

  Raises:
    TypeError: a matcher is not a per-space matcher (a factory not called, a whole-model
      matcher, another by_space).

  Example::

    # ViTs: the residual stream one to one, the rest (heads, MLPs) zipped.
    matcher = zipjax.match.by_space({"stream": zipjax.match.permute()})
    merged = zipjax.zip(va, vb, spec, data=batches, matcher=matcher)
  """
  default = default if default is not None else greedy()
  pairs = tuple((str(s), m) for s, m in dict(matchers).items())
  for m in (default, *(m for _, m in pairs)):
    if isinstance(m, (WholeModelMatcher, BySpace)):
      raise TypeError(f"by_space takes per-space matchers; got {describe(m)}, which is not.")
    check_matcher(m)
  return BySpace(pairs, default)


def check_matcher(matcher: Any) -> None:
  """Raises TypeError for something that is not a matcher, e.g. an uncalled factory."""
  if isinstance(matcher, (WholeModelMatcher, BySpace)):
    return
  name = getattr(matcher, "__name__", type(matcher).__name__)
  if not callable(matcher):
    raise TypeError(f"matcher must be a matcher such as zipjax.match.greedy(), got {name}.")
  try:
    params = inspect.signature(matcher).parameters.values()
  except (TypeError, ValueError):
    return
  if not any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
             for p in params):
    raise TypeError(f"matcher={name} is a matcher factory, not a matcher: call it to get one, "
                    f"e.g. matcher=zipjax.match.{name}() (options go in the call: "
                    "greedy(alpha=0.3, beta=0.5)).")


def match_in_groups(matcher: Callable, corr: np.ndarray, *, num_models: int,
                    groups: int = 1, pairing: np.ndarray | None = None) -> Merge:
  """``matcher`` on the features of each group of a space separately, its merges side by
  side: merged group g is matched from the features of the model groups it pairs.

  Arguments:
    matcher: a per-space matcher that gives group merges (:class:`GroupMerge`).
    corr: (N * n, N * n) correlation of the N models' features, each model's n features in
      ``groups`` equal groups, in order.
    num_models: N.
    groups: the number of groups G of each model's features.
    pairing: (N, G) ints, the merged group of each model's group (see :func:`pair_groups`);
      default: group g of every model makes merged group g. A merged group made of k model
      groups is matched with ``num_models=k`` (one group alone is kept as it is).

  Returns:
    A :class:`GroupMerge` whose merged group g (features g * n / G onwards) draws only on
    the model groups paired into g.
  """
  if groups == 1 and pairing is None:
    return matcher(corr, num_models=num_models)
  n = corr.shape[0] // num_models
  size = n // groups
  if pairing is None:
    pairing = np.tile(np.arange(groups), (num_models, 1))
  pairing = _check_pairing(pairing, num_models, groups)
  ids = np.empty((num_models, n), np.int64)
  for g in range(groups):
    members = np.argwhere(pairing == g)  # (k, 2): model, group, in model order
    index = np.concatenate([m * n + h * size + np.arange(size) for m, h in members])
    if len(members) == 1:
      inner = np.arange(size)[None]
    else:
      merge = matcher(corr[np.ix_(index, index)], num_models=len(members))
      if not isinstance(merge, GroupMerge):
        raise TypeError(f"Matching a space in groups needs group merges; {matcher} gave a "
                        f"{type(merge).__name__}.")
      inner = np.asarray(merge.groups)
    for (m, h), row in zip(members, inner):
      ids[m, h * size:(h + 1) * size] = row + g * size
  return GroupMerge(ids)


def _check_pairing(pairing: Any, num_models: int, groups: int) -> np.ndarray:
  pairing = np.asarray(pairing)
  if pairing.shape != (num_models, groups) or not np.issubdtype(pairing.dtype, np.integer):
    raise ValueError(f"A pairing of groups is an int array of shape (num_models, groups) = "
                     f"{(num_models, groups)}; got {pairing.dtype} {pairing.shape}.")
  if set(np.unique(pairing).tolist()) != set(range(groups)):
    raise ValueError(f"A pairing of {groups} groups must use every merged group 0..{groups - 1}; "
                     f"got {pairing.tolist()}.")
  return pairing


def group_similarity(corr: np.ndarray, *, num_models: int, groups: int) -> np.ndarray:
  """How alike every two groups of features are: (N * G, N * G), entry (i, j) the mean
  correlation of the best one-to-one pairing of group i's features with group j's (a linear
  assignment); 1 on the diagonal. Model m's group h is row m * G + h.

  A group and its copy with its features permuted score 1, so a pairing of groups chosen on
  this similarity recovers permuted attention heads exactly."""
  corr = np.asarray(corr, np.float64)
  n = corr.shape[0] // num_models
  size = n // groups
  count = num_models * groups
  sim = np.eye(count)
  for i in range(count):
    for j in range(i + 1, count):
      block = corr[i * size:(i + 1) * size, j * size:(j + 1) * size]
      rows, cols = scipy.optimize.linear_sum_assignment(block, maximize=True)
      sim[i, j] = sim[j, i] = block[rows, cols].mean()
  return sim


def pair_groups(matcher: Callable, corrs: Sequence[np.ndarray] = (), *, num_models: int,
                groups: int, similarity: np.ndarray | None = None) -> np.ndarray:
  """Which groups of the N models merge into which: the pairing of attention heads.

  ``matcher`` matches the N * G groups as if each were a feature, on ``similarity`` (an
  (N * G, N * G) matrix, model by model: e.g. the correlation of the heads' attention maps,
  ``zipjax.correlation(stats.heads)``), or without it on the mean over ``corrs`` (the
  correlations of the spaces that share the groups: an attention layer's query/key space and
  value/output space) of :func:`group_similarity`. Greedy matching may thus merge two heads
  of one model, as its same-model budget allows; permute() pairs heads one to one across
  models; identity() keeps head g with head g.

  Returns:
    (N, G) ints: the merged group of every model's group, for :func:`match_in_groups`.

  Raises:
    ValueError: both or neither of ``corrs`` and ``similarity``, or a similarity of another
      shape.
  """
  if (similarity is None) == (not len(corrs)):
    raise ValueError("pair_groups needs the correlations of the spaces that share the groups "
                     "(corrs) or the groups' similarity (similarity=), not "
                     f"{'both' if similarity is not None else 'neither'}.")
  if groups == 1:
    return np.zeros((num_models, 1), np.int64)
  if similarity is not None:
    sim = np.asarray(similarity)
    if sim.shape != (num_models * groups,) * 2:
      raise ValueError(f"The similarity of {num_models} models' {groups} groups must have "
                       f"shape {(num_models * groups,) * 2}, got {sim.shape}.")
  else:
    sim = np.mean([group_similarity(c, num_models=num_models, groups=groups) for c in corrs],
                  axis=0)
  merge = matcher(sim, num_models=num_models)
  if not isinstance(merge, GroupMerge):
    raise TypeError(f"Pairing attention heads needs a matcher that gives group merges; "
                    f"{getattr(matcher, '__name__', matcher)} gave a {type(merge).__name__}.")
  return np.asarray(merge.groups, np.int64)


def _fraction(name: str, value: Any, *, low_open: bool) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"greedy({name}=...) must be a number, got {value!r}.")
  value = float(value)
  if not (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
    raise ValueError(f"greedy({name}=...) must lie in {'(0' if low_open else '[0'}, 1], "
                     f"got {value}.")
  return value


def _merge_from_roots(root: np.ndarray, num_models: int) -> GroupMerge:
  """The merge of the groups of features with the same root (one of the group's features);
  groups in the order of their roots."""
  _, group = np.unique(root, return_inverse=True)
  return GroupMerge(group.reshape(num_models, -1))


def _check_corr(corr, num_models: int, dtype=np.float64) -> tuple[np.ndarray, int]:
  corr = np.asarray(corr, dtype)
  if corr.ndim != 2 or corr.shape[0] != corr.shape[1]:
    raise ValueError(f"A matcher needs a square correlation matrix, got shape {corr.shape}.")
  if num_models < 2:
    raise ValueError(f"num_models must be at least 2, got {num_models}.")
  if corr.shape[0] % num_models:
    raise ValueError(f"Correlation matrix of size {corr.shape[0]} does not split into "
                     f"num_models={num_models} equal blocks.")
  # NaN and inf survive a sum; the elementwise check only runs if the sum is not finite.
  if not np.isfinite(corr.sum()) and not np.all(np.isfinite(corr)):
    raise ValueError("The correlation matrix holds NaN or inf; compute it with "
                     "zipjax.correlation, which defines dead features.")
  return _symmetrise(corr), corr.shape[0] // num_models


def _symmetrise(a: np.ndarray, tile: int = 128) -> np.ndarray:
  """(a + a.T) / 2 of a square array, exactly symmetric (ties then break the same way from
  either side), computed in ``tile`` x ``tile`` tiles.

  Returns a view of a :func:`_padded` array of ``a``'s shape and dtype, whose rows lie 64
  bytes more than a row apart (so that a column of a matrix a power of two wide does not fall
  into one cache set). The measurements behind the tiles and the padding are in
  docs/design.md, Greedy.
  """
  dim = a.shape[0]
  out = _padded(dim, a.dtype)
  out[...] = a
  for i in range(0, dim, tile):
    for j in range(i, dim, tile):
      t = out[i:i + tile, j:j + tile] + out[j:j + tile, i:i + tile].T
      t *= 0.5
      out[i:i + tile, j:j + tile] = t
      out[j:j + tile, i:i + tile] = t.T
  return out


def _padded(dim: int, dtype, buffer: np.ndarray | None = None) -> np.ndarray:
  """An uninitialised (dim, dim) array whose rows lie 64 bytes more than a row apart, in
  the memory of ``buffer`` (a C-contiguous array at least that large) if given. Its ``base``
  is the C-contiguous array it lies in."""
  pad = 64 // np.dtype(dtype).itemsize
  if buffer is None:
    return np.empty((dim, dim + pad), dtype)[:, :dim]
  return buffer.reshape(-1)[:dim * (dim + pad)].reshape(dim, dim + pad)[:, :dim]


def same_model_budget(beta: float, num_models: int, width: int) -> int:
  """Same-model merges each model may make: floor(beta * (N - 1) * n / N)."""
  return math.floor(beta * (num_models - 1) * width / num_models + 1e-9)


# ----------------------------------------------------------------------------------------------
# Greedy (ZipIt!)


_CHUNK = 128  # rows per step of the work over whole rows of C
_COMPACT = 3  # compact C once a third of its positions are merged away
_LIMIT = 16  # the fewest candidates a batch may take after one that was cut short


def _merged_rows(C: np.ndarray, I: np.ndarray, J: np.ndarray, alpha: float) -> np.ndarray:
  """alpha * min(C[I], C[J]), row by row: a new (len(I), C.shape[1]) array of C's dtype.
  Computed in chunks of ``_CHUNK`` rows, so that the result is the only array of its size
  allocated (why: docs/design.md, Greedy)."""
  new = np.empty((len(I), C.shape[1]), C.dtype)
  for lo in range(0, len(I), _CHUNK):
    out = new[lo:lo + _CHUNK]
    np.minimum(C[I[lo:lo + _CHUNK]], C[J[lo:lo + _CHUNK]], out=out)
    out *= alpha
  return new


def _lazily(*arrays: np.ndarray, chunk: int = 32):
  """zip(*arrays) as Python scalars, converted lazily in chunks of ``chunk``, 2 * ``chunk``,
  4 * ``chunk``, ... elements, so that a loop that stops early converts little (why:
  docs/design.md, Greedy). The arrays have one length."""
  for step in itertools.count():
    start = chunk * (2 ** step - 1)
    if start >= len(arrays[0]):
      return
    yield from zip(*(a[start:start + chunk * 2 ** step].tolist() for a in arrays))


def _compacted(C: np.ndarray, keep: np.ndarray, at: np.ndarray, J: np.ndarray, new: np.ndarray,
               alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """C at the positions ``keep`` after merging J into the kept positions ``keep[at]``, whose
  merged rows are ``new`` (alpha times the smaller of the two members' rows); and each row's
  maximum and its first position.

  A merged feature's column is alpha times the smaller of its members' columns, and C is
  symmetric, so the result is symmetric, with the block between merged features alpha times
  the smaller of four values, as the in-place update writes it.

  The result is written over C's own memory (C must be a :func:`_padded` array), in chunks
  of rows: first the rows that were not merged, in order, from C (a row of the result never
  lies beyond the rows of C that later chunks read, since ``keep`` is increasing and the
  result's rows are shorter), then the merged rows, from ``new``. No array of C's size is
  allocated (why: docs/design.md, Greedy).
  """
  size = len(keep)
  out = _padded(size, C.dtype, C.base)
  other = keep.copy()
  other[at] = J
  merged = np.zeros(size, bool)
  merged[at] = True
  scale = None
  if alpha != 1:
    scale = np.ones(size, C.dtype)
    scale[at] = alpha
  rowmax = np.empty(size, C.dtype)
  rowarg = np.empty(size, np.intp)
  plain = np.flatnonzero(~merged)
  for positions, source in ((plain, None), (at, new)):
    for lo in range(0, len(positions), _CHUNK):
      here = positions[lo:lo + _CHUNK]
      rows = C[keep[here]] if source is None else source[lo:lo + _CHUNK]
      block = np.minimum(np.take(rows, keep, 1), np.take(rows, other, 1))
      if scale is not None:
        block *= scale
      out[here] = block
      rowarg[here] = arg = block.argmax(1)
      rowmax[here] = block[np.arange(len(here)), arg]
  return out, rowmax, rowarg


def _greedy_roots(corr: np.ndarray, num_models: int, alpha: float, beta: float) -> np.ndarray:
  """The paper's greedy matching, with per-row maxima and merges taken in batches.

  Returns, for each feature, the lowest feature of its group (where the group's merged row
  is kept).

  Identical in result to :func:`greedy_reference` (the plain loop: argmax over the whole
  matrix per merge). Each active row keeps its maximum over the pairs it may still make.
  Rows are sorted by their maxima once per batch, and merges are taken down that order for
  as long as the next row's pair is provably the pair the plain loop would pick next: neither
  of its rows took part in a merge of this batch, no merged feature of this batch has a value
  that reaches it (a merged feature's values can exceed its members' where correlations are
  negative), no row skipped in this batch may pair as high, and no model's same-model budget
  ran out. A row whose partner this batch merged is no stop: it pairs again at once if it
  still reaches its value outside the batch's features (at the lowest such column), and is
  skipped otherwise, worth at most its row's largest value outside them (its values with the
  batch's merged features count in their reach); the batch goes on while later rows beat
  that, or tie it with a lower pair (the plain loop's tie rule). A batch's merged rows are
  computed together, as array operations; then the disturbed rows are recomputed and the rows
  are sorted again: a handful of sorts serve all merges. After a batch that a merged
  feature's reach cut short, the next takes at most twice the merges it kept (doubling while
  none is cut), so that few merged rows are computed in vain.

  The diagonal is -inf in C. Merged-away features are masked when a row is read (their
  columns are never written again, their rows never read), and a model's own block once its
  budget is spent. Once a third of C's positions are merged away, C is compacted in its own
  memory (:func:`_compacted`), so that later batches read shorter rows.
  """
  dim = corr.shape[0]
  n = dim // num_models
  C = corr  # the caller's fresh copy, updated in place
  neg = C.dtype.type(-np.inf)
  np.fill_diagonal(C, neg)
  # Rows and columns of C are positions; ids[position] is the feature. Compaction drops the
  # positions of merged-away features (keeping the order, so ties break alike).
  ids = np.arange(dim)
  size = dim
  owner = np.arange(dim) // n
  mine = [np.arange(o * n, (o + 1) * n) for o in range(num_models)]  # each model's positions
  active = np.ones(dim, bool)
  budget = [same_model_budget(beta, num_models, n)] * num_models
  into = np.arange(dim)  # the feature each one merged into (itself while active)
  gone = np.zeros(dim, C.dtype)  # -inf at merged-away positions: added to a row, masks them

  def without_spent(vals: np.ndarray, rows: np.ndarray,
                    cols: np.ndarray | None = None) -> np.ndarray:
    """vals (pairs of rows x cols, all columns by default) with the pairs of models out of
    budget at -inf."""
    for o in range(num_models):
      if budget[o]:
        continue
      own = np.flatnonzero(owner[rows] == o)
      if len(own):
        theirs = mine[o] if cols is None else np.flatnonzero(owner[cols] == o)
        vals[np.ix_(own, theirs)] = neg
    return vals

  def row_maxima(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vals = C[rows]
    vals += gone
    vals = without_spent(vals, rows)
    arg = vals.argmax(1)
    return vals[np.arange(len(rows)), arg], arg

  if all(budget):  # nothing is masked yet: no copy of C
    rowarg = C.argmax(1)
    rowmax = C[np.arange(dim), rowarg]
  else:
    rowmax, rowarg = row_maxima(np.arange(dim))
  merges_left = dim - n
  dead = 0  # merged-away positions still in C
  limit = None  # the most candidates a batch takes (after a batch that was cut short)
  while merges_left:
    # Candidates: rows in order of their maxima while no two share a feature and no budget
    # runs out (the last candidate may spend one).
    order = np.argsort(-rowmax, kind="stable")  # ties: lowest row first
    order = order[active[order]]
    partner = rowarg[order]
    # The batch stops at such a row (unless this batch merged its partner: see below).
    last = (partner < order) | (rowmax[order] == neg)
    own = owner[order]
    own_pair = own == owner[partner]
    rows: list[int] = []
    cols: list[int] = []
    taken: set[int] = set()  # the features of this batch's merges
    left = list(budget)
    # A row whose partner this batch merged gets the lowest pair it still has at its value,
    # or else is skipped: it may pair at most at its ``bound``, the most its row holds outside
    # the batch's features (its values with the batch's merged features are in their reach,
    # checked below), and the batch goes on while later rows beat that; at a tie, while their
    # pair is the lowest of the tied ones (the plain loop's rule).
    skipped: dict[int, tuple[float, tuple[int, int]]] = {}  # row: (bound, its lowest pair)
    top = -math.inf  # the largest bound
    values: list[float] = []  # each merge's value
    outside = None  # -inf at merged-away features and the batch's features
    for r, c, v, stop, o, same in _lazily(order, partner, rowmax[order], last, own, own_pair):
      if r in taken:
        continue  # merged in this batch
      if v < top or v == -math.inf:
        break
      if c in taken:
        if outside is None:
          outside = gone.copy()
          outside[rows] = outside[cols] = neg
        vals = C[r] + outside
        if not all(budget):
          vals = without_spent(vals[None], np.array([r]))[0]
        c = int(vals.argmax())
        if vals[c] < v:
          bound = float(vals[c])
          skipped[r] = (bound, (min(r, c), max(r, c)))
          top = max(top, bound)
          continue
        same = bool(owner[c] == o)
      elif stop and c not in skipped:
        break
      # A partner below r is a skipped row: it reaches v with r, so it came first in the order
      # and is neither in the batch (``outside``) nor was taken.
      pair = (min(r, c), max(r, c))
      if v == top and pair > min(p for b, p in skipped.values() if b == top):
        break  # a skipped row's pair at this value comes first
      if len(rows) == merges_left or len(rows) == limit:
        break
      rows.append(pair[0])
      cols.append(pair[1])
      values.append(v)
      taken.add(r)
      taken.add(c)
      if outside is not None:
        outside[r] = outside[c] = neg
      if c in skipped:
        del skipped[c]
        top = max((b for b, _ in skipped.values()), default=-math.inf)
      if same:
        left[o] -= 1
        if not left[o]:
          break
    if not rows:
      raise RuntimeError("greedy matching ran out of allowed pairs; please report this.")
    I = np.asarray(rows)
    J = np.asarray(cols)
    k = len(I)
    # The candidates' merged rows, as if each were merged in turn. ``new`` holds them as
    # of the batch's start (the diagonal is -inf, as min(-inf, x)). Between two merged
    # features of the batch the value is cross: alpha * min(alpha * min(...)) over their
    # four member pairs, the same whichever merges first (rounding is monotonic).
    new = _merged_rows(C, I, J, alpha)
    before = np.tri(k, k, -1, bool)  # before[p, q]: q merges before p
    at_i = np.take(new, I, 1)
    at_j = np.take(new, J, 1)
    cross = np.minimum(at_i, at_j)
    cross *= alpha
    # Candidate p is the plain loop's next pick only if its value beats every value of the
    # features merged before it in the batch, with what they may still pair with.
    if k > 1:
      batch = gone.copy()
      batch[I] = neg
      batch[J] = neg
      reach = np.empty(k, C.dtype)
      for lo in range(0, k, _CHUNK):  # in chunks: no large temporary (see _merged_rows)
        part = new[lo:lo + _CHUNK] + batch
        reach[lo:lo + _CHUNK] = without_spent(part, I[lo:lo + _CHUNK]).max(1)
      among = np.where(before, cross, at_i)  # the merged p with the features I[q]
      np.fill_diagonal(among, neg)
      reach = np.maximum(reach, without_spent(among, I, I).max(1))
      later_j = np.where(before.T, at_j, neg)  # with J[q], q merging after p
      reach = np.maximum(reach, without_spent(later_j, I, J).max(1))
      beats = np.asarray(values[1:]) > np.maximum.accumulate(reach[:-1])
      if not beats.all():
        k = 1 + int(np.argmin(beats))
        I, J, new, cross = I[:k], J[:k], new[:k], cross[:k, :k]
        limit = max(_LIMIT, 2 * k)  # the next batch takes at most twice as many candidates
      elif limit is not None:
        limit *= 2
    # Merge the first k.
    spent = -1
    for o in owner[I[owner[I] == owner[J]]].tolist():
      budget[o] -= 1
      if not budget[o]:
        spent = o
    into[ids[J]] = ids[I]
    active[J] = False
    merges_left -= k
    if not merges_left:
      break
    dead += k
    if dead * _COMPACT >= size:
      # Drop the merged-away positions, writing the batch's merged rows and columns on the
      # way: later batches then read rows a third shorter. (With N = 2 this follows the
      # first batch, which takes most merges.)
      keep = np.flatnonzero(active)
      C, rowmax, rowarg = _compacted(C, keep, np.searchsorted(keep, I), J, new, alpha)
      ids, owner, size, dead = ids[keep], owner[keep], len(keep), 0
      mine = [np.flatnonzero(owner == o) for o in range(num_models)]
      active = np.ones(size, bool)
      gone = np.zeros(size, C.dtype)
      if not all(budget):
        rowmax, rowarg = row_maxima(np.arange(size))
      continue
    gone[J] = neg
    rowmax[J] = neg
    alive = np.flatnonzero(active)
    C[I] = new
    # The columns, of every row (the rows of merged-away features are never read again),
    # each written whole down the padded rows of C: no transposed copy of the batch, no
    # scatter of (row, column) pairs. Then the block between the batch's merged features.
    C.T[I] = new
    C[np.ix_(I, I)] = cross
    # Rows whose maximum is unknown now: the merged rows, rows whose maximum was in a merged
    # row, and, where a budget ran out, that model's rows.
    touched = np.zeros(size, bool)
    touched[I] = True
    touched[J] = True
    redo = touched[rowarg[alive]] | touched[alive]
    if spent >= 0:
      redo |= owner[alive] == spent
    stale = alive[redo]
    if len(stale):
      rowmax[stale], rowarg[stale] = row_maxima(stale)
    # The other rows keep their maxima unless a merged row's new value beats it.
    fresh = alive[~redo]
    if len(fresh):
      by_col = np.argsort(I)
      vals = without_spent(np.take(new[by_col], fresh, 1), I[by_col], fresh)
      best = vals.argmax(0)
      v = vals[best, np.arange(len(fresh))]
      col = I[by_col][best]
      better = (v > rowmax[fresh]) | ((v == rowmax[fresh]) & (col < rowarg[fresh]))
      rowmax[fresh[better]] = v[better]
      rowarg[fresh[better]] = col[better]
  while True:  # follow merged-away features to their merged feature
    hop = into[into]
    if np.array_equal(hop, into):
      return into
    into = hop


def greedy_reference(corr: np.ndarray, *, num_models: int, alpha: float = 0.5,
                     beta: float = 0.5) -> Merge:
  """The paper's greedy matching as a plain numpy loop: one argmax over the whole matrix per
  merge. Slow (O((N*n)^3)); the reference that tests and benchmarks compare against."""
  corr, n = _check_corr(corr, num_models, np.float32)
  dim = corr.shape[0]
  C = corr.copy()
  owner = np.arange(dim) // n
  active = np.ones(dim, bool)
  budget = np.full(num_models, same_model_budget(beta, num_models, n))
  members = [[i] for i in range(dim)]
  for _ in range(dim - n):
    allowed = active[:, None] & active[None, :] & ~np.eye(dim, dtype=bool)
    allowed &= (owner[:, None] != owner[None, :]) | (budget[owner] > 0)[:, None]
    flat = np.where(allowed, C, -np.inf).argmax()
    i, j = divmod(int(flat), dim)
    i, j = min(i, j), max(i, j)
    if owner[i] == owner[j]:
      budget[owner[i]] -= 1
    new = alpha * np.minimum(C[i], C[j])
    C[i, :] = new
    C[:, i] = new
    active[j] = False
    members[i] += members[j]
  return merge_from_groups([members[i] for i in np.flatnonzero(active)], dim)


def greedy(*, alpha: float = 0.5, beta: float = 0.5) -> Matcher:
  """ZipIt!'s greedy matching of features within and across models.

  Repeatedly merges the most correlated pair of current features (ties: lowest row, then
  column) until n remain. A merged feature stays in the pool, correlated to every other
  feature by ``alpha`` times the smaller of its two members' correlations (repeated matching,
  needed for N > 2). A merged feature belongs to the model of its lowest-index member; each
  model may make floor(beta * (N-1) * n / N) merges of two of its own features.

  Args:
    alpha: in (0, 1]; how strongly merged features attract further merges.
    beta: in [0, 1]; the same-model budget. 0 forbids within-model merges (permutation).
  """
  alpha = _fraction("alpha", alpha, low_open=True)
  beta = _fraction("beta", beta, low_open=False)

  def matcher(corr, *, num_models: int) -> Merge:
    corr, _ = _check_corr(corr, num_models, np.float32)
    return _merge_from_roots(_greedy_roots(corr, num_models, alpha, beta), num_models)

  matcher.__name__ = f"greedy(alpha={alpha}, beta={beta})"
  return matcher


# ----------------------------------------------------------------------------------------------
# Baselines


def identity() -> Matcher:
  """Weight averaging: feature j of every model merges with feature j of the others."""

  def matcher(corr, *, num_models: int) -> Merge:
    corr, n = _check_corr(corr, num_models)
    return merge_from_groups([[m * n + j for m in range(num_models)] for j in range(n)],
                             corr.shape[0])

  matcher.__name__ = "identity()"
  return matcher


def permute() -> Matcher:
  """Permute: features of every model are assigned one-to-one to model 0's features by a
  linear assignment maximising their correlation (no within-model merges)."""

  def matcher(corr, *, num_models: int) -> Merge:
    corr, n = _check_corr(corr, num_models)
    groups = [[j] for j in range(n)]
    for m in range(1, num_models):
      block = corr[:n, m * n:(m + 1) * n]
      rows, cols = scipy.optimize.linear_sum_assignment(block, maximize=True)
      for r, c in zip(rows, cols):
        groups[r].append(m * n + int(c))
    return merge_from_groups(groups, corr.shape[0])

  matcher.__name__ = "permute()"
  return matcher


def optimal(*, max_width: int = 256) -> Matcher:
  """Optimal zip matching for two models: the maximum-weight perfect matching of the 2n
  features into n pairs, within or across models, maximising the total correlation.

  Exact but slow (Edmonds' blossom algorithm, O(n^3) in Python): for small widths and for
  checking greedy. Widths above ``max_width`` are refused rather than left running for hours.
  """

  def matcher(corr, *, num_models: int) -> Merge:
    corr, n = _check_corr(corr, num_models)
    if num_models != 2:
      raise ValueError(f"optimal() pairs features, so it merges exactly 2 models; got "
                       f"{num_models}. Use greedy() for more.")
    if n > max_width:
      raise ValueError(f"optimal() on width {n} would take very long (limit max_width="
                       f"{max_width}); use greedy(), or pass optimal(max_width={n}) to wait.")
    import networkx as nx  # pylint: disable=g-import-not-at-top
    graph = nx.Graph()
    dim = 2 * n
    rows, cols = np.triu_indices(dim, 1)
    # Every perfect matching has n edges, so shifting the weights to be positive keeps the
    # optimum and lets the maximum-cardinality search stay exact.
    graph.add_weighted_edges_from(zip(rows.tolist(), cols.tolist(),
                                      (corr[rows, cols] + 2.0).tolist()))
    pairs = nx.max_weight_matching(graph, maxcardinality=True)
    if len(pairs) != n:
      raise RuntimeError("optimal() found no perfect matching; please report this.")
    return merge_from_groups(sorted(sorted(p) for p in pairs), dim)

  matcher.__name__ = "optimal()"
  return matcher


def kmeans(*, iterations: int = 100, seed: int = 0) -> Matcher:
  """k-means clustering of the N*n features into n clusters; each feature is described by
  its row of correlations. k-means++ seeding from ``seed``; an empty cluster is re-seeded
  with the point farthest from its centre."""

  def matcher(corr, *, num_models: int) -> Merge:
    corr, n = _check_corr(corr, num_models)
    points = corr
    rng = np.random.default_rng(seed)
    centres = [points[rng.integers(len(points))]]
    for _ in range(1, n):
      d2 = np.min([((points - c) ** 2).sum(1) for c in centres], axis=0)
      total = d2.sum()
      idx = rng.choice(len(points), p=d2 / total) if total > 0 else rng.integers(len(points))
      centres.append(points[idx])
    centres = np.stack(centres)
    labels = None
    for _ in range(iterations):
      dist = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
      new = dist.argmin(1)
      for k in range(n):
        if not (new == k).any():  # empty cluster: take the worst-served point
          worst = int(dist[np.arange(len(points)), new].argmax())
          new[worst] = k
          dist[worst] = 0.0
      if labels is not None and np.array_equal(new, labels):
        break
      labels = new
      centres = np.stack([points[labels == k].mean(0) for k in range(n)])
    groups = [np.flatnonzero(labels == k).tolist() for k in range(n)]
    return merge_from_groups(sorted(groups), corr.shape[0])

  matcher.__name__ = "kmeans()"
  return matcher


def describe(matcher: Callable) -> str:
  return getattr(matcher, "__name__", repr(matcher))
