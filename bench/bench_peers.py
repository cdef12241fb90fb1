"""Side by side with lightly: each method both libraries ship, trained by each library from the same random backbone
on the same images for the same steps, then scored by the same kNN, in one script run.

    python bench/bench_peers.py --output bench_peers.json                       # every method, 400 steps each
    python bench/bench_peers.py --methods simclr byol --steps 100 --output r.json
    python bench/bench_peers.py --methods simclr --steps 3 --knn-subset 500     # a quick check of both sides
    python bench/bench_peers.py --methods mae -- --optim.lr 1e-3                # overrides of the recipe (both sides)

Per method (``--methods``; the short names of ``bench_cpu_small.py``: the shipped ``<m>-cpu-small`` recipe):

* **selfsup**: the recipe as shipped (its method, data and optimiser settings), trained by selfsup's engine
  (``selfsup.engine.pretrain.pretrain``) for ``--steps`` optimiser steps;
* **lightly**: the same method written the way lightly's documentation examples write it (``examples/pytorch/*.py``:
  a plain PyTorch loop over a ``torch.utils.data.DataLoader`` with worker processes, lightly's transforms, heads,
  losses, ``update_momentum`` / ``cosine_schedule``), configured with the recipe's values: the same backbone module
  (a deep copy of the recipe's instantiated backbone, so both start from the same random weights), the same images
  (the recipe's training split, decoded once and served as PIL images, as ``torchvision.datasets.CIFAR10`` serves
  them to lightly's examples), batch size, optimiser, learning-rate schedule (lightly's ``cosine_warmup_schedule``
  gives the engine's warm-up + cosine exactly), weight-decay schedule, gradient clipping, EMA rates and number of
  steps. Where lightly's components cannot express a recipe value, the difference is listed per method (printed
  and in the JSON under ``differences``).

Both backbones are then scored by selfsup's kNN as ``bench_cpu_small.py`` scores them (k=200, T=0.5, backbone
features in eval mode; by default the whole bank split, 50,000 images, and test split, 10,000; ``--knn-subset N``
keeps a seeded random N of each). Seconds per step are wall time per optimiser step after ``--warmup-steps`` steps,
data loading included as each library's user runs it (selfsup: views made in the training step from images in
memory; lightly: per-image transforms in ``--peer-workers`` DataLoader workers). The table gives the speed ratio
(lightly s/step / selfsup s/step: above 1 means selfsup is faster) and the kNN difference (selfsup - lightly). The
JSON (``--output``) is written after every method, so a run that is stopped keeps what it measured.

Precision: selfsup runs the recipe's ``trainer.precision`` (``auto``: bf16 autocast where the CPU has native bf16);
lightly's examples train in fp32, which is the default here (``--peer-precision bf16`` runs lightly's loop under the
same bf16 autocast). Each side's precision is in the table and the JSON.

lightly is a bench-only dependency (``pip install -e ".[bench]"``); without it ``--sides selfsup`` still runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_small import _instantiate, recipe_path  # noqa: E402

#: The methods both libraries ship, in the order they run (short names of the shipped ``<m>-cpu-small`` recipes).
METHODS: tuple[str, ...] = (
    "simclr",
    "byol",
    "mmcr",
    "mae",
    "dino",
    "swav",
    "barlow",
    "vicreg",
    "mocov3",
    "simsiam",
    "ibot",
    "ijepa",
)
#: Methods that cannot be trained properly with lightly's components, with the reason (none at present; a builder
#: that meets a recipe value lightly cannot express raises :class:`Unsupported`, which skips that method the same way).
SKIPPED: dict[str, str] = {}

BATCHED_NOTE = (
    "views: selfsup makes them as one batched op on uint8 tensors in the training step (crop boxes not rounded to "
    "whole pixels, no antialiasing, jitter in the fixed order brightness, contrast, saturation, hue); lightly per "
    "image with torchvision / PIL in the DataLoader workers (jitter in a random order)"
)
LIGHTLY_MISSING = 'lightly is not installed: pip install -e ".[bench]" (a bench-only extra), or run --sides selfsup'


class Unsupported(Exception):
    """A recipe value lightly's components cannot express: the method is listed as skipped with this reason."""


# ====================================================================================================================
# The shared harness (no lightly): recipes, timing, the kNN, the optimiser settings, the table and the JSON
# ====================================================================================================================


def plain(ns: Any) -> Any:
    """A jsonargparse Namespace (nested) as plain dicts / lists."""
    if hasattr(ns, "__dict__") and not isinstance(ns, (str, bytes, type)):
        return {k: plain(v) for k, v in vars(ns).items()}
    if isinstance(ns, (list, tuple)):
        return type(ns)(plain(v) for v in ns)
    return ns


class StepClock:
    """Wall-clock time at the end of every optimiser step (after the device's queued work: ``sync``); the seconds per
    step after the warm-up steps."""

    def __init__(self, sync: bool = False) -> None:
        self.ends: list[float] = []
        self.sync = sync

    def tick(self) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())

    def seconds_per_step(self, warmup: int) -> tuple[float, int]:
        """``(s/step, timed steps)``: from the end of step ``warmup`` to the end of the last step (at least one step
        timed: ``warmup`` is cut to ``steps - 1``)."""
        n = len(self.ends)
        if n < 2:
            return float("nan"), 0
        w = max(1, min(warmup, n - 1))
        return (self.ends[-1] - self.ends[w - 1]) / (n - w), n - w


def _step_callback(clock: StepClock):
    import lightning as L

    class StepTimes(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # one per step
            clock.tick()

    return StepTimes()


def knn_sets(data_cfg, subset: Optional[int]) -> tuple[Dataset, Dataset]:
    """The bank and test splits under the recipe's eval transform (``subset``: a seeded random ``subset`` of each)."""
    from selfsup.data.build import build_eval_dataset

    return build_eval_dataset(data_cfg, data_cfg.bank_split, limit=subset), build_eval_dataset(
        data_cfg, data_cfg.test_split, limit=subset
    )


def knn_eval(
    backbone: nn.Module, bank: Dataset, test: Dataset, k: int = 200, temperature: float = 0.5, device: str = "cpu"
) -> dict:
    """selfsup's kNN as ``bench_cpu_small.evaluate``: backbone features in eval mode, cosine top-k weighted vote."""
    from selfsup.data.build import num_classes
    from selfsup.eval.features import extract_features
    from selfsup.eval.knn import knn_accuracy

    t0 = time.time()
    backbone.to(device)
    bf, by = extract_features(backbone, DataLoader(bank, batch_size=1000), device=device)
    tf, ty = extract_features(backbone, DataLoader(test, batch_size=1000), device=device)
    out = knn_accuracy(bf, by, tf, ty, num_classes=num_classes(bank), k=k, temperature=temperature)
    return {**out, "n_bank": len(by), "n_test": len(ty), "k": min(k, len(by)), "eval_s": round(time.time() - t0, 1)}


def train_selfsup(init, warmup: int) -> dict:
    """The recipe's method trained by selfsup's engine; wall time and seconds per step."""
    from selfsup.engine.pretrain import pretrain, resolve_precision

    clock = StepClock(sync=init.trainer.accelerator in ("gpu", "cuda"))
    t0 = time.perf_counter()
    pretrain(init.method, init.data, init.optim, init.trainer, init.monitor, extra_callbacks=[_step_callback(clock)])
    wall = time.perf_counter() - t0
    sps, timed = clock.seconds_per_step(warmup)
    return {
        "steps": len(clock.ends),
        "seconds_per_step": sps,
        "timed_steps": timed,
        "wall_s": round(wall, 1),
        "precision": resolve_precision(init.trainer.precision, init.trainer.accelerator),
    }


TOKEN_NAMES = ("cls_token", "reg_token", "pos_embed", "mask_token")


def recipe_param_groups(groups: Sequence[dict], optim_cfg, batch_size: int, no_decay_ids: set[int]) -> list[dict]:
    """Optimiser groups with the recipe's rules (``selfsup.engine.optim.method_param_groups``): each group's lr is the
    recipe's (``scale_lr`` applied) times its ``lr_mult``; with ``optim.exclude_1d`` (always for LARS) 1-D parameters,
    what a ``no_weight_decay()`` names (``no_decay_ids``) and the ViT tokens / position tables get no weight decay.

    ``groups``: ``[{"name", "params": [(name, parameter)], optional "lr_mult", optional "fixed_lr"}]``; parameters
    that do not require gradients (teachers, frozen gains) are left out. Each returned group carries ``peak_lr``,
    ``fixed_lr`` and ``base_weight_decay`` for the per-step schedules.
    """
    from selfsup.engine.optim import scaled_lr

    lr = scaled_lr(optim_cfg.lr, batch_size, rule=optim_cfg.scale_lr)
    exclude = bool(optim_cfg.exclude_1d) or optim_cfg.name == "lars"
    out = []
    for g in groups:
        decay, no_decay = [], []
        for name, p in g["params"]:
            if not p.requires_grad:
                continue
            skip = exclude and (p.ndim <= 1 or id(p) in no_decay_ids or name.rsplit(".", 1)[-1] in TOKEN_NAMES)
            (no_decay if skip else decay).append(p)
        peak = lr * float(g.get("lr_mult", 1.0))
        common = {"lr": peak, "peak_lr": peak, "fixed_lr": bool(g.get("fixed_lr", False))}
        for params, wd, suffix in ((decay, optim_cfg.weight_decay, ""), (no_decay, 0.0, "/no_decay")):
            if params:
                out.append({"name": g["name"] + suffix, "params": params, "weight_decay": wd, **common})
    for g in out:
        g["base_weight_decay"] = g["weight_decay"]
    return out


def torch_optimizer(groups: list[dict], optim_cfg) -> torch.optim.Optimizer:
    """The recipe's optimiser as a lightly user builds it: ``torch.optim`` Adam (coupled L2, as selfsup's ``adam``),
    AdamW or SGD; LARS is lightly's (``lightly.utils.lars.LARS``)."""
    name, lr = optim_cfg.name, optim_cfg.lr
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=tuple(optim_cfg.betas))
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim_cfg.betas))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg.momentum)
    if name == "lars":
        from lightly.utils.lars import LARS

        return LARS(groups, lr=lr, momentum=optim_cfg.momentum, trust_coefficient=optim_cfg.eta)
    raise Unsupported(f"optimiser {name!r}")


