"""Matchers: factories returning ``matcher(corr, *, num_models) -> Merge(M, U)``."""

from zipjax._src.match import greedy
from zipjax._src.match import greedy_reference
from zipjax._src.match import identity
from zipjax._src.match import Matcher
from zipjax._src.match import Merge
from zipjax._src.match import merge_from_groups
from zipjax._src.match import permute
from zipjax._src.match import same_model_budget

__all__ = (
    "greedy",
    "greedy_reference",
    "identity",
    "Matcher",
    "Merge",
    "merge_from_groups",
    "permute",
    "same_model_budget",
)
