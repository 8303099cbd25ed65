"""CIFAR-10 (5+5), ResNet-20 x1, CLIP-style heads, trained well: the reference pairs.

Three pairs, each on its own random 5+5 class split, each model trained on all 5,000 images
of its five classes for 25 epochs (SGD, batch 128, peak learning rate 0.1 after one epoch of
warm-up, then linear decay; crop and flip). Then merged fully and partially (stops after stage
3, 2 and 1). Training checkpoints after every epoch and resumes, so it can span several runs
of the command. Training is data-parallel over every local device; on a CPU, split the cores
into 8 devices (about 85 minutes a model on 2 cores). The training state of a model in
progress may be kept in experiments/results/cifar10_resnet20x1_clip/training (pass it as
--checkpoints) so that a later checkout resumes it:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python -m experiments.run --config cifar10_resnet20x1_clip --out runs/cifar10_r20x1_clip \\
      --checkpoints experiments/results/cifar10_resnet20x1_clip/training --train-only

then merge and evaluate on one device (the same command without XLA_FLAGS and --train-only):
the calibration batches of 500 are not a multiple of 8, so on 8 simulated devices each
BatchNorm reset would compute every batch on every device.

The ``local`` variant (one pair, 500 images per class, 2 epochs) checks the pipeline in a few
minutes.
"""

from __future__ import annotations

import dataclasses

from .. import configs as C
from . import _cifar
from ..train import TrainConfig

DATA = "../shared/data/cifar10"
EMBEDDINGS = "../shared/data/clip/cifar10_class_names_clip_features.csv"


def get_config(arg: str | None = None) -> C.ExperimentConfig:
  local = C.check_arg(arg, __name__)
  config = dataclasses.replace(
      _cifar.paper(
          "cifar10_resnet20x1_clip",
          data=C.DataConfig(source="cifar10_npz", path=DATA, class_embeddings=EMBEDDINGS),
          model=C.ModelConfig(factory="resnet20", width=1, num_outputs=C.CLIP_DIM),
          head="clip", num_classes=10, stop_points=(None, "stage3", "stage2", "stage1")),
      train=TrainConfig(epochs=25, batch_size=128, learning_rate=0.1, warmup_epochs=1,
                        schedule="linear"),
      num_runs=3,
      calibration=C.CalibrationConfig(num_images=5000, batch_size=500, augmentation=True),
      merge=C.MergeConfig(methods=_cifar.PAPER_METHODS + ("zipit_official",),
                          stop_points=(None, "stage3", "stage2", "stage1")))
  if not local:
    return config
  return dataclasses.replace(
      config, name="cifar10_resnet20x1_clip_local",
      datasets=(dataclasses.replace(config.data, max_per_class=500, max_test_per_class=100),),
      train=dataclasses.replace(config.train, epochs=2),
      num_runs=1,
      calibration=dataclasses.replace(config.calibration, num_images=500, batch_size=250),
      output_dir="runs/cifar10_resnet20x1_clip_local")
