"""Merges: how one feature space of N models becomes one space, as data of fixed shape.

A merge of a space of width n over N models is the pair M (n, N*n), which averages each merged
feature's members, and U (N*n, n), which copies a merged feature back to each member. Two types
hold it:

- :class:`GroupMerge`: every feature belongs to one merged feature, and a merged feature is the
  mean of its members. It is stored as group ids, ``groups[m, j]`` = the merged feature of
  model m's feature j, an (N, n) integer array whatever the groups are, so that a zip program
  compiled for one merge serves every other merge of the same widths.
- :class:`DenseMerge`: any M and U (soft merges that mix features).

Both are pytrees (their arrays are the leaves), so merges pass into jitted programs as they are.
"""

from __future__ import annotations

import abc
import itertools
from typing import Sequence

import jax
import numpy as np


class Merge(abc.ABC):
  """How one space is merged: M (n, N*n) and U (N*n, n), split by model into ``blocks``."""

  @property
  @abc.abstractmethod
  def M(self) -> np.ndarray:  # pylint: disable=invalid-name
    """(n, N*n) float32: merged feature g is sum_f M[g, f] * feature f."""

  @property
  @abc.abstractmethod
  def U(self) -> np.ndarray:  # pylint: disable=invalid-name
    """(N*n, n) float32: feature f is recovered as sum_g U[f, g] * merged feature g."""

  @property
  @abc.abstractmethod
  def num_models(self) -> int:
    """N."""

  @property
  @abc.abstractmethod
  def width(self) -> int:
    """n, the width of the space in each model and of the merged space."""

  def blocks(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """[M_1..M_N] and [U_1..U_N], (n, n) each: M split by columns, U by rows."""
    n, M, U = self.width, self.M, self.U
    return ([M[:, m * n:(m + 1) * n] for m in range(self.num_models)],
            [U[m * n:(m + 1) * n] for m in range(self.num_models)])


@jax.tree_util.register_pytree_node_class
class GroupMerge(Merge):
  """A merge whose merged features are the means of groups of features.

  Attributes:
    groups: (N, n) int32; ``groups[m, j]`` is the merged feature (0..n-1) that feature j of
      model m belongs to. Every merged feature has at least one member.

  ``M[g, m*n + j] = 1/|g|`` and ``U[m*n + j, g] = 1`` where ``groups[m, j] = g``, else 0.

  Raises:
    ValueError: if ``groups`` is not (N, n) with N >= 1, holds ids outside 0..n-1, or leaves a
      merged feature without members.
  """

  def __init__(self, groups: np.ndarray):
    groups = np.array(groups, copy=True)
    if groups.ndim != 2 or not np.issubdtype(groups.dtype, np.integer) or groups.size == 0:
      raise ValueError(f"GroupMerge needs an (N, n) integer array of group ids, got "
                       f"{groups.dtype} {groups.shape}.")
    n = groups.shape[1]
    if groups.min() < 0 or groups.max() >= n:
      raise ValueError(f"Group ids must lie in 0..{n - 1} (the merged features of a space of "
                       f"width {n}); got ids from {groups.min()} to {groups.max()}.")
    sizes = np.bincount(groups.ravel(), minlength=n)
    if not sizes.all():
      raise ValueError(f"Merged feature {int(np.argmin(sizes))} has no members; every merged "
                       f"feature 0..{n - 1} needs at least one.")
    groups = groups.astype(np.int32)
    groups.flags.writeable = False
    self.groups = groups

  # Inside a jitted program ``groups`` is a tracer: unflattening skips the checks.
  def tree_flatten(self):
    return (self.groups,), None

  @classmethod
  def tree_unflatten(cls, aux, leaves):
    del aux
    merge = object.__new__(cls)
    merge.groups = leaves[0]
    return merge

  @property
  def num_models(self) -> int:
    return self.groups.shape[0]

  @property
  def width(self) -> int:
    return self.groups.shape[1]

  @property
  def sizes(self) -> np.ndarray:
    """(n,) the number of members of each merged feature, over all models."""
    return np.bincount(np.asarray(self.groups).ravel(), minlength=self.width)

  @property
  def M(self) -> np.ndarray:  # pylint: disable=invalid-name
    g = np.asarray(self.groups).ravel()
    M = np.zeros((self.width, g.size), np.float32)
    M[g, np.arange(g.size)] = (1.0 / self.sizes)[g]
    return M

  @property
  def U(self) -> np.ndarray:  # pylint: disable=invalid-name
    g = np.asarray(self.groups).ravel()
    U = np.zeros((g.size, self.width), np.float32)
    U[np.arange(g.size), g] = 1.0
    return U

  def members(self) -> list[list[int]]:
    """Each merged feature's members, as features m*n + j of the concatenation."""
    g = np.asarray(self.groups).ravel()
    order = np.argsort(g, kind="stable")
    return [part.tolist() for part in np.split(order, np.cumsum(self.sizes)[:-1])]

  def __repr__(self) -> str:
    return f"GroupMerge(num_models={self.num_models}, width={self.width}, groups={self.groups!r})"


@jax.tree_util.register_pytree_node_class
class DenseMerge(Merge):
  """A merge given by any M (n, N*n) and U (N*n, n), e.g. a soft merge that mixes features.

  Raises:
    ValueError: if the shapes are not (n, N*n) and (N*n, n) for some N >= 1.
  """

  def __init__(self, M: np.ndarray, U: np.ndarray):  # pylint: disable=invalid-name
    M, U = np.asarray(M, np.float32), np.asarray(U, np.float32)
    if M.ndim != 2 or M.shape[0] == 0 or M.shape[1] % M.shape[0] or U.shape != M.shape[::-1]:
      raise ValueError(f"DenseMerge needs M of shape (n, N*n) and U of shape (N*n, n); got M "
                       f"{M.shape} and U {U.shape}.")
    self._M, self._U = M, U

  def tree_flatten(self):
    return (self._M, self._U), None

  @classmethod
  def tree_unflatten(cls, aux, leaves):
    del aux
    merge = object.__new__(cls)
    merge._M, merge._U = leaves  # pylint: disable=protected-access
    return merge

  @property
  def M(self) -> np.ndarray:  # pylint: disable=invalid-name
    return self._M

  @property
  def U(self) -> np.ndarray:  # pylint: disable=invalid-name
    return self._U

  @property
  def num_models(self) -> int:
    return self._M.shape[1] // self._M.shape[0]

  @property
  def width(self) -> int:
    return self._M.shape[0]

  def __repr__(self) -> str:
    return f"DenseMerge(num_models={self.num_models}, width={self.width})"


def merge_from_groups(groups: Sequence[Sequence[int]], dim: int) -> GroupMerge:
  """The merge whose merged feature g averages the features ``groups[g]``.

  Arguments:
    groups: n groups of features of the concatenation (feature m*n + j is feature j of model
      m) that split 0..dim-1: each feature in exactly one group.
    dim: N*n, the number of features of all models together.

  Returns:
    A :class:`GroupMerge` with merged features in the order of ``groups``.

  Example:
    >>> merge_from_groups([[0, 2], [1, 3]], 4).groups   # two models of width 2, matched 1:1
    array([[0, 1],
           [0, 1]], dtype=int32)
  """
  n = len(groups)
  if n == 0 or dim % n:
    raise ValueError(f"{n} groups over {dim} features: the groups must number n, the width of "
                     f"the space, and {dim} features must be N*n for N models.")
  sizes = np.fromiter(map(len, groups), np.int64, n)
  if sizes.min() == 0:
    raise ValueError(f"Group {int(np.argmin(sizes))} of {n} is empty; every merged feature "
                     "needs at least one member.")
  members = np.fromiter(itertools.chain.from_iterable(groups), np.int64, int(sizes.sum()))
  if members.min() < 0 or members.max() >= dim:
    bad = members[(members < 0) | (members >= dim)]
    raise ValueError(f"Group members must be features 0..{dim - 1}; got {bad[:5].tolist()}.")
  count = np.bincount(members, minlength=dim)
  if (count != 1).any():
    f = int(np.flatnonzero(count != 1)[0])
    raise ValueError(f"The groups must split features 0..{dim - 1}, each in exactly one "
                     f"group; feature {f} is in {count[f]}.")
  group = np.empty(dim, np.int64)
  group[members] = np.repeat(np.arange(n), sizes)
  return GroupMerge(group.reshape(dim // n, n))


def identity_merge(width: int, num_models: int) -> GroupMerge:
  """Feature j of every model merged with feature j of the others (weight averaging)."""
  return GroupMerge(np.tile(np.arange(width, dtype=np.int32), (num_models, 1)))


def compose(parts: Sequence[tuple[Merge, int]]) -> Merge:
  """The merge of a space made of spaces: ``parts`` = [(merge, repeats)] in axis order.

  The space is the concatenation of every part's features, each part tiled ``repeats``
  times (a feature map of k positions flattened channels-last is one part repeated k
  times), so its M and U are block-diagonal with one block per copy. Group merges give a
  group merge (the ids offset block by block); otherwise a dense one.
  """
  if all(isinstance(m, GroupMerge) for m, _ in parts):
    blocks, offset = [], 0
    for merge, repeats in parts:
      for _ in range(repeats):
        blocks.append(np.asarray(merge.groups) + offset)
        offset += merge.width
    return GroupMerge(np.concatenate(blocks, axis=1))
  num = parts[0][0].num_models
  copies = [m for m, repeats in parts for _ in range(repeats)]
  n = sum(m.width for m in copies)
  M, U = np.zeros((n, num * n), np.float32), np.zeros((num * n, n), np.float32)
  offset = 0
  for merge in copies:
    w = merge.width
    mb, ub = merge.blocks()
    for m in range(num):
      M[offset:offset + w, m * n + offset:m * n + offset + w] = mb[m]
      U[m * n + offset:m * n + offset + w, offset:offset + w] = ub[m]
    offset += w
  return DenseMerge(M, U)
