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

from .. import configs as C
from . import _cifar

EMBEDDINGS = "../shared/data/clip/cifar100_class_names_clip_features.csv"


def get_config(arg: str | None = None) -> C.ExperimentConfig:
  config = _cifar.paper(
      "cifar100_resnet20x8_clip",
      data=C.DataConfig(source="cifar100", class_embeddings=EMBEDDINGS),
      model=C.ModelConfig(factory="resnet20", width=8, num_outputs=C.CLIP_DIM), head="clip",
      num_classes=100, stop_points=(None, "stage2", "stage1"))
  if not C.check_arg(arg, __name__):
    return config
  return _cifar.local(config, max_per_class=200, max_test_per_class=50,
                      model=C.ModelConfig(factory="resnet20", width=1, num_outputs=C.CLIP_DIM),
                      num_classes=10, epochs=4, calibration_images=500,
                      stop_points=(None, "stage2"))
