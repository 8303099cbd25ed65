"""Git Re-Basin weight matching (Ainsworth et al., 2023) as a whole-model matcher.

Coordinate descent over spaces: for one space at a time, the permutation of model B's
channels that maximises the summed inner products of all weights touching the space (with
every other space's current permutation applied) is a linear assignment; sweep the spaces in
random order until no permutation changes.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import scipy.optimize

from zipjax._src import match as match_lib
from zipjax._src import spec as spec_lib


def weight_matching(*, max_iterations: int = 100,
                    seed: int = 0) -> match_lib.WholeModelMatcher:
  """A whole-model matcher: permutes model B's spaces onto model A's by weight similarity.

  Used as ``zipjax.zip(va, vb, spec, data=..., matcher=zipjax.match.weight_matching())``;
  it needs no features. Parameters are compared, BatchNorm statistics are not. For two
  models only.
  """

  def matcher(spec: spec_lib.Spec, variables_list: Sequence[Any], *,
              spaces: Sequence[str]) -> dict[str, match_lib.Merge]:
    if len(variables_list) != 2:
      raise ValueError(f"weight_matching() aligns model B to model A, so it merges exactly 2 "
                       f"models; got {len(variables_list)}. Use greedy() or permute().")
    grouped = [s for s in spaces if spec.space(s).groups > 1]
    if grouped:
      raise ValueError(f"weight_matching() permutes whole spaces; spaces {grouped} are "
                       "normalised in groups (GroupNorm), which a permutation across groups "
                       "would break. Use greedy() or permute(), which match them group by "
                       "group.")
    fa, fb = (spec_lib.flatten(v) for v in variables_list)
    stats = {p for bn in spec.batchnorm_layers() for p in (bn.mean, bn.var)}
    leaves = {p: (np.asarray(fa[p], np.float64), np.asarray(fb[p], np.float64))
              for p in fa if p[0] != "batch_stats" and p not in stats and spec.leaves[p]}
    perms = {s: np.arange(spec.width(s)) for s in spaces}
    touching = {s: [(p, a) for p, (wa, _) in leaves.items()
                    for a, ax in spec.leaf_axes(p, wa.ndim).items() if ax.space == s]
                for s in spaces}

    def permuted_b(path, skip_axis):
      w = leaves[path][1]
      for a, ax in spec.leaf_axes(path, w.ndim).items():
        if a != skip_axis and ax.space in perms:
          w = np.take(w, perms[ax.space], axis=a)
      return w

    rng = np.random.default_rng(seed)
    for _ in range(max_iterations):
      changed = False
      for s in rng.permutation(list(spaces)):
        n = spec.width(s)
        sim = np.zeros((n, n))
        for path, axis in touching[s]:
          wa = np.moveaxis(leaves[path][0], axis, 0).reshape(n, -1)
          wb = np.moveaxis(permuted_b(path, axis), axis, 0).reshape(n, -1)
          sim += wa @ wb.T
        _, cols = scipy.optimize.linear_sum_assignment(sim, maximize=True)
        old = sim[np.arange(n), perms[s]].sum()
        new = sim[np.arange(n), cols].sum()
        if new > old + 1e-12 * max(1.0, abs(old)):
          perms[s] = cols
          changed = True
      if not changed:
        break
    return {s: match_lib.merge_from_groups([[j, spec.width(s) + int(p)]
                                            for j, p in enumerate(perms[s])], 2 * spec.width(s))
            for s in spaces}

  return match_lib.WholeModelMatcher(matcher, "weight_matching()")
