r"""Few-shot evaluation of a frozen backbone: seeded episodes, a prototype or linear classifier, a 95% interval.

An **episode** (seeded by ``(seed, e)``) draws ``n_way`` classes among those with enough images, then
``n_shot`` support images per class from the support split (default: train) and ``n_query`` query images
per class from the query split (default: test; disjoint from the support when both are the same split).
Episode labels are ``0 .. n_way − 1`` in increasing class order. Classes of the two splits are matched by
name. Images are never re-drawn from the backbone: the features of every image some episode uses are
extracted **once** (:func:`selfsup.eval.features.extract_features`, backbone frozen in eval mode); the
support images optionally as ``A = augs_per_image`` views under the training augmentation (``A = 0``:
the deterministic eval view), the query images always under the eval transform (the seed extracted its
test features with random crops, spec §7).

Classifiers, fitted on the support features ``f [n_way · n_shot · A, D]`` of one episode:

* ``prototype`` (default): features L2-normalised, ``p_c = mean of class c's normalised support features``;
  ``cosine`` predicts ``argmax_c cos(q, p_c)``, ``euclidean`` predicts ``argmin_c ||q̂ − p_c||²`` (``q̂`` the
  normalised query). No training, no hyperparameters.
* ``linear``: the seed's fast probe (IMLE-SSL, spec §3.4): one ``nn.Linear(D, n_way)`` (init ``N(0, 0.01)``,
  bias 0), cross-entropy, AdamW (weight decay 1e-6 by default), batch 16, ``epochs`` epochs, lr warm-up over
  ``epochs / 10`` epochs then cosine to ``min_lr`` (per step). ``normalize`` L2-normalises the features
  first (default; the seed used them raw). Peak lr 0.1: the rate IMLE-R's probe actually ran at (its
  ``--probe_lr`` 1e-3 never reached the schedule, spec §7); on normalised features 1e-3 barely moves the head
  in 100 epochs of a 25-image support set. All ``E`` episodes' heads train in one batched loop
  (:func:`fit_linear_heads`), each exactly as it would alone.

Per-episode accuracy ``a_e`` (percent of the episode's queries); reported: ``accuracy = mean_e a_e`` and the
95% interval half-width ``ci95 = 1.96 · s / sqrt(E)``, ``s`` the **sample** standard deviation
(``E − 1`` in the denominator; ``nan`` for one episode).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from selfsup.data.keyed import key_seed
from selfsup.engine.optim import build_optimizer, build_scheduler
from selfsup.eval.features import eval_mode, extract_features

__all__ = [
    "Episode",
    "FewShotConfig",
    "FewShotResult",
    "confidence_interval",
    "episode_accuracy",
    "episode_seed",
    "few_shot_eval",
    "few_shot_from_features",
    "fit_linear_heads",
    "sample_episodes",
]

_EPISODE_STREAM = 0xE915


@dataclass
class FewShotConfig:
    """One few-shot evaluation.

    Attributes:
        n_way: classes per episode (``-1``: every class with enough images).
        n_shot: support images per class.
        n_query: query images per class (``-1``: every query image of the class).
        episodes: episodes averaged (seeded ``(seed, 0) .. (seed, episodes − 1)``).
        seed: episodes, support views, linear-head init and batch order.
        classifier: ``prototype`` (nearest class mean) or ``linear`` (the fast probe).
        metric: prototype distance: ``cosine`` or ``euclidean`` (both on L2-normalised features).
        augs_per_image: support views per image under the training augmentation (0: the eval view).
        normalize: linear head: L2-normalise the features first.
        epochs, lr, weight_decay, batch_size: linear head: AdamW, cross-entropy.
        warmup_epochs: linear head warm-up (``None``: ``epochs / 10``), then cosine to ``min_lr``.
        min_lr: the lr at the last step.
    """

    n_way: int = 5
    n_shot: int = 5
    n_query: int = 15
    episodes: int = 100
    seed: int = 0
    classifier: Literal["prototype", "linear"] = "prototype"
    metric: Literal["cosine", "euclidean"] = "cosine"
    augs_per_image: int = 0
    normalize: bool = True
    epochs: int = 100
    lr: float = 0.1
    weight_decay: float = 1e-6
    batch_size: int = 16
    warmup_epochs: Optional[float] = None
    min_lr: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("n_way", "n_query"):
            v = getattr(self, name)
            if int(v) != v or (v < 1 and v != -1):
                raise ValueError(f"fewshot.{name} must be a positive integer or -1 (all), got {v}")
        if self.n_way == 1:
            raise ValueError("fewshot.n_way must be >= 2 (one class is always right) or -1")
        for name in ("n_shot", "episodes", "epochs", "batch_size"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ValueError(f"fewshot.{name} must be a positive integer, got {v}")
        if self.augs_per_image < 0:
            raise ValueError(f"fewshot.augs_per_image must be >= 0, got {self.augs_per_image}")
        if self.classifier not in ("prototype", "linear"):
            raise ValueError(f"fewshot.classifier must be 'prototype' or 'linear', got {self.classifier!r}")
        if self.metric not in ("cosine", "euclidean"):
            raise ValueError(f"fewshot.metric must be 'cosine' or 'euclidean', got {self.metric!r}")
        if not self.lr > 0 or self.weight_decay < 0 or self.min_lr < 0:
            raise ValueError(
                f"fewshot: need lr > 0, weight_decay >= 0, min_lr >= 0; got {self.lr}, "
                f"{self.weight_decay}, {self.min_lr}"
            )
        if self.warmup_epochs is not None and not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"fewshot.warmup_epochs must be in [0, epochs = {self.epochs}], got {self.warmup_epochs}")


class Episode(NamedTuple):
    """One episode, as indices into the support and query splits.

    Attributes:
        classes: ``[n_way]`` support-split labels of the episode's classes, increasing (episode label = position).
        support: ``[n_way · n_shot]`` support-split indices, class by class.
        support_y: ``[n_way · n_shot]`` episode labels.
        query: ``[n_way · n_query]`` query-split indices (variable per class with ``n_query = -1``).
        query_y: their episode labels.
    """

    classes: Tensor
    support: Tensor
    support_y: Tensor
    query: Tensor
    query_y: Tensor


@dataclass
class FewShotResult:
    """Accuracy (percent) over seeded episodes.

    ``accuracy`` is the mean of ``per_episode``; ``ci95`` the half-width of its 95% interval
    ``1.96 · std / sqrt(episodes)`` (``std`` with ``E − 1``; ``nan`` for one episode).
    ``n_support_images`` / ``n_query_images``: distinct images used in each role; ``n_embedded``: backbone
    forwards (image views) it took, each image used once per view.
    """

    accuracy: float
    ci95: float
    std: float
    episodes: int
    n_way: int
    n_shot: int
    n_query: int
    classifier: str
    per_episode: list[float] = field(default_factory=list)
    n_support_images: int = 0
    n_query_images: int = 0
    n_embedded: int = 0
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        """``"5-way 5-shot prototype: <accuracy> ± <ci95> % (95% CI, 100 episodes)"`` (two decimals)."""
        way = "all-way" if self.n_way == -1 else f"{self.n_way}-way"
        return (
            f"{way} {self.n_shot}-shot {self.classifier}: {self.accuracy:.2f} ± {self.ci95:.2f} % "
            f"(95% CI, {self.episodes} episode{'s' if self.episodes != 1 else ''})"
        )

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        out["summary"] = self.summary
        return out


def episode_seed(seed: int, episode: int) -> int:
    """The seed of episode ``episode`` (its sampling, its linear head's init and batch order)."""
    return key_seed(seed, _EPISODE_STREAM, episode)


def confidence_interval(accuracies: Sequence[float] | Tensor) -> tuple[float, float, float]:
    """``(mean, ci95, std)`` of per-episode accuracies: ``ci95 = 1.96 · std / sqrt(E)``, ``std`` with ``E − 1``."""
    a = torch.as_tensor(list(accuracies) if not isinstance(accuracies, Tensor) else accuracies, dtype=torch.float64)
    if a.numel() == 0:
        raise ValueError("no episode accuracies to average")
    mean = float(a.mean())
    if a.numel() == 1:
        return mean, float("nan"), float("nan")
    std = float(a.std(unbiased=True))
    return mean, 1.96 * std / math.sqrt(a.numel()), std


# ------------------------------------------------------------------------------------------- episodes
def _pools(labels: Tensor) -> dict[int, Tensor]:
    """``{label: its indices, ascending}`` (one stable sort, not one scan per class)."""
    if labels.numel() == 0:
        return {}
    order = torch.sort(labels, stable=True).indices
    values, counts = torch.unique_consecutive(labels[order], return_counts=True)
    return dict(zip(values.tolist(), order.split(counts.tolist())))


def sample_episodes(
    support_y: Sequence[int] | Tensor,
    query_y: Sequence[int] | Tensor,
    cfg: FewShotConfig,
    *,
    same_split: bool = False,
    class_map: Optional[dict[int, int]] = None,
    class_names: Optional[Sequence[str]] = None,
) -> list[Episode]:
    """``cfg.episodes`` seeded episodes over the labels of the two splits.

    Args:
        support_y: ``[Ns]`` labels of the support split.
        query_y: ``[Nq]`` labels of the query split (the same tensor when ``same_split``).
        cfg: sizes and seed.
        same_split: support and query come from one split: each class's query images are drawn disjoint
            from its support images.
        class_map: support label -> query label (default: identity); classes without a query label are
            not eligible.
        class_names: support-split class names, for the error message.

    A class is eligible when it has ``n_shot`` support images and ``n_query`` (at least one with
    ``n_query = -1``) query images besides them; fewer than ``n_way`` (``n_way = -1``: fewer than 2)
    eligible classes is a ``ValueError`` listing the counts.
    """
    sy = torch.as_tensor(support_y, dtype=torch.long).reshape(-1)
    qy = torch.as_tensor(query_y, dtype=torch.long).reshape(-1)
    if same_split and sy.numel() != qy.numel():
        raise ValueError("same_split needs the same labels for support and query")
    s_pools, q_pools = _pools(sy), _pools(qy)
    need_q = 1 if cfg.n_query == -1 else cfg.n_query
    eligible, counts = [], {}
    for c, pool in s_pools.items():
        qc = c if class_map is None else class_map.get(c)
        nq = 0 if qc is None else q_pools.get(qc, torch.zeros(0, dtype=torch.long)).numel()
        if same_split:
            ok = pool.numel() >= cfg.n_shot + need_q
        else:
            ok = pool.numel() >= cfg.n_shot and nq >= need_q
        counts[c] = (pool.numel(), nq)
        if ok:
            eligible.append(c)
    n_way = len(eligible) if cfg.n_way == -1 else cfg.n_way
    if len(eligible) < max(n_way, 2):
        name = lambda c: class_names[c] if class_names is not None and c < len(class_names) else str(c)
        short = ", ".join(f"{name(c)}: {s}/{q}" for c, (s, q) in sorted(counts.items())[:8])
        raise ValueError(
            f"{len(eligible)} classes have {cfg.n_shot} support and {need_q} query images "
            f"{'(disjoint, one split) ' if same_split else ''}but an episode needs "
            f"{max(n_way, 2)}; support/query images per class: {short}"
            f"{' ...' if len(counts) > 8 else ''}"
        )
    eligible_t = torch.tensor(sorted(eligible))
    episodes = []
    for e in range(cfg.episodes):
        g = torch.Generator().manual_seed(episode_seed(cfg.seed, e))
        chosen = eligible_t[torch.randperm(eligible_t.numel(), generator=g)[:n_way]].sort().values
        s_idx, s_lab, q_idx, q_lab = [], [], [], []
        for j, c in enumerate(chosen.tolist()):
            pool = s_pools[c]
            perm = pool[torch.randperm(pool.numel(), generator=g)]
            s_idx.append(perm[: cfg.n_shot])
            if same_split:
                q = perm[cfg.n_shot :] if cfg.n_query == -1 else perm[cfg.n_shot : cfg.n_shot + cfg.n_query]
            else:
                qpool = q_pools[c if class_map is None else class_map[c]]
                q = qpool if cfg.n_query == -1 else qpool[torch.randperm(qpool.numel(), generator=g)[: cfg.n_query]]
            q_idx.append(q)
            s_lab.append(torch.full((cfg.n_shot,), j, dtype=torch.long))
            q_lab.append(torch.full((q.numel(),), j, dtype=torch.long))
        episodes.append(Episode(chosen, torch.cat(s_idx), torch.cat(s_lab), torch.cat(q_idx), torch.cat(q_lab)))
    return episodes


# ------------------------------------------------------------------------------------------- classifiers
def _prototype_logits(support_f: Tensor, support_y: Tensor, query_f: Tensor, n_way: int, metric: str) -> Tensor:
    """Scores ``[Q, n_way]``: cosine to the class means of the normalised support, or minus the squared
    distance of the normalised query to them."""
    s = F.normalize(support_f.flatten(0, -2).float(), dim=-1)  # [S·A, D]
    q = F.normalize(query_f.float(), dim=-1)  # [Q, D]
    onehot = F.one_hot(support_y, n_way).to(s.dtype)  # [S·A, n_way]
    protos = (onehot.T @ s) / onehot.sum(0).clamp_min(1)[:, None]  # [n_way, D] class means
    if metric == "cosine":
        return q @ F.normalize(protos, dim=-1).T
    return -torch.cdist(q, protos).pow(2)


def fit_linear_heads(
    support_f: Tensor, support_y: Tensor, n_way: int, cfg: FewShotConfig, seeds: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Fit ``E`` independent fast probes at once: ``support_f [E, S, D]``, ``support_y [E, S]`` -> ``(W [E, n_way, D],
    b [E, n_way])``.

    Head ``e`` starts from ``N(0, 0.01)`` weights and zero bias drawn with ``seeds[e]`` and sees its own shuffled
    mini-batches (same generator). The loss is the **sum over heads** of each head's mean cross-entropy and AdamW
    acts element-wise, so every head follows exactly the trajectory it would follow alone; one batched step
    replaces ``E`` small ones.
    """
    e, n, d = support_f.shape
    x = support_f.float()
    gens = [torch.Generator().manual_seed(key_seed(int(sd), 1)) for sd in seeds]
    weight = nn.Parameter(torch.stack([torch.randn(n_way, d, generator=g) * 0.01 for g in gens]))  # [E, n_way, D]
    bias = nn.Parameter(torch.zeros(e, n_way))
    opt = build_optimizer(
        [{"params": [weight], "weight_decay": cfg.weight_decay}, {"params": [bias], "weight_decay": 0.0}],
        "adamw",
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )
    steps = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps
    warm = cfg.epochs / 10 if cfg.warmup_epochs is None else cfg.warmup_epochs
    sched = build_scheduler(opt, total, min(total, round(warm * steps)), cfg.min_lr / cfg.lr, "cosine")
    rows = torch.arange(e)[:, None]
    with torch.enable_grad():
        for _ in range(cfg.epochs):
            perms = torch.stack([torch.randperm(n, generator=g) for g in gens])  # [E, S]
            for idx in perms.split(cfg.batch_size, dim=1):  # [E, b]
                logits = torch.einsum("ebd,ekd->ebk", x[rows, idx], weight) + bias[:, None, :]  # [E, b, n_way]
                loss = F.cross_entropy(logits.flatten(0, 1), support_y[rows, idx].flatten(), reduction="sum")
                opt.zero_grad(set_to_none=True)
                (loss / idx.shape[1]).backward()  # Σ_e mean_b CE
                opt.step()
                sched.step()
    return weight.detach(), bias.detach()


def _flat_support(support_f: Tensor, support_y: Tensor) -> tuple[Tensor, Tensor]:
    """``[S, D]`` or ``[S, A, D]`` (A views per image) -> ``[S·A, D]`` with labels repeated per view."""
    support_y = torch.as_tensor(support_y, dtype=torch.long)
    if support_f.dim() == 3:
        return support_f.flatten(0, 1), support_y.repeat_interleave(support_f.shape[1])
    return support_f, support_y


def _prepare(f: Tensor, cfg: FewShotConfig) -> Tensor:
    f = f.float()
    return F.normalize(f, dim=-1) if cfg.normalize else f


def episode_accuracy(
    support_f: Tensor,
    support_y: Tensor,
    query_f: Tensor,
    query_y: Tensor,
    n_way: int,
    cfg: FewShotConfig,
    seed: int = 0,
) -> float:
    """Percent of queries classified correctly by ``cfg.classifier`` fitted on one episode's support.

    ``support_f`` is ``[S, D]`` or ``[S, A, D]`` (``A`` views per image, labels ``support_y [S]``);
    ``query_f [Q, D]``, ``query_y [Q]``; labels in ``0 .. n_way − 1``.
    """
    support_f, support_y = _flat_support(support_f, support_y)
    if cfg.classifier == "prototype":
        logits = _prototype_logits(support_f, support_y, query_f, n_way, cfg.metric)
    else:
        w, b = fit_linear_heads(_prepare(support_f, cfg)[None], support_y[None], n_way, cfg, [seed])
        logits = _prepare(query_f, cfg) @ w[0].T + b[0]
    return 100.0 * float((logits.argmax(1) == torch.as_tensor(query_y)).double().mean())


def _run(
    episodes: list[Episode],
    support_f: Tensor,
    query_f: Tensor,
    cfg: FewShotConfig,
    *,
    t0: float,
    n_support: int,
    n_query: int,
    n_embedded: int = 0,
) -> FewShotResult:
    seeds = [episode_seed(cfg.seed, e) for e in range(len(episodes))]
    if cfg.classifier == "linear":  # every episode has the same support size: fit all heads in one batch
        flat = [_flat_support(support_f[ep.support], ep.support_y) for ep in episodes]
        n_way = episodes[0].classes.numel()
        w, b = fit_linear_heads(
            torch.stack([_prepare(f, cfg) for f, _ in flat]), torch.stack([y for _, y in flat]), n_way, cfg, seeds
        )
        accs = [
            100.0 * float(((_prepare(query_f[ep.query], cfg) @ w[e].T + b[e]).argmax(1) == ep.query_y).double().mean())
            for e, ep in enumerate(episodes)
        ]
    else:
        accs = [
            episode_accuracy(
                support_f[ep.support],
                ep.support_y,
                query_f[ep.query],
                ep.query_y,
                ep.classes.numel(),
                cfg,
                seed=seeds[e],
            )
            for e, ep in enumerate(episodes)
        ]
    mean, ci, std = confidence_interval(accs)
    return FewShotResult(
        accuracy=mean,
        ci95=ci,
        std=std,
        episodes=len(accs),
        n_way=cfg.n_way,
        n_shot=cfg.n_shot,
        n_query=cfg.n_query,
        classifier=cfg.classifier,
        per_episode=accs,
        n_support_images=n_support,
        n_query_images=n_query,
        n_embedded=n_embedded,
        seconds=time.perf_counter() - t0,
        config=dataclasses.asdict(cfg),
    )


def few_shot_from_features(
    support_f: Tensor,
    support_y: Sequence[int] | Tensor,
    query_f: Tensor,
    query_y: Sequence[int] | Tensor,
    cfg: Optional[FewShotConfig] = None,
    *,
    same_split: bool = False,
) -> FewShotResult:
    """Few-shot accuracy from the features of whole splits: ``support_f [Ns, D]`` or ``[Ns, A, D]`` with labels
    ``[Ns]``, ``query_f [Nq, D]`` with labels ``[Nq]`` (the same label space). ``same_split``: the two are
    the same split (queries disjoint from supports)."""
    t0 = time.perf_counter()
    cfg = cfg or FewShotConfig()
    sy, qy = torch.as_tensor(support_y).long(), torch.as_tensor(query_y).long()
    if support_f.shape[0] != sy.numel() or query_f.shape[0] != qy.numel():
        raise ValueError(
            f"features and labels differ in length: support {tuple(support_f.shape)} vs {sy.numel()}, "
            f"query {tuple(query_f.shape)} vs {qy.numel()}"
        )
    episodes = sample_episodes(sy, qy, cfg, same_split=same_split)
    n_s = torch.unique(torch.cat([ep.support for ep in episodes])).numel()
    n_q = torch.unique(torch.cat([ep.query for ep in episodes])).numel()
    return _run(episodes, support_f, query_f, cfg, t0=t0, n_support=n_s, n_query=n_q)


# ------------------------------------------------------------------------------------------- datasets
def _labels(ds: Dataset, role: str) -> Tensor:
    targets, classes = getattr(ds, "targets", None), getattr(ds, "classes", None)
    if targets is None or classes is None:
        raise ValueError(f"the {role} dataset ({type(ds).__name__}) needs .targets and .classes")
    return torch.as_tensor(targets, dtype=torch.long).reshape(-1)


def _features_of(
    backbone: nn.Module, ds: Dataset, idx: Tensor, device, batch_size: int, num_workers: int, amp_dtype
) -> Tensor:
    loader = DataLoader(Subset(ds, idx.tolist()), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return extract_features(backbone, loader, device=device, amp_dtype=amp_dtype)[0]


def few_shot_eval(
    backbone: nn.Module,
    support: Dataset,
    query: Dataset,
    cfg: Optional[FewShotConfig] = None,
    *,
    support_augmented: Optional[Dataset] = None,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    num_workers: int = 0,
    amp_dtype: Optional[torch.dtype] = None,
) -> FewShotResult:
    """Few-shot accuracy of a frozen ``backbone`` (already on ``device``) over ``cfg.episodes`` episodes.

    Args:
        backbone: images -> pooled features; run in eval mode under ``no_grad``, flags restored.
        support: labelled split under the eval transform (``.targets``, ``.classes``) giving the support.
        query: labelled split under the eval transform giving the queries; ``query is support`` draws both
            from one split, disjoint.
        cfg: the evaluation (default :class:`FewShotConfig`).
        support_augmented: the support split's images under the training augmentation, redrawn per access;
            required when ``cfg.augs_per_image > 0`` (views drawn with torch's RNG forked and seeded by
            ``(cfg.seed, view)``, so the result is reproducible).
        device, batch_size, num_workers, amp_dtype: feature extraction.

    Only the images some episode uses are embedded, each once per view.
    """
    t0 = time.perf_counter()
    cfg = cfg or FewShotConfig()
    same = query is support
    sy, qy = _labels(support, "support"), _labels(query, "query")
    s_names, q_names = list(support.classes), list(query.classes)  # type: ignore[attr-defined]
    where = {str(n): j for j, n in enumerate(q_names)}
    class_map = {c: where[str(n)] for c, n in enumerate(s_names) if str(n) in where}
    if not class_map:
        raise ValueError(
            f"the support and query splits share no class name (support: {s_names[:5]}..., query: {q_names[:5]}...)"
        )
    if cfg.augs_per_image > 0:
        if support_augmented is None:
            raise ValueError(
                "fewshot.augs_per_image > 0 needs support_augmented (the support images with the training augmentation)"
            )
        n_aug, n_sup = len(support_augmented), len(support)  # type: ignore[arg-type]
        if n_aug != n_sup:
            raise ValueError(f"support_augmented has {n_aug} images, the support split {n_sup}")
    episodes = sample_episodes(sy, qy, cfg, same_split=same, class_map=None if same else class_map, class_names=s_names)
    s_used = torch.unique(torch.cat([ep.support for ep in episodes]))  # sorted
    q_used = torch.unique(torch.cat([ep.query for ep in episodes]))
    device = torch.device(device)
    kw = dict(device=device, batch_size=batch_size, num_workers=num_workers, amp_dtype=amp_dtype)
    with eval_mode(backbone):
        if cfg.augs_per_image == 0:
            both = torch.unique(torch.cat([s_used, q_used])) if same else s_used
            f = _features_of(backbone, support, both, **kw)
            s_feats = f[torch.searchsorted(both, s_used)]
            q_feats = f[torch.searchsorted(both, q_used)] if same else _features_of(backbone, query, q_used, **kw)
            n_embedded = both.numel() + (0 if same else q_used.numel())
        else:
            views = []
            for a in range(cfg.augs_per_image):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(key_seed(cfg.seed, 0xA06, a))
                    views.append(_features_of(backbone, support_augmented, s_used, **kw))
            s_feats = torch.stack(views, dim=1)  # [S, A, D]
            q_feats = _features_of(backbone, query, q_used, **kw)
            n_embedded = cfg.augs_per_image * s_used.numel() + q_used.numel()
    # episode indices (into the splits) -> rows of the compact feature tensors
    remapped = [
        ep._replace(support=torch.searchsorted(s_used, ep.support), query=torch.searchsorted(q_used, ep.query))
        for ep in episodes
    ]
    return _run(
        remapped, s_feats, q_feats, cfg, t0=t0, n_support=s_used.numel(), n_query=q_used.numel(), n_embedded=n_embedded
    )
