"""Every experiment config, paper and local variant, loads and is well-formed."""

import dataclasses
import os

import numpy as np
import pytest

from experiments import configs as C
from experiments import data as data_lib
from zipjax import models

CONFIG_DIR = os.path.dirname(C.__file__)
NAMES = C.names()
VARIANTS = [(n, a) for n in NAMES for a in (None, "local")]
PAPER_EXPERIMENTS = {
    "cifar10_resnet20x4_clip", "cifar100_resnet20x8_clip", "cifar100_resnet20x16_ce",
    "cifar10_vgg11_ce", "imagenet200_resnet50x1", "imagenet200_resnet50x1_5",
    "multidataset_resnet50_pairs", "multidataset_resnet50_all",
}
CPU_IMAGES_PER_SECOND = 150  # ResNet-20 x1 training on a 2-core CPU (measured: 150-200)


def _strings(obj):
  """Every string value inside a (nested) config."""
  if isinstance(obj, str):
    yield obj
  elif dataclasses.is_dataclass(obj):
    for f in dataclasses.fields(obj):
      yield from _strings(getattr(obj, f.name))
  elif isinstance(obj, (tuple, list)):
    for v in obj:
      yield from _strings(v)


def test_every_paper_experiment_has_a_config():
  assert PAPER_EXPERIMENTS <= set(NAMES)


@pytest.mark.parametrize("name,arg", VARIANTS)
def test_config_is_well_formed(name, arg):
  module = __import__(f"experiments.configs.{name}", fromlist=["get_config"])
  config = module.get_config(arg)
  assert C.validate(config) is config
  assert isinstance(config, C.ExperimentConfig)
  assert config.name.endswith("_local") == (arg == "local")
  # The model factory exists and builds; every stop point is one of the spec's.
  assert config.model.factory in models.__all__
  _, spec = config.model.build()
  for stop in config.merge.stop_points:
    assert stop is None or stop in spec.stop_points
  # Tasks are disjoint, equal within a class split, and every group names real tasks.
  tasks = config.tasks(0)
  assert len(tasks) == config.num_tasks
  if config.split is not None:
    assert len({len(t) for t in tasks}) == 1
    flat = np.concatenate(tasks)
    assert len(np.unique(flat)) == len(flat) == config.split.num_classes
    assert config.split.num_classes <= data_lib.SOURCES[config.data.source].num_classes
  for group in config.groups:
    assert len(set(group)) == len(group) >= 2
    assert all(0 <= t < config.num_tasks for t in group)
  # Heads: CLIP outputs match the text embeddings; CE heads hold every class of a task.
  if config.head == "clip":
    if all(d.class_embeddings for d in config.datasets):  # CLIP text embeddings
      assert config.model.num_outputs == C.CLIP_DIM
    else:  # fixed random orthonormal class embeddings
      assert config.model.num_outputs >= sum(len(t) for t in tasks)
  else:
    assert config.model.num_outputs >= max(len(t) for t in tasks)
  assert set(config.merge.methods) <= set(C.METHODS)
  assert config.train.momentum == 0.9 and config.train.warmup_epochs > 0
  # No machine-specific absolute paths.
  assert not [s for s in _strings(config) if os.path.isabs(s)]
  # Distinct runs draw distinct class splits and distinct seeds.
  if config.split is not None and config.split.shuffle and config.num_runs > 1:
    assert not all(np.array_equal(a, b) for a, b in zip(config.tasks(0), config.tasks(1)))
  seeds = {config.train_config(r, t).seed for r in range(config.num_runs)
           for t in range(config.num_tasks)}
  assert len(seeds) == config.num_runs * config.num_tasks


@pytest.mark.parametrize("name", NAMES)
def test_local_variant_is_small(name):
  local = C.load(f"{name}:local")
  paper = C.load(name)
  images = local.estimated_train_images()
  assert 0 < images
  assert local.num_runs <= paper.num_runs
  assert local.model.width <= paper.model.width
  assert local.calibration.num_images <= paper.calibration.num_images


def test_local_cifar10_fits_a_small_cpu():
  config = C.load("cifar10_resnet20x4_clip:local")
  assert config.model.factory == "resnet20" and config.model.width == 1
  assert config.data.source == "cifar10_npz"
  seconds = config.estimated_train_images() / CPU_IMAGES_PER_SECOND
  assert seconds < 6 * 60


