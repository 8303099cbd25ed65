"""The embedded default: scikit-learn's bundled 8x8 digits (no download), 5+5 classes.

Two ResNet-20s (width 1) with CLIP-style heads (fixed random orthonormal class embeddings),
each trained on 5 random digits, merged with every method, fully and at every stage end.
Runs in a few minutes on a 2-core CPU; this is what ``python -m experiments`` runs. The
``local`` variant is a one-pair, one-minute smoke run.

  python -m experiments
  python -m experiments.run --config digits_default --set num_runs=3
  python -m experiments.run --config digits_default:local
"""

from __future__ import annotations

import dataclasses

from .. import configs as C
from ..train import TrainConfig


def get_config(arg: str | None = None) -> C.ExperimentConfig:
  local = C.check_arg(arg, __name__)
  config = C.ExperimentConfig(
      name="digits_default",
      datasets=(C.DataConfig(source="digits", max_per_class=200),),  # all (~135 per class)
      model=C.ModelConfig(factory="resnet20", width=1, num_outputs=64),
      head="clip",
      split=C.SplitConfig(num_classes=10, num_tasks=2, seed=0),
      train=TrainConfig(epochs=30, batch_size=64, learning_rate=0.1, warmup_epochs=2,
                        augmentation=False),
      num_runs=2,
      calibration=C.CalibrationConfig(num_images=500, batch_size=250, augmentation=False),
      merge=C.MergeConfig(methods=("ensemble", "weight_avg", "git_rebasin", "permute", "zipit"),
                          stop_points=(None, "stage2", "stage1")),
      eval_batch_size=500,
      output_dir="runs/digits_default",
  )
  if not local:
    return config
  return dataclasses.replace(
      config, name="digits_default_local", num_runs=1,
      train=dataclasses.replace(config.train, epochs=10),
      output_dir="runs/digits_default_local")
