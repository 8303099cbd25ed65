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

from .. import configs as C
from . import _cifar

DATA = "../shared/data/cifar10"
EMBEDDINGS = "../shared/data/clip/cifar10_class_names_clip_features.csv"


def get_config(arg: str | None = None) -> C.ExperimentConfig:
  config = _cifar.paper(
      "cifar10_resnet20x4_clip",
      data=C.DataConfig(source="cifar10_npz", path=DATA, class_embeddings=EMBEDDINGS),
      model=C.ModelConfig(factory="resnet20", width=4, num_outputs=C.CLIP_DIM), head="clip",
      num_classes=10, stop_points=(None, "stage2", "stage1"))
  if not C.check_arg(arg, __name__):
    return config
  return _cifar.local(config, max_per_class=800, max_test_per_class=200,
                      model=C.ModelConfig(factory="resnet20", width=1, num_outputs=C.CLIP_DIM),
                      epochs=5, calibration_images=1000, stop_points=(None, "stage2", "stage1"))
