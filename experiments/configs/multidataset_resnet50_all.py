"""Multi-dataset merging, all four: ResNet-50s of Dogs, Pets, CUB and NABirds merged at once.

One model each on Stanford Dogs, Oxford-IIIT Pets, CUB-200-2011 and NABirds, all four merged
into one (N = 4: ZipIt!'s repeated matching, alpha, matters here), fully and partially. Data
as in ``multidataset_resnet50_pairs``.

Run from the repository root:

  python -m experiments.run --config experiments/configs/multidataset_resnet50_all.py
  python -m experiments.run --config experiments/configs/multidataset_resnet50_all.py:local

The local variant (ResNet-50 x0.25 at 64x64, 8 images per class, 2 epochs) is a smoke test
of the pipeline on a CPU; it still needs the four datasets.
"""

from __future__ import annotations

from .. import configs as C
from . import _multidataset


def get_config(arg: str | None = None) -> C.ExperimentConfig:
  return _multidataset.multidataset("multidataset_resnet50_all", ((0, 1, 2, 3),),
                                    C.check_arg(arg, __name__))
