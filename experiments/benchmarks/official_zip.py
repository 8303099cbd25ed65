"""The whole zip of two ResNet-20s: zipjax's reference mode against the official PyTorch code.

The official side is the code of gstoica27/ZipIt, imported from a checkout, called as its
experiment scripts call it (evaluation_scripts/zipit_concept_merging.py): the two models'
BatchNorm statistics reset on the calibration loader (``utils.reset_bn_stats``), a graph of a
copy of each (``graphs.resnet_graph.resnet20``), ``model_merger.ModelMerge(...).transform``
with ``match_tensors_zipit`` on the covariance and mean metrics, and the merged model's
BatchNorm reset, all under ``torch.no_grad()`` on the CPU. The candidate is
``zipjax.zip(..., mode="official", matcher=zipjax.match.official(alpha, beta))``, which does
the same work, on the same weights (the official models' state dicts, converted with
``zipjax.models.from_official_resnet20``) and the same images (batches of the same sizes, in
the same order).

Each side runs in a fresh Python process: its first zip (what a user waits for; for zipjax,
compilation included) and, in the same process, the same zip again. The time is that of the
zip alone, from two models and the data in memory to the merged model, BatchNorm reset
included; imports, model construction and the weights' conversion are not timed. Rows: the
first call and the repeat, each against the official side's call of the same rank; ratio =
zipjax / official, lower is better. Each row's notes say whether the two merged models agree:
the largest difference of their logits on a held-out batch, relative to the largest official
logit (and the share of equal predictions); the source models' logits are compared the same
way (the conversion), and the merged variables group by group (the official state dict
converted): kernels (convolutions and the head: the merges), BatchNorm scale and bias, and
BatchNorm statistics. In the reference mode both merge a BatchNorm layer's weight, bias and
statistics like any vector (zipjax's default merges its affine map instead), so the merged
models agree to float rounding.

Needs torch (a CPU build is enough) and the official code's own imports (scikit-learn,
networkx, scipy, fvcore, matplotlib, einops, pyyaml, tqdm) in the Python that runs the suite,
and a checkout of github.com/gstoica27/ZipIt named by the environment variable
``ZIPIT_OFFICIAL``::

  pip install torch scikit-learn networkx fvcore matplotlib einops pyyaml
  git clone https://github.com/gstoica27/ZipIt /path/to/ZipIt
  ZIPIT_OFFICIAL=/path/to/ZipIt python -m experiments.benchmarks --only official_zip

Where either is missing, the benchmark's only row says what is missing and how to provide it
(nothing is timed). torch's intra-op threads are its default (one per core) unless
``ZIPIT_OFFICIAL_THREADS`` says how many: on a machine busy with other work, OpenMP threads
wait for each other (with a training job on both cores of a 2-core machine, a ResNet-20x1
forward pass took 11x longer on 2 threads than on 1), so the rows name the number used. The
official utils module imports OpenAI's ``clip`` package, which installs from git only and
serves CLIP heads only: where it is not installed, the worker registers an empty module under
that name before importing the official code.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
import tempfile
import time
import types

import numpy as np

from . import common

NAME = "official_zip"
TITLE = "Whole zip vs the official PyTorch code"
BASELINE = "the official ZipIt! code (PyTorch)"

#: The environment variable that names the checkout of gstoica27/ZipIt.
ENV_VAR = "ZIPIT_OFFICIAL"
#: The environment variable that sets torch's intra-op threads (default: torch's).
THREADS_VAR = "ZIPIT_OFFICIAL_THREADS"

#: What the official code imports (module name -> pip package); ``clip`` is stubbed instead.
OFFICIAL_MODULES = {
    "torch": "torch", "networkx": "networkx", "sklearn": "scikit-learn", "scipy": "scipy",
    "fvcore": "fvcore", "matplotlib": "matplotlib", "einops": "einops", "yaml": "pyyaml",
    "tqdm": "tqdm",
}

#: The files of a checkout that the official side imports.
CHECKOUT_FILES = ("model_merger.py", "matching_functions.py", "metric_calculators.py", "utils.py",
                  os.path.join("graphs", "resnet_graph.py"), os.path.join("models", "resnets.py"))

#: The largest relative difference of the merged models' logits counted as agreement.
AGREEMENT_TOLERANCE = 1e-3



@dataclasses.dataclass(frozen=True)
class Settings:
  """One case: ResNet-20 x``width`` on 32x32 images, ``num_images`` calibration images in
  batches of ``batch_size`` (the last one smaller where they do not divide), official alpha
  and beta, and ``check_images`` held-out images for comparing the merged models."""

  width: int
  num_outputs: int
  num_images: int
  batch_size: int
  timeout_s: float
  alpha: float = 0.3
  beta: float = 0.125
  check_images: int = 64
  seed: int = 0


SETTINGS = {
    "smoke": (Settings(1, 10, 32, 16, timeout_s=300, check_images=16),),
    "quick": (Settings(1, 10, 128, 64, timeout_s=300),),
    "full": (Settings(4, 10, 500, 128, timeout_s=900),),
}

IMAGE_SIZE = 32


def label(s: Settings) -> str:
  return (f"ResNet-20x{s.width:g}, {s.num_images} images {IMAGE_SIZE}x{IMAGE_SIZE} in batches "
          f"of {s.batch_size}")


# ----------------------------------------------------------------------------------------------
# What the official side needs.


def _installed(module: str) -> bool:
  return importlib.util.find_spec(module) is not None


def unavailable(checkout: str | None) -> str | None:
  """Why the official side cannot run with ``checkout`` (the value of ZIPIT_OFFICIAL) in this
  Python, in words that say what to install or set; None when it can."""
  reasons = []
  missing = [pkg for module, pkg in OFFICIAL_MODULES.items() if not _installed(module)]
  if missing:
    reasons.append(f"{', '.join(missing)} not installed in this Python ({sys.executable}): "
                   f"pip install {' '.join(missing)}"
                   + (" (torch's CPU build is enough)" if "torch" in missing else ""))
  if not checkout:
    reasons.append(f"no checkout of the official code: set {ENV_VAR}=/path/to/ZipIt, a checkout "
                   "of github.com/gstoica27/ZipIt (git clone https://github.com/gstoica27/ZipIt)")
  else:
    absent = [f for f in CHECKOUT_FILES if not os.path.isfile(os.path.join(checkout, f))]
    if absent:
      reasons.append(f"{ENV_VAR}={checkout} is not a checkout of github.com/gstoica27/ZipIt "
                     f"(no {', '.join(absent)}): point it at the repository's root")
  if not reasons:
    return None
  return "NOT RUN, the official side is missing: " + "; ".join(reasons) + "."


# ----------------------------------------------------------------------------------------------
# The workers: one fresh process per side.


def _images(path: str) -> tuple[np.ndarray, np.ndarray]:
  with np.load(path) as f:
    return f["calibration"], f["check"]


def _import_official(checkout: str) -> types.SimpleNamespace:
  """The official functions, imported from ``checkout`` (its root put first on sys.path)."""
  sys.path.insert(0, os.path.abspath(checkout))
  if not _installed("clip"):  # OpenAI's CLIP: imported by utils.py, used for CLIP heads only
    sys.modules["clip"] = types.ModuleType("clip")
  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from graphs.resnet_graph import resnet20 as resnet20_graph
  from matching_functions import match_tensors_zipit
  from metric_calculators import get_metric_fns
  from model_merger import ModelMerge
  from models.resnets import resnet20
  from utils import reset_bn_stats
  return types.SimpleNamespace(
      resnet20_graph=resnet20_graph, match_tensors_zipit=match_tensors_zipit,
      get_metric_fns=get_metric_fns, ModelMerge=ModelMerge, resnet20=resnet20,
      reset_bn_stats=reset_bn_stats)


def measure_official(payload: dict) -> dict:
  """The official side (in its worker): builds the two models (torch's default initialisation,
  seeded), writes their state dicts for the zipjax side, and times two zips."""
  import copy  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  import warnings  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  import torch  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  s = Settings(**payload["settings"])
  official = _import_official(payload["checkout"])
  # The official code runs torch.cuda.amp.autocast(), which on a CPU only warns.
  warnings.filterwarnings("ignore", message=".*autocast.*")
  warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
  if os.environ.get(THREADS_VAR):
    torch.set_num_threads(int(os.environ[THREADS_VAR]))
  torch.manual_seed(s.seed)
  sources = [official.resnet20(s.width, s.num_outputs).eval() for _ in range(2)]
  template = official.resnet20(s.width, s.num_outputs)
  np.savez(payload["weights"], **{f"{m}/{k}": v.detach().numpy()
                                   for m, model in zip("ab", sources)
                                   for k, v in model.state_dict().items()})
  calibration, check = _images(payload["images"])
  to_nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # noqa: E731
  dataset = torch.utils.data.TensorDataset(to_nchw(calibration),
                                           torch.zeros(len(calibration), dtype=torch.long))
  loader = torch.utils.data.DataLoader(dataset, batch_size=s.batch_size, shuffle=False)
  check_x = to_nchw(check)
  with torch.no_grad():
    source_logits = sources[0](check_x).numpy()

  def zip_once(models):
    """What the official scripts do from two models and a loader to the merged model."""
    with torch.no_grad():
      bases = [official.reset_bn_stats(m, loader) for m in models]
      graphs = [official.resnet20_graph(copy.deepcopy(m)).graphify() for m in bases]
      merge = official.ModelMerge(*graphs, device="cpu")
      merge.transform(copy.deepcopy(template), loader,
                      transform_fn=official.match_tensors_zipit,
                      metric_classes=official.get_metric_fns(["covariance", "mean"]),
                      stop_at=None, a=s.alpha, b=s.beta)
      official.reset_bn_stats(merge, loader)
    return merge

  calls, logits = {}, {}
  for name in ("first", "repeat"):
    models = [copy.deepcopy(m) for m in sources]  # reset_bn_stats changes its model in place
    start = time.perf_counter()
    merge = zip_once(models)
    calls[name] = {"seconds": time.perf_counter() - start}
    with torch.no_grad():
      logits[name] = merge.eval()(check_x).numpy()
    if name == "first":
      np.savez(payload["merged_official"], **{k: v.detach().numpy() for k, v in
                                              merge.merged_model.state_dict().items()})
  return {"calls": calls, "logits": logits["first"], "source_logits": source_logits,
          "repeat_identical": bool(np.array_equal(logits["first"], logits["repeat"])),
          "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def measure_zipjax(payload: dict) -> dict:
  """The zipjax side (in its worker): converts the official state dicts and times two zips in
  the reference mode, counting the XLA compilations of each."""
  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  import jax
  import zipjax
  from zipjax import models
  s = Settings(**payload["settings"])
  call = common.compile_counter()
  with np.load(payload["weights"]) as f:
    states = {m: {k.split("/", 1)[1]: f[k] for k in f.files if k.startswith(f"{m}/")}
              for m in "ab"}
  variables = [models.from_official_resnet20(states[m]) for m in "ab"]
  model, spec = models.resnet20(s.width, s.num_outputs, padding="pytorch")
  calibration, check = _images(payload["images"])
  data = [jax.device_put(calibration[i:i + s.batch_size])
          for i in range(0, len(calibration), s.batch_size)]
  jax.block_until_ready((variables, data))
  apply = jax.jit(model.apply)
  source_logits = np.asarray(apply(variables[0], check))
  matcher = zipjax.match.official(alpha=s.alpha, beta=s.beta)
  calls, merged = {}, {}
  for name in ("first", "repeat"):
    merged[name], calls[name] = call(lambda: zipjax.zip(
        variables[0], variables[1], spec, data=data, matcher=matcher, mode="official"))
  logits = {k: np.asarray(apply(v, check)) for k, v in merged.items()}
  np.savez(payload["merged_zipjax"], **{jax.tree_util.keystr(p): np.asarray(x) for p, x in
                                        jax.tree_util.tree_leaves_with_path(merged["first"])})
  return {"calls": calls, "logits": logits["first"], "source_logits": source_logits,
          "repeat_identical": bool(np.array_equal(logits["first"], logits["repeat"])),
          "jax": jax.__version__, "backend": jax.default_backend()}


def measure(payload: dict) -> dict:
  """The worker's entry point: the side named in the payload."""
  return {"official": measure_official, "zipjax": measure_zipjax}[payload["side"]](payload)


