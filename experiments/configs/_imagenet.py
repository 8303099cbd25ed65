"""ImageNet-1k (200+200) with ResNet-50: the shared part of the two width variants."""

from __future__ import annotations

import dataclasses

from .. import configs as C
from ..train import TrainConfig


def imagenet200(width: float, name: str, local: bool) -> C.ExperimentConfig:
  """ImageNet-1k split into 5 blocks of 200 consecutive classes; every pair is merged.

  Training follows the 16-epoch ResNet-50 recipe of FFCV that the paper used: batch 1024,
  peak learning rate 1.7 after 2 epochs of linear warm-up then linear decay, weight decay
  1e-4 (the ImageNet value, rather than CIFAR's 5e-4), label smoothing 0.1.
  """
  config = C.ExperimentConfig(
      name=name,
      # 224x224 uint8 images: ~39 GB in memory for one 200-class task (260k images).
      datasets=(C.DataConfig(source="imagenet2012", image_size=224),),
      model=C.ModelConfig(factory="resnet50", width=width, num_outputs=200),
      head="ce",
      split=C.SplitConfig(num_classes=1000, num_tasks=5, seed=0, shuffle=False),
      train=TrainConfig(epochs=16, batch_size=1024, learning_rate=1.7, momentum=0.9,
                        weight_decay=1e-4, warmup_epochs=2, schedule="linear",
                        label_smoothing=0.1),
      num_runs=1,
      groups=C.all_pairs(5),
      calibration=C.CalibrationConfig(num_images=5000, batch_size=250, augmentation=True),
      merge=C.MergeConfig(methods=("ensemble", "weight_avg", "permute", "zipit"),
                          stop_points=(None, "stage3", "stage2", "stage1")),
      eval_batch_size=250,
      output_dir=f"runs/{name}",
  )
  if not local:
    return config
  return dataclasses.replace(
      config,
      name=f"{name}_local",
      datasets=(C.DataConfig(source="imagenet2012", image_size=64, max_per_class=40,
                             max_test_per_class=10),),
      model=C.ModelConfig(factory="resnet50", width=width / 4, num_outputs=10),
      split=C.SplitConfig(num_classes=20, num_tasks=2, seed=0, shuffle=False),
      train=TrainConfig(epochs=3, batch_size=40, learning_rate=0.1, warmup_epochs=1,
                        schedule="linear", label_smoothing=0.1),
      groups=((0, 1),),
      calibration=C.CalibrationConfig(num_images=200, batch_size=50, augmentation=True),
      merge=C.MergeConfig(methods=("ensemble", "weight_avg", "permute", "zipit"),
                          stop_points=(None, "stage2")),
      eval_batch_size=100,
      output_dir=f"runs/{name}_local",
  )
