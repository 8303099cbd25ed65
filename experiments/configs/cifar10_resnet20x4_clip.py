"""CIFAR-10 (5+5): ResNet-20 x4 with CLIP-style heads, the paper's main CIFAR-10 experiment.

Two models per run, each trained from its own initialisation on 5 random classes of CIFAR-10,
their outputs compared with the CLIP text embeddings of the class names; then merged fully
and partially (stops after stage 2 and stage 1: ZipIt!20/20, 13/20 and 7/20).

Run from the repository root (data paths are relative to it):

  python -m experiments.run --config experiments/configs/cifar10_resnet20x4_clip.py
  python -m experiments.run --config experiments/configs/cifar10_resnet20x4_clip.py:local

The local variant (ResNet-20 x1, 800 training images per class, 5 epochs) trains its two
models in about 4 minutes on a 2-core CPU (~170 images/s).
"""

from __future__ import annotations

import dataclasses

from experiments import configs as C
from experiments.train import TrainConfig

DATA = "../shared/data/cifar10"
EMBEDDINGS = "../shared/data/clip/cifar10_class_names_clip_features.csv"


def get_config(arg: str | None = None) -> C.ExperimentConfig:
  local = C.check_arg(arg, __name__)
  config = C.ExperimentConfig(
      name="cifar10_resnet20x4_clip",
      datasets=(C.DataConfig(source="cifar10_npz", path=DATA, class_embeddings=EMBEDDINGS),),
      model=C.ModelConfig(factory="resnet20", width=4, num_outputs=C.CLIP_DIM),
      head="clip",
      split=C.SplitConfig(num_classes=10, num_tasks=2, seed=0),
      train=TrainConfig(epochs=100, batch_size=500, learning_rate=0.4, momentum=0.9,
                        weight_decay=5e-4, warmup_epochs=5, schedule="linear"),
      num_runs=5,
      groups=((0, 1),),
      calibration=C.CalibrationConfig(num_images=5000, batch_size=500, augmentation=True),
      merge=C.MergeConfig(methods=("ensemble", "weight_avg", "git_rebasin", "permute", "zipit"),
                          stop_points=(None, "stage2", "stage1")),
      output_dir="runs/cifar10_resnet20x4_clip",
  )
  if not local:
    return config
  return dataclasses.replace(
      config,
      name="cifar10_resnet20x4_clip_local",
      datasets=(dataclasses.replace(config.data, max_per_class=800, max_test_per_class=200),),
      model=C.ModelConfig(factory="resnet20", width=1, num_outputs=C.CLIP_DIM),
      train=TrainConfig(epochs=5, batch_size=100, learning_rate=0.1, warmup_epochs=1,
                        schedule="linear"),
      num_runs=1,
      calibration=C.CalibrationConfig(num_images=1000, batch_size=250, augmentation=True),
      merge=C.MergeConfig(methods=("ensemble", "weight_avg", "permute", "zipit"),
                          stop_points=(None, "stage2", "stage1")),
      output_dir="runs/cifar10_resnet20x4_clip_local",
  )
