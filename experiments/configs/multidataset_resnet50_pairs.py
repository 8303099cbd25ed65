"""Multi-dataset merging, pairs: ResNet-50s trained on different datasets, merged two at a time.

One model each on Stanford Dogs, Oxford-IIIT Pets, CUB-200-2011 and NABirds; each of the 6
pairs merged fully and partially (stops after stages 3, 2 and 1). Dogs, Pets and CUB come
from tensorflow-datasets (``pip install "zipjax[tfds]"``); NABirds from its release folder
(``images/``, ``images.txt``, ``train_test_split.txt``, ...), by default
``../shared/data/nabirds``: override with ``datasets.3.path=...``.

Run from the repository root:

  python -m experiments.run --config experiments/configs/multidataset_resnet50_pairs.py
  python -m experiments.run --config experiments/configs/multidataset_resnet50_pairs.py:local

The local variant (ResNet-50 x0.25 at 64x64, 8 images per class, 2 epochs) is a smoke test
of the pipeline on a CPU; it still needs the four datasets.
"""

from __future__ import annotations

from .. import configs as C
from . import _multidataset


def get_config(arg: str | None = None) -> C.ExperimentConfig:
  return _multidataset.multidataset("multidataset_resnet50_pairs", C.all_pairs(4),
                                    C.check_arg(arg, __name__))
