"""CIFAR-10 (5+5): VGG-11 (BatchNorm) with cross-entropy heads (the paper's appendix).

Two models per run, each with a 5-way cross-entropy head trained from its own initialisation
on 5 random classes of CIFAR-10; merged fully and partially (every conv is a stop point; the
config compares stops after the 4th and the 2nd conv).

Run from the repository root (data paths are relative to it):

  python -m experiments.run --config experiments/configs/cifar10_vgg11_ce.py
  python -m experiments.run --config experiments/configs/cifar10_vgg11_ce.py:local

The local variant (VGG-11 x0.25, 500 training images per class, 4 epochs) trains its two
models in a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses

from experiments import configs as C
from experiments.train import TrainConfig

DATA = "../shared/data/cifar10"


def get_config(arg: str | None = None) -> C.ExperimentConfig:
  local = C.check_arg(arg, __name__)
  config = C.ExperimentConfig(
      name="cifar10_vgg11_ce",
      datasets=(C.DataConfig(source="cifar10_npz", path=DATA),),
      model=C.ModelConfig(factory="vgg11", width=1, num_outputs=5),
      head="ce",
      split=C.SplitConfig(num_classes=10, num_tasks=2, seed=0),
      train=TrainConfig(epochs=100, batch_size=500, learning_rate=0.4, momentum=0.9,
                        weight_decay=5e-4, warmup_epochs=5, schedule="linear"),
      num_runs=5,
      groups=((0, 1),),
      calibration=C.CalibrationConfig(num_images=5000, batch_size=500, augmentation=True),
      merge=C.MergeConfig(methods=("ensemble", "weight_avg", "git_rebasin", "permute", "zipit"),
                          stop_points=(None, "conv3", "conv1")),
      output_dir="runs/cifar10_vgg11_ce",
  )
  if not local:
    return config
  return dataclasses.replace(
      config,
      name="cifar10_vgg11_ce_local",
      datasets=(dataclasses.replace(config.data, max_per_class=500, max_test_per_class=200),),
      model=C.ModelConfig(factory="vgg11", width=0.25, num_outputs=5),
      train=TrainConfig(epochs=4, batch_size=100, learning_rate=0.1, warmup_epochs=1,
                        schedule="linear"),
      num_runs=1,
      calibration=C.CalibrationConfig(num_images=1000, batch_size=250, augmentation=True),
      merge=C.MergeConfig(methods=("ensemble", "weight_avg", "permute", "zipit"),
                          stop_points=(None, "conv3")),
      output_dir="runs/cifar10_vgg11_ce_local",
  )
