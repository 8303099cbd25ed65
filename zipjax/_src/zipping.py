"""The top-level ``zip`` / ``zip_many``: statistics, matching, applying merges, BatchNorm reset."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from jax.sharding import Mesh

from zipjax._src import apply as apply_lib
from zipjax._src import batchnorm as bn_lib
from zipjax._src import data as data_lib
from zipjax._src import explain as explain_lib
from zipjax._src import match as match_lib
from zipjax._src import nnx as nnx_lib
from zipjax._src import official as official_lib
from zipjax._src import spec as spec_lib
from zipjax._src import stats as stats_lib
from zipjax._src.multihead import MultiHead

#: The values of ``zip(..., mode=)``.
MODES = ("zipjax", "official")


def compute_merges(stats: Mapping[str, stats_lib.FeatureStats], *, num_models: int,
                   matcher: Callable | None = None, spec: spec_lib.Spec | None = None,
                   groups: Mapping[str, int] | None = None,
                   progress: bool = False) -> dict[str, match_lib.Merge]:
  """One Merge per space from its statistics (see :func:`zipjax.compute_stats`).

  Arguments:
    stats: {space: FeatureStats} of the N models.
    num_models: N.
    matcher: a per-space matcher (default ``zipjax.match.greedy()``), or one per space
      (``zipjax.match.by_space``).
    spec: the models' spec: spaces in groups (``Space.groups``) are matched group by group,
      and the spaces of one attention layer (``Space.heads``) within groups of heads paired
      across models (:func:`zipjax.match.pair_groups`) on the correlation of the heads'
      attention maps where the statistics hold them (``FeatureStats.heads``, gathered by
      ``compute_stats(..., pair_heads="attention")``, the default), else on the similarity
      of the features of all of the layer's spaces in ``stats``. Without it every space is
      matched whole.
    groups: {space: number of groups}, for a caller without a spec (ignored with one).
    progress: show a tqdm progress bar.

  Returns:
    {space: Merge} for every space in ``stats``.
  """
  matcher = matcher or match_lib.greedy()
  match_lib.check_matcher(matcher)
  if isinstance(matcher, match_lib.WholeModelMatcher):
    raise TypeError(f"compute_merges takes per-space matchers; {matcher.name} reads the "
                    "models' weights: call it as matcher(spec, variables_list, spaces=...).")
  heads: dict[str, str] = {}
  if spec is not None:
    groups = {s.name: s.groups for s in spec.spaces}
    heads = {s.name: s.heads for s in spec.spaces if s.heads is not None and s.name in stats}
  groups = groups or {}
  if isinstance(matcher, match_lib.BySpace):
    matcher.check_spaces(spec.space_names if spec is not None else list(stats))
    matcher_of = matcher.matcher_for
  else:
    matcher_of = lambda name: matcher  # noqa: E731

  def corr_of(name, s):
    m = matcher_of(name)
    if isinstance(m, match_lib.OwnCorrelation):
      return m.correlation(np.asarray(s.covariance))
    return np.asarray(stats_lib.correlation(s))

  corrs = {name: corr_of(name, s) for name, s in stats.items()}
  pairings = {}
  for layer in dict.fromkeys(heads.values()):
    names = [n for n, h in heads.items() if h == layer]
    maps = next((stats[n].heads for n in names if stats[n].heads is not None), None)
    pair_with = matcher_of(names[0])
    if maps is not None:
      pairings[layer] = match_lib.pair_groups(pair_with, num_models=num_models,
                                              groups=groups[names[0]],
                                              similarity=corr_of(names[0], maps))
    else:
      pairings[layer] = match_lib.pair_groups(pair_with, [corrs[n] for n in names],
                                              num_models=num_models, groups=groups[names[0]])
  items = corrs.items()
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    items = tqdm.tqdm(items, desc="matching", leave=False)
  return {name: match_lib.match_in_groups(
              matcher_of(name), corr, num_models=num_models, groups=groups.get(name, 1),
              pairing=pairings.get(heads.get(name)))
          for name, corr in items}


def zip_many(models: Sequence[Any], spec: spec_lib.Spec | None = None, *, data: Iterable[Any],
             matcher: Callable | None = None, stop_at: str | None = None,
             reset_bn: bool = True, progress: bool = False, mesh: Mesh | None = None,
             microbatch: int | str | None = "auto", mode: str = "zipjax",
             pair_heads: str = "attention") -> Any:
  """Merges N >= 2 models of one architecture into one, without training.

  The arguments are those of :func:`zipjax.zip`, with ``models`` a sequence of N variables
  trees (or N NNX modules). Returns what :func:`zipjax.zip` returns: merged variables with
  the inputs' structure (an NNX module for NNX modules), or a MultiHead for a partial zip.
  """
  spec_lib.check_order(models, spec, "zip(model_a, model_b, spec, data=...) / zip_many("
                       "models, spec, data=...)", spec_optional=True)
  if isinstance(models, Mapping):
    raise TypeError(f"zip_many takes a sequence of models, got a dict with keys "
                    f"{sorted(models)[:6]}; pass list(models.values()).")
  models = list(models)
  if len(models) < 2:
    raise ValueError(f"Zipping needs at least 2 models, got {len(models)}.")
  data_lib.check_form(data)
  stats_lib.check_pair_heads(pair_heads)  # before any pass over the data
  if matcher is not None:
    match_lib.check_matcher(matcher)
  official = _check_mode(mode, matcher)
  graphdef = rest = None
  if any(nnx_lib.is_module(m) for m in models):
    graphdef, models, rest = nnx_lib.split_models(models)
    if spec is None:
      spec = nnx_lib.inferred_spec(graphdef, models[0], rest,
                                   data_lib.first_input(data, what="inferring a spec"))
  elif spec is None:
    raise TypeError("zip needs the models' spec: zipjax.models.* return one with the module, "
                    "zipjax.infer_spec(module_or_apply_fn, variables, x) infers one, "
                    "zipjax.spec.linen_spec declares one. (NNX modules need none.)")
  spec_lib.check_models(spec, models)
  statistics = "flax"
  if official:
    spec = spec_lib.last_captures(spec)
    matcher = matcher or official_lib.official()
    statistics = "pytorch"
    if reset_bn:  # the official scripts reset the source models on the same data first
      models = [bn_lib.reset_batchnorm(m, spec, data, statistics=statistics, mesh=mesh)
                for m in models]
  explain_lib.check_merges_something(spec)
  explain_lib.warn_unmerged(explain_lib.explain(models[0], spec, stop_at=stop_at))
  data_lib.check_fits(data, spec.apply, models[0], example=spec.example)
  spaces = spec.trunk_spaces(stop_at) if stop_at is not None else spec.space_names
  spaces = tuple(s for s in spaces if not spec.space(s).parts)  # the others are composed
  matcher = matcher or match_lib.greedy()
  if isinstance(matcher, match_lib.WholeModelMatcher):
    merges = matcher(spec, models, spaces=spaces)
  else:
    stats = stats_lib.compute_stats(models, spec, data, spaces=spaces, progress=progress,
                                    mesh=mesh, microbatch=microbatch, pair_heads=pair_heads)
    merges = compute_merges(stats, num_models=len(models), matcher=matcher, spec=spec,
                            progress=progress)
  merged = apply_lib.apply_merges(models, spec, merges, stop_at=stop_at,
                                  batchnorm="leaves" if official else "affine")
  if reset_bn:
    merged = bn_lib.reset_batchnorm(merged, spec, data, statistics=statistics,
                                    progress=progress, mesh=mesh)
  if graphdef is not None and not isinstance(merged, MultiHead):
    return nnx_lib.merge(graphdef, merged, rest)
  return merged


def _check_mode(mode: str, matcher: Callable | None) -> bool:
  """Whether ``mode`` is the official one; a clear error for an unknown mode or a matcher
  the official mode cannot use."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  if mode == "official" and matcher is not None and not isinstance(
      matcher, official_lib.OfficialMatcher):
    raise ValueError(
        f"mode='official' reproduces the official ZipIt! merges, which match with "
        f"zipjax.match.official(); got matcher {getattr(matcher, '__name__', matcher)!r}. "
        "Pass matcher=zipjax.match.official(alpha=..., beta=...) to change its alpha and "
        "beta, or use mode='zipjax' for other matchers.")
  return mode == "official"


