"""Typed configuration of a pretraining run (read by jsonargparse from YAML and the command line).

Every field is typed and documented; an unknown key is an error that names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union


@dataclass
class DataConfig:
    """Where the images come from and how views are made.

    Attributes:
        dataset: ``cifar10``, ``cifar100``, ``stl10``, ``imagenet``, ``imagenet100``, ``folder`` or ``demo``
            (the CIFAR-10 sample shipped in the package).
        root: torchvision root, or an ImageFolder directory / ``.zip`` / ``.tar``.
        download: let torchvision download (never implicit).
        train_split: split used for pretraining (STL-10: ``train+unlabeled``).
        bank_split: labelled split used as the kNN bank and probe training set.
        test_split: split scored by the kNN monitor.
        class_list: class-name file restricting the classes (ImageNet-100).
        batch_size: images per step **per device** (each gives ``views`` views).
        views: views per image (V).
        augment: augmentation preset (``selfsup.data.transforms.PRESETS``).
        augment_overrides: fields of ``Augment`` replaced in every pipeline of the preset,
            e.g. ``{scale: [0.2, 1.0], blur_p: 0.1}``; an unknown field is an error.
        local_views: multi-crop (DINO, SwAV): this many smaller local views per image besides the ``views`` global
            ones (``Batch.local_views``; :mod:`selfsup.data.multicrop`); 0 = single-size views.
        local_augment: preset of the local views (its crop size and scale range: e.g. ``dino_local``); required
            with ``local_views``.
        local_augment_overrides: fields of ``Augment`` replaced in the local preset (``{crop_size: 64}``).
        view_mode: ``per_image`` (torchvision transforms in loader workers) or ``batched``
            (one vectorised op for the whole batch, on the training device).
        in_memory: decode the whole split once into a uint8 tensor (small datasets).
        image_size: ``in_memory``: resize every image to ``image_size`` x ``image_size`` when decoding (default:
            the native size; required when sizes differ). ``batched`` without ``in_memory``: resize the short side
            to it (aspect kept) before the loader-side crop (default: no resize, crops from the full image).
        num_workers: loader worker processes.
        skip_corrupt: drop undecodable images (reported) instead of failing.
        subset: use only the first N images of the (shuffled, fixed-seed) train split.
        n_way, n_shot: pretrain on ``n_way`` classes x ``n_shot`` images each (IMLE-SSL's 32-way x 64-shot ImageNet
            subset; ``-1`` or unset = all). With ``n_way``, the kNN monitor's bank and test splits and the
            evaluations that read this config keep the same classes (all their images).
        class_pick: how the ``n_way`` classes are chosen: ``even`` (evenly spaced in sorted order, IMLE-R) or
            ``random`` (a seeded sample, IMLE-H); see :mod:`selfsup.data.subsets`.
        subset_seed: seed of the class sample and of the shots.
    """

    dataset: str = "cifar10"
    root: Optional[str] = None
    download: bool = False
    train_split: str = "train"
    bank_split: str = "train"
    test_split: str = "test"
    class_list: Optional[str] = None
    batch_size: int = 256
    views: int = 2
    augment: str = "cifar10"
    augment_overrides: Optional[dict] = None
    local_views: int = 0
    local_augment: Optional[str] = None
    local_augment_overrides: Optional[dict] = None
    view_mode: Literal["per_image", "batched"] = "per_image"
    in_memory: bool = False
    image_size: Optional[int] = None
    num_workers: int = 4
    skip_corrupt: bool = False
    subset: Optional[int] = None
    n_way: Optional[int] = None
    n_shot: Optional[int] = None
    class_pick: Literal["even", "random"] = "even"
    subset_seed: int = 0


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (per step).

    Attributes:
        name: ``adam``, ``adamw``, ``sgd`` or ``lars``.
        lr: base learning rate (before batch scaling).
        scale_lr: ``linear`` gives ``lr * global_batch / 256`` (global batch = images per step over all devices).
        weight_decay: decoupled for adamw, L2 otherwise.
        exclude_1d: keep 1-D parameters (biases, norms) and what the model's ``no_weight_decay()`` names
            (position embeddings, class tokens) out of weight decay (always so for LARS, also out of adaptation).
            ``false`` decays everything, as the MMCR seeds' Adam did.
        betas: Adam / AdamW betas (MAE: ``[0.9, 0.95]``).
        momentum: SGD / LARS momentum.
        eta: LARS trust coefficient.
        schedule: ``cosine`` (warm-up then half-cosine) or ``constant`` (warm-up then flat).
        warmup_epochs: linear warm-up length, per step; the first step already has a non-zero lr.
        final_lr_ratio: cosine end value as a fraction of the peak.
        weight_decay_end: with a value, every decayed group's weight decay follows a cosine from ``weight_decay`` at
            step 0 to this value at the end (DINO: 0.04 -> 0.4; ``selfsup.schedules.cosine``); ``None``: constant.
        clip_grad: clip gradients before each optimiser step to this norm (``None``: no clipping).
        clip_grad_per_param: clip each parameter's gradient to ``clip_grad`` on its own (DINO / iBOT's
            ``clip_gradients``) instead of the global norm of all gradients (``torch.nn.utils.clip_grad_norm_``).
    """

    name: Literal["adam", "adamw", "sgd", "lars"] = "adam"
    lr: float = 1e-3
    scale_lr: Literal["none", "linear", "sqrt"] = "none"
    weight_decay: float = 1e-6
    exclude_1d: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    eta: float = 0.001
    schedule: Literal["cosine", "constant"] = "constant"
    warmup_epochs: float = 0.0
    final_lr_ratio: float = 0.0
    weight_decay_end: Optional[float] = None
    clip_grad: Optional[float] = None
    clip_grad_per_param: bool = False

    def __post_init__(self) -> None:
        if self.weight_decay_end is not None and not (self.weight_decay > 0 and self.weight_decay_end >= 0):
            raise ValueError(
                f"optim.weight_decay_end ({self.weight_decay_end}) schedules the weight decay from optim.weight_decay, "
                f"which must then be > 0 (got {self.weight_decay}); the end value must be >= 0"
            )
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"optim.clip_grad must be > 0 (or unset), got {self.clip_grad}")