def clip_gradients(params, max_norm: float, per_param: bool) -> None:
    """The recipe's clipping: the global norm (``clip_grad_norm_``) or each parameter's own (DINO's ``clip_gradients``)."""
    grads = [p for p in params if p.grad is not None]
    if not per_param:
        torch.nn.utils.clip_grad_norm_(grads, max_norm)
        return
    for p in grads:
        coef = max_norm / (float(p.grad.detach().norm(2)) + 1e-6)
        if coef < 1:
            p.grad.mul_(coef)


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def result_row(name: str, rec: dict) -> dict:
    """kNN of each side, the difference, s/step of each side and the ratio, from one method's record."""
    ours, peer = rec.get("selfsup") or {}, rec.get("lightly") or {}
    k_ours, k_peer = (ours.get("knn") or {}).get("top1"), (peer.get("knn") or {}).get("top1")
    s_ours, s_peer = ours.get("seconds_per_step"), peer.get("seconds_per_step")
    return {
        "method": name,
        "steps": rec.get("steps"),
        "knn_selfsup": k_ours,
        "knn_lightly": k_peer,
        "knn_diff": None if k_ours is None or k_peer is None else k_ours - k_peer,
        "s_per_step_selfsup": s_ours,
        "s_per_step_lightly": s_peer,
        "speed_ratio": None if not s_ours or s_peer is None else s_peer / s_ours,
        "precision": f"{ours.get('precision', '-')} / {peer.get('precision', '-')}",
    }


def table(results: dict, skipped: dict) -> str:
    """The side-by-side table (one line per method; skipped methods with their reason)."""
    head = (
        f"  {'method':<8} {'steps':>5} {'kNN selfsup':>11} {'kNN lightly':>11} {'diff':>6} "
        f"{'s/step selfsup':>14} {'s/step lightly':>14} {'ratio':>6}  precision (selfsup / lightly)"
    )
    lines = [head]
    for name, rec in results.items():
        r = result_row(name, rec)
        lines.append(
            f"  {name:<8} {_fmt(r['steps'], 'd'):>5} {_fmt(r['knn_selfsup'], '.2f'):>11} "
            f"{_fmt(r['knn_lightly'], '.2f'):>11} {_fmt(r['knn_diff'], '+.2f'):>6} "
            f"{_fmt(r['s_per_step_selfsup'], '.3f'):>14} {_fmt(r['s_per_step_lightly'], '.3f'):>14} "
            f"{_fmt(r['speed_ratio'], '.2f'):>6}  {r['precision']}"
        )
    for name, reason in skipped.items():
        lines.append(f"  {name:<8} skipped: {reason}")
    return "\n".join(lines)


def write_json(path: Optional[str], payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str))


def environment(args) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        import lightly

        env["lightly"] = lightly.__version__
    except ImportError:
        env["lightly"] = None
    return env


# ====================================================================================================================
# The lightly side: lightly's components, in a plain loop as its examples write it
# ====================================================================================================================


def to_device(batch: Any, device: str) -> Any:
    """A loader batch (tensors in nested lists / tuples) on ``device``."""
    if device == "cpu":
        return batch
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    return batch


class PILImages(Dataset):
    """The training images as ``(transform(PIL image), label)``: decoded once into memory, as
    ``torchvision.datasets.CIFAR10`` holds CIFAR-10 and hands PIL images to lightly's transforms in its examples
    (a dataset that is not in memory is read per image, as lightly's ``LightlyDataset`` of a folder)."""

    def __init__(self, data_cfg, transform: Callable):
        from selfsup.data.build import open_source

        if data_cfg.subset is not None or data_cfg.n_way is not None or data_cfg.n_shot is not None:
            raise ValueError("bench_peers trains on the whole training split: data.subset / n_way / n_shot are unset")
        source = open_source(data_cfg)
        self.transform = transform
        if source.in_memory:
            ds = source.decoded(data_cfg.train_split)
            self.images = ds.images.permute(0, 2, 3, 1).contiguous().numpy()  # [N, H, W, 3] uint8
            self.labels = ds.labels.tolist()
            self.raw = None
        else:
            self.raw = source.raw(data_cfg.train_split)
            self.labels = list(self.raw.targets)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        img = Image.fromarray(self.images[i]) if self.raw is None else self.raw[i][0]
        return self.transform(img), self.labels[i]


@dataclass
class Peer:
    """One method written with lightly: the modules, the transform, and the step's pieces of the plain loop."""

    model: nn.Module  # every module (online, momentum copies, heads): its trainable parameters are optimised
    transform: Callable
    loss: Callable[[Any, int, int], Tensor]  # (batch, step, epoch) -> loss
    groups: list[dict]  # [{"name", "params": [(name, p)], "lr_mult", "fixed_lr"}]
    components: list[str]
    differences: list[str] = field(default_factory=list)
    collate_fn: Optional[Callable] = None
    before_step: Callable[[int], None] = lambda step: None  # the examples' momentum update before the forward
    after_backward: Callable[[int, int], None] = lambda step, epoch: None  # cancel last-layer gradients
    after_step: Callable[[int], None] = lambda step: None  # the examples' momentum update after the step


@dataclass
class Ctx:
    """What a builder reads: the recipe's method arguments, the backbone, the data config and its pipelines."""

    name: str
    args: dict
    backbone: nn.Module
    data: Any
    pipelines: list  # the recipe's Augment pipelines (one, or an asymmetric pair)
    local: Optional[list]  # the local views' pipelines (multi-crop) or None
    total_steps: int

    @property
    def feat(self) -> int:
        return int(self.backbone.num_features)


def _normalize(aug) -> dict:
    return {"mean": list(aug.mean), "std": list(aug.std)}


def _jitter(aug) -> dict:
    b, c, s, h = aug.jitter
    return {"cj_prob": aug.jitter_p, "cj_strength": 1.0, "cj_bright": b, "cj_contrast": c, "cj_sat": s, "cj_hue": h}


def _view_kwargs(aug) -> dict:
    """lightly's per-view transform arguments (SimCLR / BYOL / VICReg / SimSiam / MMCR style) from a recipe Augment."""
    return {
        "input_size": aug.crop_size,
        "min_scale": aug.scale[0],
        "random_gray_scale": aug.gray_p,
        "gaussian_blur": aug.blur_p,
        "hf_prob": aug.flip_p,
        "sigmas": tuple(aug.blur_sigma),
        "normalize": _normalize(aug),
        **_jitter(aug),
    }


