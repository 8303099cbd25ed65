"""Matchers (factories returning ``matcher(corr, *, num_models) -> Merge``) and merges."""

from zipjax._src.match import by_space
from zipjax._src.match import BySpace
from zipjax._src.match import greedy
from zipjax._src.match import greedy_reference
from zipjax._src.match import group_similarity
from zipjax._src.match import identity
from zipjax._src.match import kmeans
from zipjax._src.match import match_in_groups
from zipjax._src.match import Matcher
from zipjax._src.match import OwnCorrelation
from zipjax._src.official import official
from zipjax._src.official import OfficialMatcher
from zipjax._src.official import official_budget
from zipjax._src.official import official_correlation
from zipjax._src.match import WholeModelMatcher
from zipjax._src.merge import DenseMerge
from zipjax._src.merge import GroupMerge
from zipjax._src.merge import Merge
from zipjax._src.merge import merge_from_groups
from zipjax._src.match import optimal
from zipjax._src.match import pair_groups
from zipjax._src.match import permute
from zipjax._src.match import same_model_budget
from zipjax._src.weight_matching import weight_matching

__all__ = (
    "by_space",
    "BySpace",
    "DenseMerge",
    "greedy",
    "greedy_reference",
    "GroupMerge",
    "group_similarity",
    "identity",
    "kmeans",
    "match_in_groups",
    "Matcher",
    "Merge",
    "merge_from_groups",
    "official",
    "OfficialMatcher",
    "official_budget",
    "official_correlation",
    "optimal",
    "OwnCorrelation",
    "pair_groups",
    "permute",
    "same_model_budget",
    "weight_matching",
    "WholeModelMatcher",
)
