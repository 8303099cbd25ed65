"""ImageNet-1k (200+200): ResNet-50 x1.5 with cross-entropy heads.

As ``imagenet200_resnet50x1`` with 1.5 times the channels: the paper's evidence that ZipIt!
gains most from extra width. ImageNet comes from tensorflow-datasets
(``pip install "zipjax[tfds]"``; put the ILSVRC2012 tar files in
``<tfds data folder>/downloads/manual/`` first).

Run from the repository root:

  python -m experiments.run --config experiments/configs/imagenet200_resnet50x1_5.py
  python -m experiments.run --config experiments/configs/imagenet200_resnet50x1_5.py:local

The local variant (ResNet-50 x0.375 at 64x64, 20 classes split 10+10, 40 images per class,
3 epochs) is a smoke test of the pipeline on a CPU; it still needs the prepared dataset.
"""

from __future__ import annotations

from .. import configs as C
from . import _imagenet


def get_config(arg: str | None = None) -> C.ExperimentConfig:
  return _imagenet.imagenet200(1.5, "imagenet200_resnet50x1_5", C.check_arg(arg, __name__))
