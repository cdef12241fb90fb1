"""Evaluation of frozen backbones: feature extraction, kNN monitor, linear probes.

* :func:`extract_features` runs a backbone in eval mode under ``no_grad`` over a loader.
* :func:`knn_scores` / :func:`knn_accuracy`: the weighted kNN classifier of the MMCR monitor;
  :func:`knn_topk`, :func:`merge_topk` and :func:`vote` are its pieces (a bank scored shard by shard).
* :func:`linear_probe_cached` / :func:`linear_probe_augmented`: frozen linear probes configured by a
  :class:`ProbeConfig`, selected on a held-out part of train, reporting best-on-validation and
  last-epoch test accuracy.
* :data:`PROTOCOLS`: the seeds' linear-probe protocols as named presets (:mod:`selfsup.eval.protocols`).
"""

from selfsup.eval.features import check_labels, eval_mode, extract_features
from selfsup.eval.knn import knn_accuracy, knn_scores, knn_topk, merge_topk, topk_accuracy, vote
from selfsup.eval.linear import (
    ProbeConfig,
    ProbeResult,
    build_linear_head,
    evaluate_head,
    linear_probe_augmented,
    linear_probe_cached,
    split_train_val,
    train_linear_on_features,
)
from selfsup.eval.protocols import PROTOCOLS, Protocol, get_protocol

__all__ = [
    "PROTOCOLS",
    "ProbeConfig",
    "ProbeResult",
    "Protocol",
    "build_linear_head",
    "check_labels",
    "eval_mode",
    "evaluate_head",
    "extract_features",
    "get_protocol",
    "knn_accuracy",
    "knn_scores",
    "knn_topk",
    "linear_probe_augmented",
    "linear_probe_cached",
    "merge_topk",
    "split_train_val",
    "topk_accuracy",
    "train_linear_on_features",
    "vote",
]