def zip(model_a: Any, model_b: Any, spec: spec_lib.Spec | None = None, *,  # pylint: disable=redefined-builtin
        data: Iterable[Any], matcher: Callable | None = None, stop_at: str | None = None,
        reset_bn: bool = True, progress: bool = False, mesh: Mesh | None = None,
        microbatch: int | str | None = "auto", mode: str = "zipjax",
        pair_heads: str = "attention") -> Any:
  """Merges two models trained separately into one model (ZipIt!), without training.

  Feature statistics of every space are computed over ``data``; the matcher pairs each
  model's features with correlated features of either model; every layer is zipped with
  those merges; the merged model's BatchNorm statistics are recomputed over ``data``.

  Arguments:
    model_a, model_b: the two models: variables trees of one architecture (any pytree of
      arrays: linen ``{'params': ..., 'batch_stats': ...}``, lists of tuples, dataclasses,
      ...), or two ``flax.nnx`` modules.
    spec: the models' zip spec: from ``zipjax.models``, :func:`zipjax.infer_spec` or
      declared with ``zipjax.spec``. Optional for NNX modules (inferred from their forward
      pass on the first calibration batch, and reused by later zips of modules of the same
      structure, shapes and input shapes, so they compile nothing again).
    data: the calibration data: a re-iterable collection of batches (a list; each batch an
      input array with a leading batch axis, an (inputs, labels) tuple, or a dict with an
      'image', 'x' or 'inputs' entry). zip passes over it twice.
    matcher: a per-space matcher such as ``zipjax.match.greedy()`` (the default, alpha =
      beta = 0.5) or ``zipjax.match.permute()``, one per space
      (``zipjax.match.by_space({"stream": zipjax.match.permute()})``), or a whole-model
      matcher such as ``zipjax.match.weight_matching()``.
    stop_at: a partial zip: merge the spaces up to this stop point (``spec.stop_points``)
      and keep the rest of each model as its own head.
    reset_bn: recompute the merged model's BatchNorm statistics over ``data``.
    progress: show tqdm progress bars.
    mesh: the devices the passes over ``data`` run on, data-parallel (default: all local
      devices); see :func:`zipjax.compute_stats`.
    microbatch: the statistics pass takes batches in parts of at most this many examples
      (None: whole batches; "auto": whole on accelerators, parts of at most 32 MiB of
      features on the CPU).
    mode: ``"zipjax"`` (the default) or ``"official"``: the reference mode, which reproduces
      the merges of the official ZipIt! code (gstoica27/ZipIt) on the same weights and data:
      every space's features are taken where it is last captured (a residual stream where
      its stage ends, not after every block: :func:`zipjax.spec.last_captures`), matched by
      ``zipjax.match.official()`` (its budget rule and epsilons, quirks included; the default
      matcher here, and the only kind accepted), each BatchNorm layer's scale, bias, mean and
      variance merged by themselves (``apply_merges(..., batchnorm="leaves")``), and with
      ``reset_bn`` the source models are reset on ``data`` first and every reset is PyTorch's
      (each batch weighing the same, unbiased variance). The docs' departure table says where
      and why the default differs.
    pair_heads: what the heads of each attention layer (``Space.heads``) are paired across
      models on: ``"attention"`` (the default), the correlation of the heads' attention maps
      (scaled dot-product attention's weights from the captured queries and keys, every
      (query, key) pair of the calibration data a sample); ``"features"``, the similarity of
      their query/key and value features. Either way each space is then matched
      within the paired heads. Models without attention ignore it.

  Returns:
    A full zip: merged variables with the structure, shapes and dtypes of ``model_a`` (an NNX
    module for NNX modules), runnable like either source model. A partial zip: a
    :class:`zipjax.MultiHead` whose ``apply(x)`` gives one output per source model.

  Raises:
    SpecError: the spec does not describe the models, or merges no space at all (that would
      be plain weight averaging). MismatchError: the models differ in structure, shapes or
      dtypes, or hold NaN or infinity. DataError: calibration data of the wrong form (one
      array, one (x, y) batch, a one-shot iterator, empty) or shape. TypeError: arguments in
      the wrong order, or a matcher factory passed uncalled.

  Warns:
    UnmergedWarning: some weights are only averaged because axes that carry features stay
      unmerged (``print(zipjax.explain(variables, spec))`` shows which and why).

  Example::

    model, spec = zipjax.models.resnet20(width=4)
    merged = zipjax.zip(variables_a, variables_b, spec, data=batches)
    logits = model.apply(merged, x)
    heads = zipjax.zip(variables_a, variables_b, spec, data=batches, stop_at="stage2")
    logits_a, logits_b = heads.apply(x)
  """
  return zip_many([model_a, model_b], spec, data=data, matcher=matcher, stop_at=stop_at,
                  reset_bn=reset_bn, progress=progress, mesh=mesh, microbatch=microbatch,
                  mode=mode, pair_heads=pair_heads)