def _aug_notes(augs: Sequence, interpolation: str, what: str, fixed_flip: Optional[float] = None) -> list[str]:
    """Where lightly's transform cannot take a recipe value."""
    notes = []
    for i, a in enumerate(augs):
        tag = f"{what}" + (f" view {i + 1}" if len(augs) > 1 else "")
        if a.interpolation != interpolation:
            notes.append(f"{tag}: crop resize {interpolation} in lightly's transform, {a.interpolation} in the recipe")
        if tuple(a.ratio) != (3.0 / 4.0, 4.0 / 3.0):
            notes.append(f"{tag}: crop aspect ratio (3/4, 4/3) in lightly's transform, {tuple(a.ratio)} in the recipe")
        if a.color_first:
            notes.append(f"{tag}: lightly jitters after the crop, the recipe before it")
        if fixed_flip is not None and a.flip_p != fixed_flip:
            notes.append(f"{tag}: horizontal flip p {fixed_flip} in lightly's transform, {a.flip_p} in the recipe")
        if a.blur_p > 0:
            notes.append(f"{tag}: lightly blurs with PIL's GaussianBlur(radius = sigma), the recipe with a kernel")
    return notes


def _check_crop_max(augs: Sequence, what: str) -> list[str]:
    return [
        f"{what}: lightly's transform crops scale ({a.scale[0]}, 1.0), the recipe ({a.scale[0]}, {a.scale[1]})"
        for a in augs
        if a.scale[1] != 1.0
    ]


def _photometric_only(augs: Sequence, what: str) -> list[str]:
    """lightly's MAE / I-JEPA transforms have no photometric ops: a recipe that has some is noted."""
    return [
        f"{what}: the recipe jitters / greys / blurs / solarises, lightly's transform does not"
        for a in augs
        if a.jitter_p > 0 or a.gray_p > 0 or a.blur_p > 0 or a.solarize_p > 0
    ]


def _two_view_transform(ctx: Ctx) -> tuple[Callable, str, list[str]]:
    """SimCLRTransform for a symmetric pipeline, BYOLTransform (View1 / View2) for an asymmetric pair."""
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform, SimCLRTransform

    augs = ctx.pipelines
    notes = _aug_notes(augs, "bilinear", "views") + _check_crop_max(augs, "views")
    if len(augs) == 1:
        a = augs[0]
        if a.solarize_p > 0:
            raise Unsupported("SimCLRTransform has no solarisation; the recipe solarises")
        return SimCLRTransform(**_view_kwargs(a)), "SimCLRTransform", notes
    a, b = augs
    return (
        BYOLTransform(
            BYOLView1Transform(**_view_kwargs(a), solarization_prob=a.solarize_p),
            BYOLView2Transform(**_view_kwargs(b), solarization_prob=b.solarize_p),
        ),
        "BYOLTransform(BYOLView1Transform, BYOLView2Transform)",
        notes,
    )


def _equal_hidden(widths: Sequence[int], what: str) -> None:
    if len(set(widths[:-1])) > 1:
        raise Unsupported(f"{what} {list(widths)}: lightly's heads have one hidden width")


def _named(*modules: tuple[str, nn.Module]) -> list[tuple[str, nn.Parameter]]:
    return [(f"{prefix}.{n}", p) for prefix, m in modules for n, p in m.named_parameters()]


def _frozen_copy(module: nn.Module, build: Optional[Callable[[], nn.Module]] = None) -> nn.Module:
    """A momentum / teacher copy (``deactivate_requires_grad``): ``copy.deepcopy``, or for a module that cannot be
    deep-copied (lightly's DINO head uses the old ``nn.utils.weight_norm``) a fresh ``build()`` loaded with its state."""
    from lightly.models.utils import deactivate_requires_grad

    if build is None:
        copied = copy.deepcopy(module)
    else:
        copied = build()
        copied.load_state_dict(module.state_dict())
    deactivate_requires_grad(copied)
    return copied


# ------------------------------------------------------------------------------------------------ joint embeddings


def build_simclr(ctx: Ctx) -> Peer:
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    proj = list(ctx.args["projector"])
    _equal_hidden(proj, "projector")
    backbone = ctx.backbone
    head = SimCLRProjectionHead(ctx.feat, proj[0], proj[-1], num_layers=len(proj), batch_norm=True)
    model = nn.ModuleDict({"backbone": backbone, "projection_head": head})
    criterion = NTXentLoss(temperature=ctx.args["temperature"])
    transform, tname, notes = _two_view_transform(ctx)

    def loss(batch, step, epoch):
        x0, x1 = batch[0]
        return criterion(head(backbone(x0)), head(backbone(x1)))

    return Peer(
        model,
        transform,
        loss,
        [{"name": "all", "params": _named(("backbone", backbone), ("head", head))}],
        ["SimCLRProjectionHead", "NTXentLoss", tname],
        [
            f"SimCLRProjectionHead(batch_norm=True) ends with BatchNorm1d({proj[-1]}) after its output layer; the "
            "recipe's projector ends with the Linear",
            "one backbone pass per view (BatchNorm statistics per view), as lightly's example; selfsup: one pass "
            "over both views",
            *notes,
        ],
    )


def _momentum_schedule(tau: float, final: Optional[float], total: int) -> Callable[[int], float]:
    from lightly.utils.scheduler import cosine_schedule

    return lambda step: tau if final is None else cosine_schedule(step, total, tau, final)


def build_byol(ctx: Ctx) -> Peer:
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import update_momentum

    proj, a = list(ctx.args["projector"]), ctx.args
    if len(proj) != 2:
        raise Unsupported(f"projector {proj}: lightly's BYOLProjectionHead has one hidden layer")
    backbone = ctx.backbone
    head = BYOLProjectionHead(ctx.feat, proj[0], proj[1])
    pred = BYOLPredictionHead(proj[1], a["predictor_hidden"], proj[1])
    backbone_m, head_m = _frozen_copy(backbone), _frozen_copy(head)
    model = nn.ModuleDict(
        {"backbone": backbone, "head": head, "pred": pred, "backbone_m": backbone_m, "head_m": head_m}
    )
    criterion = NegativeCosineSimilarity()
    momentum = _momentum_schedule(a["tau"], a.get("final_tau", 1.0), ctx.total_steps)
    transform, tname, notes = _two_view_transform(ctx)

    def before_step(step):
        m = momentum(step)
        update_momentum(backbone, backbone_m, m=m)
        update_momentum(head, head_m, m=m)

    def loss(batch, step, epoch):
        x0, x1 = batch[0]
        p0, p1 = pred(head(backbone(x0))), pred(head(backbone(x1)))
        with torch.no_grad():
            z0, z1 = head_m(backbone_m(x0)), head_m(backbone_m(x1))
        return 0.5 * (criterion(p0, z1) + criterion(p1, z0))

    return Peer(
        model,
        transform,
        loss,
        [{"name": "all", "params": _named(("backbone", backbone), ("head", head), ("pred", pred))}],
        [
            "BYOLProjectionHead",
            "BYOLPredictionHead",
            "NegativeCosineSimilarity",
            "update_momentum",
            "cosine_schedule",
            tname,
        ],
        [
            "loss scale: lightly's example takes 0.5·(−cos − cos), selfsup Σ(2 − 2·cos): 4x the gradient (Adam is "
            "invariant to it up to eps and the coupled weight decay)",
            "EMA step at the start of each iteration with that step's momentum (lightly's example); selfsup after the "
            "optimiser step: one step apart",
            *notes,
        ],
        before_step=before_step,
    )


