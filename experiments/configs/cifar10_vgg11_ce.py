"""CIFAR-10 (5+5): VGG-11 (BatchNorm) with cross-entropy heads (the paper's appendix).

Two models per run, each with a 5-way cross-entropy head trained from its own initialisation
on 5 random classes of CIFAR-10; merged fully and partially (every conv is a stop point; the
config compares stops after the 4th and the 2nd conv).

Run from the repository root (data paths are relative to it):

  python -m experiments.run --config experiments/configs/cifar10_vgg11_ce.py
  python -m experiments.run --config experiments/configs/cifar10_vgg11_ce.py:local

The local variant (VGG-11 x0.25, 500 training images per class, 4 epochs) trains its two
models in a few minutes on a 2-core CPU.
"""

from __future__ import annotations

from .. import configs as C
from . import _cifar

DATA = "../shared/data/cifar10"


def get_config(arg: str | None = None) -> C.ExperimentConfig:
  config = _cifar.paper(
      "cifar10_vgg11_ce", data=C.DataConfig(source="cifar10_npz", path=DATA),
      model=C.ModelConfig(factory="vgg11", width=1, num_outputs=5), head="ce",
      num_classes=10, stop_points=(None, "conv3", "conv1"))
  if not C.check_arg(arg, __name__):
    return config
  return _cifar.local(config, max_per_class=500, max_test_per_class=200,
                      model=C.ModelConfig(factory="vgg11", width=0.25, num_outputs=5),
                      epochs=4, calibration_images=1000, stop_points=(None, "conv3"))
