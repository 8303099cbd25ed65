"""CIFAR-100 (50+50): ResNet-20 x16 with cross-entropy heads (the paper's appendix).

Two models per run, each with a 50-way cross-entropy head trained from its own
initialisation on 50 random classes of CIFAR-100; merged fully and partially. The heads are
task-specific, so a full zip is compared on each task with that task's head. CIFAR-100 comes
from tensorflow-datasets (``pip install "zipjax[tfds]"``).

Run from the repository root:

  python -m experiments.run --config experiments/configs/cifar100_resnet20x16_ce.py
  python -m experiments.run --config experiments/configs/cifar100_resnet20x16_ce.py:local

The local variant (ResNet-20 x1, 10 classes split 5+5, 200 images per class, 4 epochs) trains
its two models in well under a minute on a 2-core CPU.
"""

from __future__ import annotations

from .. import configs as C
from . import _cifar


def get_config(arg: str | None = None) -> C.ExperimentConfig:
  config = _cifar.paper(
      "cifar100_resnet20x16_ce", data=C.DataConfig(source="cifar100"),
      model=C.ModelConfig(factory="resnet20", width=16, num_outputs=50), head="ce",
      num_classes=100, stop_points=(None, "stage2", "stage1"))
  if not C.check_arg(arg, __name__):
    return config
  return _cifar.local(config, max_per_class=200, max_test_per_class=50,
                      model=C.ModelConfig(factory="resnet20", width=1, num_outputs=5),
                      num_classes=10, epochs=4, calibration_images=500,
                      stop_points=(None, "stage2"))