def build_mmcr(ctx: Ctx) -> Peer:
    from lightly.loss import MMCRLoss
    from lightly.models.modules import MMCRProjectionHead
    from lightly.models.utils import update_momentum
    from lightly.transforms import MMCRTransform

    proj, a = list(ctx.args["projector"]), ctx.args
    _equal_hidden(proj, "projector")
    if len(ctx.pipelines) != 1:
        raise Unsupported("MMCRTransform makes k views of one pipeline; the recipe's pipelines are a pair")
    aug, views = ctx.pipelines[0], int(ctx.data.views)
    if aug.solarize_p > 0:
        raise Unsupported("the recipe solarises its views; MMCRTransform does not")
    backbone = ctx.backbone
    head = MMCRProjectionHead(
        ctx.feat, proj[0], proj[-1], num_layers=len(proj) - 1, use_bias=bool(a["projector_last_bias"])
    )
    modules = {"backbone": backbone, "head": head}
    tau = a.get("momentum_tau")
    if tau is not None:
        modules.update(backbone_m=_frozen_copy(backbone), head_m=_frozen_copy(head))
    model = nn.ModuleDict(modules)
    criterion = MMCRLoss(lmda=a["lmbda"])
    transform = MMCRTransform(k=views, **_view_kwargs(aug))

    def before_step(step):
        if tau is not None:
            update_momentum(backbone, model["backbone_m"], m=tau)
            update_momentum(head, model["head_m"], m=tau)

    def loss(batch, step, epoch):
        z = torch.stack([head(backbone(x)) for x in batch[0]], dim=1)  # [B, k, D], one pass per view
        z = F.normalize(z, dim=-1)
        if tau is None:
            return criterion(z, z)  # no momentum branch: the centroid of the online views, as the recipe
        with torch.no_grad():
            zm = torch.stack([model["head_m"](model["backbone_m"](x)) for x in batch[0]], dim=1)
        return criterion(z, F.normalize(zm, dim=-1))

    differences = [
        "embeddings L2-normalised before MMCRLoss (added: lightly's MMCRLoss and example never normalise, which "
        "leaves the nuclear-norm objective unbounded; the official MMCR and selfsup normalise)",
        f"one backbone pass per view ({views} passes of {ctx.data.batch_size} images, BatchNorm statistics per view), "
        "as lightly's example; selfsup: one pass over all views",
        *_aug_notes([aug], "bilinear", "views"),
        *_check_crop_max([aug], "views"),
    ]
    if tau is None:
        differences.insert(1, "no momentum branch (as the recipe): MMCRLoss gets the online embeddings twice")
    if a["lmbda"]:
        differences.append("local term: MMCRLoss over the doubled view stack weighs it sqrt(2)x the recipe's")
    return Peer(
        model,
        transform,
        loss,
        [{"name": "all", "params": _named(("backbone", backbone), ("head", head))}],
        ["MMCRProjectionHead", "MMCRLoss", "MMCRTransform"] + (["update_momentum"] if tau is not None else []),
        differences,
        before_step=before_step,
    )


def build_barlow(ctx: Ctx) -> Peer:
    from lightly.loss import BarlowTwinsLoss
    from lightly.models.modules import BarlowTwinsProjectionHead

    proj, a = list(ctx.args["projector"]), ctx.args
    if len(proj) != 3 or proj[0] != proj[1]:
        raise Unsupported(f"projector {proj}: lightly's BarlowTwinsProjectionHead has two equal hidden layers")
    backbone = ctx.backbone
    head = BarlowTwinsProjectionHead(ctx.feat, proj[0], proj[2])
    model = nn.ModuleDict({"backbone": backbone, "projection_head": head})
    criterion = BarlowTwinsLoss(lambda_param=a["lambd"])
    scale = float(a["scale_loss"])
    transform, tname, notes = _two_view_transform(ctx)
    params = _named(("backbone", backbone), ("head", head))

    def loss(batch, step, epoch):
        x0, x1 = batch[0]
        return scale * criterion(head(backbone(x0)), head(backbone(x1)))

    return Peer(
        model,
        transform,
        loss,
        [
            {"name": "weights", "params": [(n, p) for n, p in params if p.ndim > 1]},
            {"name": "biases", "params": [(n, p) for n, p in params if p.ndim <= 1], "lr_mult": a["bias_lr_mult"]},
        ],
        ["BarlowTwinsProjectionHead", "BarlowTwinsLoss", tname],
        [
            "BarlowTwinsProjectionHead's output layer has a bias (no effect: the loss batch-normalises the outputs)",
            *notes,
        ],
    )


def build_vicreg(ctx: Ctx) -> Peer:
    from lightly.loss import VICRegLoss
    from lightly.models.modules.heads import VICRegProjectionHead
    from lightly.transforms import VICRegTransform

    proj, a = list(ctx.args["projector"]), ctx.args
    _equal_hidden(proj, "projector")
    if len(ctx.pipelines) != 1:
        raise Unsupported("VICRegTransform is symmetric; the recipe's pipelines are a pair")
    aug = ctx.pipelines[0]
    backbone = ctx.backbone
    head = VICRegProjectionHead(ctx.feat, proj[0], proj[-1], num_layers=len(proj))
    model = nn.ModuleDict({"backbone": backbone, "projection_head": head})
    # lightly's variance term is the official ½(var_a + var_b), as selfsup's: the recipe's std_coeff carries over
    criterion = VICRegLoss(lambda_param=a["sim_coeff"], mu_param=a["std_coeff"], nu_param=a["cov_coeff"])
    kw = _view_kwargs(aug)
    transform = VICRegTransform(**kw, solarize_prob=aug.solarize_p)

    def loss(batch, step, epoch):
        x0, x1 = batch[0]
        return criterion(head(backbone(x0)), head(backbone(x1)))

    return Peer(
        model,
        transform,
        loss,
        [{"name": "all", "params": _named(("backbone", backbone), ("head", head))}],
        ["VICRegProjectionHead", "VICRegLoss", "VICRegTransform"],
        [
            "VICRegProjectionHead's output layer has a bias (the recipe's has none)",
            *_aug_notes([aug], "bilinear", "views"),
            *_check_crop_max([aug], "views"),
        ],
    )


def build_mocov3(ctx: Ctx) -> Peer:
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import update_momentum

    proj, a = list(ctx.args["projector"] or []), ctx.args
    if not proj:
        raise Unsupported("the recipe leaves the projector to the backbone family; give it explicitly")
    _equal_hidden(proj, "projector")
    if hasattr(ctx.backbone, "patch_embed"):
        raise Unsupported("MoCo v3's ViT recipe (fixed sin-cos positions, frozen patch projection) has no lightly part")
    backbone = ctx.backbone
    head = MoCoProjectionHead(ctx.feat, proj[0], proj[-1], num_layers=len(proj), batch_norm=True)
    pred = MoCoProjectionHead(proj[-1], a["predictor_hidden"], proj[-1], num_layers=2, batch_norm=True)
    backbone_m, head_m = _frozen_copy(backbone), _frozen_copy(head)
    model = nn.ModuleDict(
        {"backbone": backbone, "head": head, "pred": pred, "backbone_m": backbone_m, "head_m": head_m}
    )
    criterion = NTXentLoss(temperature=a["temperature"], memory_bank_size=0)
    momentum = _momentum_schedule(a["tau"], a.get("final_tau"), ctx.total_steps)
    transform, tname, notes = _two_view_transform(ctx)

    def before_step(step):
        m = momentum(step)
        update_momentum(backbone, backbone_m, m=m)
        update_momentum(head, head_m, m=m)

    def loss(batch, step, epoch):
        x0, x1 = batch[0]
        q0, q1 = pred(head(backbone(x0))), pred(head(backbone(x1)))
        with torch.no_grad():
            k0, k1 = head_m(backbone_m(x0)), head_m(backbone_m(x1))
        return criterion(q0, k1) + criterion(q1, k0)

    return Peer(
        model,
        transform,
        loss,
        [{"name": "all", "params": _named(("backbone", backbone), ("head", head), ("pred", pred))}],
        [
            "MoCoProjectionHead(batch_norm=True) as projector and predictor",
            "NTXentLoss(memory_bank_size=0)",
            "update_momentum",
            "cosine_schedule",
            tname,
        ],
        [
            "loss: lightly has no MoCo v3 loss; NTXentLoss without memory bank is SimCLR's NT-Xent on (query, key): "
            "its negatives include the other queries and it adds key-anchored rows, where MoCo v3 (selfsup) takes "
            "2τ·CE(q·kᵀ/τ) over the batch's keys only",
            "MoCoProjectionHead(batch_norm=True) ends both MLPs with an affine BatchNorm1d; the recipe's projector "
            f"ends with BatchNorm1d(affine=False) and its predictor with the Linear (predictor_last_bn "
            f"{a.get('predictor_last_bn')}, the official ResNet builder)",
            "EMA step at the start of each iteration (lightly's example); selfsup after the optimiser step",
            *notes,
        ],
        before_step=before_step,
    )


