"""zipjax: merge neural networks trained on different tasks, without training (ZipIt!)."""

from zipjax import match
from zipjax import metrics
from zipjax import models
from zipjax import spec
from zipjax._src.batchnorm import reset_batchnorm
from zipjax._src.errors import DataError
from zipjax._src.errors import MismatchError
from zipjax._src.errors import SpecError
from zipjax._src.errors import UnmergedWarning
from zipjax._src.explain import explain
from zipjax._src.explain import Explanation
from zipjax._src.infer import infer_linen_spec
from zipjax._src.infer import infer_spec
from zipjax._src.io import load
from zipjax._src.io import save
from zipjax._src.nnx import infer_nnx_spec
from zipjax._src.multihead import ensemble
from zipjax._src.multihead import MultiHead
from zipjax._src.spec import check_spec
from zipjax._src.spec import permute_spaces
from zipjax._src.spec import Spec
from zipjax._src.stats import compute_stats
from zipjax._src.stats import correlation
from zipjax._src.stats import FeatureStats
from zipjax._src.apply import apply_merges
from zipjax._src.zipping import compute_merges
# `zip` is not in __all__, so `from zipjax import *` leaves the builtin alone: call zipjax.zip.
from zipjax._src.zipping import zip  # noqa: F401  pylint: disable=redefined-builtin
from zipjax._src.zipping import zip_many

__version__ = "0.1.0"

__all__ = (
    "apply_merges",
    "check_spec",
    "compute_merges",
    "compute_stats",
    "correlation",
    "DataError",
    "ensemble",
    "explain",
    "Explanation",
    "FeatureStats",
    "infer_linen_spec",
    "infer_nnx_spec",
    "load",
    "infer_spec",
    "match",
    "metrics",
    "MismatchError",
    "models",
    "MultiHead",
    "permute_spaces",
    "reset_batchnorm",
    "save",
    "spec",
    "Spec",
    "SpecError",
    "UnmergedWarning",
    "zip_many",
)
