"""Evaluation: features (+flip), chunked distances, k-reciprocal re-ranking, mAP / CMC / mINP."""
from uda.evaluation.distance import pairwise_distance
from uda.evaluation.features import extract_features, fold_batchnorm
from uda.evaluation.metrics import AP_DEFINITIONS, evaluate
from uda.evaluation.rerank import re_ranking

__all__ = ["AP_DEFINITIONS", "evaluate", "extract_features", "fold_batchnorm", "pairwise_distance", "re_ranking"]