def build_simsiam(ctx: Ctx) -> Peer:
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead
    from lightly.transforms import SimSiamTransform

    a = ctx.args
    if len(ctx.pipelines) != 1:
        raise Unsupported("SimSiamTransform is symmetric; the recipe's pipelines are a pair")
    aug = ctx.pipelines[0]
    if aug.solarize_p > 0:
        raise Unsupported("the recipe solarises its views; SimSiamTransform does not")
    hidden = ctx.feat if a.get("hidden_dim") is None else int(a["hidden_dim"])
    backbone = ctx.backbone
    head = SimSiamProjectionHead(ctx.feat, hidden, a["dim"])
    pred = SimSiamPredictionHead(a["dim"], a["pred_dim"], a["dim"])
    model = nn.ModuleDict({"backbone": backbone, "projection_head": head, "prediction_head": pred})
    criterion = NegativeCosineSimilarity()
    transform = SimSiamTransform(**_view_kwargs(aug))

    def loss(batch, step, epoch):
        x0, x1 = batch[0]
        z0, z1 = head(backbone(x0)), head(backbone(x1))
        p0, p1 = pred(z0), pred(z1)
        return 0.5 * (criterion(z0.detach(), p1) + criterion(z1.detach(), p0))

    encoder = _named(("backbone", backbone), ("head", head))
    groups = [{"name": "encoder", "params": encoder}, {"name": "predictor", "params": _named(("pred", pred))}]
    if a.get("fix_pred_lr"):
        groups[1]["fixed_lr"] = True
    else:
        groups = [{"name": "all", "params": encoder + groups[1]["params"]}]
    return Peer(
        model,
        transform,
        loss,
        groups,
        ["SimSiamProjectionHead", "SimSiamPredictionHead", "NegativeCosineSimilarity", "SimSiamTransform"],
        [*_aug_notes([aug], "bilinear", "views"), *_check_crop_max([aug], "views")],
    )


# ------------------------------------------------------------------------------------------------ multi-crop


def len_train(data_cfg) -> int:
    from selfsup.data.build import open_source

    source = open_source(data_cfg)
    return len(source.decoded(data_cfg.train_split) if source.in_memory else source.raw(data_cfg.train_split))


def _dino_transform(ctx: Ctx, ibot: bool = False) -> tuple[Callable, str, list[str]]:
    """DINOTransform / IBOTTransform from the recipe's global pair and local pipeline."""
    from lightly.transforms import DINOTransform, IBOTTransform

    g = ctx.pipelines if len(ctx.pipelines) == 2 else [ctx.pipelines[0], ctx.pipelines[0]]
    loc = ctx.local[0] if ctx.local else None
    nloc = int(ctx.data.local_views or 0)
    a, b = g
    photometric = ("jitter", "jitter_p", "gray_p", "flip_p", "blur_sigma", "mean", "std")
    if any(getattr(a, k) != getattr(b, k) for k in (*photometric, "scale", "crop_size")) or (
        loc is not None and any(getattr(loc, k) != getattr(a, k) for k in photometric)
    ):
        raise Unsupported("lightly's DINO/iBOT transform shares jitter, grey, flip and normalisation across crops")
    if a.solarize_p > 0 or (loc is not None and loc.solarize_p > 0):
        raise Unsupported("lightly's DINO/iBOT transform solarises the second global crop only")
    kw = {
        "global_crop_size": a.crop_size,
        "global_crop_scale": tuple(a.scale),
        "local_crop_size": loc.crop_size if loc is not None else 96,
        "local_crop_scale": tuple(loc.scale) if loc is not None else (0.05, 0.4),
        "n_local_views": nloc,
        "hf_prob": a.flip_p,
        "random_gray_scale": a.gray_p,
        "gaussian_blur": (a.blur_p, b.blur_p, loc.blur_p if loc is not None else 0.0),
        "sigmas": tuple(a.blur_sigma),
        "solarization_prob": b.solarize_p,
        "normalize": _normalize(a),
        **_jitter(a),
    }
    cls, name = (IBOTTransform, "IBOTTransform") if ibot else (DINOTransform, "DINOTransform")
    notes = _aug_notes(g, "bicubic", "global crops") + _aug_notes([loc] if loc else [], "bicubic", "local crops")
    return cls(**kw), name, notes


def build_dino(ctx: Ctx) -> Peer:
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import update_momentum

    a = ctx.args
    if a["nlayers"] != 3:
        raise Unsupported(f"head nlayers {a['nlayers']}: lightly's DINOProjectionHead has 3 layers")
    backbone = ctx.backbone
    make_head = lambda: DINOProjectionHead(
        ctx.feat,
        a["hidden_dim"],
        a["bottleneck_dim"],
        a["out_dim"],
        batch_norm=a["use_bn_in_head"],
        freeze_last_layer=a["freeze_last_layer"],
        norm_last_layer=a["norm_last_layer"],
    )
    head = make_head()
    teacher_backbone, teacher_head = _frozen_copy(backbone), _frozen_copy(head, make_head)
    model = nn.ModuleDict(
        {"student": backbone, "head": head, "teacher": teacher_backbone, "teacher_head": teacher_head}
    )
    criterion = DINOLoss(
        output_dim=a["out_dim"],
        warmup_teacher_temp=a["warmup_teacher_temp"],
        teacher_temp=a["teacher_temp"],
        warmup_teacher_temp_epochs=a["warmup_teacher_temp_epochs"],
        student_temp=a["student_temp"],
        center_momentum=a["center_momentum"],
    )
    model["criterion"] = criterion  # its centre moves with the model (as the example's criterion.to(device))
    momentum = _momentum_schedule(a["momentum_teacher"], 1.0, ctx.total_steps)
    transform, tname, notes = _dino_transform(ctx)

    def loss(batch, step, epoch):
        views = batch[0]
        with torch.no_grad():
            teacher_out = [teacher_head(teacher_backbone(v)) for v in views[:2]]
        student_out = [head(backbone(v)) for v in views]
        return criterion(teacher_out, student_out, epoch=epoch)

    def after_step(step):
        m = momentum(step)
        update_momentum(backbone, teacher_backbone, m=m)
        update_momentum(head, teacher_head, m=m)

    return Peer(
        model,
        transform,
        loss,
        [{"name": "all", "params": _named(("student", backbone), ("head", head))}],
        ["DINOProjectionHead", "DINOLoss", "update_momentum", "cosine_schedule", tname],
        [
            "the teacher head starts as a copy of the student head (as the official code and selfsup); lightly's "
            "example builds a second, independently initialised DINOProjectionHead",
            "one backbone and head pass per crop (BatchNorm statistics per crop), as lightly's example; selfsup: one "
            "backbone pass per resolution and the head once over every crop",
            *notes,
        ],
        after_backward=lambda step, epoch: head.cancel_last_layer_gradients(epoch),
        after_step=after_step,
    )


def build_swav(ctx: Ctx) -> Peer:
    from lightly.loss import SwaVLoss
    from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
    from lightly.transforms import SwaVTransform

    a = ctx.args
    views = int(ctx.data.views)
    if list(a["crops_for_assign"]) != list(range(views)):
        raise Unsupported(f"crops_for_assign {a['crops_for_assign']}: SwaVLoss assigns codes to every global crop")
    if a["queue_length"]:
        raise Unsupported("a SwAV queue (lightly's example keeps one outside the loss); the cpu-small recipe has none")
    if not a["hidden_dim"]:
        raise Unsupported("a one-layer SwAV head: lightly's SwaVProjectionHead has a hidden layer")
    if len(ctx.pipelines) != 1 or (ctx.local and len(ctx.local) != 1):
        raise Unsupported("SwaVTransform applies one photometric pipeline to every crop")
    g, loc = ctx.pipelines[0], ctx.local[0] if ctx.local else None
    photometric = ("jitter", "jitter_p", "gray_p", "blur_p", "blur_sigma", "flip_p", "solarize_p", "mean", "std")
    if loc is not None and any(getattr(g, k) != getattr(loc, k) for k in photometric):
        raise Unsupported("SwaVTransform applies one photometric pipeline to every crop; the recipe's differ")
    if g.solarize_p > 0:
        raise Unsupported("the recipe solarises; SwaVTransform does not")
    backbone = ctx.backbone
    head = SwaVProjectionHead(ctx.feat, a["hidden_dim"], a["feat_dim"])
    prototypes = SwaVPrototypes(
        a["feat_dim"], n_prototypes=a["nmb_prototypes"], n_steps_frozen_prototypes=a["freeze_prototypes_niters"]
    )
    model = nn.ModuleDict({"backbone": backbone, "projection_head": head, "prototypes": prototypes})
    criterion = SwaVLoss(
        temperature=a["temperature"], sinkhorn_iterations=a["sinkhorn_iterations"], sinkhorn_epsilon=a["epsilon"]
    )
    nloc = int(ctx.data.local_views or 0)
    crop = dict(
        crop_sizes=(g.crop_size, loc.crop_size) if loc else (g.crop_size,),
        crop_counts=(views, nloc) if loc else (views,),
        crop_min_scales=(g.scale[0], loc.scale[0]) if loc else (g.scale[0],),
        crop_max_scales=(g.scale[1], loc.scale[1]) if loc else (g.scale[1],),
    )
    transform = SwaVTransform(
        **crop,
        hf_prob=g.flip_p,
        random_gray_scale=g.gray_p,
        gaussian_blur=g.blur_p,
        sigmas=tuple(g.blur_sigma),
        normalize=_normalize(g),
        **_jitter(g),
    )

    def loss(batch, step, epoch):
        prototypes.normalize()
        outs = [prototypes(F.normalize(head(backbone(x)), dim=1, p=2), step) for x in batch[0]]
        return criterion(outs[:views], outs[views:])

    return Peer(
        model,
        transform,
        loss,
        [{"name": "all", "params": _named(("backbone", backbone), ("head", head), ("prototypes", prototypes))}],
        ["SwaVProjectionHead", "SwaVPrototypes(n_steps_frozen_prototypes)", "SwaVLoss", "SwaVTransform"],
        [
            "SwaVPrototypes' layer has a bias (the official and the recipe's prototypes have none)",
            "one backbone and head pass per crop (BatchNorm statistics per crop), as lightly's example; selfsup: one "
            "backbone pass per resolution and the head once over every crop",
            "Sinkhorn: lightly's exp(scores/ε) without the max shift (the same codes while it does not overflow)",
            *_aug_notes([g] + ([loc] if loc else []), "bilinear", "crops"),
        ],
    )