# ----------------------------------------------------------------------------------------------
# The suite's side.


def agreement(candidate, reference) -> dict:
  """How far ``candidate``'s logits are from ``reference``'s: the largest absolute difference
  relative to the largest absolute reference logit, and the share of equal predictions."""
  a, b = np.asarray(candidate, np.float64), np.asarray(reference, np.float64)
  scale = float(np.abs(b).max()) or 1.0
  return {"max_rel_diff": float(np.abs(a - b).max()) / scale,
          "argmax_agree": float(np.mean(a.argmax(-1) == b.argmax(-1)))}


def variables_agreement(official_path: str, zipjax_path: str) -> dict:
  """How far zipjax's merged variables (an .npz of {keystr path: array}) are from the official
  merged state dict (an .npz, converted with ``zipjax.models.from_official_resnet20``), group
  by group: 'kernels' (convolutions and the head), 'batchnorm_params' (scales and biases) and
  'batchnorm_stats'; each the largest absolute difference over the group's leaves, relative to
  the group's largest absolute official value."""
  import jax  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from zipjax import models  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  with np.load(official_path) as f:
    official = models.from_official_resnet20({k: f[k] for k in f.files})
  with np.load(zipjax_path) as f:
    candidate = {k: f[k] for k in f.files}
  diff, scale = {}, {}
  for path, ref in jax.tree_util.tree_leaves_with_path(official):
    key = jax.tree_util.keystr(path)
    names = [str(getattr(k, "key", k)) for k in path]
    group = ("batchnorm_stats" if names[0] == "batch_stats" else
             "batchnorm_params" if any(re.fullmatch(r"(.*_)?bn\d*", n) for n in names) else
             "kernels")
    ref = np.asarray(ref, np.float64)
    diff[group] = max(diff.get(group, 0.0),
                      float(np.abs(np.asarray(candidate[key], np.float64) - ref).max()))
    scale[group] = max(scale.get(group, 0.0), float(np.abs(ref).max()))
  return {g: diff[g] / (scale[g] or 1.0) for g in diff}


