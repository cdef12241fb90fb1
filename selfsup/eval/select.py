"""Checkpoint selection without the test split: ``selfsup select RUN_DIR --by knn|linear|rankme``.

The seeds picked checkpoints by their test accuracy, which makes the reported test number optimistic. Here
every checkpoint of a run (``RUN_DIR/checkpoints/*.ckpt``; several files of one step, e.g. ``last.ckpt`` and
the final ``epochNNNN.ckpt``, are scored once) is scored on the **train split only**, in two phases:

1. **Choose** (train split only; the test split is not even opened):

   * ``knn``: a seeded, stratified ``val_fraction`` of the train split is held out
     (:func:`selfsup.eval.linear.split_train_val`, the linear probe's own split); the weighted kNN classifier
     with the rest of train as its bank scores it (top-1, %).
   * ``linear``: the cached linear probe (:func:`selfsup.eval.linear.linear_probe_cached`, default the ``fast``
     preset) trained on the same split; the score is its held-out top-1 (%).
   * ``rankme``: RankMe (:func:`selfsup.losses.spectrum.rankme`) of the features of a fixed, seeded subset of
     ``rankme_images`` train images; no labels at all.

   The pick is the highest score (ties: the later step; ``last.ckpt`` among files of one step).

2. **Report** (after the pick is fixed): the test score of the pick and of ``last.ckpt`` (the newest
   checkpoint of a run killed before writing it), side by side: kNN top-1 on the test split with the whole
   train split as the bank (``knn``, ``rankme``), or the linear probe's test top-1 (``linear``). With
   ``diagnostic_best_on_test`` every checkpoint's test score is computed too and shown under
   ``diagnostic_best_on_test``, labelled as a diagnostic: it never changes the pick.

The result is written to ``RUN_DIR/eval/select-<by>.json`` (:func:`selfsup.eval.results.write_eval_result`,
never overwriting).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from selfsup.eval.features import extract_features
from selfsup.eval.knn import knn_accuracy
from selfsup.eval.linear import ProbeConfig, linear_probe_cached, split_train_val
from selfsup.eval.load import load_backbone
from selfsup.eval.protocols import get_protocol
from selfsup.eval.results import is_run_dir
from selfsup.losses.spectrum import rankme

__all__ = ["METRICS", "SelectOptions", "list_checkpoints", "select_checkpoint"]

By = Literal["knn", "linear", "rankme"]

#: What each criterion's score and test score are.
METRICS = {
    "knn": ("held-out train kNN top-1 (%)", "test kNN top-1 (%), bank = whole train split"),
    "linear": ("held-out train linear-probe top-1 (%)", "test linear-probe top-1 (%)"),
    "rankme": ("RankMe of train-subset features (no labels)", "test kNN top-1 (%), bank = whole train split"),
}


def _fast_probe() -> ProbeConfig:
    return get_protocol("fast").probe


@dataclass
class SelectOptions:
    """How ``select`` scores checkpoints.

    Attributes:
        by: ``knn``, ``linear`` or ``rankme``.
        which: backbone scored (``online`` or a declared teacher).
        val_fraction: held-out part of the train split (stratified, seeded) for ``knn`` / ``linear``.
        seed: seed of the held-out split and the RankMe subset.
        k, temperature: kNN parameters (selection and the kNN test score).
        rankme_images: train images whose features RankMe is computed on.
        probe: linear probe for ``linear`` (default: the ``fast`` preset); its ``val_fraction`` / ``seed`` are
            replaced by the ones above so all criteria hold out the same images.
        test_scores: score the pick and the last checkpoint on the test split (phase 2).
        diagnostic_best_on_test: also score every checkpoint on the test split (a diagnostic, never the pick).
        batch_size: feature-extraction batch.
    """

    by: By = "knn"
    which: str = "online"
    val_fraction: float = 0.1
    seed: int = 0
    k: int = 200
    temperature: float = 0.5
    rankme_images: int = 2000
    probe: ProbeConfig = field(default_factory=_fast_probe)
    test_scores: bool = True
    diagnostic_best_on_test: bool = False
    batch_size: int = 512

    def __post_init__(self) -> None:
        if self.by not in METRICS:
            raise ValueError(f"--by must be one of {', '.join(METRICS)}, got {self.by!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.rankme_images < 2:
            raise ValueError(f"rankme_images must be >= 2, got {self.rankme_images}")
        self.probe = dataclasses.replace(self.probe, val_fraction=self.val_fraction, seed=self.seed)


def list_checkpoints(run_dir: str | Path) -> list[dict[str, Any]]:
    """``[{"path", "name", "step", "epoch"}]`` of ``RUN_DIR/checkpoints/*.ckpt``, by step then name.

    A missing run directory is a ``FileNotFoundError``, one without checkpoints a ``ValueError`` (both name it);
    an unreadable file (a write cut short) is a ``ValueError`` naming the file.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory '{run}' does not exist")
    paths = sorted((run / "checkpoints").glob("*.ckpt"))
    if not paths:
        hint = "" if is_run_dir(run) else " (is it a run directory written by selfsup pretrain?)"
        raise ValueError(f"run directory '{run}' holds no checkpoints in {run / 'checkpoints'}{hint}")
    out = []
    for p in paths:
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            step, epoch = int(ckpt["global_step"]), int(ckpt.get("epoch", -1))
        except Exception as e:
            raise ValueError(f"cannot read checkpoint '{p}': {type(e).__name__}: {str(e)[:200]}") from e
        out.append({"path": p, "name": p.name, "step": step, "epoch": epoch})
    out.sort(key=lambda c: (c["step"], c["name"] == "last.ckpt", c["name"]))
    return out


def _features(
    backbone: torch.nn.Module, ds: Dataset, batch_size: int, device: torch.device, num_workers: int
) -> tuple[torch.Tensor, torch.Tensor]:
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return extract_features(backbone, loader, device=device)


class _Scorer:
    """Datasets opened once; train-only scores (phase 1) and test scores (phase 2) of one backbone."""

    def __init__(self, data, opts: SelectOptions, device: torch.device):
        from selfsup.data.build import build_eval_dataset, num_classes

        self.data, self.opts, self.device = data, opts, device
        self.workers = 0 if data.in_memory else data.num_workers
        self.train = build_eval_dataset(data, data.bank_split)
        self.num_classes = num_classes(self.train)
        self.rankme_set = (
            build_eval_dataset(data, data.bank_split, limit=opts.rankme_images) if opts.by == "rankme" else None
        )
        self._test: Optional[Dataset] = None
        self.split: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def feats(self, backbone: torch.nn.Module, ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        return _features(backbone, ds, self.opts.batch_size, self.device, self.workers)

    def select_score(self, backbone: torch.nn.Module) -> float:
        """Phase 1: the criterion on the train split only."""
        o = self.opts
        if o.by == "rankme":
            f, _ = self.feats(backbone, self.rankme_set)
            return float(rankme(f))
        f, y = self.feats(backbone, self.train)
        if o.by == "knn":
            if self.split is None:
                self.split = split_train_val(y, o.val_fraction, o.seed)
            tr, va = self.split
            acc = knn_accuracy(f[tr], y[tr], f[va], y[va], self.num_classes, k=o.k, temperature=o.temperature)
            return float(acc["top1"])
        res = linear_probe_cached(f, y, f[:0], y[:0], self.num_classes, o.probe, device=self.device)
        return float(res.val_top1)

    def test_score(self, backbone: torch.nn.Module) -> dict[str, float]:
        """Phase 2: the test split scored once (kNN with the whole train split as bank, or the linear probe)."""
        from selfsup.data.build import build_eval_dataset

        if self._test is None:
            self._test = build_eval_dataset(self.data, self.data.test_split)
        f, y = self.feats(backbone, self.train)
        tf, ty = self.feats(backbone, self._test)
        o = self.opts
        if o.by == "linear":
            res = linear_probe_cached(f, y, tf, ty, self.num_classes, o.probe, device=self.device)
            return {"test_top1": res.test_top1, "test_top5": res.test_top5}
        acc = knn_accuracy(f, y, tf, ty, self.num_classes, k=o.k, temperature=o.temperature)
        return {"test_top1": acc["top1"], "test_top5": acc["top5"]}


def select_checkpoint(
    run_dir: str | Path,
    data,
    opts: SelectOptions,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Score every checkpoint of ``run_dir`` by ``opts.by`` on the train split, pick one, then report test scores.

    Args:
        run_dir: a pretraining run directory.
        data: a ``DataConfig`` whose ``bank_split`` is the labelled train split and ``test_split`` the test split
            (``selfsup select`` builds it from the checkpoint, like ``selfsup knn``).
        opts: :class:`SelectOptions`.
        device: where features are computed.
        log: progress messages.

    Returns the JSON-able result (see the module docstring); nothing is written here.
    """
    t0 = time.time()
    device = torch.device(device)
    ckpts = list_checkpoints(run_dir)
    scorer = _Scorer(data, opts, device)

    # Phase 1: choose on the train split only (one score per distinct step).
    by_step: dict[int, float] = {}
    rows = []
    for c in ckpts:
        if c["step"] not in by_step:
            backbone, _ = load_backbone(c["path"], opts.which)
            by_step[c["step"]] = scorer.select_score(backbone.to(device))
            log(f"{c['name']}: step {c['step']}, {opts.by} score {by_step[c['step']]:.4g}")
        rows.append({"checkpoint": c["name"], "step": c["step"], "epoch": c["epoch"], "score": by_step[c["step"]]})
    pick = max(range(len(ckpts)), key=lambda i: (rows[i]["score"], ckpts[i]["step"], ckpts[i]["name"] == "last.ckpt"))
    last = next((i for i, c in enumerate(ckpts) if c["name"] == "last.ckpt"), len(ckpts) - 1)
    score_name, test_name = METRICS[opts.by]
    result: dict[str, Any] = {
        "run_dir": str(Path(run_dir)),
        "by": opts.by,
        "which": opts.which,
        "metric": score_name,
        "selection_split": {
            "split": data.bank_split,
            "val_fraction": opts.val_fraction,
            "seed": opts.seed,
            **({"rankme_images": opts.rankme_images} if opts.by == "rankme" else {}),
        },
        "scores": rows,
        "pick": dict(rows[pick]),
        "last": dict(rows[last]),
    }
    if opts.by == "knn" and scorer.split is not None:
        result["selection_split"].update(n_bank=int(scorer.split[0].numel()), n_heldout=int(scorer.split[1].numel()))
    if opts.by == "linear":
        result["probe"] = dataclasses.asdict(opts.probe)

    # Phase 2: the pick is fixed; now (and only now) the test split is read.
    if opts.test_scores or opts.diagnostic_best_on_test:
        result["test_metric"] = test_name
        tested: dict[int, dict[str, float]] = {}

        def test(i: int) -> dict[str, float]:
            step = ckpts[i]["step"]
            if step not in tested:
                backbone, _ = load_backbone(ckpts[i]["path"], opts.which)
                tested[step] = scorer.test_score(backbone.to(device))
            return tested[step]

        result["pick"].update(test(pick))
        result["last"].update(test(last))
        if opts.diagnostic_best_on_test:
            every = [{"checkpoint": c["name"], "step": c["step"], **test(i)} for i, c in enumerate(ckpts)]
            best = max(every, key=lambda r: (r["test_top1"], r["step"]))
            result["diagnostic_best_on_test"] = {
                "note": "DIAGNOSTIC ONLY: chosen on the test split, so its test score is optimistic; never the pick",
                "checkpoint": best["checkpoint"],
                "step": best["step"],
                "test_top1": best["test_top1"],
                "all": every,
            }
    result["seconds"] = round(time.time() - t0, 2)
    return result
