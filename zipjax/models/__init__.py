"""Models with their zip specs: each factory returns ``(module, Spec)``: a flax.linen module,
or for ``nnx_*`` an initialised Flax NNX module."""

from zipjax.models.mlp import mlp
from zipjax.models.official import from_official_resnet20
from zipjax.models.official import from_official_vgg
from zipjax.models.official import load_torch_checkpoint
from zipjax.models.resnet import nnx_resnet20
from zipjax.models.vit import nnx_vit
from zipjax.models.resnet import resnet20
from zipjax.models.resnet import resnet50
from zipjax.models.vgg import vgg11
from zipjax.models.vgg import vgg16
from zipjax.models.vit import vit

__all__ = (
    "from_official_resnet20",
    "from_official_vgg",
    "load_torch_checkpoint",
    "mlp",
    "nnx_resnet20",
    "nnx_vit",
    "resnet20",
    "resnet50",
    "vgg11",
    "vgg16",
    "vit",
)
