"""Feature statistics: a streaming, jitted pass over calibration data for N models at once.

For every space, the features of the N models are concatenated channel-wise, model by model
(channel ``m * width + j`` is channel j of model m), and every position (pixel, token, capture
point) is a sample. Batches are merged into the running mean and centred second moment with
Chan's parallel update, in float32 at the highest matmul precision, so no E[xx] - E[x]^2
cancellation happens and no features are ever held beyond one batch.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from zipjax._src import data as data_lib
from zipjax._src import spec as spec_lib
from zipjax._src.errors import DataError, SpecError


class FeatureStats(NamedTuple):
  """Running statistics of one space's concatenated features (N * width channels).

  Attributes:
    count: number of samples seen.
    mean: (N * width,) mean.
    m2: (N * width, N * width) sum of outer products of centred samples.
  """

  count: jax.Array
  mean: jax.Array
  m2: jax.Array

  @property
  def covariance(self) -> jax.Array:
    return self.m2 / jnp.maximum(self.count - 1, 1).astype(self.m2.dtype)


def init_stats(dim: int) -> FeatureStats:
  return FeatureStats(jnp.zeros((), jnp.int32), jnp.zeros((dim,), jnp.float32),
                      jnp.zeros((dim, dim), jnp.float32))


def update_stats(stats: FeatureStats, samples: jax.Array) -> FeatureStats:
  """Merges a (num_samples, dim) batch into ``stats`` (Chan et al.'s parallel update)."""
  samples = samples.astype(jnp.float32)
  b = samples.shape[0]
  b_mean = samples.mean(0)
  centred = samples - b_mean[None, :]
  b_m2 = jnp.matmul(centred.T, centred, precision=jax.lax.Precision.HIGHEST)
  n = stats.count + b
  frac = jnp.float32(b) / n.astype(jnp.float32)
  delta = b_mean - stats.mean
  mean = stats.mean + delta * frac
  m2 = stats.m2 + b_m2 + jnp.outer(delta, delta) * (stats.count.astype(jnp.float32) * frac)
  return FeatureStats(n, mean, m2)


def correlation(stats: FeatureStats) -> jax.Array:
  """The correlation matrix of ``stats``.

  Exactly cov / (std std^T), without an epsilon, so identical features correlate exactly 1.
  A dead feature (zero variance: constant on the data) correlates 1 with the features it is
  identical to on the data (dead ones with the same value) and 0 with every other. The result
  never holds NaN.
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


def stack(variables_list: Sequence[Any]) -> Any:
  """Stacks N variables trees along a new leading model axis."""
  return jax.tree_util.tree_map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]),
                                *variables_list)


def _concat_models(spec: spec_lib.Spec, name: str, captures: Sequence[jax.Array]) -> jax.Array:
  """(N, ..., width) captures -> (samples, N * width), channels model by model."""
  width = spec.width(name)
  parts = []
  for c in captures:
    if c.shape[-1] != width:
      raise SpecError(f"Features of space {name!r} have {c.shape[-1]} channels (shape "
                      f"{c.shape[1:]}), but the space has width {width}.")
    parts.append(c.reshape(c.shape[0], -1, width))
  f = jnp.concatenate(parts, axis=1)  # (N, samples, width)
  return jnp.moveaxis(f, 0, 1).reshape(f.shape[1], -1)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=2)
def _stats_step(spec, names, stats, stacked, x):
  feats = jax.vmap(spec.features, in_axes=(0, None))(stacked, x)
  missing = [n for n in names if n not in feats]
  if missing:
    raise SpecError(f"The model captured no features for spaces {missing} (captured: "
                    f"{sorted(feats)}). Call zipjax.spec.capture(self, name, x) after the "
                    "activation of each space.")
  return {n: update_stats(stats[n], _concat_models(spec, n, feats[n])) for n in names}


def compute_stats(spec: spec_lib.Spec, variables_list: Sequence[Any], data: Iterable[Any], *,
                  spaces: Sequence[str] | None = None,
                  progress: bool = False) -> dict[str, FeatureStats]:
  """Feature statistics of every space (or of ``spaces``) of N models over ``data``.

  Returns {space: FeatureStats} over the N * width concatenated channels. Raises DataError
  if the data is empty or one-shot, or if any space's features are not finite.
  """
  names = tuple(spaces if spaces is not None else spec.space_names)
  for n in names:
    spec.width(n)
  num = len(variables_list)
  stacked = stack([spec_lib._model_vars(v) for v in variables_list])
  stats = {n: init_stats(num * spec.width(n)) for n in names}
  batches = data_lib.iterate(data, what="feature statistics")
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    batches = tqdm.tqdm(batches, desc="feature statistics", leave=False)
  for x in batches:
    stats = _stats_step(spec, names, stats, stacked, x)
  bad = [n for n, s in stats.items()
         if not bool(jnp.all(jnp.isfinite(s.m2)) & jnp.all(jnp.isfinite(s.mean)))]
  if bad:
    raise DataError(f"Features of spaces {bad} are not finite (NaN or inf) on the calibration "
                    "data; check the inputs and the models' parameters.")
  return stats

