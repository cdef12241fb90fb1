"""Frozen linear probe, done right (spec §5.2 and §8).

What the reference repositories got wrong and what this module does instead:

* **Frozen means frozen.** The backbone runs in eval mode under ``torch.no_grad()``: BatchNorm
  uses its running statistics and never updates them, and no backbone parameter receives a
  gradient. Only the head trains.
* **Selection never sees the test split.** A stratified, deterministic part of the *train* split
  (:func:`split_train_val`) is held out as validation. The epoch and the (lr, weight decay)
  candidate are chosen by validation top-1; the test split is then scored once with the selected
  head (best validation epoch) and once with the last-epoch head of the same candidate, and both
  numbers are reported.

Everything a probe trains with is one :class:`ProbeConfig` (epochs, lr / weight-decay grid,
batch, optimiser, head, schedule, validation fraction, seed); the named presets of the seeds'
protocols live in :mod:`selfsup.eval.protocols`. Two ways to feed the head share one loop:

* :func:`linear_probe_cached` trains on pre-extracted features (fast; no augmentation).
* :func:`linear_probe_augmented` forwards the frozen backbone on a freshly augmented view of
  every training image at every epoch (the seeds' protocol); validation and test features use
  the eval transform and are extracted once.

With the same inputs (no augmentation), the same config, both see identical mini-batches in
identical order and reach the same numbers.

The head is ``BatchNorm1d(F, affine=False)`` (parameter-free feature standardisation, MAE/MEC
style; ``feature_norm="none"`` drops it, as the MMCR seeds do) followed by ``Linear(F, C)``
initialised ``N(0, 0.01)`` with zero bias, trained with cross-entropy, SGD / Adam / LARS
(:func:`selfsup.engine.optim.build_optimizer`) and the shared per-step schedule
:class:`selfsup.engine.optim.WarmupSchedule` (linear warm-up whose first step already has a
non-zero lr, then half-cosine). Weight decay applies to the linear weight only (not the bias).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from selfsup.engine.optim import build_optimizer, build_scheduler, scaled_lr
from selfsup.eval.features import _autocast, check_labels, eval_mode, extract_features, split_batch
from selfsup.eval.knn import topk_accuracy

__all__ = [
    "ProbeConfig",
    "ProbeResult",
    "build_linear_head",
    "evaluate_head",
    "linear_probe_augmented",
    "linear_probe_cached",
    "split_train_val",
    "train_linear_on_features",
]

OptimizerName = Literal["sgd", "adam", "lars"]
FeatureNorm = Literal["bn", "none"]

#: A function mapping the list of index batches of one epoch to ``(features, labels)`` batches.
BatchSource = Callable[[list[Tensor]], Iterable[tuple[Tensor, Tensor]]]


def _floats(value: float | Sequence[float], name: str) -> tuple[float, ...]:
    out = (float(value),) if isinstance(value, (int, float)) else tuple(float(v) for v in value)
    if not out:
        raise ValueError(f"{name} must hold at least one value")
    return out


@dataclass(frozen=True)
class ProbeConfig:
    """Everything a linear probe trains with and selects on.

    Attributes:
        epochs: training epochs of each candidate.
        lrs: base learning rates; with ``weight_decays`` they form a grid selected on validation
            (a single value is a plain run). A scalar is accepted.
        weight_decays: L2 coefficients of the linear weight (never the bias). A scalar is accepted.
        batch_size: head mini-batch.
        optimizer: ``sgd``, ``adam`` (coupled L2, as the seeds) or ``lars`` (trust ratio on the
            weight, bias excluded).
        momentum: SGD / LARS momentum.
        feature_norm: ``bn`` puts ``BatchNorm1d(F, affine=False)`` before the linear layer,
            ``none`` is a bare linear layer.
        warmup_epochs: linear warm-up length in epochs (counted in steps, clipped to the run; the
            first step already has a non-zero lr), then half-cosine to ``final_lr_ratio x`` peak at
            the last step.
        final_lr_ratio: end of the cosine as a fraction of the peak.
        scale_lr: ``linear`` / ``sqrt`` scale each lr by ``batch_size / 256``
            (:func:`selfsup.engine.optim.scaled_lr`); ``none`` uses it as given.
        val_fraction: part of the train split held out (stratified) for selection; 0 disables
            selection (then a single (lr, wd) is required and the best head is the last one).
        seed: split, head init and mini-batch order.
        refit_on_full_train: cached probe only: after selection retrain the selected candidate on
            the whole train split (see :func:`linear_probe_cached`).
    """

    epochs: int = 100
    lrs: tuple[float, ...] = (0.1,)
    weight_decays: tuple[float, ...] = (0.0,)
    batch_size: int = 256
    optimizer: OptimizerName = "sgd"
    momentum: float = 0.9
    feature_norm: FeatureNorm = "bn"
    warmup_epochs: float = 0.0
    final_lr_ratio: float = 0.0
    scale_lr: Literal["none", "linear", "sqrt"] = "none"
    val_fraction: float = 0.1
    seed: int = 0
    refit_on_full_train: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "lrs", _floats(self.lrs, "lrs"))
        object.__setattr__(self, "weight_decays", _floats(self.weight_decays, "weight_decays"))
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.optimizer not in ("sgd", "adam", "lars"):
            raise ValueError(f"optimizer must be 'sgd', 'adam' or 'lars', got {self.optimizer!r}")
        if self.feature_norm not in ("bn", "none"):
            raise ValueError(f"feature_norm must be 'bn' or 'none', got {self.feature_norm!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.warmup_epochs < 0 or self.final_lr_ratio < 0:
            raise ValueError(
                f"warmup_epochs and final_lr_ratio must be >= 0, got {self.warmup_epochs}, {self.final_lr_ratio}"
            )
        scaled_lr(1.0, self.batch_size, rule=self.scale_lr)  # validates the rule

    def peak_lr(self, lr: float) -> float:
        """The peak learning rate of a candidate: ``lr`` scaled by ``batch_size / 256`` per ``scale_lr``."""
        return scaled_lr(lr, self.batch_size, rule=self.scale_lr)


def _resolve(cfg: ProbeConfig | None, overrides: dict[str, Any]) -> ProbeConfig:
    """``cfg`` (default ``ProbeConfig()``) with ``overrides`` replacing fields by name."""
    cfg = ProbeConfig() if cfg is None else cfg
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------


def build_linear_head(
    in_features: int,
    num_classes: int,
    feature_norm: FeatureNorm = "bn",
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """``[BatchNorm1d(F, affine=False, eps=1e-6)] + Linear(F, C)`` with children ``norm`` and ``fc``.

    ``fc.weight ~ N(0, 0.01)`` (drawn from ``generator`` if given) and ``fc.bias = 0``.
    ``feature_norm="none"`` replaces the BatchNorm by an identity.
    """
    if feature_norm == "bn":
        norm: nn.Module = nn.BatchNorm1d(in_features, affine=False, eps=1e-6)
    elif feature_norm == "none":
        norm = nn.Identity()
    else:
        raise ValueError(f"feature_norm must be 'bn' or 'none', got {feature_norm!r}")
    fc = nn.Linear(in_features, num_classes)
    with torch.no_grad():
        nn.init.normal_(fc.weight, mean=0.0, std=0.01, generator=generator)
        fc.bias.zero_()
    return nn.Sequential(OrderedDict(norm=norm, fc=fc))


@torch.no_grad()
def evaluate_head(head: nn.Module, feats: Tensor, labels: Tensor, batch_size: int = 8192) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent, top-5 over ``min(5, C)``) of ``head`` on features.

    The head runs in eval mode (its flags are restored afterwards) on its own device.
    Returns ``nan`` accuracies for an empty set.
    """
    if feats.shape[0] == 0:
        return {"top1": float("nan"), "top5": float("nan")}
    device = next(head.parameters()).device
    with eval_mode(head):
        logits = torch.cat(
            [head(feats[i : i + batch_size].to(device).float()) for i in range(0, feats.shape[0], batch_size)]
        )
    return {"top1": topk_accuracy(logits, labels, 1), "top5": topk_accuracy(logits, labels, 5)}


