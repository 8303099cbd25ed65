"""Merging source models with every method, evaluating them, and the paper's tables and plots.

``evaluate_methods`` turns N trained source models into one row per method (per-task and
joint accuracy, FLOPs per image, merge time); ``summarise`` averages rows over model pairs
into the layout of the paper's Table 1 (mean ± std); ``write_table`` and ``plot_partial``
write what a person reads.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np

import zipjax
from zipjax import match


@dataclasses.dataclass(frozen=True)
class Method:
  """A way to get a model from the sources.

  kind: 'source' (source model ``index`` alone), 'merge' (zip with ``matcher``, ``stop_at``
  and ``mode``; ``capture="last"`` takes each space's features where it is last captured,
  :func:`zipjax.spec.last_captures`; ``attention`` see :data:`ATTENTION`; ``merges``, if
  given, ``merges(stats, spec, sources, calibration) -> {space: Merge}`` replaces
  :func:`zipjax.compute_merges` in a full zip's steps; ``pair_heads`` is ``zipjax.zip``'s)
  or 'ensemble'.
  """

  name: str
  kind: str
  matcher: Callable | None = None
  stop_at: str | None = None
  index: int = 0
  mode: str = "zipjax"
  capture: str = "every"
  attention: str = "heads"
  merges: Callable | None = None
  pair_heads: str = "attention"


#: How a merge treats a spec's attention heads (``Space.heads``): "heads" pairs them across
#: models and merges within pairs (the spec as it is); "in_place" merges head g of every
#: model with head g of the others (no pairing); "unmerged" leaves their spaces unmerged, so
#: the attention weights are only averaged.
ATTENTION = ("heads", "in_place", "unmerged")

_ATTENTION_SPECS: dict = {}


def attention_spec(spec: zipjax.Spec, attention: str) -> zipjax.Spec:
  """``spec`` with its attention heads treated as ``attention`` says (see :data:`ATTENTION`);
  the same object for the same arguments, so its compiled passes are reused."""
  if attention not in ATTENTION:
    raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}.")
  heads = {s.name for s in spec.spaces if s.heads is not None}
  if attention == "heads" or not heads:
    return spec
  key = (id(spec), attention)
  if key not in _ATTENTION_SPECS:
    if attention == "in_place":
      new = dataclasses.replace(spec, spaces=tuple(
          dataclasses.replace(s, heads=None) for s in spec.spaces))
    else:
      why = "attention left unmerged (its weights averaged), to compare"
      leaves = {p: {a: ax for a, ax in axes.items() if ax.space not in heads}
                for p, axes in spec.leaves.items()}
      unmerged = dict(spec.unmerged)
      for p, axes in spec.leaves.items():
        dropped = {a: why for a, ax in axes.items() if ax.space in heads}
        if dropped:
          unmerged[p] = {**unmerged.get(p, {}), **dropped}
      new = dataclasses.replace(
          spec, spaces=tuple(s for s in spec.spaces if s.name not in heads), leaves=leaves,
          unmerged=unmerged)
    _ATTENTION_SPECS[key] = (spec, new)  # the spec kept alive: ids stay unique
  return _ATTENTION_SPECS[key][1]


_MERGE_ROWS = {
    "weight_avg": ("W.Avg", match.identity),
    "git_rebasin": ("Git Re-Basin", match.weight_matching),
    "permute": ("Permute", match.permute),
}


def table_methods(num_models: int, *,
                  methods: Sequence[str] = ("ensemble", "weight_avg", "git_rebasin",
                                            "permute", "zipit"),
                  stop_points: Sequence[str | None] = (None,), alpha: float = 0.5,
                  beta: float = 0.5) -> list[Method]:
  """The rows of the paper's Table 1, in its order: each source model, then of ``methods``
  W.Avg, Git Re-Basin (2 models only), Permute, ZipIt! at each of ``stop_points`` (None: the
  full zip), ZipIt! with its space "stream" matched by Permute ("zipit_stream_permute"),
  with attention heads in place or unmerged, ZipIt! in the reference mode at each of them,
  and the ensemble."""
  names = "ABCDEFGH"
  out = [Method(f"Model {names[m]}", "source", index=m) for m in range(num_models)]
  for key, (label, factory) in _MERGE_ROWS.items():
    if key in methods and not (key == "git_rebasin" and num_models != 2):
      out.append(Method(label, "merge", factory()))
  if "zipit" in methods:
    zipit = match.greedy(alpha=alpha, beta=beta)
    for stop in stop_points:
      name = "ZipIt! (full)" if stop is None else f"ZipIt! (partial, {stop})"
      out.append(Method(name, "merge", zipit, stop_at=stop))
  if "zipit_stream_permute" in methods:  # transformers: see experiments/results/cifar10_vit_clip
    for stop in stop_points:
      where = "full" if stop is None else f"partial, {stop}"
      out.append(Method(f"ZipIt! stream by permute ({where})", "merge",
                        match.by_space({"stream": match.permute()},
                                       default=match.greedy(alpha=alpha, beta=beta)),
                        stop_at=stop))
  for key, attention, label in (("zipit_heads_in_place", "in_place", "heads in place"),
                                ("zipit_attention_unmerged", "unmerged",
                                 "attention unmerged")):
    if key in methods:
      for stop in stop_points:
        where = "full" if stop is None else f"partial, {stop}"
        out.append(Method(f"ZipIt! {label} ({where})", "merge",
                          match.greedy(alpha=alpha, beta=beta), stop_at=stop,
                          attention=attention))
  if "zipit_official" in methods:
    for stop in stop_points:
      name = "ZipIt! official (full)" if stop is None else f"ZipIt! official (partial, {stop})"
      out.append(Method(name, "merge", match.official(), stop_at=stop, mode="official"))
  if "ensemble" in methods:
    out.append(Method("Ensemble", "ensemble"))
  return out


@dataclasses.dataclass(frozen=True)
class Row:
  method: str
  pair: int
  joint: float
  per_task: tuple[float, ...]
  gflops: float  # per image
  seconds: float  # to build the model (merge + BatchNorm reset; the first merge compiles);
  # NaN for the source models, which are not built

  @property
  def task_avg(self) -> float:
    return float(np.mean(self.per_task))


@functools.partial(jax.jit, static_argnums=0)
def _apply(spec, variables, x):
  return spec.apply(variables, x)


def _predict(model: Any, spec: zipjax.Spec, batches: Iterable) -> tuple[np.ndarray, np.ndarray]:
  outs, labels = [], []
  for x, y in batches:
    out = model.apply(x) if isinstance(model, zipjax.MultiHead) else _apply(spec, model, x)
    outs.append(np.asarray(out))
    labels.append(np.asarray(y))
  axis = 1 if isinstance(model, zipjax.MultiHead) else 0
  return np.concatenate(outs, axis=axis), np.concatenate(labels)


def _flops_key(model: Any) -> tuple:
  """Models with equal keys have equal FLOPs: every single model of one architecture, and
  multi-head models with the same head leaves."""
  if isinstance(model, zipjax.MultiHead):
    return ("multi", model.stacked, model.num_heads)
  return ("single",)


def _gflops_per_image(model: Any, spec: zipjax.Spec, x: np.ndarray) -> float:
  if isinstance(model, zipjax.MultiHead):
    total = zipjax.metrics.flops(lambda v, x: model.replace(variables=v).apply(x),
                                 model.variables, x)
  else:
    total = zipjax.metrics.flops(spec.apply, model, x)
  return total / x.shape[0] / 1e9


def evaluate_methods(spec: zipjax.Spec, sources: Sequence[Any], *, tasks: Sequence[Sequence[int]],
                     calibration: Sequence[Any], test: Iterable, methods: Sequence[Method],
                     class_embeddings: np.ndarray | None = None, logit_scale: float = 1.0,
                     task_columns: Sequence[Sequence[int]] | None = None,
                     pair: int = 0, progress: bool = True) -> list[Row]:
  """One Row per method for N source models.

  The sources' BatchNorm statistics are reset on the calibration data first, as for every
  merged model, so that all rows are measured alike. ``task_columns``: see
  :func:`zipjax.metrics.accuracy`.
  """
  sources = [zipjax.reset_batchnorm(v, spec, calibration) for v in sources]
  probe = next(iter(test))[0]
  gflops: dict[tuple, float] = {}  # one cost analysis per model shape, not per method
  rows = []
  it = methods
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    it = tqdm.tqdm(methods, desc=f"methods (pair {pair})", leave=False)
  for method in it:
    start = time.perf_counter()
    if method.kind == "source":
      model = sources[method.index]
      start = float("nan")
    elif method.kind == "ensemble":
      model = zipjax.ensemble(sources, spec)
    elif method.kind == "merge":
      merge_spec = attention_spec(spec, method.attention)
      if method.capture == "last":
        merge_spec = zipjax.spec.last_captures(merge_spec)
      if method.merges is not None:  # the steps of a full zip, with its own merges
        stats = zipjax.compute_stats(sources, merge_spec, calibration,
                                     pair_heads=method.pair_heads)
        model = zipjax.apply_merges(sources, merge_spec,
                                    method.merges(stats, merge_spec, sources, calibration))
        model = zipjax.reset_batchnorm(model, merge_spec, calibration)
      else:
        model = zipjax.zip_many(sources, merge_spec, data=calibration, matcher=method.matcher,
                                stop_at=method.stop_at, mode=method.mode,
                                pair_heads=method.pair_heads)
    else:
      raise ValueError(f"Unknown method kind {method.kind!r} in {method}.")
    jax.block_until_ready(model)
    seconds = time.perf_counter() - start
    acc, flops = _score(model, spec, test, tasks, class_embeddings, logit_scale, probe, gflops,
                        task_columns)
    rows.append(Row(method.name, pair, acc.joint, acc.per_task, flops, seconds))
  return rows


def _score(model, spec, test, tasks, class_embeddings, logit_scale, probe,
           gflops: dict[tuple, float], task_columns=None):
  """(accuracy, GFLOPs per image) of one model; FLOPs cached in ``gflops`` per model shape."""
  outputs, labels = _predict(model, spec, test)
  acc = zipjax.metrics.accuracy(outputs, labels, tasks, class_embeddings=class_embeddings,
                                logit_scale=logit_scale, task_columns=task_columns)
  key = _flops_key(model)
  if key not in gflops:
    gflops[key] = _gflops_per_image(model, spec, probe)
  return acc, gflops[key]


def summarise(rows: Sequence[Row]) -> list[dict[str, Any]]:
  """Mean and std over pairs, per method, in first-seen order (the paper's Table 1)."""
  order = list(dict.fromkeys(r.method for r in rows))
  out = []
  for name in order:
    rs = [r for r in rows if r.method == name]
    per_task = np.array([r.per_task for r in rs]) * 100
    entry = {"method": name, "pairs": len(rs), "gflops": float(np.mean([r.gflops for r in rs])),
             "joint": _ms([r.joint * 100 for r in rs])}
    for t in range(per_task.shape[1]):
      entry[f"task{'ABCDEFGH'[t]}"] = _ms(per_task[:, t])
    entry["avg"] = _ms(per_task.mean(1))
    entry["seconds"] = float(np.mean([r.seconds for r in rs]))
    out.append(entry)
  return out


def _ms(values) -> tuple[float, float]:
  values = np.asarray(values, float)
  return float(values.mean()), float(values.std(ddof=1) if len(values) > 1 else 0.0)


def _fmt(value) -> str:
  if isinstance(value, tuple):
    return f"{value[0]:.1f} ± {value[1]:.1f}"
  if isinstance(value, float):
    return "—" if np.isnan(value) else f"{value:.3g}"
  return str(value)


def format_flops(gflops: float) -> str:
  """FLOPs with a unit: '2.72 G', '79.8 M', '3.74 k'."""
  for scale, unit in ((1.0, "G"), (1e-3, "M"), (1e-6, "k")):
    if gflops >= scale:
      return f"{gflops / scale:.3g} {unit}"
  return f"{gflops * 1e9:.3g}"


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
  keys = [k for k in summary[0] if k != "pairs"]
  header = {"method": "Method", "gflops": "FLOPs/img", "joint": "Joint", "avg": "Avg",
            "seconds": "Build s"}
  names = [header.get(k, k.replace("task", "Task ")) for k in keys]
  lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(keys)]
  for entry in summary:
    lines.append("| " + " | ".join(format_flops(entry[k]) if k == "gflops" else _fmt(entry[k])
                                   for k in keys) + " |")
  return "\n".join(lines)


