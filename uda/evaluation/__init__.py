"""Evaluation: features (+flip, multi-scale), chunked distances and ensembles of them, k-reciprocal re-ranking, mAP / CMC / mINP."""
from uda.evaluation.distance import ensemble_distance, ensemble_weights, pairwise_distance
from uda.evaluation.features import extract_features, fold_batchnorm
from uda.evaluation.metrics import AP_DEFINITIONS, evaluate
from uda.evaluation.rerank import re_ranking

__all__ = ["AP_DEFINITIONS", "ensemble_distance", "ensemble_weights", "evaluate", "extract_features", "fold_batchnorm", "pairwise_distance",
           "re_ranking"]