def agreement_text(merged: dict, source: dict, variables: dict) -> str:
  """The notes' words for the agreement of the two sides (see :func:`run`)."""
  return (f"merged logits {merged['max_rel_diff']:.1e} apart "
          f"({100 * merged['argmax_agree']:.0f}% same predictions; sources "
          f"{source['max_rel_diff']:.0e}): kernels {variables['kernels']:.0e}, BatchNorm "
          f"scale/bias {variables['batchnorm_params']:.0e}, statistics "
          f"{variables['batchnorm_stats']:.0e}")


def _not_run(s: Settings, reason: str) -> common.Row:
  return common.Row(NAME, f"{label(s)}: not run", None, BASELINE, None, notes=reason,
                    data={"settings": dataclasses.asdict(s), "not_run": reason})


def run(scale: str, *, progress: bool = False) -> common.Result:
  """Both sides of every case of ``scale``, each in fresh processes; a row per call.

  Where torch, the official code's imports or the checkout (``ZIPIT_OFFICIAL``) are missing,
  one row per case says so (no time, the reason in its notes) and so does a remark."""
  checkout = os.environ.get(ENV_VAR) or None
  reason = unavailable(checkout)
  if reason:
    rows = [_not_run(s, reason) for s in SETTINGS[scale]]
    return common.Result(rows, summary={"not_run": reason}, remarks=[f"{NAME}: {reason}"])
  # The checkout's folder name only: results are shared, paths on one machine mean nothing.
  rows, summary = [], {"checkout": os.path.basename(os.path.normpath(checkout)), "cases": []}
  for s in SETTINGS[scale]:
    with tempfile.TemporaryDirectory(prefix="official_zip_") as tmp:
      rng = np.random.default_rng(s.seed)
      images = os.path.join(tmp, "images.npz")
      np.savez(images, **{k: rng.standard_normal((n, IMAGE_SIZE, IMAGE_SIZE, 3),
                                                 dtype=np.float32)
                          for k, n in (("calibration", s.num_images),
                                       ("check", s.check_images))})
      payload = {"settings": dataclasses.asdict(s), "checkout": checkout, "images": images,
                 **{k: os.path.join(tmp, f"{k}.npz")
                    for k in ("weights", "merged_official", "merged_zipjax")}}
      results = {}
      for side in ("official", "zipjax"):  # the official side writes the weights
        if progress:
          print(f"{NAME}: {label(s)}, the {side} side in a fresh process", file=sys.stderr)
        results[side] = common.run_worker(__spec__.name, {**payload, "side": side},
                                          timeout_s=s.timeout_s)
      variables = variables_agreement(payload["merged_official"], payload["merged_zipjax"])
    off, zj = results["official"], results["zipjax"]
    merged = agreement(zj["logits"], off["logits"])
    source = agreement(zj["source_logits"], off["source_logits"])
    agree = merged["max_rel_diff"] <= AGREEMENT_TOLERANCE
    data = {"settings": dataclasses.asdict(s), "merged_agreement": merged,
            "source_agreement": source, "variables_agreement": variables, "agree": agree,
            "official": {k: v for k, v in off.items() if "logits" not in k},
            "zipjax": {k: v for k, v in zj.items() if "logits" not in k}}
    summary["cases"].append({"label": label(s), **data})
    baseline = f"{BASELINE}, torch {off['torch']} on {off['torch_threads']} thread(s)"
    for name, case in (("first call, fresh process", "first"), ("repeat", "repeat")):
      call = zj["calls"][case]
      rows.append(common.Row(
          NAME, f"{label(s)}: {name}", call["seconds"], baseline,
          off["calls"][case]["seconds"], checks_ok=agree,
          notes=(f"zipjax compiled {call['compiles']} programs in "
                 f"{call['compile_seconds']:.1f} s; "
                 + agreement_text(merged, source, variables)),
          data=data))
  return common.Result(rows, summary=summary)


if __name__ == "__main__":
  sys.exit(common.worker_main(measure))
