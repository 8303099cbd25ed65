"""CIFAR-10 (5+5), a small ViT, CLIP-style heads: attention heads merged against the baselines.

Three pairs, each on its own random 5+5 class split. Each model is a ViT of width 128, depth 4,
4 heads of 32 features, MLP 256, patches of 4 pixels and a class token, trained from its own
initialisation on 2,000 images of each of its five classes for 20 epochs (AdamW, batch 128,
peak learning rate 1e-3 after one epoch of warm-up, then cosine decay; crop and flip).
Then merged fully by weight averaging, Permute and ZipIt! with each attention treatment of
``experiments.evaluate.ATTENTION`` (heads paired and merged, heads merged in place, attention
left unmerged). The residual stream runs through every block, so there is no partial zip.
On a CPU, split the cores into 8 devices (about 12 minutes a model on 2 cores):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python -m experiments.run --config cifar10_vit_clip

The ``local`` variant (one pair, 300 images per class, 2 epochs, width 64) checks the
pipeline in a few minutes.
"""

from __future__ import annotations

import dataclasses

from .. import configs as C
from ..train import TrainConfig

DATA = "../shared/data/cifar10"
EMBEDDINGS = "../shared/data/clip/cifar10_class_names_clip_features.csv"
METHODS = ("ensemble", "weight_avg", "permute", "zipit", "zipit_stream_permute",
           "zipit_heads_in_place", "zipit_attention_unmerged")


def _model(width: int) -> C.ModelConfig:
  return C.ModelConfig(factory="vit", width=width, num_outputs=C.CLIP_DIM,
                       options=(("depth", 4), ("num_heads", 4), ("mlp_dim", 2 * width),
                                ("patch", 4)))


def get_config(arg: str | None = None) -> C.ExperimentConfig:
  local = C.check_arg(arg, __name__)
  config = C.ExperimentConfig(
      name="cifar10_vit_clip",
      datasets=(C.DataConfig(source="cifar10_npz", path=DATA, class_embeddings=EMBEDDINGS,
                             max_per_class=2000),),
      model=_model(128),
      head="clip",
      split=C.SplitConfig(num_classes=10, num_tasks=2, seed=0),
      train=TrainConfig(epochs=20, batch_size=128, learning_rate=1e-3, weight_decay=0.05,
                        warmup_epochs=1, schedule="cosine", optimizer="adamw"),
      num_runs=3,
      groups=((0, 1),),
      calibration=C.CalibrationConfig(num_images=2000, batch_size=500, augmentation=True),
      merge=C.MergeConfig(methods=METHODS, stop_points=(None,)),
      output_dir="runs/cifar10_vit_clip")
  if not local:
    return config
  return dataclasses.replace(
      config, name="cifar10_vit_clip_local",
      datasets=(dataclasses.replace(config.data, max_per_class=300, max_test_per_class=100),),
      model=_model(64),
      train=dataclasses.replace(config.train, epochs=2),
      num_runs=1,
      calibration=dataclasses.replace(config.calibration, num_images=500, batch_size=250),
      output_dir="runs/cifar10_vit_clip_local")