def write_rows(rows: Sequence[Row], path: str) -> None:
  """Writes every row as CSV (:func:`read_rows` reads it back)."""
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    tasks = len(rows[0].per_task)
    w.writerow(["method", "pair", "joint", *[f"task{t}" for t in range(tasks)], "avg",
                "gflops", "seconds"])
    for r in rows:
      w.writerow([r.method, r.pair, f"{r.joint:.5f}", *[f"{a:.5f}" for a in r.per_task],
                  f"{r.task_avg:.5f}", f"{r.gflops:.6g}", f"{r.seconds:.3f}"])


def read_rows(path: str) -> list[Row]:
  """The rows :func:`write_rows` wrote (accuracies to 5 decimals)."""
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    tasks = sorted((k for k in reader.fieldnames if k.startswith("task")),
                   key=lambda k: int(k[4:]))
    return [Row(r["method"], int(r["pair"]), float(r["joint"]),
                tuple(float(r[t]) for t in tasks), float(r["gflops"]), float(r["seconds"]))
            for r in reader]


def pairs_table(rows: Sequence[Row], *, metric: str = "joint") -> str:
  """Markdown: ``metric`` ("joint" or "avg", in %) of every method, a column per pair and
  their mean, the best merged model of each pair (not a source, not the ensemble) in bold:
  whether a method wins in every pair or on average only."""
  pairs = sorted({r.pair for r in rows})
  value = {(r.method, r.pair): 100 * (r.joint if metric == "joint" else r.task_avg)
           for r in rows}
  methods = list(dict.fromkeys(r.method for r in rows))
  merged = [m for m in methods if not m.startswith("Model ") and m != "Ensemble"]
  best = {p: max(merged, key=lambda m, p=p: value.get((m, p), -1.0)) for p in pairs
          } if merged else {}
  lines = [f"| {metric} | " + " | ".join(f"pair {p}" for p in pairs) + " | mean |",
           "|---|" + "---|" * (len(pairs) + 1)]
  for m in methods:
    cells = [("—" if (m, p) not in value else
              f"**{value[(m, p)]:.1f}**" if best.get(p) == m else f"{value[(m, p)]:.1f}")
             for p in pairs]
    mean = np.mean([value[(m, p)] for p in pairs if (m, p) in value])
    lines.append(f"| {m} | " + " | ".join(cells) + f" | {mean:.1f} |")
  return "\n".join(lines)


