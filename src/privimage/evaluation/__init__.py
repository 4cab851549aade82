"""Metrics of synthetic images: FID, precision/recall, downstream accuracy, memorisation."""

from privimage.evaluation.downstream import downstream_accuracy
from privimage.evaluation.fid import (
    FeatureStats,
    InceptionFeatures,
    feature_stats,
    fid_from_features,
    fid_from_stats,
)
from privimage.evaluation.manifold import precision_recall
from privimage.evaluation.memorization import closest_pairs_figure, memorization

__all__ = [
    "FeatureStats",
    "InceptionFeatures",
    "closest_pairs_figure",
    "downstream_accuracy",
    "feature_stats",
    "fid_from_features",
    "fid_from_stats",
    "memorization",
    "precision_recall",
]
