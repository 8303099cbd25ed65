"""CIFAR-100 (50+50): ResNet-20 x8 with CLIP-style heads.

Two models per run, each trained from its own initialisation on 50 random classes of
CIFAR-100 against the CLIP text embeddings of the class names; merged fully and partially.
CIFAR-100 comes from tensorflow-datasets (``pip install "zipjax[tfds]"``; the first run
downloads it into the tfds data folder, ``data.path`` or ``~/tensorflow_datasets``).

Run from the repository root:

  python -m experiments.run --config experiments/configs/cifar100_resnet20x8_clip.py
  python -m experiments.run --config experiments/configs/cifar100_resnet20x8_clip.py:local

The local variant (ResNet-20 x1, 10 of the 100 classes split 5+5, 200 images per class,
4 epochs) trains its two models in well under a minute on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses

from experiments import configs as C
from experiments.train import TrainConfig

EMBEDDINGS = "../shared/data/clip/cifar100_class_names_clip_features.csv"


def get_config(arg: str | None = None) -> C.ExperimentConfig:
  local = C.check_arg(arg, __name__)
  config = C.ExperimentConfig(
      name="cifar100_resnet20x8_clip",
      datasets=(C.DataConfig(source="cifar100", class_embeddings=EMBEDDINGS),),
      model=C.ModelConfig(factory="resnet20", width=8, num_outputs=C.CLIP_DIM),
      head="clip",
      split=C.SplitConfig(num_classes=100, num_tasks=2, seed=0),
      train=TrainConfig(epochs=100, batch_size=500, learning_rate=0.4, momentum=0.9,
                        weight_decay=5e-4, warmup_epochs=5, schedule="linear"),
      num_runs=5,
      groups=((0, 1),),
      calibration=C.CalibrationConfig(num_images=5000, batch_size=500, augmentation=True),
      merge=C.MergeConfig(methods=("ensemble", "weight_avg", "git_rebasin", "permute", "zipit"),
                          stop_points=(None, "stage2", "stage1")),
      output_dir="runs/cifar100_resnet20x8_clip",
  )
  if not local:
    return config
  return dataclasses.replace(
      config,
      name="cifar100_resnet20x8_clip_local",
      datasets=(dataclasses.replace(config.data, max_per_class=200, max_test_per_class=50),),
      model=C.ModelConfig(factory="resnet20", width=1, num_outputs=C.CLIP_DIM),
      split=C.SplitConfig(num_classes=10, num_tasks=2, seed=0),
      train=TrainConfig(epochs=4, batch_size=100, learning_rate=0.1, warmup_epochs=1,
                        schedule="linear"),
      num_runs=1,
      calibration=C.CalibrationConfig(num_images=500, batch_size=250, augmentation=True),
      merge=C.MergeConfig(methods=("ensemble", "weight_avg", "permute", "zipit"),
                          stop_points=(None, "stage2")),
      output_dir="runs/cifar100_resnet20x8_clip_local",
  )
