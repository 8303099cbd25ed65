"""Models with their zip specs: each factory returns ``(flax.linen module, Spec)``."""

from zipjax.models.mlp import mlp
from zipjax.models.resnet import resnet20
from zipjax.models.resnet import resnet50
from zipjax.models.vgg import vgg11
from zipjax.models.vgg import vgg16

__all__ = (
    "mlp",
    "resnet20",
    "resnet50",
    "vgg11",
    "vgg16",
)
