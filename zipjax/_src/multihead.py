"""Multi-head models: one merged trunk shared by N per-model heads (partial zips, ensembles).

The variables of a multi-head model are one tree: trunk leaves as in the source models, head
leaves stacked along a leading model axis. ``apply`` vmaps the model over that axis with the
trunk leaves unbatched, so JAX computes the trunk once and only the heads N times.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from zipjax._src import spec as spec_lib


def in_axes(variables: Any, stacked: frozenset) -> Any:
  """The vmap in_axes tree: 0 for stacked (head) leaves, None for trunk leaves."""
  flat = spec_lib.flatten(variables)
  return spec_lib.unflatten({p: (0 if p in stacked else None) for p in flat}, variables)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(spec, stacked, variables, x):
  return jax.vmap(spec.apply, in_axes=(in_axes(variables, stacked), None))(variables, x)


@flax.struct.dataclass
class MultiHead:
  """A merged trunk and N heads.

  Attributes:
    variables: trunk leaves unbatched, head leaves with a leading axis of size N.
    spec: the source models' spec.
    stacked: the paths of the head leaves.
    stop_at: the last merged space (None for an ensemble: no shared trunk).
  """

  variables: Any
  spec: spec_lib.Spec = flax.struct.field(pytree_node=False)
  stacked: frozenset = flax.struct.field(pytree_node=False)
  stop_at: str | None = flax.struct.field(pytree_node=False, default=None)

  @property
  def num_heads(self) -> int:
    flat = spec_lib.flatten(self.variables)
    return int(jnp.shape(flat[next(iter(self.stacked))])[0])

  def apply(self, x: Any) -> Any:
    """Outputs of every head, stacked along a leading axis of size N (trunk computed once)."""
    return _apply(self.spec, self.stacked, self.variables, x)

  def head(self, m: int) -> dict:
    """Plain variables of the single model made of the trunk and head ``m``."""
    flat = spec_lib.flatten(self.variables)
    return spec_lib.unflatten({p: (v[m] if p in self.stacked else v) for p, v in flat.items()},
                              self.variables)


def ensemble(variables_list: Sequence[Any], spec: spec_lib.Spec) -> MultiHead:
  """The N source models side by side, as a MultiHead with no shared trunk."""
  flats = spec_lib.check_models(spec, variables_list)
  stacked = {p: jnp.stack([jnp.asarray(f[p]) for f in flats]) for p in flats[0]}
  return MultiHead(spec_lib.unflatten(stacked, variables_list[0]), spec, frozenset(stacked))
