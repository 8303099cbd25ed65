"""Multi-dataset merging with ResNet-50: the shared part of the pairwise and 4-way configs."""

from __future__ import annotations

import dataclasses

from .. import configs as C
from ..train import TrainConfig

NABIRDS = "../shared/data/nabirds"


def multidataset(name: str, groups: tuple[tuple[int, ...], ...],
                 local: bool) -> C.ExperimentConfig:
  """One ResNet-50 per dataset: Stanford Dogs, Oxford-IIIT Pets, CUB-200-2011, NABirds.

  Every model has a 555-way cross-entropy head (NABirds' class count) and trains on its
  dataset's classes with the first outputs, so all four share one architecture. Dogs, Pets
  and CUB come from tensorflow-datasets; NABirds (not in tfds) from its release folder at
  ``datasets.3.path``. The recipe (60 epochs from scratch, batch 64, peak learning rate 0.05)
  is this project's choice: the paper's models started from ImageNet-1k checkpoints.
  """
  def dataset(source: str, path: str | None = None) -> C.DataConfig:
    return C.DataConfig(source=source, path=path, image_size=224)

  config = C.ExperimentConfig(
      name=name,
      # ~46k training images at 224x224 uint8: ~7 GB in memory.
      datasets=(dataset("stanford_dogs"), dataset("oxford_iiit_pet"),
                dataset("caltech_birds2011"), dataset("nabirds", NABIRDS)),
      model=C.ModelConfig(factory="resnet50", width=1.0, num_outputs=555),
      head="ce",
      split=None,
      train=TrainConfig(epochs=60, batch_size=64, learning_rate=0.05, momentum=0.9,
                        weight_decay=5e-4, warmup_epochs=2, schedule="cosine"),
      num_runs=1,
      groups=groups,
      calibration=C.CalibrationConfig(num_images=2000, batch_size=100, augmentation=True),
      merge=C.MergeConfig(methods=("ensemble", "weight_avg", "permute", "zipit"),
                          stop_points=(None, "stage3", "stage2", "stage1")),
      eval_batch_size=250,
      output_dir=f"runs/{name}",
  )
  if not local:
    return config
  small = lambda d: dataclasses.replace(d, image_size=64, max_per_class=8,  # noqa: E731
                                        max_test_per_class=2)
  return dataclasses.replace(
      config,
      name=f"{name}_local",
      datasets=tuple(small(d) for d in config.datasets),
      model=C.ModelConfig(factory="resnet50", width=0.25, num_outputs=555),
      train=TrainConfig(epochs=2, batch_size=32, learning_rate=0.05, warmup_epochs=1),
      calibration=C.CalibrationConfig(num_images=200, batch_size=50, augmentation=True),
      merge=C.MergeConfig(methods=("ensemble", "weight_avg", "permute", "zipit"),
                          stop_points=(None, "stage2")),
      eval_batch_size=100,
      output_dir=f"runs/{name}_local",
  )
