"""Building zip specs: spaces, per-axis roles and helpers per module type."""

from zipjax._src.spec import Axis
from zipjax._src.spec import batchnorm
from zipjax._src.spec import capture
from zipjax._src.spec import compress_groups
from zipjax._src.spec import conv
from zipjax._src.spec import dense
from zipjax._src.spec import expand_groups
from zipjax._src.spec import FEATURES
from zipjax._src.spec import IN
from zipjax._src.spec import last_captures
from zipjax._src.spec import layernorm
from zipjax._src.spec import linen_spec
from zipjax._src.nnx import nnx_spec
from zipjax._src.spec import OUT
from zipjax._src.spec import Space
from zipjax._src.spec import Spec
from zipjax._src.spec import validate
from zipjax._src.spec import VAR

__all__ = (
    "Axis",
    "batchnorm",
    "capture",
    "compress_groups",
    "conv",
    "dense",
    "expand_groups",
    "FEATURES",
    "IN",
    "last_captures",
    "layernorm",
    "linen_spec",
    "nnx_spec",
    "OUT",
    "Space",
    "Spec",
    "validate",
    "VAR",
)
