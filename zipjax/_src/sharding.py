"""Data parallelism over a ``jax.sharding.Mesh`` for the passes over calibration data.

Feature statistics and the BatchNorm reset are sums over samples. Each calibration batch is
placed sharded along its leading (batch) axis over the mesh's ``"data"`` axis, the variables
and running statistics replicated, and the jitted step reduces (or, for a covariance,
contracts) the sharded sample axis: XLA's partitioner turns that into per-device partial sums
and one all-reduce. Every device thus sees ``batch / devices`` samples; the results come back
replicated and leave the mesh as single-device copies. Matching runs on the host and the zip
kernels run where the variables are. Each step takes the previous one's output (the running
statistics), so no two steps with collectives are in flight at once: on simulated CPU devices
that could deadlock, each holding some devices' threads in its all-reduce.

One device (the default on a machine with one) takes the plain path: nothing is placed, no
mesh is built.

A batch whose size is not a multiple of the number of data-parallel devices cannot be split
evenly. Feature statistics split it into a sharded part (the largest multiple) and a
replicated remainder; statistics do not depend on how samples are grouped into batches, so
this is exact. The BatchNorm reset normalises every batch with its own statistics, so its
batches must stay whole: an uneven one is placed replicated (every device computes all of it).
No padding is used, since padded samples would change the batch statistics.

Several hosts: build one mesh over all processes' devices (``jax.make_mesh`` or ``Mesh`` over
``jax.devices()``), and make every calibration batch a global array with
``jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local_batch)``: each
host feeds its own shard of the data. Such a batch (an array that is not fully addressable
from this process) is used as it is. Every host runs the same calls with the same variables
and gets the same results.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zipjax._src.errors import DataError

#: The mesh axis calibration batches are sharded over.
DATA_AXIS = "data"


def resolve_mesh(mesh: Mesh | None) -> Mesh | None:
  """The mesh a pass runs on: ``mesh``, or all local devices if None; None for one device."""
  if mesh is None:
    devices = jax.local_devices()
    return None if len(devices) == 1 else Mesh(np.asarray(devices), (DATA_AXIS,))
  if not isinstance(mesh, Mesh):
    raise TypeError(f"`mesh` must be a jax.sharding.Mesh (or None: all local devices), got "
                    f"{type(mesh).__name__}.")
  return None if mesh.size == 1 else mesh


def _batch_axes(mesh: Mesh) -> str | tuple[str, ...]:
  """The mesh axis (or axes) batches are split over: "data" if it has one, else all."""
  return DATA_AXIS if DATA_AXIS in mesh.axis_names else tuple(mesh.axis_names)


def num_shards(mesh: Mesh) -> int:
  """How many parts a batch is split into."""
  return mesh.shape[DATA_AXIS] if DATA_AXIS in mesh.axis_names else mesh.size


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def replicate(tree: Any, mesh: Mesh) -> Any:
  """``tree`` with every leaf replicated over ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


def batch_size(x: Any) -> int:
  """The size of the leading (batch) axis of a batch (an array or a pytree of arrays)."""
  leaves = jax.tree_util.tree_leaves(x)
  if not leaves or not getattr(leaves[0], "shape", ()):
    raise DataError("A calibration batch has no leading batch axis.")
  return int(leaves[0].shape[0])


def is_global(x: Any) -> bool:
  """Whether the caller already placed ``x`` across processes (not fully addressable)."""
  return any(isinstance(a, jax.Array) and not a.is_fully_addressable
             for a in jax.tree_util.tree_leaves(x))


def place_batch(x: Any, mesh: Mesh) -> Any:
  """``x`` sharded along its batch axis over ``mesh``, or replicated if the batch size is not
  a multiple of the number of shards. A global array is returned as it is."""
  if is_global(x):
    return x
  even = batch_size(x) % num_shards(mesh) == 0
  spec = PartitionSpec(_batch_axes(mesh)) if even else PartitionSpec()
  return jax.device_put(x, NamedSharding(mesh, spec))


def split_batch(x: Any, mesh: Mesh) -> list[Any]:
  """``x`` as [sharded part] or, for an uneven batch, [sharded part, replicated remainder].

  Only for passes whose results do not depend on how samples are grouped into batches.
  """
  if is_global(x):
    return [x]
  size = batch_size(x)
  even = size - size % num_shards(mesh)
  if even in (0, size):
    return [place_batch(x, mesh)]
  head = jax.tree_util.tree_map(lambda a: a[:even], x)
  tail = jax.tree_util.tree_map(lambda a: a[even:], x)
  return [place_batch(head, mesh), replicate(tail, mesh)]


def to_local(tree: Any) -> Any:
  """Replicated arrays as this process's single-device copy (no transfer); others as they
  are. Results leave the mesh this way, so they mix freely with arrays on one device."""

  def local(a):
    if (isinstance(a, jax.Array) and len(a.sharding.device_set) > 1
        and a.is_fully_replicated):
      return a.addressable_data(0)
    return a

  return jax.tree_util.tree_map(local, tree)
