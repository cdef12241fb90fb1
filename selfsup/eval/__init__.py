"""Evaluation of frozen backbones: feature extraction, kNN monitor, linear probes.

* :func:`extract_features` runs a backbone in eval mode under ``no_grad`` over a loader.
* :func:`knn_scores` / :func:`knn_accuracy`: the weighted kNN classifier of the MMCR monitor.
* :func:`linear_probe_cached` / :func:`linear_probe_augmented`: frozen linear probes selected on
  a held-out part of train, reporting best-on-validation and last-epoch test accuracy.
"""

from selfsup.eval.features import eval_mode, extract_features
from selfsup.eval.knn import knn_accuracy, knn_scores, topk_accuracy
from selfsup.eval.linear import (
    ProbeResult,
    build_linear_head,
    evaluate_head,
    linear_probe_augmented,
    linear_probe_cached,
    split_train_val,
    train_linear_on_features,
)

__all__ = [
    "ProbeResult",
    "build_linear_head",
    "eval_mode",
    "evaluate_head",
    "extract_features",
    "knn_accuracy",
    "knn_scores",
    "linear_probe_augmented",
    "linear_probe_cached",
    "split_train_val",
    "topk_accuracy",
    "train_linear_on_features",
]