def split_train_val(labels: Sequence[int] | Tensor, val_fraction: float = 0.1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Stratified, deterministic split of sample indices into train and validation.

    For each class with ``n_c`` samples, ``round(val_fraction * n_c)`` of them (clipped to
    ``[1, n_c - 1]`` when ``n_c >= 2`` and ``val_fraction > 0``; a single-sample class stays in
    train) are drawn without replacement by a generator seeded with ``seed`` (classes in
    increasing order), so the same labels and seed always give the same split.

    Returns:
        ``(train_idx, val_idx)``: disjoint, sorted int64 tensors whose union is ``range(N)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    labels_t = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    g = torch.Generator().manual_seed(seed)
    is_val = torch.zeros(labels_t.numel(), dtype=torch.bool)
    if val_fraction > 0:
        for c in torch.unique(labels_t).tolist():
            idx = (labels_t == c).nonzero().flatten()
            n_c = idx.numel()
            if n_c < 2:
                continue
            n_val = min(max(round(val_fraction * n_c), 1), n_c - 1)
            is_val[idx[torch.randperm(n_c, generator=g)[:n_val]]] = True
    return (~is_val).nonzero().flatten(), is_val.nonzero().flatten()


def _epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """One epoch of shuffled index batches over ``range(n)``.

    A trailing batch of a single sample is dropped (BatchNorm cannot train on it) unless it is
    the only batch.
    """
    batches = list(torch.randperm(n, generator=generator).split(batch_size))
    if len(batches) > 1 and batches[-1].numel() < 2:
        batches.pop()
    return batches


def _steps_per_epoch(n: int, batch_size: int) -> int:
    steps = math.ceil(n / batch_size)
    if steps > 1 and n % batch_size == 1:
        steps -= 1
    return steps


# --------------------------------------------------------------------------------------------
# the shared training loop
# --------------------------------------------------------------------------------------------


def _fit_head(
    batch_source: BatchSource,
    n_train: int,
    in_features: int,
    val_f: Tensor,
    val_y: Tensor,
    num_classes: int,
    cfg: ProbeConfig,
    lr: float,
    weight_decay: float,
    device: torch.device,
    keep_epoch: int | None = None,
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
) -> dict[str, Any]:
    """Train one head with base lr ``lr``; see :func:`train_linear_on_features` for the result.

    ``keep_epoch`` (1-based) forces the "best" head to be the one after that epoch (used when
    refitting without a validation split); otherwise best = highest validation top-1 (earliest
    epoch on ties), or the last epoch when there is no validation data.
    """
    if n_train < 1:
        raise ValueError("the training set is empty")
    g_init = torch.Generator().manual_seed(cfg.seed)
    g_shuffle = torch.Generator().manual_seed(cfg.seed + 1)
    head = build_linear_head(in_features, num_classes, cfg.feature_norm, generator=g_init).to(device)

    groups = [
        {"params": [head.fc.weight], "weight_decay": weight_decay},
        {"params": [head.fc.bias], "weight_decay": 0.0, "lars_exclude": True},
    ]
    opt = build_optimizer(groups, cfg.optimizer, lr=cfg.peak_lr(lr), weight_decay=weight_decay, momentum=cfg.momentum)
    steps_per_epoch = _steps_per_epoch(n_train, cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = min(total_steps, round(cfg.warmup_epochs * steps_per_epoch))
    schedule = build_scheduler(opt, total_steps, warmup_steps, cfg.final_lr_ratio, "cosine")

    has_val = val_f.shape[0] > 0
    val_curve: list[float] = []
    loss_curve: list[float] = []
    best_val = -math.inf
    best_epoch = cfg.epochs if keep_epoch is None else keep_epoch
    best_state: dict[str, Tensor] | None = None

    for epoch in range(1, cfg.epochs + 1):
        head.train()
        loss_sum = torch.zeros((), device=device)
        n_seen = 0
        for feats, labels in batch_source(_epoch_batches(n_train, cfg.batch_size, g_shuffle)):
            feats = feats.to(device, non_blocking=True).float()
            labels = labels.to(device, non_blocking=True)
            loss = F.cross_entropy(head(feats), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            loss_sum += loss.detach() * labels.numel()
            n_seen += labels.numel()
        loss_curve.append(loss_sum.item() / max(n_seen, 1))

        val_top1 = evaluate_head(head, val_f, val_y)["top1"] if has_val else float("nan")
        val_curve.append(val_top1)
        take = epoch == keep_epoch if keep_epoch is not None else has_val and val_top1 > best_val
        if take:
            best_val = val_top1
            best_epoch = epoch
            best_state = copy.deepcopy(head.state_dict())
        if on_epoch_end is not None:
            with eval_mode(head), torch.no_grad():
                on_epoch_end(epoch, head)

    head.eval()
    if best_state is None:  # no validation data (or keep_epoch == epochs): best is last
        best_head = copy.deepcopy(head)
    else:
        best_head = build_linear_head(in_features, num_classes, cfg.feature_norm).to(device)
        best_head.load_state_dict(best_state)
        best_head.eval()
    return {
        "best_head": best_head,
        "last_head": head,
        "best_epoch": best_epoch,
        "best_val_top1": best_val if has_val and keep_epoch is None else (val_curve[best_epoch - 1]),
        "val_top1": val_curve,
        "train_loss": loss_curve,
        "lr": lr,
        "weight_decay": weight_decay,
        "epochs": cfg.epochs,
    }


def _cached_source(train_f: Tensor, train_y: Tensor) -> BatchSource:
    def source(batches: list[Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
        for idx in batches:
            idx = idx.to(train_f.device)
            yield train_f[idx], train_y[idx]

    return source


def train_linear_on_features(
    train_f: Tensor,
    train_y: Tensor,
    val_f: Tensor,
    val_y: Tensor,
    num_classes: int,
    cfg: ProbeConfig | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    device: str | torch.device = "cpu",
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
) -> dict[str, Any]:
    """Train one linear head on cached features and track validation top-1 every epoch.

    Mini-batches are drawn from a generator seeded with ``cfg.seed + 1`` (the head init uses
    ``cfg.seed``), so a run is reproducible. ``val_f`` may be empty (``[0, F]``): the best head is
    then the last one. ``cfg.val_fraction`` is not used (the split is the caller's).

    Args:
        cfg: epochs, batch, optimiser, head and schedule (default ``ProbeConfig()``).
        lr, weight_decay: the candidate to train (default: ``cfg.lrs[0]``, ``cfg.weight_decays[0]``);
            ``lr`` is the base value, scaled per ``cfg.scale_lr``.
        on_epoch_end: optional ``fn(epoch, head)`` called after each epoch's validation with the
            head in eval mode under ``no_grad`` (for logging; it must not modify the head).

    Returns:
        dict with ``best_head`` / ``last_head`` (``nn.Module`` in eval mode), ``best_epoch``
        (1-based: the number of epochs trained by ``best_head``), ``best_val_top1``,
        ``val_top1`` and ``train_loss`` (per-epoch curves), ``lr``, ``weight_decay``, ``epochs``.
    """
    cfg = _resolve(cfg, {})
    device = torch.device(device)
    train_y = check_labels(train_y, num_classes, "train_y")
    val_y = check_labels(val_y, num_classes, "val_y")
    if train_f.ndim != 2 or val_f.ndim != 2 or (val_f.shape[0] and val_f.shape[1] != train_f.shape[1]):
        raise ValueError("train_f / val_f must be [N, F] with the same F")
    if train_f.shape[0] != train_y.numel() or val_f.shape[0] != val_y.numel():
        raise ValueError("features and labels differ in length")
    train_f = train_f.to(device).float()
    train_y = train_y.to(device)
    return _fit_head(
        _cached_source(train_f, train_y),
        train_f.shape[0],
        train_f.shape[1],
        val_f.float(),
        val_y,
        num_classes,
        cfg,
        cfg.lrs[0] if lr is None else float(lr),
        cfg.weight_decays[0] if weight_decay is None else float(weight_decay),
        device,
        on_epoch_end=on_epoch_end,
    )


# --------------------------------------------------------------------------------------------
# full protocols
# --------------------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """Outcome of a linear probe. Accuracies are percentages.

    ``test_top1`` / ``test_top5`` come from the head selected on validation (best epoch of the
    best (lr, wd) candidate); ``test_top1_last`` / ``test_top5_last`` from the last-epoch head of
    that same candidate. ``epoch`` is the selected epoch (1-based) out of ``epochs``.
    ``val_top1`` is the selection score on the held-out part of train (``nan`` when
    ``val_fraction == 0``). ``lr`` / ``weight_decay`` are the selected candidate (``lr`` before
    batch scaling). ``mode`` is ``cached`` or ``augmented``; ``config`` the :class:`ProbeConfig`
    as a dict. ``grid`` lists every candidate's ``lr``, ``weight_decay``, ``best_val_top1`` and
    ``best_epoch``; ``val_curve`` is the selected candidate's per-epoch validation top-1. The
    heads are kept on the object but left out of :meth:`to_dict`.
    """

    val_top1: float
    test_top1: float
    test_top5: float
    test_top1_last: float
    test_top5_last: float
    lr: float
    weight_decay: float
    epoch: int
    epochs: int
    seconds: float
    mode: str
    refit_on_full_train: bool = False
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0
    val_curve: list[float] = field(default_factory=list)
    grid: list[dict[str, float]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    head: nn.Module | None = field(default=None, repr=False, compare=False)
    head_last: nn.Module | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict of every field except the heads."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("head", "head_last"):
                continue
            value = getattr(self, f.name)
            out[f.name] = copy.deepcopy(value) if isinstance(value, (list, dict)) else value
        return out


def _select(
    fit: Callable[[float, float], dict[str, Any]], cfg: ProbeConfig, has_val: bool
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Fit every (lr, wd) candidate; return the one with the best validation top-1 and the grid.

    Ties keep the earlier candidate (grid order: lrs outer, weight decays inner).
    """
    candidates = list(itertools.product(cfg.lrs, cfg.weight_decays))
    if not has_val and len(candidates) > 1:
        raise ValueError("a (lr, weight_decay) grid needs a validation split: set val_fraction > 0")
    best: dict[str, Any] | None = None
    grid: list[dict[str, float]] = []
    for lr, wd in candidates:
        run = fit(lr, wd)
        grid.append(
            {"lr": lr, "weight_decay": wd, "best_val_top1": run["best_val_top1"], "best_epoch": run["best_epoch"]}
        )
        if best is None or run["best_val_top1"] > best["best_val_top1"]:
            best = run
    assert best is not None
    return best, grid


def _probe_result(
    best: dict[str, Any],
    grid: list[dict[str, float]],
    best_head: nn.Module,
    last_head: nn.Module,
    test_f: Tensor,
    test_y: Tensor,
    cfg: ProbeConfig,
    *,
    t0: float,
    mode: str,
    n_train: int,
    n_val: int,
    has_val: bool,
) -> ProbeResult:
    """Score the test split once with the selected (best-on-val) head and the last-epoch head."""
    test_best = evaluate_head(best_head, test_f, test_y)
    test_last = evaluate_head(last_head, test_f, test_y)
    return ProbeResult(
        val_top1=best["best_val_top1"] if has_val else float("nan"),
        test_top1=test_best["top1"],
        test_top5=test_best["top5"],
        test_top1_last=test_last["top1"],
        test_top5_last=test_last["top5"],
        lr=best["lr"],
        weight_decay=best["weight_decay"],
        epoch=best["best_epoch"],
        epochs=cfg.epochs,
        seconds=time.perf_counter() - t0,
        mode=mode,
        refit_on_full_train=cfg.refit_on_full_train,
        n_train=int(n_train),
        n_val=int(n_val),
        n_test=test_f.shape[0],
        val_curve=best["val_top1"],
        grid=grid,
        config=dataclasses.asdict(cfg),
        head=best_head,
        head_last=last_head,
    )


def linear_probe_cached(
    train_f: Tensor,
    train_y: Tensor,
    test_f: Tensor,
    test_y: Tensor,
    num_classes: int,
    cfg: ProbeConfig | None = None,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> ProbeResult:
    """Linear probe on pre-extracted features with validation-based selection.

    1. :func:`split_train_val` holds out ``cfg.val_fraction`` of the train features (stratified,
       seeded by ``cfg.seed``).
    2. For every ``(lr, wd)`` in ``cfg.lrs x cfg.weight_decays`` a head is trained on the
       remaining part for ``cfg.epochs`` epochs (:func:`train_linear_on_features`), keeping its
       best-validation epoch. The candidate with the highest validation top-1 is selected.
    3. The test split is scored with the selected head (best epoch) and with the last-epoch
       head of the selected candidate. The test split is never used to choose anything.

    With ``cfg.refit_on_full_train`` a head with the selected (lr, wd) and the same schedule is
    then retrained on the **whole** train split (train + validation) and the test numbers are
    those of that head after the selected epoch (``test_top1``) and after the last epoch
    (``test_top1_last``); ``val_top1`` still refers to the selection run. Uses 100 % of the
    labels at the cost of one more training run.

    Args:
        train_f, train_y, test_f, test_y: ``[N, F]`` features and ``[N]`` labels.
        cfg: the probe (default ``ProbeConfig()``); presets in :mod:`selfsup.eval.protocols`.
        device: where the head trains.
        overrides: :class:`ProbeConfig` fields replacing those of ``cfg``
            (``linear_probe_cached(..., cfg, epochs=5)``); an unknown name is a ``TypeError``.
    """
    t0 = time.perf_counter()
    cfg = _resolve(cfg, overrides)
    device = torch.device(device)
    train_y = check_labels(train_y, num_classes, "train_y")
    test_y = check_labels(test_y, num_classes, "test_y")
    if train_f.shape[0] != train_y.numel() or test_f.shape[0] != test_y.numel():
        raise ValueError("features and labels differ in length")
    tr_idx, va_idx = split_train_val(train_y, cfg.val_fraction, cfg.seed)
    has_val = va_idx.numel() > 0

    def fit(lr: float, wd: float) -> dict[str, Any]:
        return train_linear_on_features(
            train_f[tr_idx],
            train_y[tr_idx],
            train_f[va_idx],
            train_y[va_idx],
            num_classes,
            cfg,
            lr=lr,
            weight_decay=wd,
            device=device,
        )

    best, grid = _select(fit, cfg, has_val)
    best_head, last_head, n_train = best["best_head"], best["last_head"], tr_idx.numel()
    if cfg.refit_on_full_train:
        full_f = train_f.to(device).float()
        full_y = train_y.to(device)
        refit = _fit_head(
            _cached_source(full_f, full_y),
            full_f.shape[0],
            full_f.shape[1],
            full_f[:0],
            full_y[:0],
            num_classes,
            cfg,
            best["lr"],
            best["weight_decay"],
            device,
            keep_epoch=best["best_epoch"],
        )
        best_head, last_head, n_train = refit["best_head"], refit["last_head"], full_f.shape[0]

    return _probe_result(
        best,
        grid,
        best_head,
        last_head,
        test_f,
        test_y,
        cfg,
        t0=t0,
        mode="cached",
        n_train=n_train,
        n_val=va_idx.numel(),
        has_val=has_val,
    )


def _dataset_labels(dataset: Dataset, labels: Sequence[int] | Tensor | None) -> Tensor:
    if labels is not None:
        return torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise ValueError("train_dataset has no .targets: pass train_labels explicitly")
    return torch.as_tensor(targets, dtype=torch.long).reshape(-1)


def dataset_selection_split(
    train_dataset: Dataset,
    train_labels: Sequence[int] | Tensor | None,
    val_dataset: Dataset | None,
    num_classes: int,
    val_fraction: float,
    seed: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(labels, train_idx, val_idx)``: the checked train labels and the stratified held-out split used to select
    on (never the test split). ``val_dataset`` holds the same images as ``train_dataset`` with the eval transform and
    is required whenever the split holds images out."""
    labels = check_labels(_dataset_labels(train_dataset, train_labels), num_classes, "train labels")
    if labels.numel() != len(train_dataset):  # type: ignore[arg-type]
        raise ValueError("train labels and train_dataset differ in length")
    tr_idx, va_idx = split_train_val(labels, val_fraction, seed)
    if va_idx.numel() > 0 and val_dataset is None:
        raise ValueError("val_fraction > 0 needs val_dataset (train images with the eval transform)")
    if val_dataset is not None and len(val_dataset) != len(train_dataset):  # type: ignore[arg-type]
        raise ValueError("val_dataset must hold the same images as train_dataset")
    return labels, tr_idx, va_idx


def linear_probe_augmented(
    backbone: nn.Module,
    train_dataset: Dataset,
    test_dataset: Dataset,
    num_classes: int,
    cfg: ProbeConfig | None = None,
    val_dataset: Dataset | None = None,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    *,
    eval_batch_size: int = 512,
    amp_dtype: torch.dtype | None = None,
    train_labels: Sequence[int] | Tensor | None = None,
    pin_memory: bool = False,
    **overrides: Any,
) -> ProbeResult:
    """Linear probe with a fresh augmented view of every training image at every epoch.

    The backbone (already on ``device``) is frozen: it runs in **eval mode** under
    ``torch.no_grad()`` (BatchNorm running statistics are used, never updated; no parameter gets
    a gradient) and its train/eval flags are restored on return. Only the head trains.
    Selection, grid and reporting are those of :func:`linear_probe_cached` (one training run
    per candidate, each with its own backbone forwards); ``cfg.refit_on_full_train`` is not
    supported here.

    Args:
        train_dataset: returns ``(augmented tensor, label)``; its transform is applied by the
            dataset itself, so each epoch sees new views.
        test_dataset: the test split with the eval transform.
        cfg: the probe (default ``ProbeConfig()``); ``overrides`` replace its fields by name.
        val_dataset: the **same images as** ``train_dataset`` **with the eval transform**; the
            held-out indices from :func:`split_train_val` are read from it. Required when
            ``cfg.val_fraction > 0``.
        device, num_workers, pin_memory: where the head trains and the backbone runs; loaders.
        eval_batch_size: batch of the validation / test feature extraction.
        amp_dtype: autocast dtype for the backbone forward (e.g. ``torch.bfloat16`` on CUDA).
        train_labels: labels of ``train_dataset`` (default: its ``.targets``) for the split.

    Validation and test features come from deterministic eval transforms and are extracted once.
    Mini-batch composition and order are drawn exactly as in the cached path, so without
    augmentation both give the same result. Returns a :class:`ProbeResult` with
    ``mode="augmented"``.
    """
    t0 = time.perf_counter()
    cfg = _resolve(cfg, overrides)
    if cfg.refit_on_full_train:
        raise ValueError("refit_on_full_train is only supported by linear_probe_cached")
    device = torch.device(device)
    _labels, tr_idx, va_idx = dataset_selection_split(
        train_dataset, train_labels, val_dataset, num_classes, cfg.val_fraction, cfg.seed
    )
    has_val = va_idx.numel() > 0

    def loader(ds: Dataset, **kw: Any) -> DataLoader:
        return DataLoader(ds, num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False, **kw)

    with eval_mode(backbone):
        test_f, test_y = extract_features(
            backbone, loader(test_dataset, batch_size=eval_batch_size), device, amp_dtype=amp_dtype
        )
        test_y = check_labels(test_y, num_classes, "test labels")
        in_features = test_f.shape[1]
        if has_val:
            assert val_dataset is not None
            val_f, val_y = extract_features(
                backbone,
                loader(Subset(val_dataset, va_idx.tolist()), batch_size=eval_batch_size),
                device,
                amp_dtype=amp_dtype,
            )
        else:
            val_f, val_y = torch.zeros(0, in_features), torch.zeros(0, dtype=torch.long)
        train_subset = Subset(train_dataset, tr_idx.tolist())

        def source(batches: list[Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
            batch_lists = [b.tolist() for b in batches]
            for batch in loader(train_subset, batch_sampler=batch_lists):
                x, y = split_batch(batch)
                with torch.no_grad(), _autocast(device, amp_dtype):
                    f = backbone(x.to(device, non_blocking=True))
                yield f.flatten(1).float(), y

        def fit(lr: float, wd: float) -> dict[str, Any]:
            return _fit_head(source, tr_idx.numel(), in_features, val_f, val_y, num_classes, cfg, lr, wd, device)

        best, grid = _select(fit, cfg, has_val)

    return _probe_result(
        best,
        grid,
        best["best_head"],
        best["last_head"],
        test_f,
        test_y,
        cfg,
        t0=t0,
        mode="augmented",
        n_train=tr_idx.numel(),
        n_val=va_idx.numel(),
        has_val=has_val,
    )
