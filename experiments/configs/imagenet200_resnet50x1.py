"""ImageNet-1k (200+200): ResNet-50 x1 with cross-entropy heads.

Five models, each trained from its own initialisation on a block of 200 consecutive ImageNet
classes; every pair (10 pairs) merged fully and partially (stops after stages 3, 2 and 1).
ImageNet comes from tensorflow-datasets (``pip install "zipjax[tfds]"``), which cannot
download it: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in
``<tfds data folder>/downloads/manual/`` first. Each model loads only its 200 classes
(~39 GB as 224x224 uint8; lower ``data.image_size`` or set ``data.max_per_class`` on smaller
machines).

Run from the repository root:

  python -m experiments.run --config experiments/configs/imagenet200_resnet50x1.py
  python -m experiments.run --config experiments/configs/imagenet200_resnet50x1.py:local

The local variant (ResNet-50 x0.25 at 64x64, 20 classes split 10+10, 40 images per class,
3 epochs) is a smoke test of the pipeline on a CPU; it still needs the prepared dataset.
"""

from __future__ import annotations

from .. import configs as C
from . import _imagenet


def get_config(arg: str | None = None) -> C.ExperimentConfig:
  return _imagenet.imagenet200(1.0, "imagenet200_resnet50x1", C.check_arg(arg, __name__))
