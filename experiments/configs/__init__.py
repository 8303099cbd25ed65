"""Experiment configs as Python, one module per experiment of the paper.

Each module ``experiments/configs/<name>.py`` defines ``get_config(arg: str | None = None)``
returning an :class:`ExperimentConfig` (a frozen dataclass): ``arg=None`` is the paper's
setting, ``arg="local"`` a small variant that runs on a laptop CPU. Its docstring gives the
command that runs it::

  python -m experiments.run --config experiments/configs/<name>.py:local

:func:`load` resolves such a ``path[:arg]`` (or ``module[:arg]``) string, :func:`override`
applies ``"dotted.field=value"`` overrides (e.g. ``"data.path=/data/cifar10"``), and
:func:`validate` checks that a config is well-formed. Paths in the committed configs are
relative to the folder the command runs in (the repository root); none is machine-specific,
so point them at your data with overrides.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import importlib.util
import itertools
import os
import pkgutil
from typing import Any, Sequence

import numpy as np

from .. import data as data_lib
from ..train import TrainConfig

HEADS = ("clip", "ce")
METHODS = ("ensemble", "weight_avg", "git_rebasin", "permute", "zipit", "zipit_official",
           "zipit_stream_permute", "zipit_heads_in_place", "zipit_attention_unmerged")
"""Merge methods a config may ask for: the ensemble (every source model run, the upper bound),
weight averaging, Git Re-Basin weight matching, Permute (correlation matching across models
only), ZipIt! and ZipIt! in the reference mode (``zipjax.zip(..., mode="official")`` with
the official alpha and beta), each ZipIt! at every stop point; for models with attention
heads (``Space.heads``), ZipIt! with head g of every model merged with head g of the others
(no pairing of heads) and ZipIt! with attention left unmerged (its weights averaged); and
ZipIt! with the space named "stream" (a residual stream) matched by Permute
(``zipjax.match.by_space``)."""

CLIP_DIM = 512


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where a dataset comes from and how much of it to hold in memory.

  Attributes:
    source: a key of ``experiments.data.SOURCES`` ("cifar10_npz", "cifar100", ...).
    path: the local data folder, or for tensorflow-datasets sources the tfds data folder
      (None: tfds's default). Relative paths are relative to the working folder.
    image_size: resize to this square size (sources whose images vary in size need it).
    max_per_class: at most this many training images per class (memory, quick runs).
    max_test_per_class: at most this many test images per class.
    class_embeddings: CLIP-style heads: CSV of the class names' text embeddings, rows in
      class order (None: fixed random orthonormal embeddings).
  """

  source: str
  path: str | None = None
  image_size: int | None = None
  max_per_class: int | None = None
  max_test_per_class: int | None = None
  class_embeddings: str | None = None

  @property
  def num_classes(self) -> int | None:
    return data_lib.SOURCES[self.source].num_classes if self.source in data_lib.SOURCES else None

  def load(self, *, classes: Sequence[int] | None = None,
           download: bool = True) -> tuple[data_lib.Dataset, data_lib.Dataset]:
    """Train and test sets (only ``classes`` if given; labels keep their global indices)."""
    return data_lib.load_source(self.source, path=self.path, image_size=self.image_size,
                                classes=classes, max_per_class=self.max_per_class,
                                max_test_per_class=self.max_test_per_class, download=download)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A model of ``zipjax.models``: ``getattr(zipjax.models, factory)(width, num_outputs,
  **dict(options))``, e.g. ``options=(("padding", "pytorch"),)`` for the official ResNet-20.
  """

  factory: str
  width: float = 1.0
  num_outputs: int = 10
  options: tuple[tuple[str, Any], ...] = ()

  def build(self):
    """(flax module, zip spec), the same objects for equal configs: specs hash by identity,
    so every run of one model shares its compiled passes."""
    return _build_model(self.factory, self.width, self.num_outputs, tuple(self.options))


@functools.lru_cache(maxsize=None)
def _build_model(factory: str, width: float, num_outputs: int, options: tuple = ()):
  from zipjax import models  # pylint: disable=g-import-not-at-top
  return getattr(models, factory)(width=width, num_outputs=num_outputs, **dict(options))


@dataclasses.dataclass(frozen=True)
class SplitConfig:
  """Classes 0..num_classes-1 of one dataset, split into ``num_tasks`` disjoint equal tasks.

  Attributes:
    num_classes: how many of the dataset's classes take part (local variants use fewer).
    num_tasks: the number of tasks, one source model each.
    seed: run r splits with seed ``seed + r``.
    shuffle: draw the tasks' classes at random (False: consecutive blocks 0..k-1, k..2k-1, ...,
      as the reference ImageNet experiments do).
  """

  num_classes: int
  num_tasks: int = 2
  seed: int = 0
  shuffle: bool = True


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
  """The data ZipIt! computes feature statistics and resets BatchNorm on.

  ``num_images`` images drawn at random (with ``seed``) from the training images of the tasks
  whose models are merged, in batches of ``batch_size``, optionally augmented.
  """

  num_images: int = 5000
  batch_size: int = 500
  augmentation: bool = True
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class MergeConfig:
  """What to compare: ``methods`` (see :data:`METHODS`), each at every stop point.

  Attributes:
    methods: merge methods, from :data:`METHODS`.
    stop_points: partial-zip stops (spaces of the model's ``spec.stop_points``); None is the
      full zip.
    alpha: ZipIt!'s repeated-matching factor.
    beta: ZipIt!'s same-model merge budget.
  """

  methods: tuple[str, ...] = ("ensemble", "weight_avg", "permute", "zipit")
  stop_points: tuple[str | None, ...] = (None,)
  alpha: float = 0.5
  beta: float = 0.5


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """One experiment: data, source models, how they train, and how they are merged.

  Attributes:
    name: a short name, used in output paths.
    datasets: one dataset whose classes ``split`` divides into tasks, or one dataset per task
      (the multi-dataset setting, ``split`` None: each task is all of its dataset's classes).
    model: the architecture of every source model.
    head: "clip" (outputs compared with class text embeddings, num_outputs = their width) or
      "ce" (a cross-entropy head, one output per class of the task; multi-dataset models
      share the widest task's head size and use its first outputs).
    split: the class split, or None for one dataset per task.
    train: the training recipe (``TrainConfig``); model t of run r trains with seed
      ``train.seed + 1000 * r + t`` (see :meth:`train_config`).
    num_runs: independent repeats (own class split, own source models); with two tasks and
      one group, the number of model pairs.
    groups: the tasks whose models are merged together, e.g. ((0, 1),) for a pair.
    calibration: the data for feature statistics and BatchNorm resets.
    merge: methods and stop points.
    eval_batch_size: batch size of evaluation passes.
    output_dir: where checkpoints, merged models and results go (relative to the working folder).
  """

  name: str
  datasets: tuple[DataConfig, ...]
  model: ModelConfig
  head: str
  split: SplitConfig | None
  train: TrainConfig
  num_runs: int = 1
  groups: tuple[tuple[int, ...], ...] = ((0, 1),)
  calibration: CalibrationConfig = CalibrationConfig()
  merge: MergeConfig = MergeConfig()
  eval_batch_size: int = 500
  output_dir: str = "runs"

  @property
  def data(self) -> DataConfig:
    """The dataset of a class-split experiment (the first of several otherwise)."""
    return self.datasets[0]

  @property
  def num_tasks(self) -> int:
    return self.split.num_tasks if self.split is not None else len(self.datasets)

  @property
  def num_pairs(self) -> int:
    """How many model groups are merged over all runs (model pairs when groups are pairs)."""
    return self.num_runs * len(self.groups)

  def tasks(self, run: int = 0) -> list[np.ndarray]:
    """Each task's classes (global indices in its dataset) in run ``run``."""
    if self.split is None:
      return [np.arange(d.num_classes) for d in self.datasets]
    if not self.split.shuffle:
      return np.split(np.arange(self.split.num_classes), self.split.num_tasks)
    return data_lib.class_split(self.split.num_classes, self.split.num_tasks,
                                seed=self.split.seed + run)

  def task_data(self, task: int) -> DataConfig:
    """The dataset task ``task`` trains on."""
    return self.datasets[task] if len(self.datasets) > 1 else self.datasets[0]

  def train_config(self, run: int, task: int) -> TrainConfig:
    """The training recipe of source model ``task`` of run ``run``: its own seed."""
    return dataclasses.replace(self.train, seed=self.train.seed + 1000 * run + task)

  def estimated_train_images(self) -> int:
    """Images a full run of all source models passes through training (for time budgets)."""
    total = 0
    for t, classes in enumerate(self.tasks(0)):
      d = self.task_data(t)
      per_class = d.max_per_class
      if per_class is None:
        return -1  # unknown without loading the dataset
      total += per_class * len(classes) * self.train.epochs
    return total * self.num_runs


# ------------------------------------------------------------------------------------------
# Checks.


def validate(config: ExperimentConfig) -> ExperimentConfig:
  """Checks that ``config`` is well-formed; returns it, or raises ValueError naming the field."""
  from zipjax import models  # pylint: disable=g-import-not-at-top
  problems = []
  err = problems.append
  if not isinstance(config, ExperimentConfig):
    raise ValueError(f"A config must be an ExperimentConfig, got {type(config).__name__}.")
  if not config.datasets:
    err("datasets: empty")
  for i, d in enumerate(config.datasets):
    src = data_lib.SOURCES.get(d.source)
    if src is None:
      err(f"datasets[{i}].source: unknown {d.source!r}; known: {sorted(data_lib.SOURCES)}")
      continue
    if src.needs_path and not d.path:
      err(f"datasets[{i}].path: source {d.source!r} reads local files, give a path")
    if src.image_size is None and d.image_size is None:
      err(f"datasets[{i}].image_size: source {d.source!r} has images of varying size")
    for field in ("image_size", "max_per_class", "max_test_per_class"):
      value = getattr(d, field)
      if value is not None and value < 1:
        err(f"datasets[{i}].{field}: must be >= 1, got {value}")
    if config.head == "ce" and d.class_embeddings is not None:
      err(f"datasets[{i}].class_embeddings: a 'ce' head uses no class embeddings")
  if config.head not in HEADS:
    err(f"head: {config.head!r} is not one of {HEADS}")
  factory = getattr(models, config.model.factory, None)
  if factory is None or not callable(factory):
    err(f"model.factory: zipjax.models has no {config.model.factory!r}; it has "
        f"{list(models.__all__)}")
  if config.model.width <= 0:
    err(f"model.width: must be > 0, got {config.model.width}")
  if config.split is None:
    if len(config.datasets) < 2:
      err("split: None needs one dataset per task (at least two datasets)")
  else:
    s = config.split
    if len(config.datasets) != 1:
      err(f"split: a class split needs exactly one dataset, got {len(config.datasets)}")
    total = config.data.num_classes
    if s.num_tasks < 2:
      err(f"split.num_tasks: must be >= 2, got {s.num_tasks}")
    elif s.num_classes % s.num_tasks:
      err(f"split: {s.num_classes} classes do not split into {s.num_tasks} equal tasks")
    if total is not None and not 0 < s.num_classes <= total:
      err(f"split.num_classes: {s.num_classes} not in [1, {total}] for {config.data.source}")
  if not problems:
    _validate_tasks(config, err)
  if config.num_runs < 1:
    err(f"num_runs: must be >= 1, got {config.num_runs}")
  if config.calibration.num_images < 1 or config.calibration.batch_size < 1:
    err("calibration: num_images and batch_size must be >= 1")
  bad = [m for m in config.merge.methods if m not in METHODS]
  if bad or not config.merge.methods:
    err(f"merge.methods: {list(config.merge.methods)}; each must be one of {METHODS}")
  if not config.merge.stop_points:
    err("merge.stop_points: empty (None is the full zip)")
  if not 0.0 < config.merge.alpha <= 1.0 or not 0.0 <= config.merge.beta <= 1.0:
    err(f"merge: alpha must lie in (0, 1] and beta in [0, 1], got {config.merge.alpha}, "
        f"{config.merge.beta}")
  if factory is not None and not problems:
    _, spec = config.model.build()
    for stop in config.merge.stop_points:
      if stop is not None and stop not in spec.stop_points:
        err(f"merge.stop_points: {stop!r} is not a stop point of {config.model.factory}; "
            f"valid: {list(spec.stop_points)}")
  if problems:
    raise ValueError(f"Config {config.name!r} is not well-formed:\n  " + "\n  ".join(problems))
  return config


def _validate_tasks(config: ExperimentConfig, err) -> None:
  tasks = config.tasks(0)
  sizes = [len(t) for t in tasks]
  if config.split is not None:
    flat = np.concatenate(tasks)
    if len(np.unique(flat)) != len(flat):
      err("split: tasks overlap")
  for g, group in enumerate(config.groups):
    if len(group) < 2 or len(set(group)) != len(group):
      err(f"groups[{g}]: {group} must name at least two different tasks")
    if any(not 0 <= t < config.num_tasks for t in group):
      err(f"groups[{g}]: {group} names a task outside 0..{config.num_tasks - 1}")
  if not config.groups:
    err("groups: empty")
  if config.head == "clip":
    if config.model.num_outputs != CLIP_DIM and any(
        d.class_embeddings is not None for d in config.datasets):
      err(f"model.num_outputs: a CLIP head with text embeddings has {CLIP_DIM} outputs, got "
          f"{config.model.num_outputs}")
    if config.model.num_outputs < max(sizes):
      err(f"model.num_outputs: {config.model.num_outputs} dimensions cannot hold "
          f"{max(sizes)} orthonormal class embeddings")
  elif config.head == "ce":
    if config.split is not None and config.model.num_outputs != sizes[0]:
      err(f"model.num_outputs: a 'ce' head has one output per class of the task "
          f"({sizes[0]}), got {config.model.num_outputs}")
    if config.model.num_outputs < max(sizes):
      err(f"model.num_outputs: {config.model.num_outputs} < the largest task's "
          f"{max(sizes)} classes")


# ------------------------------------------------------------------------------------------
# Loading and overriding.


def names() -> list[str]:
  """The config modules in this package."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load(spec: str) -> ExperimentConfig:
  """The config ``spec`` names: ``path/to/config.py[:arg]`` or ``module.name[:arg]``.

  A bare name ("cifar10_resnet20x4_clip") is a module of this package. The result is
  validated.
  """
  target, _, arg = spec.partition(":")
  arg = arg or None
  if target.endswith(".py"):
    if not os.path.exists(target):
      raise FileNotFoundError(f"No config file {target}.")
    # Named inside this package, so that a config's relative imports (``from . import _cifar``)
    # resolve whatever name the package is installed under.
    name = f"{__name__}._loaded_" + os.path.splitext(os.path.basename(target))[0]
    module_spec = importlib.util.spec_from_file_location(name, target)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  else:
    module = importlib.import_module(target if "." in target else f"{__name__}.{target}")
  if not hasattr(module, "get_config"):
    raise ValueError(f"{target} defines no get_config(arg).")
  return validate(module.get_config(arg))


def _convert(value: str, annotation: Any, where: str) -> Any:
  """Parses ``value`` for a field annotated ``annotation`` (a string under __future__)."""
  text = value.strip()
  if text in ("None", "none", "null"):
    if "None" in str(annotation):
      return None
    raise ValueError(f"{where} cannot be None.")
  ann = str(annotation)
  try:
    if "tuple" in ann:
      parsed = ast.literal_eval(text)
      return tuple(parsed) if isinstance(parsed, (list, tuple)) else (parsed,)
    if ann.startswith("bool"):
      if text.lower() in ("true", "1", "yes"):
        return True
      if text.lower() in ("false", "0", "no"):
        return False
      raise ValueError(text)
    if ann.startswith("int"):
      return int(text)
    if ann.startswith("float"):
      return float(text)
  except (ValueError, SyntaxError) as e:
    raise ValueError(f"{where}={value!r} does not parse as {ann}.") from e
  return text


def override(config: Any, *assignments: str) -> Any:
  """``config`` with ``"a.b.c=value"`` assignments applied (values parsed by field type).

  ``datasets`` entries are addressed as ``datasets.0.path``; ``data.path`` is short for
  ``datasets.0.path``.
  """
  for assignment in assignments:
    key, sep, value = assignment.partition("=")
    if not sep:
      raise ValueError(f"Override {assignment!r} is not of the form dotted.field=value.")
    parts = key.strip().split(".")
    if parts[0] == "data":
      parts = ["datasets", "0"] + parts[1:]
    config = _set(config, parts, value, key)
  return config if not isinstance(config, ExperimentConfig) else validate(config)


def _set(obj: Any, parts: list[str], value: str, key: str) -> Any:
  head, rest = parts[0], parts[1:]
  if isinstance(obj, tuple):
    if not head.isdigit() or int(head) >= len(obj):
      raise ValueError(f"Override {key}: {head!r} is not an index below {len(obj)}.")
    i = int(head)
    return obj[:i] + (_set(obj[i], rest, value, key),) + obj[i + 1:]
  if not dataclasses.is_dataclass(obj):
    raise ValueError(f"Override {key}: cannot go into {type(obj).__name__}.")
  fields = {f.name: f for f in dataclasses.fields(obj)}
  if head not in fields:
    raise ValueError(f"Override {key}: {type(obj).__name__} has no field {head!r}; it has "
                     f"{sorted(fields)}.")
  if rest:
    return dataclasses.replace(obj, **{head: _set(getattr(obj, head), rest, value, key)})
  current = getattr(obj, head)
  if dataclasses.is_dataclass(current) or (isinstance(current, tuple) and current
                                           and dataclasses.is_dataclass(current[0])):
    raise ValueError(f"Override {key}: set its fields ({key}.<field>=...), not the whole value.")
  return dataclasses.replace(obj, **{head: _convert(value, fields[head].type, key)})


def all_pairs(num_tasks: int) -> tuple[tuple[int, int], ...]:
  """Every pair of tasks: the groups of a pairwise experiment."""
  return tuple(itertools.combinations(range(num_tasks), 2))


def check_arg(arg: str | None, module: str) -> bool:
  """True for the local variant, False for the paper's; anything else is an error."""
  if arg in (None, ""):
    return False
  if arg == "local":
    return True
  raise ValueError(f"{module}: unknown variant {arg!r}; use no argument (the paper's setting) "
                   "or 'local'.")