# ------------------------------------------------------------------------------------------------ masked ViTs


def _masked_vit(vit: nn.Module, **kw) -> nn.Module:
    """lightly's MaskedVisionTransformerTIMM around the recipe's ViT, keeping its initialisation and positions."""
    from lightly.models.modules import MaskedVisionTransformerTIMM

    return MaskedVisionTransformerTIMM(vit=vit, weight_initialization="skip", pos_embed_initialization="skip", **kw)


def _vit_checks(vit: nn.Module) -> None:
    if not hasattr(vit, "patch_embed"):
        raise Unsupported("a ViT method on a backbone that is not a timm ViT")


def build_mae(ctx: Ctx) -> Peer:
    from lightly.models import utils
    from lightly.models.modules import MaskedVisionTransformerDecoderTIMM
    from lightly.transforms import MAETransform

    a, vit = ctx.args, ctx.backbone
    _vit_checks(vit)
    if len(ctx.pipelines) != 1:
        raise Unsupported("MAETransform makes one view")
    aug = ctx.pipelines[0]
    dec = a["decoder"] or {}
    width, depth, heads = int(dec.get("width", 512)), int(dec.get("depth", 8)), int(dec.get("heads", 16))
    patch = int(vit.patch_embed.patch_size[0])
    backbone = _masked_vit(vit)
    seq_len = backbone.sequence_length
    prefix = int(vit.num_prefix_tokens)
    if prefix != 1:
        raise Unsupported("lightly's MAE recipe indexes patches after one class token")
    decoder_embed = nn.Linear(vit.embed_dim, width)
    decoder = MaskedVisionTransformerDecoderTIMM(
        num_patches=vit.patch_embed.num_patches,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        num_prefix_tokens=prefix,
        mlp_ratio=float(dec.get("mlp_ratio", 4.0)),
        proj_drop_rate=0.0,
        attn_drop_rate=0.0,
    )
    prediction_head = nn.Linear(width, patch**2 * 3)
    model = nn.ModuleDict(
        {"backbone": backbone, "decoder_embed": decoder_embed, "decoder": decoder, "prediction_head": prediction_head}
    )
    mask_ratio, norm_pix = float(a["mask_ratio"]), bool(a["norm_pix_loss"])
    # timm with global_pool avg moves the final LayerNorm after the pooling (fc_norm): its encode() then ends without
    # one; selfsup applies fc_norm token by token before the decoder, and so does this loop (the same network)
    token_norm = vit.fc_norm if isinstance(vit.norm, nn.Identity) and not isinstance(vit.fc_norm, nn.Identity) else None
    criterion = nn.MSELoss()
    transform = MAETransform(input_size=aug.crop_size, min_scale=aug.scale[0], normalize=_normalize(aug))

    def loss(batch, step, epoch):
        images = batch[0][0]  # one view
        b = images.shape[0]
        idx_keep, idx_mask = utils.random_token_mask(size=(b, seq_len), mask_ratio=mask_ratio, device=images.device)
        features = backbone.encode(images=images, idx_keep=idx_keep)
        if token_norm is not None:
            features = token_norm(features)
        x_decode = decoder_embed(features)
        x_masked = x_decode.new_zeros(b, seq_len, x_decode.shape[-1])
        x_masked = utils.set_at_index(x_masked, idx_keep, x_decode.type_as(x_masked))
        x_pred = prediction_head(utils.get_at_index(decoder(x_masked, idx_mask=idx_mask), idx_mask))
        target = utils.get_at_index(utils.patchify(images, patch), idx_mask - 1)
        if norm_pix:
            target = utils.normalize_mean_var(target, dim=-1)
        return criterion(x_pred, target)

    params = _named(
        ("backbone", backbone), ("decoder_embed", decoder_embed), ("decoder", decoder), ("head", prediction_head)
    )
    return Peer(
        model,
        transform,
        loss,
        [{"name": "all", "params": params}],
        [
            "MaskedVisionTransformerTIMM",
            "MaskedVisionTransformerDecoderTIMM",
            "random_token_mask / patchify",
            "normalize_mean_var (norm-pix targets)",
            "MAETransform",
        ],
        [
            "decoder, its embedding and prediction layers initialised by lightly's modules",
            "the recipe's ViT pools the mean of its tokens (timm's fc_norm after the pooling): the loop applies fc_norm "
            "to the encoder tokens before the decoder, as selfsup does (lightly's encode() ends without a norm there)",
            *_aug_notes([aug], "bicubic", "views", fixed_flip=0.5),
            *_photometric_only([aug], "views"),
        ],
    )