@dataclass
class MonitorConfig:
    """Online kNN monitor (backbone features, cosine, top-k weighted vote) and embedding-spectrum monitor.

    Attributes:
        every_n_epochs: run after every N-th epoch (0 = off) and at the end of training.
        k: neighbours.
        temperature: weights ``exp(sim / T)``.
        bank_size: limit the bank to the first N bank-split images (None = whole split).
        test_size: limit the queries to the first N test images (None = whole split).
        batch_size: feature-extraction batch per device.
        which: the backbone scored: ``online`` or a teacher the method declares (``teacher``).
        spectrum_every_n_steps: every N optimiser steps (and at step 0 and the last step) log the effective
            rank, RankMe, alignment and uniformity of the step's backbone / projector embeddings (rank 0's
            local batch, no extra forward pass) and append their singular values to ``RUN_DIR/spectrum.jsonl``
            (``selfsup.engine.spectrum``); 0 = off.
        recon_every_n_epochs: masked-image models (MAE, CAN, IMLE): every N epochs the held-out reconstruction loss
            of ``recon_examples`` test-split images (IMLE: averaged over ``recon_codes`` random codes per image), and
            before training the baseline with codes ignored (``selfsup.engine.recon_monitor``); 0 = off.
        fewshot_every_n_epochs: every N epochs the few-shot accuracy of the backbone (support: the bank split,
            queries: the test split; IMLE-SSL's fast probe), configured by ``fewshot`` (fields of
            :class:`selfsup.eval.fewshot.FewShotConfig`); 0 = off.
    """

    every_n_epochs: int = 1
    k: int = 200
    temperature: float = 0.5
    bank_size: Optional[int] = None
    test_size: Optional[int] = None
    batch_size: int = 512
    which: str = "online"
    spectrum_every_n_steps: int = 50
    recon_every_n_epochs: int = 0
    recon_examples: int = 2048
    recon_codes: int = 128
    fewshot_every_n_epochs: int = 0
    fewshot: Optional[dict] = None


@dataclass
class TrainerConfig:
    """Run-level settings, passed to Lightning.

    Attributes:
        out_dir: run directory (checkpoints, logs, resolved config). Never overwritten: a directory with
            checkpoints needs ``resume``.
        max_epochs: epochs (the lr schedule spans them).
        max_steps: stop after this many optimiser steps instead (-1 = off); the schedule then spans them.
        max_time: optional wall-clock stop, ``DD:HH:MM:SS``.
        accelerator, devices, num_nodes, strategy: as in Lightning (``ddp`` for many GPUs / nodes).
        precision: ``32-true``, ``bf16-mixed``, ``16-mixed``, or ``auto`` (bf16-mixed where the device computes
            bf16 natively: CUDA with bf16, or a CPU with AVX-512-BF16/AMX; else 32-true). Losses run in fp32 regardless.
        sync_batchnorm: convert BatchNorm to SyncBatchNorm under DDP.
        channels_last: NHWC memory format (faster convolutions on CPU and recent GPUs).
        seed: global seed (data order, augmentation and init).
        save_every_n_epochs: checkpoint period; ``last.ckpt`` is always kept up to date.
        save_every_n_steps: optional extra step-based checkpoints (0 = off).
        resume: ``true`` continues from ``out_dir``'s ``last.ckpt``; a path continues from that file; ``auto``
            continues when there is something to continue (SLURM pre-emption checkpoint or last.ckpt), else starts.
            A requeued SLURM job resumes automatically.
        logger: ``csv``, ``tensorboard``, ``wandb`` or ``none``.
        log_every_n_steps: logging period.
        progress_bar: ``auto`` (a tqdm bar on a terminal, else one complete line per ``log_every_n_steps``:
            :mod:`selfsup.engine.progress`), ``bar`` / ``true``, ``lines``, ``none`` / ``false``.
        accumulate_grad_batches: gradient accumulation (the loss still sees one step's batch).
        compile: compile the training step with ``torch.compile`` (inductor): ``false`` (default), ``true`` (mode
            ``default``) or a mode, ``default`` / ``reduce-overhead`` / ``max-autotune`` /
            ``max-autotune-no-cudagraphs``. The method's trainable modules (backbone, projector, heads) are compiled
            in place, so checkpoint keys, export, EMA teachers and resume are unchanged; the first step pays the
            compilation (:func:`selfsup.engine.compile.compile_trainable_modules`). Needs a C++ compiler on CPU,
            Triton on CUDA; where compilation is unavailable the run fails before training, naming what is missing.
    """

    out_dir: str = "runs/pretrain"
    max_epochs: int = 100
    max_steps: int = -1
    max_time: Optional[str] = None
    accelerator: str = "auto"
    devices: Union[int, str] = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    sync_batchnorm: bool = False
    channels_last: bool = False
    seed: int = 0
    save_every_n_epochs: int = 1
    save_every_n_steps: int = 0
    resume: Union[bool, str] = False
    logger: Literal["csv", "tensorboard", "wandb", "none"] = "csv"
    log_every_n_steps: int = 20
    progress_bar: Union[bool, Literal["auto", "bar", "lines", "none"]] = "auto"
    accumulate_grad_batches: int = 1
    compile: Union[bool, Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]] = False
