"""Models with their zip specs: each factory returns ``(module, Spec)``: a flax.linen module,
or for ``nnx_*`` an initialised Flax NNX module."""

from zipjax.models.mlp import mlp
from zipjax.models.resnet import nnx_resnet20
from zipjax.models.resnet import resnet20
from zipjax.models.resnet import resnet50
from zipjax.models.vgg import vgg11
from zipjax.models.vgg import vgg16

__all__ = (
    "mlp",
    "nnx_resnet20",
    "resnet20",
    "resnet50",
    "vgg11",
    "vgg16",
)