def build_ibot(ctx: Ctx) -> Peer:
    from lightly.loss import DINOLoss, IBOTPatchLoss
    from lightly.models import utils
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import update_momentum
    from lightly.utils.scheduler import linear_warmup_schedule

    a, vit = ctx.args, ctx.backbone
    _vit_checks(vit)
    if a["patch_head"] != "shared":
        raise Unsupported(f"patch_head {a['patch_head']!r}: lightly's iBOT example shares one DINOProjectionHead")
    if a["nlayers"] != 3:
        raise Unsupported(f"head nlayers {a['nlayers']}: lightly's DINOProjectionHead has 3 layers")
    if a["centering"] != "ema" or a["koleo_weight"] or a["layerwise_decay"] != 1.0 or a["patch_embed_lr_mult"] != 1.0:
        raise Unsupported("the DINOv2 options (Sinkhorn centring, KoLeo, layer-wise lr)")
    if a["pred_start_epoch"]:
        raise Unsupported("pred_start_epoch > 0")
    student = _masked_vit(vit, antialias=False)
    teacher = _frozen_copy(student)
    teacher.eval()  # lightly's example: freeze_eval_module (no dropout / drop path in the teacher)
    make_head = lambda: DINOProjectionHead(
        vit.embed_dim,
        a["hidden_dim"],
        a["bottleneck_dim"],
        a["out_dim"],
        freeze_last_layer=a["freeze_last_layer"],
        norm_last_layer=a["norm_last_layer"],
    )
    head = make_head()
    teacher_head = _frozen_copy(head, make_head)
    dino_criterion = DINOLoss(
        output_dim=a["out_dim"],
        teacher_temp=a["teacher_temp"],
        student_temp=a["student_temp"],
        center_momentum=a["center_momentum"],
    )
    ibot_criterion = IBOTPatchLoss(
        output_dim=a["patch_out_dim"],
        teacher_temp=a["teacher_patch_temp"],
        student_temp=a["student_temp"],
        center_momentum=a["center_momentum2"],
    )
    model = nn.ModuleDict(
        {"student": student, "head": head, "teacher": teacher, "teacher_head": teacher_head, "dino": dino_criterion}
    )
    model["ibot"] = ibot_criterion
    momentum = _momentum_schedule(a["momentum_teacher"], 1.0, ctx.total_steps)
    lo, hi = a["pred_ratio"] - a["pred_ratio_var"], a["pred_ratio"] + a["pred_ratio_var"]
    aspect = tuple(a["pred_aspect_ratio"])
    gh, gw = (int(s) for s in vit.patch_embed.grid_size)
    min_block = (min(gh, gw) // 3) ** 2
    warm = int(a["warmup_teacher_temp_epochs"])
    lam1, lam2 = float(a["lambda1"]), float(a["lambda2"])
    transform, tname, notes = _dino_transform(ctx, ibot=True)

    def temps(epoch):
        if not warm:
            return a["teacher_temp"], a["teacher_patch_temp"]
        return (
            linear_warmup_schedule(epoch, warm, a["warmup_teacher_temp"], a["teacher_temp"]),
            linear_warmup_schedule(epoch, warm, a["warmup_teacher_patch_temp"], a["teacher_patch_temp"]),
        )

    def loss(batch, step, epoch):
        views = batch[0]
        global_views = torch.cat(views[:2])
        b2 = len(global_views)
        mask = global_views.new_zeros((b2, student.sequence_length), dtype=torch.bool)
        block_mask = utils.random_block_mask(
            size=(b2, gh, gw),
            batch_mask_ratio=a["mask_probability"],
            min_image_mask_ratio=lo,
            max_image_mask_ratio=hi,
            min_num_masks_per_block=min_block,
            min_block_aspect_ratio=aspect[0],
            max_block_aspect_ratio=aspect[1],
            device=mask.device,
        )
        mask[:, student.vit.num_prefix_tokens :] = block_mask.flatten(start_dim=1)
        with torch.no_grad():
            t_feats = teacher.encode(global_views)
            t_cls = teacher_head(t_feats[:, 0])
            t_masked = teacher_head(t_feats[mask])
        s_feats = student.encode(global_views, mask=mask)
        s_cls = head(s_feats[:, 0])
        s_masked = head(s_feats[mask])
        n_views = 2
        if len(views) > 2:
            s_cls = torch.cat([s_cls, head(student.encode(torch.cat(views[2:]))[:, 0])])
            n_views = len(views)
        temp, temp2 = temps(epoch)
        cls_loss = dino_criterion(teacher_out=t_cls.chunk(2), student_out=s_cls.chunk(n_views), teacher_temp=temp)
        patch_loss = ibot_criterion(t_masked, s_masked, mask=block_mask, teacher_temp=temp2)
        return lam1 * cls_loss + lam2 * patch_loss

    def after_step(step):
        m = momentum(step)
        update_momentum(student, teacher, m=m)
        update_momentum(head, teacher_head, m=m)

    return Peer(
        model,
        transform,
        loss,
        [{"name": "all", "params": _named(("student", student), ("head", head))}],
        [
            "MaskedVisionTransformerTIMM",
            "DINOProjectionHead (shared by class and patch tokens)",
            "DINOLoss",
            "IBOTPatchLoss",
            "random_block_mask",
            "update_momentum",
            "cosine_schedule",
            tname,
        ],
        [
            "masks: lightly's random_block_mask (DINOv2's sampler: the images' mask ratios spread evenly over "
            f"[{lo:.2f}, {hi:.2f}]), selfsup iBOT's (a ratio drawn per image from U({lo:.2f}, {hi:.2f}))",
            "patch centre: IBOTPatchLoss updates it from the masked teacher tokens; iBOT (selfsup) from all of them",
            "the teacher head starts as a copy of the student head (as the official code and selfsup); lightly's "
            "example builds a second DINOProjectionHead and its student head without the frozen gains",
            *notes,
        ],
        after_backward=lambda step, epoch: head.cancel_last_layer_gradients(epoch),
        after_step=after_step,
    )


def build_ijepa(ctx: Ctx) -> Peer:
    from lightly.data import IJEPAMaskCollator
    from lightly.models import utils
    from lightly.models.modules import IJEPAPredictorTIMM
    from lightly.transforms.ijepa_transform import IJEPATransform

    a, vit = ctx.args, ctx.backbone
    _vit_checks(vit)
    if int(vit.num_prefix_tokens) != 0:
        raise Unsupported("lightly's I-JEPA masks index patch tokens of a ViT without a class token")
    if len(ctx.pipelines) != 1:
        raise Unsupported("IJEPATransform makes one view")
    aug = ctx.pipelines[0]
    patch = int(vit.patch_embed.patch_size[0])
    pred_cfg = a["predictor"] or {}
    heads = pred_cfg.get("heads") or int(vit.blocks[0].attn.num_heads)
    encoder = _masked_vit(vit)
    target_encoder = _frozen_copy(encoder)
    predictor = IJEPAPredictorTIMM(
        num_patches=vit.patch_embed.num_patches,
        depth=int(pred_cfg.get("depth", 6)),
        mlp_dim=vit.embed_dim,
        predictor_embed_dim=int(pred_cfg.get("width", 384)),
        num_heads=int(heads),
        mlp_ratio=float(pred_cfg.get("mlp_ratio", 4.0)),
    )
    model = nn.ModuleDict({"encoder": encoder, "predictor": predictor, "target_encoder": target_encoder})
    collator = IJEPAMaskCollator(
        input_size=aug.crop_size,
        patch_size=patch,
        enc_mask_scale=tuple(a["enc_mask_scale"]),
        pred_mask_scale=tuple(a["pred_mask_scale"]),
        aspect_ratio=tuple(a["aspect_ratio"]),
        nenc=int(a["num_enc_masks"]),
        npred=int(a["num_pred_masks"]),
        min_keep=int(a["min_keep"]),
        allow_overlap=bool(a["allow_overlap"]),
    )
    transform = IJEPATransform(input_size=aug.crop_size, min_scale=aug.scale[0], normalize=_normalize(aug))
    m0, m1, total = float(a["momentum"]), a.get("final_momentum"), ctx.total_steps

    def loss(batch, step, epoch):
        udata, masks_enc, masks_pred = batch
        imgs = udata[0]
        with torch.no_grad():
            h = target_encoder.encode(imgs)
            h = F.layer_norm(h, (h.size(-1),))
            h = utils.apply_masks(h, masks_pred)
            h = utils.repeat_interleave_batch(h, len(imgs), repeat=len(masks_enc))
        z = torch.cat([encoder.encode(imgs, idx_keep=m) for m in masks_enc])
        z = predictor(z, masks_enc, masks_pred)
        return F.smooth_l1_loss(z, h)

    def after_step(step):  # the example's linear momentum_scheduler, after the optimiser step
        m = m0 if m1 is None else m0 + min(step, total) * (m1 - m0) / total
        with torch.no_grad():
            for pq, pk in zip(encoder.parameters(), target_encoder.parameters()):
                pk.data.mul_(m).add_((1.0 - m) * pq.detach().data)

    return Peer(
        model,
        transform,
        loss,
        [{"name": "all", "params": _named(("encoder", encoder), ("predictor", predictor))}],
        ["MaskedVisionTransformerTIMM", "IJEPAPredictorTIMM", "IJEPAMaskCollator", "apply_masks", "IJEPATransform"],
        [
            "masks drawn in the DataLoader workers by IJEPAMaskCollator (the official collator's scheme); selfsup "
            "draws the same multi-block masks in the training step",
            "predictor initialised by lightly's module",
            *_aug_notes([aug], "bicubic", "views", fixed_flip=0.5),
            *_photometric_only([aug], "views"),
        ],
        collate_fn=collator,
        after_step=after_step,
    )


BUILDERS: dict[str, Callable[[Ctx], Peer]] = {
    "simclr": build_simclr,
    "byol": build_byol,
    "mmcr": build_mmcr,
    "mae": build_mae,
    "dino": build_dino,
    "swav": build_swav,
    "barlow": build_barlow,
    "vicreg": build_vicreg,
    "mocov3": build_mocov3,
    "simsiam": build_simsiam,
    "ibot": build_ibot,
    "ijepa": build_ijepa,
}


def _ctx(name: str, cfg, backbone: nn.Module, total: int) -> Ctx:
    from selfsup.data.build import local_pipelines, train_pipelines

    data = cfg.data
    return Ctx(name, plain(cfg.method.init_args), backbone, data, train_pipelines(data), local_pipelines(data), total)


def check_peer(name: str, cfg, backbone: nn.Module) -> None:
    """Build lightly's side on a copy (random state untouched): :class:`Unsupported` if lightly cannot express it."""
    with torch.random.fork_rng():
        BUILDERS[name](_ctx(name, cfg, copy.deepcopy(backbone), 1))


def train_peer(
    name: str,
    cfg,
    backbone: nn.Module,
    steps: int,
    warmup: int,
    workers: int,
    bf16: bool,
    device: str = "cpu",
    log_every: int = 50,
) -> tuple[nn.Module, dict]:
    """lightly's implementation of ``name`` with the recipe ``cfg``'s settings, trained for ``steps`` steps in a plain
    loop; returns the trained backbone and the record (s/step, components, differences)."""
    from lightly.utils.scheduler import cosine_schedule, cosine_warmup_schedule

    from selfsup.engine.optim import no_weight_decay_ids

    data, optim = cfg.data, cfg.optim
    per_epoch = max(1, len_train(data) // int(data.batch_size))
    total = min(steps, int(cfg.trainer.max_epochs) * per_epoch) if cfg.trainer.max_epochs else steps
    seed = int(cfg.trainer.seed)
    torch.manual_seed(seed)  # heads, shuffling, masks: lightly draws from torch's, Python's and NumPy's global RNGs
    random.seed(seed)
    np.random.seed(seed)
    peer = BUILDERS[name](_ctx(name, cfg, backbone, total))
    dataset = PILImages(data, peer.transform)
    loader = DataLoader(
        dataset,
        batch_size=int(data.batch_size),
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        collate_fn=peer.collate_fn,
    )
    groups = recipe_param_groups(peer.groups, optim, int(data.batch_size), no_weight_decay_ids(peer.model))
    optimizer = torch_optimizer(groups, optim)
    warmup_lr = min(total, round(optim.warmup_epochs * per_epoch))
    params = [p for g in groups for p in g["params"]]
    peer.model.to(device)
    clock, t0, it, step = StepClock(sync=device == "cuda"), time.perf_counter(), iter(loader), 0
    while step < total:
        try:
            batch = to_device(next(it), device)
        except StopIteration:  # the next epoch (the examples' `for epoch ...: for batch in dataloader`)
            it = iter(loader)
            continue
        epoch = step // per_epoch
        factor = (
            cosine_warmup_schedule(step, total, 1.0, optim.final_lr_ratio, warmup_lr, 0.0)
            if optim.schedule == "cosine"
            else min(1.0, (step + 1) / max(1, warmup_lr))
        )
        for g in optimizer.param_groups:
            g["lr"] = g["peak_lr"] * (1.0 if g["fixed_lr"] else factor)
            if optim.weight_decay_end is not None and g["base_weight_decay"] > 0:
                end = g["base_weight_decay"] * optim.weight_decay_end / optim.weight_decay
                g["weight_decay"] = cosine_schedule(step, total + 1, g["base_weight_decay"], end)
        peer.before_step(step)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = peer.loss(batch, step, epoch)
        if not torch.isfinite(loss).all():
            raise FloatingPointError(f"lightly {name}: non-finite loss {float(loss)} at step {step}")
        loss.backward()
        if optim.clip_grad is not None:
            clip_gradients(params, optim.clip_grad, optim.clip_grad_per_param)
        peer.after_backward(step, epoch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        peer.after_step(step)
        clock.tick()
        step += 1
        if log_every and (step % log_every == 0 or step == total):
            print(f"  lightly {name}: step {step}/{total} loss {float(loss.detach()):.4f}", flush=True)
    del it, loader
    sps, timed = clock.seconds_per_step(warmup)
    return backbone, {
        "steps": step,
        "seconds_per_step": sps,
        "timed_steps": timed,
        "wall_s": round(time.perf_counter() - t0, 1),
        "precision": "bf16-mixed" if bf16 else "32-true",
        "workers": workers,
        "components": peer.components,
        "differences": [*peer.differences, BATCHED_NOTE],
    }


# ====================================================================================================================
# The run
# ====================================================================================================================


def run_method(name: str, args, overrides: list[str], runs_dir: str) -> dict:
    """Both sides of one method: the recipe instantiated once, the backbone copied before selfsup trains it."""
    recipe = recipe_path(name)
    accelerator = "gpu" if args.device == "cuda" else "cpu"  # both sides on one device (--device)
    ov = ["--trainer.max_steps", str(args.steps), "--trainer.accelerator", accelerator, *overrides]
    init, cfg = _instantiate(recipe, args.zip, ov, runs_dir)
    peer_backbone = copy.deepcopy(init.method.backbone)  # the same random weights for both
    if "lightly" in args.sides:
        check_peer(name, cfg, peer_backbone)  # a method lightly cannot express is skipped before any training
    rec: dict[str, Any] = {
        "recipe": recipe,
        "method": type(init.method).__name__,
        "steps": args.steps,
        "batch_size": int(cfg.data.batch_size),
        "run_dir": str(cfg.trainer.out_dir),
    }
    bank, test = knn_sets(init.data, args.knn_subset)
    if "selfsup" in args.sides:
        print(f"{name}: selfsup {rec['method']} ({Path(recipe).name}), {args.steps} steps", flush=True)
        rec["selfsup"] = train_selfsup(init, args.warmup_steps)
        rec["selfsup"]["knn"] = knn_eval(init.method.backbone, bank, test, args.knn_k, args.knn_t, args.device)
        print(f"{name}: selfsup kNN top-1 {rec['selfsup']['knn']['top1']:.2f}", flush=True)
    if "lightly" in args.sides:
        print(f"{name}: lightly, {args.steps} steps, {args.peer_workers} DataLoader workers", flush=True)
        trained, rec["lightly"] = train_peer(
            name,
            cfg,
            peer_backbone,
            args.steps,
            args.warmup_steps,
            args.peer_workers,
            args.peer_precision == "bf16",
            args.device,
        )
        rec["lightly"]["knn"] = knn_eval(trained, bank, test, args.knn_k, args.knn_t, args.device)
        print(f"{name}: lightly kNN top-1 {rec['lightly']['knn']['top1']:.2f}", flush=True)
        for note in rec["lightly"]["differences"]:
            print(f"  differs: {note}", flush=True)
    rec.update({k: v for k, v in result_row(name, rec).items() if k in ("knn_diff", "speed_ratio")})
    return rec


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zip", default=str(ROOT.parent / "shared/datasets/cifar10-jpeg.zip"), help="an ImageFolder zip")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help=f"any of {', '.join(METHODS)}")
    ap.add_argument("--steps", type=int, default=400, help="optimiser steps of each side")
    ap.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the s/step timing")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="both sides (selfsup: trainer.accelerator)"
    )
    ap.add_argument("--peer-workers", type=int, default=2, help="lightly's DataLoader num_workers")
    ap.add_argument("--peer-precision", choices=["32", "bf16"], default="32", help="lightly's loop (examples: fp32)")
    ap.add_argument("--knn-subset", type=int, default=None, help="a seeded random N of the bank and of the test split")
    ap.add_argument("--knn-k", type=int, default=200)
    ap.add_argument("--knn-t", type=float, default=0.5)
    ap.add_argument("--sides", nargs="+", choices=["selfsup", "lightly"], default=["selfsup", "lightly"])
    ap.add_argument("--output", default=None, help="write the JSON here (after every method)")
    ap.add_argument("--runs-dir", default=None, help="keep selfsup's run directories here (default: removed)")
    args, overrides = ap.parse_known_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if args.steps < 2:
        ap.error("--steps must be >= 2 (one warm-up step, one timed)")
    return args, [o for o in overrides if o != "--"]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args, overrides = parse_args(argv)
    torch.set_num_threads(args.threads)
    if "lightly" in args.sides:
        try:
            import lightly  # noqa: F401
        except ImportError:
            raise SystemExit(LIGHTLY_MISSING) from None
    payload: dict[str, Any] = {
        "config": {**{k: v for k, v in vars(args).items()}, "overrides": overrides},
        "environment": environment(args),
        "results": {},
        "skipped": {},
    }
    results, skipped = payload["results"], payload["skipped"]
    for name in args.methods:
        if name in SKIPPED:
            skipped[name] = SKIPPED[name]
            print(f"{name}: skipped: {SKIPPED[name]}", flush=True)
            continue
        runs_dir = args.runs_dir or tempfile.mkdtemp(prefix="bench_peers-")
        try:
            results[name] = run_method(name, args, overrides, runs_dir)
        except Unsupported as e:
            skipped[name] = f"lightly's components cannot express it: {e}"
            print(f"{name}: skipped: {skipped[name]}", flush=True)
        finally:
            if not args.runs_dir:
                shutil.rmtree(runs_dir, ignore_errors=True)
        write_json(args.output, payload)  # after every method: a stopped run keeps what it measured
    print(
        f"\nkNN top-1 (k={args.knn_k}, T={args.knn_t}) at equal steps; s/step after {args.warmup_steps} warm-up steps;"
    )
    print("ratio = lightly s/step / selfsup s/step (> 1: selfsup faster); diff = selfsup - lightly:")
    print(table(results, skipped))
    write_json(args.output, payload)
    return payload


if __name__ == "__main__":
    main()