def write_table(rows: Sequence[Row], out_dir: str, *, name: str = "results") -> str:
  """Writes every row (CSV), the mean ± std table (CSV and Markdown) and, for rows of
  several pairs, each pair's joint accuracy (``{name}_pairs.md``, :func:`pairs_table`);
  returns the mean ± std Markdown."""
  os.makedirs(out_dir, exist_ok=True)
  write_rows(rows, os.path.join(out_dir, f"{name}_rows.csv"))
  summary = summarise(rows)
  with open(os.path.join(out_dir, f"{name}.csv"), "w", newline="") as f:
    w = csv.writer(f)
    keys = list(summary[0])
    w.writerow(keys)
    for entry in summary:
      w.writerow([(f"{entry[k][0]:.2f} ± {entry[k][1]:.2f}" if isinstance(entry[k], tuple)
                   else entry[k]) for k in keys])
  md = markdown_table(summary)
  with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
    f.write(md + "\n")
  if len({r.pair for r in rows}) > 1:
    with open(os.path.join(out_dir, f"{name}_pairs.md"), "w") as f:
      f.write(pairs_table(rows) + "\n")
  return md


def plot_partial(rows: Sequence[Row], spec: zipjax.Spec, path: str, *,
                 title: str = "") -> None:
  """Accuracy against how much of the network is zipped (the paper's Fig. 7), with the
  ensemble and the sources' average for reference; FLOPs on a second axis."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  summary = {e["method"]: e for e in summarise(rows)}
  stops = [s for s in spec.stop_points if f"ZipIt! (partial, {s})" in summary]
  labels = stops + (["full"] if "ZipIt! (full)" in summary else [])
  keys = [f"ZipIt! (partial, {s})" for s in stops] + (
      ["ZipIt! (full)"] if "ZipIt! (full)" in summary else [])
  fig, ax = plt.subplots(figsize=(6, 4))
  xs = np.arange(len(keys))
  for metric, style in (("joint", "o-"), ("avg", "s--")):
    mean = np.array([summary[k][metric][0] for k in keys])
    std = np.array([summary[k][metric][1] for k in keys])
    ax.errorbar(xs, mean, yerr=std, fmt=style, capsize=3, label=f"ZipIt! {metric}")
  if "Ensemble" in summary:
    ax.axhline(summary["Ensemble"]["joint"][0], color="tab:blue", ls=":", alpha=0.7,
               label="Ensemble joint")
    ax.axhline(summary["Ensemble"]["avg"][0], color="tab:orange", ls=":", alpha=0.7,
               label="Ensemble avg")
  ax.set_xticks(xs, [f"up to {l}" if l != "full" else "full zip" for l in labels],
                rotation=20)
  ax.set_ylabel("accuracy (%)")
  ax.set_xlabel("zipped up to")
  ax2 = ax.twinx()
  ax2.plot(xs, [summary[k]["gflops"] for k in keys], color="gray", ls="--", marker="x",
           alpha=0.6, label="GFLOPs / image")
  ax2.set_ylabel("GFLOPs / image", color="gray")
  handles = ax.get_legend_handles_labels()
  handles2 = ax2.get_legend_handles_labels()
  ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], fontsize=8, loc="lower left")
  ax.set_title(title or "Partial zipping")
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


@dataclasses.dataclass(frozen=True)
class Variant:
  """One merged model of a sweep: ``matcher`` (per-space or whole-model) zipped up to
  ``stop_at`` (None: the full zip), labelled ``method`` at sweep value ``value``."""

  value: Any
  method: str
  matcher: Callable
  stop_at: str | None = None


def evaluate_matchers(spec: zipjax.Spec, sources: Sequence[Any], *,
                      tasks: Sequence[Sequence[int]], calibration: Sequence[Any], test: Iterable,
                      variants: Sequence[Variant], class_embeddings: np.ndarray | None = None,
                      logit_scale: float = 1.0, pair: int = 0,
                      progress: bool = True) -> list[tuple[Variant, Row]]:
  """Merges N source models once per variant, sharing one pass of feature statistics.

  What :func:`evaluate_methods` does for 'merge' methods (sources' BatchNorm reset on the
  calibration data, zip, BatchNorm reset of the result, evaluation), but the statistics of
  every space any variant needs are computed once, and each Row's ``seconds`` is the time of
  the matcher calls alone, over every space the variant merges (a whole-model matcher: its one
  call). Per-space matchers see the same correlations ``zipjax.zip_many`` gives them, so a
  variant's accuracy equals :func:`evaluate_methods`' for the same matcher and stop point.
  """
  grouped = [s.name for s in spec.spaces if s.groups > 1]
  if grouped:
    raise ValueError(f"evaluate_matchers matches every space whole, but spaces {grouped[:4]} "
                     "are matched in groups (GroupNorm groups or attention heads); evaluate "
                     "such models with evaluate_methods, whose zips match them in groups.")
  sources = [zipjax.reset_batchnorm(v, spec, calibration) for v in sources]
  num = len(sources)

  def spaces_of(stop):
    return spec.space_names if stop is None else spec.trunk_spaces(stop)

  needed = [s for s in spec.space_names
            if any(s in spaces_of(v.stop_at) for v in variants
                   if not isinstance(v.matcher, zipjax.match.WholeModelMatcher))]
  corr = {}
  if needed:
    stats = zipjax.compute_stats(sources, spec, calibration, spaces=needed)
    corr = {name: np.asarray(zipjax.correlation(s)) for name, s in stats.items()}
  probe = next(iter(test))[0]
  gflops: dict[tuple, float] = {}
  out = []
  it = variants
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    it = tqdm.tqdm(variants, desc=f"variants (pair {pair})", leave=False)
  for v in it:
    spaces = spaces_of(v.stop_at)
    start = time.perf_counter()
    if isinstance(v.matcher, zipjax.match.WholeModelMatcher):
      merges = v.matcher(spec, sources, spaces=spaces)
    else:
      merges = {s: v.matcher(corr[s], num_models=num) for s in spaces}
    seconds = time.perf_counter() - start
    model = zipjax.apply_merges(sources, spec, merges, stop_at=v.stop_at)
    model = zipjax.reset_batchnorm(model, spec, calibration)
    acc, flops = _score(model, spec, test, tasks, class_embeddings, logit_scale, probe, gflops)
    out.append((v, Row(v.method, pair, acc.joint, acc.per_task, flops, seconds)))
  return out
