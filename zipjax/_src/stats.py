"""Feature statistics: a streaming, jitted pass over calibration data for N models at once.

For every space, the features of the N models are concatenated channel-wise, model by model
(channel ``m * width + j`` is channel j of model m), and every position (pixel, token, capture
point) is a sample. Batches are merged into the running mean and centred second moment with
Chan's parallel update, in float32 at the highest matmul precision, so no E[xx] - E[x]^2
cancellation happens and no features are ever held beyond one batch.

With several devices (all local ones by default, or a ``mesh``), every batch is split over the
devices along its batch axis and XLA all-reduces the per-device moments (see
``zipjax._src.sharding``).
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from typing import Any, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from zipjax._src import data as data_lib
from zipjax._src import sharding as sharding_lib
from zipjax._src import spec as spec_lib
from zipjax._src.errors import DataError, SpecError


class FeatureStats(NamedTuple):
  """Running statistics of one space's concatenated features (N * width channels).

  Attributes:
    count: number of samples seen.
    mean: (N * width,) mean.
    m2: (N * width, N * width) sum of outer products of centred samples.
    heads: for the query/key space of an attention layer, computed with
      ``pair_heads="attention"``: the statistics of the N models' G heads' attention maps,
      softmax(q . k / sqrt(head width)) over the keys (N * G channels, model by model; every
      (query, key) pair of every example a sample), on which :func:`zipjax.compute_merges`
      pairs the layer's heads. None otherwise.
  """

  count: jax.Array
  mean: jax.Array
  m2: jax.Array
  heads: FeatureStats | None = None

  @property
  def covariance(self) -> jax.Array:
    return self.m2 / jnp.maximum(self.count - 1, 1).astype(self.m2.dtype)


def init_stats(dim: int) -> FeatureStats:
  """Empty statistics of ``dim`` channels (made on the host: no program is compiled)."""
  return FeatureStats(*jax.device_put((np.zeros((), np.int32), np.zeros((dim,), np.float32),
                                       np.zeros((dim, dim), np.float32))))


def _merge(stats: FeatureStats, b: int, b_mean: jax.Array, b_m2: jax.Array) -> FeatureStats:
  """Merges a batch of ``b`` samples, given its mean and centred second moment, into ``stats``
  (Chan et al.'s parallel update)."""
  n = stats.count + b
  frac = jnp.float32(b) / n.astype(jnp.float32)
  delta = b_mean - stats.mean
  mean = stats.mean + delta * frac
  m2 = stats.m2 + b_m2 + jnp.outer(delta, delta) * (stats.count.astype(jnp.float32) * frac)
  return FeatureStats(n, mean, m2)


def update_stats(stats: FeatureStats, samples: jax.Array) -> FeatureStats:
  """Merges a (num_samples, dim) batch into ``stats`` (Chan et al.'s parallel update)."""
  samples = samples.astype(jnp.float32)
  b_mean = samples.mean(0)
  centred = samples - b_mean[None, :]
  b_m2 = jnp.matmul(centred.T, centred, precision=jax.lax.Precision.HIGHEST)
  return _merge(stats, samples.shape[0], b_mean, b_m2)


@jax.jit
def correlation(stats: FeatureStats) -> jax.Array:
  """The correlation matrix of ``stats``.

  Exactly cov / (std std^T), without an epsilon, so identical features correlate exactly 1.
  A dead feature (zero variance: constant on the data) correlates 1 with the features it is
  identical to on the data (dead ones with the same value) and 0 with every other. The result
  never holds NaN.

  Jitted: one fused program per width.
  """
  cov = stats.covariance
  var = jnp.diagonal(cov)
  live = var > 0
  std = jnp.sqrt(jnp.where(live, var, 1.0))
  corr = jnp.clip(cov / std[:, None] / std[None, :], -1.0, 1.0)
  mean = stats.mean
  same_value = jnp.abs(mean[:, None] - mean[None, :]) <= 1e-6 * jnp.maximum(
      1.0, jnp.maximum(jnp.abs(mean)[:, None], jnp.abs(mean)[None, :]))
  dead_pair = jnp.where(same_value & ~live[:, None] & ~live[None, :], 1.0, 0.0)
  corr = jnp.where(live[:, None] & live[None, :], corr, dead_pair)
  return jnp.fill_diagonal(corr, 1.0, inplace=False)


_BLOCKS_MAX_WIDTH = 32


def _update_space(stats: FeatureStats, spec: spec_lib.Spec, name: str,
                  captures: Sequence[Sequence[jax.Array]]) -> FeatureStats:
  """Merges one batch's captures of a space (per capture point, one (batch, ..., width)
  array per model) into its statistics.

  Per capture point, the second moment of the models' centred (samples, width) features,
  contracting the samples (so with a batch sharded over devices every product is a
  per-device product plus one all-reduce):
  - spaces up to ``_BLOCKS_MAX_WIDTH`` wide: block by block, for models i <= j the product
    of model i's and model j's features, the blocks below the diagonal being transposes
    (N(N+1)/2 of the N^2 blocks' FLOPs: 3/4 for two models);
  - wider spaces: one product of the features concatenated model by model (the centring
    fuses into that copy).

  The measurements that set the threshold are in docs/design.md, Statistics.

  Raises:
    SpecError: a capture's last axis is not the space's width.
  """
  width = spec.width(name)
  parts = []  # per capture point, per model: (samples, width)
  for point in captures:
    for c in point:
      if c.shape[-1] != width:
        raise SpecError(f"Features of space {name!r} have {c.shape[-1]} channels (shape "
                        f"{c.shape}), but the space has width {width}.")
    parts.append([c.astype(jnp.float32).reshape(-1, width) for c in point])
  num = len(parts[0])
  b = sum(p[0].shape[0] for p in parts)
  b_mean = [sum(p[m].sum(0) for p in parts) / b for m in range(num)]
  if width > _BLOCKS_MAX_WIDTH:
    b_m2 = 0.0
    for p in parts:
      c = jnp.concatenate([p[m] - b_mean[m][None, :] for m in range(num)], -1)
      b_m2 = b_m2 + jax.lax.dot_general(c, c, (((0,), (0,)), ((), ())),
                                        precision=jax.lax.Precision.HIGHEST)
    return _merge(stats, b, jnp.concatenate(b_mean), b_m2)
  blocks: dict[tuple[int, int], jax.Array] = {}
  for p in parts:
    centred = [p[m] - b_mean[m][None, :] for m in range(num)]
    for i in range(num):
      for j in range(i, num):
        prod = jax.lax.dot_general(centred[i], centred[j], (((0,), (0,)), ((), ())),
                                   precision=jax.lax.Precision.HIGHEST)
        blocks[i, j] = blocks[i, j] + prod if (i, j) in blocks else prod
  b_m2 = jnp.concatenate([
      jnp.concatenate([blocks[i, j] if i <= j else blocks[j, i].T for j in range(num)], 1)
      for i in range(num)], 0)
  return _merge(stats, b, jnp.concatenate(b_mean), b_m2)


def _update_head_maps(stats: FeatureStats, spec: spec_lib.Spec, name: str,
                      point_q: Sequence[jax.Array], point_k: Sequence[jax.Array]) -> FeatureStats:
  """Merges the attention weights of the G heads of N models (N * G channels, model by
  model) into ``stats``, from the query/key space ``name``'s two captures (per model,
  (batch, ..., width) queries and keys): scaled dot-product attention, softmax(q . k /
  sqrt(head width)) over the keys, every (query, key) pair of an example a sample. The maps
  stay (batch, head, query, key), the softmax along their minor axis, and the moments
  contract every axis but the heads'."""
  groups = spec.space(name).groups
  maps = []
  for q, k in zip(point_q, point_k):
    q = q.astype(jnp.float32).reshape(q.shape[0], -1, groups, q.shape[-1] // groups)
    k = k.astype(jnp.float32).reshape(k.shape[0], -1, groups, k.shape[-1] // groups)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=jax.lax.Precision.HIGHEST)
    maps.append(jax.nn.softmax(logits / np.sqrt(q.shape[-1]).astype(np.float32), axis=-1))
  maps = jnp.concatenate(maps, 1)
  b = maps.shape[0] * maps.shape[2] * maps.shape[3]
  b_mean = maps.mean((0, 2, 3))
  centred = maps - b_mean[None, :, None, None]
  b_m2 = jnp.einsum("bhqk,bgqk->hg", centred, centred, precision=jax.lax.Precision.HIGHEST)
  return _merge(stats, b, b_mean, b_m2)


def _features(spec: spec_lib.Spec, models: Sequence[Any], x: Any) -> dict:
  """{space: [per capture point: [one (batch, ..., width) capture per model]]} of N models,
  one pass per model.

  Not vmapped over stacked models: vmap makes a grouped convolution of a conv over stacked
  kernels, which XLA's SPMD partitioner does not split along a sharded batch (it gathers the
  whole batch onto every device; openxla/xla#47945). The FLOPs are the same either way; the
  CPU measurement is in docs/design.md, Statistics.
  """
  per_model = [spec.features(v, x) for v in models]
  return {n: [list(c) for c in zip(*(f[n] for f in per_model))] for n in per_model[0]}


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=3)
def _stats_step(spec, names, out_sharding, stats, models, x):
  feats = _features(spec, models, x)
  missing = [n for n in names if n not in feats]
  if missing:
    raise SpecError(f"The model captured no features for spaces {missing} (captured: "
                    f"{sorted(feats)}). Call zipjax.spec.capture(self, name, x) after the "
                    "activation of each space.")
  new = {}
  for n in names:
    new[n] = _update_space(stats[n], spec, n, feats[n])
    if stats[n].heads is not None:
      new[n] = new[n]._replace(heads=_update_head_maps(stats[n].heads, spec, n, *feats[n]))
  if out_sharding is not None:
    new = jax.lax.with_sharding_constraint(new, out_sharding)
  return new


@jax.jit
def _finite(stats: dict[str, FeatureStats]) -> dict[str, jax.Array]:
  """{space: whether its statistics are finite}, in one program."""
  return {n: jnp.isfinite(sum(jnp.sum(a) for a in jax.tree_util.tree_leaves(s)))
          for n, s in stats.items()}


def _microbatches(x: Any, size: int | None) -> list[Any]:
  """``x`` cut along its batch axis into parts of at most ``size`` examples (whole if it
  is already placed across processes: every host then cuts its own shard alike)."""
  if size is None or sharding_lib.is_global(x):
    return [x]
  total = sharding_lib.batch_size(x)
  if total <= size:
    return [x]
  return [jax.tree_util.tree_map(lambda a, i=i: a[i:i + size], x)
          for i in range(0, total, size)]


#: With ``microbatch="auto"`` on the CPU, the most bytes of float32 features a statistics step
#: holds per device: glibc's largest mmap threshold (32 MiB on 64-bit machines). XLA takes a
#: step's working memory in one block, and glibc maps a block over its threshold afresh from the
#: kernel on every call instead of reusing it.
CPU_STEP_FEATURE_BYTES = 32 * 2**20


def _abstract(tree: Any) -> tuple:
  """A hashable signature of ``tree``: its structure and its leaves' shapes and dtypes."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef, tuple((tuple(a.shape), jnp.dtype(a.dtype).name) for a in leaves)


@functools.lru_cache(maxsize=32)
def _capture_shapes(spec: spec_lib.Spec, model: tuple, example: tuple) -> dict:
  """{space: (the shape of each of its captures, in order)} of a model (signature ``model``)
  on one example (signature ``example``), found by tracing, not running, the model."""
  shapes = [jax.tree_util.tree_unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaves])
            for treedef, leaves in (model, example)]
  feats = jax.eval_shape(spec.features, *shapes)
  return {n: tuple(tuple(c.shape) for c in caps) for n, caps in feats.items()}


def _example(x: Any) -> Any:
  """The abstract signature of one example of batch ``x``."""
  return _abstract(jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct((1,) + tuple(a.shape[1:]), a.dtype), x))


def head_map_spaces(spec: spec_lib.Spec, shapes: dict, names: Sequence[str]) -> tuple:
  """The spaces among ``names`` whose heads' attention maps the statistics gather: per
  attention layer (``Space.heads``), its one space captured exactly twice (its queries, then
  its keys: (batch, ..., width) each, as many examples in both).

  Warns for a layer with a space among ``names`` but no such space (its heads are then
  paired on their features)."""
  layers: dict[str, list[str]] = {}
  for n in names:
    if spec.space(n).heads is not None:
      layers.setdefault(spec.space(n).heads, []).append(n)
  out, why = [], []
  for layer, spaces in layers.items():
    found = [n for n in spaces if len(shapes.get(n, ())) == 2
             and all(len(c) >= 2 for c in shapes[n])]
    if len(found) == 1:
      out.append(found[0])
    elif not found:
      why.append(f"attention layer {layer!r}: none of its spaces {spaces} is captured "
                 "exactly twice")
    else:
      why.append(f"attention layer {layer!r}: its spaces {found} are each captured twice, "
                 "so which holds the queries and keys is ambiguous")
  if why:
    warnings.warn(
        "The heads of these attention layers are paired on the similarity of their features "
        "instead of their attention maps: " + "; ".join(why) + ". Capture each layer's "
        "queries and then its keys in its query/key space only (zipjax.spec.capture(self, "
        "space, q), then k), or pass pair_heads='features' to pair every layer's heads on "
        "their features.", UserWarning, stacklevel=3)
  return tuple(out)


def _feature_bytes(spec: spec_lib.Spec, model: tuple, example: tuple, num_models: int,
                   map_spaces: Sequence[str] = ()) -> int:
  """Bytes of the float32 features that ``num_models`` models (signature ``model``) capture
  from one example (signature ``example``), with the attention maps of ``map_spaces``."""
  shapes = _capture_shapes(spec, model, example)
  per_model = sum(math.prod(c) for caps in shapes.values() for c in caps)
  for n in map_spaces:
    q, k = shapes[n]
    per_model += math.prod(q[:-1]) * math.prod(k[1:-1]) * spec.space(n).groups
  return 4 * num_models * per_model


def auto_microbatch(spec: spec_lib.Spec, models: Sequence[Any], x: Any,
                    mesh: Mesh | None, map_spaces: Sequence[str] = ()) -> int | None:
  """The part size ``microbatch="auto"`` takes for batches like ``x``: None (whole batches)
  off the CPU; on the CPU, the number of shards of ``mesh`` (1 without one) times the largest
  power of two of examples whose features (and the attention maps of ``map_spaces``)
  take at most ``CPU_STEP_FEATURE_BYTES`` (at least one example a shard)."""
  device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
  if device.platform != "cpu":
    return None
  per_example = _feature_bytes(spec, _abstract(models[0]), _example(x), len(models),
                               map_spaces)
  fit = max(1, CPU_STEP_FEATURE_BYTES // max(per_example, 1))
  shards = 1 if mesh is None else sharding_lib.num_shards(mesh)
  return shards * (1 << (fit.bit_length() - 1))


#: The values of ``pair_heads``: what the heads of attention layers are paired on.
PAIR_HEADS = ("attention", "features")


def check_pair_heads(pair_heads: str) -> None:
  """Raises ValueError unless ``pair_heads`` is one of ``PAIR_HEADS``."""
  if pair_heads not in PAIR_HEADS:
    raise ValueError(f"pair_heads must be one of {PAIR_HEADS}, got {pair_heads!r}.")


def compute_stats(variables_list: Sequence[Any], spec: spec_lib.Spec, data: Iterable[Any], *,
                  spaces: Sequence[str] | None = None, progress: bool = False,
                  mesh: Mesh | None = None, microbatch: int | str | None = "auto",
                  pair_heads: str = "attention") -> dict[str, FeatureStats]:
  """Feature statistics of every space (or of ``spaces``) of N models over ``data``.

  Data-parallel: every batch is sharded along its batch axis over the mesh's "data" axis (all
  its axes if it has none of that name), the variables replicated, and XLA all-reduces the
  per-device sums. A batch whose size is not a multiple of the number of devices is split
  into a sharded part and a replicated remainder (exact: the statistics do not depend on the
  batching). On several hosts, pass a mesh over every process's devices and batches made with
  ``jax.make_array_from_process_local_data``, each host feeding its shard of the data.

  Args:
    variables_list: the N models' variables.
    spec: the models' zip spec.
    data: a re-iterable collection of calibration batches.
    spaces: the spaces to compute (default: all of the spec's).
    progress: show a tqdm progress bar.
    mesh: the devices to run on (default: all local devices; one device takes the plain
      single-device path).
    microbatch: cut every batch into parts of at most this many examples, one step each;
      None takes whole batches. The statistics do not depend on how the samples are batched
      (up to float rounding); the memory a step takes does. "auto" (the default): whole
      batches on accelerators; on the CPU, parts whose float32 features take at most
      ``CPU_STEP_FEATURE_BYTES`` (32 MiB) a device (a power of two of examples, see
      :func:`auto_microbatch`; the measurements behind the rule are in docs/design.md,
      Statistics). Batches already placed across processes are taken whole.
    pair_heads: what the heads of attention layers are paired on (see
      :func:`zipjax.compute_merges`). "attention" (the default): the statistics of each
      layer's query/key space also gather its heads' attention maps (``FeatureStats.heads``;
      a layer whose queries and keys are not its query/key space's two captures is reported
      with a warning and paired on its features). "features": only the spaces' features.

  Returns:
    {space: FeatureStats} over the N * width concatenated channels, as arrays on one device.

  Raises:
    DataError: the data is empty or one-shot, or a space's features are not finite.
    SpecError: ``spaces`` names a space the spec does not have, or the model captures no
      features for one.
    ValueError: ``microbatch`` is not a positive int, "auto" or None, or ``pair_heads`` is
      not one of ``PAIR_HEADS``.
    TypeError: a spec is passed where the models go, or the reverse.
  """
  spec_lib.check_order(variables_list, spec, "compute_stats(variables_list, spec, data)")
  names = tuple(spaces if spaces is not None else spec.matched_spaces)
  for n in names:
    spec.width(n)
  auto = isinstance(microbatch, str) and microbatch == "auto"
  if not auto and microbatch is not None and (
      isinstance(microbatch, bool) or not isinstance(microbatch, numbers.Integral)
      or microbatch < 1):
    raise ValueError(f"microbatch must be a positive int, 'auto' or None (whole batches), "
                     f"got {microbatch!r}.")
  check_pair_heads(pair_heads)
  num = len(variables_list)
  mesh = sharding_lib.resolve_mesh(mesh)
  models = tuple(spec_lib._model_vars(v) for v in variables_list)
  out_sharding: NamedSharding | None = None
  if mesh is not None:
    out_sharding = sharding_lib.replicated(mesh)
  batches = data_lib.iterate(data, what="feature statistics")
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    batches = tqdm.tqdm(batches, desc="feature statistics", leave=False)
  stats = None
  for x in batches:
    if stats is None:  # set up on the first batch
      map_spaces = ()
      if pair_heads == "attention" and any(spec.space(n).heads is not None for n in names):
        shapes = _capture_shapes(spec, _abstract(models[0]), _example(x))
        map_spaces = head_map_spaces(spec, shapes, names)
      stats = {n: init_stats(num * spec.width(n)) for n in names}
      for n in map_spaces:
        stats[n] = stats[n]._replace(heads=init_stats(num * spec.space(n).groups))
      if mesh is not None:
        models, stats = sharding_lib.replicate((models, stats), mesh)
      if auto:
        microbatch = auto_microbatch(spec, models, x, mesh, map_spaces)
    for chunk in _microbatches(x, microbatch):
      for part in ([chunk] if mesh is None else sharding_lib.split_batch(chunk, mesh)):
        stats = _stats_step(spec, names, out_sharding, stats, models, part)
  if mesh is not None:
    stats = sharding_lib.to_local(stats)
  bad = [n for n, ok in jax.device_get(_finite(stats)).items() if not ok]
  if bad:
    raise DataError(f"Features of spaces {bad} are not finite (NaN or inf) on the calibration "
                    "data; check the inputs and the models' parameters.")
  return stats