def test_load_accepts_file_paths_and_module_names():
  path = os.path.join(CONFIG_DIR, "cifar10_vgg11_ce.py")
  assert C.load(f"{path}:local") == C.load("cifar10_vgg11_ce:local")
  assert C.load(path) == C.load("experiments.configs.cifar10_vgg11_ce")
  with pytest.raises(ValueError, match="unknown variant 'huge'"):
    C.load("cifar10_vgg11_ce:huge")
  with pytest.raises(FileNotFoundError):
    C.load("no/such/config.py")


def test_override_parses_by_field_type():
  config = C.load("cifar10_resnet20x4_clip:local")
  out = C.override(config, "data.path=/data/cifar10", "train.epochs=2",
                   "train.learning_rate=0.05", "train.augmentation=false",
                   "merge.stop_points=(None, 'stage1')", "datasets.0.max_per_class=None",
                   "model.width=2")
  assert out.data.path == "/data/cifar10"
  assert out.train.epochs == 2 and out.train.learning_rate == 0.05
  assert out.train.augmentation is False
  assert out.merge.stop_points == (None, "stage1")
  assert out.data.max_per_class is None
  assert out.model.width == 2.0
  assert config.train.epochs == 5  # the original is untouched


@pytest.mark.parametrize("assignment,match", [
    ("train.epoch=3", "has no field 'epoch'"),
    ("train.epochs=three", "does not parse as int"),
    ("train.epochs", "dotted.field=value"),
    ("datasets.5.path=x", "not an index below 1"),
    ("train=3", "set its fields"),
    ("model.factory=resnet9000", "zipjax.models has no 'resnet9000'"),
    ("merge.stop_points=('stage7',)", "'stage7' is not a stop point"),
    ("split.num_tasks=3", "do not split into 3 equal tasks"),
])
def test_override_errors_name_the_problem(assignment, match):
  config = C.load("cifar10_resnet20x4_clip:local")
  with pytest.raises(ValueError, match=match):
    C.override(config, assignment)


def test_validate_lists_every_problem():
  config = C.load("cifar10_vgg11_ce:local")
  bad = dataclasses.replace(
      config, head="softmax", num_runs=0,
      merge=C.MergeConfig(methods=("zipit", "magic")),
      datasets=(C.DataConfig(source="imagenet2012"),))
  with pytest.raises(ValueError) as info:
    C.validate(bad)
  message = str(info.value)
  for fragment in ("head: 'softmax'", "num_runs", "'magic'",
                   "image_size: source 'imagenet2012'"):
    assert fragment in message


def test_multidataset_tasks_are_whole_datasets():
  config = C.load("multidataset_resnet50_all")
  assert config.split is None and config.num_tasks == 4
  assert [len(t) for t in config.tasks()] == [120, 37, 200, 555]
  assert config.groups == ((0, 1, 2, 3),)
  assert C.load("multidataset_resnet50_pairs").groups == C.all_pairs(4)
  assert config.task_data(3).source == "nabirds"


def test_imagenet_tasks_are_consecutive_blocks():
  config = C.load("imagenet200_resnet50x1_5")
  tasks = config.tasks()
  assert [t[0] for t in tasks] == [0, 200, 400, 600, 800]
  assert len(config.groups) == 10
  assert config.model.width == 1.5


def test_model_options_reach_the_factory():
  official = C.ModelConfig("resnet20", 1, 10, options=(("padding", "pytorch"),))
  module, _ = official.build()
  assert module.padding == "pytorch"
  assert C.ModelConfig("resnet20", 1, 10).build()[0].padding == "same"
  assert official.build()[1] is official.build()[1]  # one spec per config: compiled once


def test_reference_mode_rows_follow_the_zipit_rows():
  from experiments import evaluate  # pylint: disable=import-outside-toplevel
  rows = evaluate.table_methods(2, methods=("zipit", "zipit_official", "ensemble"),
                                stop_points=(None, "stage1"))
  assert [r.name for r in rows] == [
      "Model A", "Model B", "ZipIt! (full)", "ZipIt! (partial, stage1)",
      "ZipIt! official (full)", "ZipIt! official (partial, stage1)", "Ensemble"]
  assert [r.mode for r in rows if r.kind == "merge"] == ["zipjax"] * 2 + ["official"] * 2
  assert rows[4].matcher.__name__ == "official(alpha=0.3, beta=0.125)"
