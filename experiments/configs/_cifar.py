"""The shared part of the CIFAR configs: the paper's recipe and the shape of a local variant."""

from __future__ import annotations

import dataclasses

from .. import configs as C
from ..train import TrainConfig

#: SGD, momentum 0.9, weight decay 5e-4, batch 500, peak learning rate 0.4 after 5 epochs of
#: warm-up, then linear decay over 100 epochs.
PAPER_TRAIN = TrainConfig(epochs=100, batch_size=500, learning_rate=0.4, momentum=0.9,
                          weight_decay=5e-4, warmup_epochs=5, schedule="linear")
PAPER_METHODS = ("ensemble", "weight_avg", "git_rebasin", "permute", "zipit")
LOCAL_METHODS = ("ensemble", "weight_avg", "permute", "zipit")


def paper(name: str, *, data: C.DataConfig, model: C.ModelConfig, head: str,
          num_classes: int, stop_points: tuple) -> C.ExperimentConfig:
  """A CIFAR experiment as the paper runs it: 5 runs of one pair, 5000 calibration images."""
  return C.ExperimentConfig(
      name=name,
      datasets=(data,),
      model=model,
      head=head,
      split=C.SplitConfig(num_classes=num_classes, num_tasks=2, seed=0),
      train=PAPER_TRAIN,
      num_runs=5,
      groups=((0, 1),),
      calibration=C.CalibrationConfig(num_images=5000, batch_size=500, augmentation=True),
      merge=C.MergeConfig(methods=PAPER_METHODS, stop_points=stop_points),
      output_dir=f"runs/{name}",
  )


def local(config: C.ExperimentConfig, *, max_per_class: int, max_test_per_class: int,
          model: C.ModelConfig, epochs: int, calibration_images: int, stop_points: tuple,
          num_classes: int | None = None) -> C.ExperimentConfig:
  """The CPU-sized variant of ``config``: one run, fewer images, a narrow model."""
  name = f"{config.name}_local"
  split = config.split if num_classes is None else dataclasses.replace(
      config.split, num_classes=num_classes)
  return dataclasses.replace(
      config,
      name=name,
      datasets=(dataclasses.replace(config.data, max_per_class=max_per_class,
                                    max_test_per_class=max_test_per_class),),
      model=model,
      split=split,
      train=TrainConfig(epochs=epochs, batch_size=100, learning_rate=0.1, warmup_epochs=1,
                        schedule="linear"),
      num_runs=1,
      calibration=C.CalibrationConfig(num_images=calibration_images, batch_size=250,
                                      augmentation=True),
      merge=C.MergeConfig(methods=LOCAL_METHODS, stop_points=stop_points),
      output_dir=f"runs/{name}",
  )
