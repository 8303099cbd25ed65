"""CIFAR-10 (5+5), ResNet-20 x1, CLIP heads: the CPU-scale setting of the analysis sweeps
(Figs. 8-10, Table 4) and of the committed Table 1 in
experiments/results/cifar10_5+5_resnet20x1_cpu (same source models: 3 pairs, 2,000 training
images per class, 6 epochs; 2,000 calibration images without augmentation).

Run from the repository root (data paths are relative to it); point ``--checkpoints`` at the
runner's checkpoints to reuse its trained models:

  python -m experiments.run --config cifar10_resnet20x1_sweeps --out runs/cifar10_r20x1
  python -m experiments.sweeps --config cifar10_resnet20x1_sweeps --sweep beta \\
      --checkpoints runs/cifar10_r20x1/checkpoints --out runs/cifar10_r20x1_beta
  python -m experiments.sweeps --config cifar10_resnet20x1_sweeps --sweep matchers \\
      --checkpoints runs/cifar10_r20x1/checkpoints --out runs/cifar10_r20x1_matchers
  python -m experiments.sweeps --config cifar10_resnet20x1_sweeps --sweep calibration \\
      --checkpoints runs/cifar10_r20x1/checkpoints --out runs/cifar10_r20x1_calibration
  python -m experiments.sweeps --config cifar10_resnet20x1_sweeps:local --sweep width \\
      --values 0.5,1,2 --out runs/cifar10_r20_width

The ``local`` variant (one pair, 1,000 training images per class, 4 epochs, 200 test images
per class) is sized for the width sweep, which trains new models at every width.
"""

from __future__ import annotations

import dataclasses

from .. import configs as C
from . import cifar10_resnet20x4_clip


def get_config(arg: str | None = None) -> C.ExperimentConfig:
  local = C.check_arg(arg, __name__)
  base = cifar10_resnet20x4_clip.get_config("local")
  config = dataclasses.replace(
      base,
      name="cifar10_resnet20x1_sweeps",
      datasets=(dataclasses.replace(base.data, max_per_class=2000, max_test_per_class=500),),
      train=dataclasses.replace(base.train, epochs=6, batch_size=128),
      num_runs=3,
      calibration=C.CalibrationConfig(num_images=2000, batch_size=250, augmentation=False),
      merge=C.MergeConfig(methods=("ensemble", "weight_avg", "git_rebasin", "permute",
                                   "zipit"),
                          stop_points=(None, "stage3", "stage2", "stage1")),
      output_dir="runs/cifar10_resnet20x1_sweeps")
  if not local:
    return config
  return dataclasses.replace(
      config, name="cifar10_resnet20x1_sweeps_local",
      datasets=(dataclasses.replace(config.data, max_per_class=1000, max_test_per_class=200),),
      train=dataclasses.replace(config.train, epochs=4),
      num_runs=1,
      calibration=dataclasses.replace(config.calibration, num_images=1000),
      output_dir="runs/cifar10_resnet20x1_sweeps_local")
