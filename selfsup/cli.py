"""``selfsup`` command line: ``demo``, ``pretrain``, ``knn``, ``linear``, ``finetune``, ``export``, ``reconstruct``,
``report``, ``select``, ``fewshot``, ``recipes``, ``submit``.

Configs are typed (jsonargparse): a recipe YAML is read with ``--config``, any field can be
overridden on the command line (``--optim.lr 0.002``, ``--method.init_args.lmbda 0.1``), and an
unknown key is rejected by name. ``selfsup pretrain --print_config`` shows the resolved config.

Bad input ends in one line ``selfsup <cmd>: error: ...`` naming the culprit (a corrupt image, a file that
is not a checkpoint, a typo) and exit status 1, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

from selfsup.data.datasets import CorruptImageError
from selfsup.engine.config import DataConfig, MonitorConfig, OptimConfig, TrainerConfig
from selfsup.eval.finetune_protocols import finetune_protocol_names
from selfsup.eval.protocols import protocol_names
from selfsup.methods import Method

#: A linear-probe protocol name, checked when the command line / recipe is parsed.
ProtocolName = Literal[protocol_names()]  # type: ignore[valid-type]
#: A fine-tune protocol name (selfsup.eval.finetune_protocols.FINETUNE_PROTOCOLS).
FinetuneProtocolName = Literal[finetune_protocol_names()]  # type: ignore[valid-type]
WHICH_HELP = "online, a teacher the method declares (e.g. teacher), or momentum (the EMA copy of older checkpoints)"


@dataclass
class EvalData:
    """Data for offline evaluation.

    Attributes:
        dataset: dataset name (default: the one the checkpoint was trained on).
        root: torchvision root or ImageFolder dir / .zip / .tar (default: the checkpoint's).
        download: let torchvision download.
        train_split: labelled split for the kNN bank / probe training (a held-out part is the validation set).
        test_split: split scored once at the end.
        class_list: class-name file (ImageNet-100).
        augment: preset giving the eval transform and, for the augmented probe, the train augmentation
            (default: the checkpoint's).
        in_memory: decode each split once into memory.
        image_size: decode size for in_memory.
        batch_size: feature-extraction batch.
        num_workers: loader workers.
        skip_corrupt: drop undecodable images instead of failing.
        n_way: evaluate on ``n_way`` classes only (all their images), chosen as in pretraining (``class_pick``,
            ``subset_seed``); default: the checkpoint's (an n-way pretraining subset is evaluated on its classes);
            ``-1``: every class.
        class_pick, subset_seed: how the classes are chosen (default: the checkpoint's).
    """

    dataset: Optional[str] = None
    root: Optional[str] = None
    download: bool = False
    train_split: str = "train"
    test_split: str = "test"
    class_list: Optional[str] = None
    augment: Optional[str] = None
    in_memory: bool = False
    image_size: Optional[int] = None
    batch_size: int = 512
    num_workers: int = 4
    skip_corrupt: bool = False
    n_way: Optional[int] = None
    class_pick: Optional[Literal["even", "random"]] = None
    subset_seed: Optional[int] = None


# ---------------------------------------------------------------------------------------------- parsers
def _pretrain_parser() -> ArgumentParser:
    p = ArgumentParser(description="Pretrain a backbone without labels.", exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="recipe YAML")
    p.add_subclass_arguments(Method, "method", required=True, help="method: class_path (e.g. MMCR) and init_args")
    p.add_class_arguments(DataConfig, "data")
    p.add_class_arguments(OptimConfig, "optim")
    p.add_class_arguments(TrainerConfig, "trainer")
    p.add_class_arguments(MonitorConfig, "monitor")
    p.add_argument(
        "--protocol",
        type=Optional[ProtocolName],
        default=None,
        help="linear-probe protocol of this recipe (selfsup.eval.protocols), stored in the run config; "
        "`selfsup linear` uses it by default",
    )
    return p


def _eval_common(p: ArgumentParser) -> None:
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--checkpoint", type=str, required=True, help="a selfsup .ckpt or an export directory/file")
    p.add_argument("--which", type=str, default="online", help=f"backbone to evaluate: {WHICH_HELP}")
    p.add_class_arguments(EvalData, "data")
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, or auto")
    p.add_argument(
        "--output",
        type=Optional[str],
        default=None,
        help="write the result JSON here (not overwritten); default: "
        "RUN_DIR/eval/<kind>-<checkpoint>[-N].json when the checkpoint lies in a run directory",
    )


def _knn_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="kNN accuracy of a backbone (cosine, top-k vote weighted by exp(sim/T)).", exit_on_error=False
    )
    _eval_common(p)
    p.add_argument(
        "--protocol",
        type=Literal["selfsup", "dino"],
        default="selfsup",
        help="k and T: selfsup (200, 0.5) or dino (20, 0.07; DINO eval_knn.py); --k / --temperature override",
    )
    p.add_argument("--k", type=Optional[int], default=None, help="default: the protocol's")
    p.add_argument("--temperature", type=Optional[float], default=None, help="default: the protocol's")
    _add_pool_argument(p)
    return p


def _add_pool_argument(p: ArgumentParser, default: str = "the backbone's own") -> None:
    p.add_argument(
        "--pool",
        type=Optional[Literal["token", "avg", "last4", "token+avg"]],
        default=None,
        help="ViT features: token (class token), avg (mean patch token), last4 (DINO: class tokens of the last 4 "
        f"blocks concatenated), token+avg (DINO ViT-B: class token + mean patch token); default: {default} "
        "(selfsup.eval.pool)",
    )


def _linear_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="Frozen linear probe (backbone in eval mode), selected on a held-out part of train. "
        "A protocol preset gives every value; a flag given explicitly overrides it.",
        exit_on_error=False,
    )
    _eval_common(p)
    p.add_argument(
        "--protocol",
        type=Optional[ProtocolName],
        default=None,
        help="preset (selfsup.eval.protocols); default: the checkpoint's recipe protocol, else fast",
    )
    p.add_argument(
        "--augmented",
        type=Optional[bool],
        default=None,
        help="a fresh augmented view every epoch (seeds) or cached features (default: the protocol's)",
    )
    p.add_argument("--epochs", type=Optional[int], default=None, help="default: the protocol's")
    p.add_argument("--lrs", type=Optional[list[float]], default=None, help="lr grid (default: the protocol's)")
    p.add_argument(
        "--weight_decays", type=Optional[list[float]], default=None, help="weight-decay grid (default: the protocol's)"
    )
    p.add_argument("--optimizer", type=Optional[Literal["sgd", "adam", "lars"]], default=None)
    p.add_argument("--momentum", type=Optional[float], default=None)
    p.add_argument("--probe_batch_size", type=Optional[int], default=None, help="head mini-batch")
    p.add_argument(
        "--feature_norm",
        type=Optional[Literal["bn", "none"]],
        default=None,
        help="bn: BatchNorm1d(affine=False) before the linear layer; none: bare linear layer",
    )
    p.add_argument("--warmup_epochs", type=Optional[float], default=None)
    p.add_argument(
        "--scale_lr",
        type=Optional[Literal["none", "linear", "sqrt"]],
        default=None,
        help="scale the lrs by probe_batch_size / 256",
    )
    p.add_argument("--val_fraction", type=Optional[float], default=None)
    p.add_argument("--seed", type=Optional[int], default=None)
    _add_pool_argument(p, default="the protocol's, else the backbone's own")
    return p


def _export_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="Export the backbone as a torchvision state dict and safetensors.", exit_on_error=False
    )
    p.add_argument("--checkpoint", type=str, required=True)
    p.add_argument("--out", type=str, required=True, help="output directory")
    p.add_argument("--which", type=str, default="online", help=f"backbone to export: {WHICH_HELP}")
    p.add_argument("--overwrite", type=bool, default=False)
    return p


def _reconstruct_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="PNG grid of an MAE / CAN / IMLE checkpoint's reconstructions: one test image per row, "
        "columns original, masked, reconstruction.",
        exit_on_error=False,
    )
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--checkpoint", type=str, required=True, help="a selfsup .ckpt of MAE, CAN or IMLE")
    p.add_class_arguments(EvalData, "data")
    p.add_argument("--output", type=str, default="reconstruction.png", help="the PNG to write (not overwritten)")
    p.add_argument("--num_images", type=int, default=8, help="the first N images of --data.test_split")
    p.add_argument("--mask_ratio", type=Optional[float], default=None, help="default: the method's")
    p.add_argument("--seed", type=int, default=0, help="seed of the masks")
    p.add_argument("--upscale", type=int, default=1, help="nearest-neighbour magnification of every panel")
    p.add_argument(
        "--display",
        type=Literal["patch", "channel"],
        default="patch",
        help="norm-pix predictions: patch (MAE's: each patch at its own mean and scale) or channel (each channel at "
        "the original's mean: no colour cast on gray images; see selfsup.reconstruct)",
    )
    p.add_argument(
        "--codes",
        type=int,
        default=1,
        help="IMLE: one reconstruction column per random latent code (same image, same mask)",
    )
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, or auto")
    return p


def _recipes_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="List the recipes shipped with selfsup (`selfsup pretrain --config NAME` runs one).",
        exit_on_error=False,
    )
    p.add_argument("names", nargs="*", type=str, help="print these recipes' YAML instead of the list")
    p.add_argument("--method", type=Optional[str], default=None, help="only the recipes of this method (e.g. MMCR)")
    return p


def run_recipes(argv: list[str]) -> list[str]:
    """One line per shipped recipe (name, method, dataset, backbone, summary), or the YAML of the named ones."""
    from selfsup.recipes import available_recipes, recipe_info, resolve_recipe

    cfg = _recipes_parser().parse_args(argv)
    if cfg.names:
        for name in cfg.names:
            path = resolve_recipe(name)
            print(f"# {path}\n{Path(path).read_text()}")
        return list(cfg.names)
    infos = [recipe_info(n) for n in available_recipes()]
    if cfg.method:
        infos = [i for i in infos if i.method.lower() == cfg.method.lower()]
        if not infos:
            raise ValueError(f"no shipped recipe uses method '{cfg.method}'")
    width = max(len(i.name) for i in infos)
    for i in infos:
        head = f"{i.name:<{width}}  {i.method:<7} {i.dataset:<11} {i.backbone:<9} "
        summary = i.summary if len(head) + len(i.summary) <= 160 else i.summary[: 157 - len(head)] + "..."
        print(head + summary)
    return [i.name for i in infos]


def _demo_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="Pretrain MMCR on the CIFAR-10 sample shipped in the package and evaluate it.", exit_on_error=False
    )
    p.add_argument("--out_dir", type=Optional[str], default=None, help="default: runs/demo-<time>")
    from selfsup.demo import DEMO_EPOCHS

    p.add_argument("--epochs", type=int, default=DEMO_EPOCHS)
    p.add_argument(
        "--progress_bar",
        type=Union[bool, Literal["auto", "bar", "lines", "none"]],
        default="auto",
        help="auto: a bar on a terminal, else one line per logging interval",
    )
    return p


# ---------------------------------------------------------------------------------------------- commands
def _check_resume_file(trainer) -> Optional[str]:
    """A resume checkpoint that cannot be read is named before any work is done; returns its path (None: fresh)."""
    from selfsup.engine.checkpoint import resolve_resume
    from selfsup.eval.load import checkpoint_meta

    path = resolve_resume(trainer.out_dir, trainer.resume)
    if path is None:
        return None
    with reading_checkpoint(path):
        meta = checkpoint_meta(path)
    if not meta:
        raise ValueError(f"'{path}' was not written by selfsup pretrain (no 'selfsup' entry); cannot resume from it")
    return path


def recipe_paths(argv: list[str]) -> list[str]:
    """``argv`` with each ``--config NAME`` that is not a file replaced by the shipped recipe's path
    (:func:`selfsup.recipes.resolve_recipe`; an unknown name is a ``FileNotFoundError`` naming close recipes)."""
    from selfsup.recipes import resolve_recipe

    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            out += [arg, resolve_recipe(argv[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + resolve_recipe(arg.split("=", 1)[1])
        out.append(arg)
        i += 1
    return out


def run_pretrain(argv: list[str], extra_callbacks=()) -> dict:
    parser = _pretrain_parser()
    cfg = parser.parse_args(recipe_paths(argv))
    if _check_resume_file(cfg.trainer) and getattr(cfg.method.init_args, "init_from", None):
        # a resumed run's weights come from its checkpoint: the initial weights' file is not needed (nor read) again
        cfg.method.init_args.init_from = None
    import lightning as L

    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)  # before the model is built
    init = parser.instantiate(cfg)
    from selfsup.engine.pretrain import pretrain

    config = json.loads(parser.dump(cfg, format="json"))
    config.pop("config", None)
    result = pretrain(
        init.method, init.data, init.optim, init.trainer, init.monitor, config=config, extra_callbacks=extra_callbacks
    )
    result.pop("module", None)
    print(json.dumps(result, indent=2))
    return result


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextlib.contextmanager
def reading_checkpoint(path: str) -> Iterator[None]:
    """Turn a failure to read ``path`` as a checkpoint / export into a ``ValueError`` naming the file.

    ``torch.load`` / safetensors / a foreign dictionary fail with many exception types (unpickling errors,
    ``RuntimeError`` for a file that is not a zip, ``EOFError``, ``KeyError`` for missing entries, ...).
    """
    import pickle

    try:
        yield
    except (FileNotFoundError, FileExistsError, ValueError):
        raise
    except (KeyError, TypeError, AttributeError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"cannot read '{path}' as a selfsup checkpoint or export: {type(e).__name__}: {e}") from e
    except Exception as e:  # safetensors' SafetensorError derives from Exception only
        if type(e).__name__ != "SafetensorError":
            raise
        raise ValueError(f"cannot read '{path}' as a safetensors export: {e}") from e


def _read_checkpoint(path: str, which: str):
    """``(backbone, checkpoint meta)`` of a checkpoint or export (``meta`` is ``{}`` for an export)."""
    from selfsup.eval.load import checkpoint_meta, load_backbone

    with reading_checkpoint(path):
        backbone, _ = load_backbone(path, which)
        meta = checkpoint_meta(path)
    return backbone, meta


def _check_output_free(output: Optional[str]) -> None:
    """An ``--output`` that exists fails before any work (results are never overwritten)."""
    if output and Path(output).exists():
        raise FileExistsError(f"--output '{output}' exists; refusing to overwrite it")


def _eval_setup(cfg):
    """``(backbone on the --device, eval DataConfig, checkpoint meta, device)``, defaults from the checkpoint."""
    _check_output_free(cfg.output)
    backbone, meta = _read_checkpoint(cfg.checkpoint, cfg.which)
    data = eval_data_config(cfg.data, meta, cfg.checkpoint)
    device = _device(cfg.device)
    return on_device(backbone, device), data, meta, device


def eval_data_config(d: EvalData, meta: dict, checkpoint: str) -> DataConfig:
    """The eval ``DataConfig``: each ``--data.*`` given, else the checkpoint's dataset, root and augmentation."""
    dataset = d.dataset or meta.get("dataset")
    if dataset is None:
        raise ValueError(f"'{checkpoint}' does not say which dataset it was trained on: pass --data.dataset")
    root = d.root if d.root is not None else (meta.get("root") if dataset == meta.get("dataset") else None)
    augment = d.augment or meta.get("augment") or ("cifar10" if dataset == "demo" else dataset)
    trained = meta.get("config", {}).get("data", {}) if dataset == meta.get("dataset") else {}
    overrides = meta.get("config", {}).get("data", {}).get("augment_overrides") if not d.augment else None
    n_way = d.n_way if d.n_way is not None else trained.get("n_way")
    return DataConfig(
        dataset=dataset,
        root=root,
        download=d.download,
        bank_split=d.train_split,
        augment_overrides=overrides,
        n_way=None if n_way == -1 else n_way,
        class_pick=d.class_pick or trained.get("class_pick") or "even",
        subset_seed=d.subset_seed if d.subset_seed is not None else trained.get("subset_seed", 0),
        test_split=d.test_split,
        class_list=d.class_list,
        augment=augment,
        in_memory=d.in_memory,
        image_size=d.image_size,
        num_workers=d.num_workers,
        skip_corrupt=d.skip_corrupt,
    )


def on_device(backbone, device):
    """The backbone moved to ``device`` (the inputs go there too), so features are computed where asked."""
    return backbone.to(device)


def _write_output(
    path: Optional[str], result: dict, kind: Optional[str] = None, checkpoint: Optional[str] = None
) -> Optional[Path]:
    """Print ``result``; write it to ``path`` (never overwritten), else, when ``checkpoint`` lies in a run directory,
    to ``RUN_DIR/eval/<kind>-<checkpoint>[-N].json`` (:func:`selfsup.eval.results.write_eval_result`)."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        p = Path(path)
        if p.exists():
            raise FileExistsError(f"--output '{p}' exists; refusing to overwrite it (result printed above)")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        return p
    from selfsup.eval.results import find_run_dir, write_eval_result

    if kind and checkpoint and Path(checkpoint).is_file() and find_run_dir(checkpoint) is not None:
        written = write_eval_result(checkpoint, kind, result)
        print(f"result written to {written}", file=sys.stderr)
        return written
    return None


def _features(backbone, data: DataConfig, split: str, batch_size: int, device):
    from torch.utils.data import DataLoader

    from selfsup.data.build import build_eval_dataset, num_classes
    from selfsup.eval.features import extract_features

    ds = build_eval_dataset(data, split)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=0 if data.in_memory else data.num_workers)
    f, y = extract_features(backbone, loader, device=device)
    return f, y, num_classes(ds)


def run_knn(argv: list[str]) -> dict:
    parser = _knn_parser()
    cfg = parser.parse_args(argv)
    backbone, data, _, device = _eval_setup(cfg)
    from selfsup.eval.knn import KNN_PROTOCOLS, knn_accuracy
    from selfsup.eval.pool import probe_pool, probe_pool_name

    backbone = probe_pool(backbone, cfg.pool)
    k = cfg.k if cfg.k is not None else int(KNN_PROTOCOLS[cfg.protocol]["k"])
    temperature = cfg.temperature if cfg.temperature is not None else KNN_PROTOCOLS[cfg.protocol]["temperature"]
    t0 = time.time()
    bank_f, bank_y, c = _features(backbone, data, data.bank_split, cfg.data.batch_size, device)
    test_f, test_y, _ = _features(backbone, data, data.test_split, cfg.data.batch_size, device)
    acc = knn_accuracy(bank_f, bank_y, test_f, test_y, num_classes=c, k=k, temperature=temperature)
    result = {
        "checkpoint": cfg.checkpoint,
        "dataset": data.dataset,
        "protocol": cfg.protocol,
        "k": k,
        "temperature": temperature,
        "pool": probe_pool_name(backbone),
        "bank": int(bank_y.numel()),
        "test": int(test_y.numel()),
        **acc,
        "seconds": round(time.time() - t0, 2),
    }
    _write_output(cfg.output, result, kind="knn", checkpoint=cfg.checkpoint)
    return result


def linear_protocol(cfg, meta: dict):
    """The probe protocol of a ``selfsup linear`` call: ``--protocol``, else the checkpoint recipe's, else
    ``fast``; each flag given explicitly replaces the preset's value."""
    from selfsup.eval.protocols import resolve

    name = cfg.protocol or (meta.get("config") or {}).get("protocol") or "fast"
    return resolve(
        name,
        augmented=cfg.augmented,
        epochs=cfg.epochs,
        lrs=cfg.lrs,
        weight_decays=cfg.weight_decays,
        optimizer=cfg.optimizer,
        momentum=cfg.momentum,
        batch_size=cfg.probe_batch_size,
        feature_norm=cfg.feature_norm,
        warmup_epochs=cfg.warmup_epochs,
        scale_lr=cfg.scale_lr,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
    )


def run_linear(argv: list[str]) -> dict:
    parser = _linear_parser()
    cfg = parser.parse_args(argv)
    backbone, data, meta, device = _eval_setup(cfg)
    protocol = linear_protocol(cfg, meta)
    from selfsup.eval.pool import probe_pool, probe_pool_name

    backbone = probe_pool(backbone, cfg.pool or protocol.pool)
    from selfsup.eval.linear import linear_probe_augmented, linear_probe_cached

    t0 = time.time()
    if protocol.augmented:
        import dataclasses

        from selfsup.data.build import build_eval_dataset, num_classes, train_augmented_dataset

        train_data = dataclasses.replace(
            data, augment_overrides=protocol.train_augment_overrides(data.augment_overrides)
        )
        train_ds = train_augmented_dataset(train_data, data.bank_split)
        val_ds = build_eval_dataset(data, data.bank_split)
        test_ds = build_eval_dataset(data, data.test_split)
        res = linear_probe_augmented(
            backbone,
            train_ds,
            test_ds,
            num_classes(val_ds),
            protocol.probe,
            val_dataset=val_ds,
            device=device,
            num_workers=0 if data.in_memory else data.num_workers,
            eval_batch_size=cfg.data.batch_size,
        )
    else:
        train_f, train_y, c = _features(backbone, data, data.bank_split, cfg.data.batch_size, device)
        test_f, test_y, _ = _features(backbone, data, data.test_split, cfg.data.batch_size, device)
        res = linear_probe_cached(train_f, train_y, test_f, test_y, c, protocol.probe, device=device)
    result = {
        "checkpoint": cfg.checkpoint,
        "dataset": data.dataset,
        "protocol": protocol.name,
        "augmented": protocol.augmented,
        "train_augment": protocol.train_augment,
        "pool": probe_pool_name(backbone),
        **res.to_dict(),
        "total_seconds": round(time.time() - t0, 2),
    }
    _write_output(cfg.output, result, kind="linear", checkpoint=cfg.checkpoint)
    return result


def run_export(argv: list[str]) -> dict:
    cfg = _export_parser().parse_args(argv)
    from selfsup.eval.load import export_backbone

    _read_checkpoint(cfg.checkpoint, cfg.which)  # a bad file is named before anything is written
    paths = export_backbone(cfg.checkpoint, cfg.out, overwrite=cfg.overwrite, which=cfg.which)
    print(json.dumps(paths, indent=2))
    return paths


def run_reconstruct(argv: list[str]) -> dict:
    cfg = _reconstruct_parser().parse_args(argv)
    cfg.which = "online"
    _, data, _, device = _eval_setup(cfg)  # the checkpoint's dataset and normalisation unless given
    from selfsup.reconstruct import reconstruct

    with reading_checkpoint(cfg.checkpoint):
        result = reconstruct(
            cfg.checkpoint,
            cfg.output,
            data,
            num_images=cfg.num_images,
            mask_ratio=cfg.mask_ratio,
            seed=cfg.seed,
            upscale=cfg.upscale,
            device=device,
            codes=cfg.codes,
            display=cfg.display,
        )
    print(json.dumps(result, indent=2))
    return result


def run_demo(argv: list[str]) -> dict:
    cfg = _demo_parser().parse_args(argv)
    from selfsup.demo import demo

    return demo(out_dir=cfg.out_dir, epochs=cfg.epochs, progress_bar=cfg.progress_bar)


def _finetune_parser() -> ArgumentParser:
    import dataclasses
    import typing

    from selfsup.eval.finetune import FinetuneConfig

    p = ArgumentParser(
        description="Fine-tune a backbone end to end with a new linear head (layer-wise lr decay, mixup / "
        "cutmix, label smoothing, drop path, RandAugment), selected on a held-out part of "
        "train. A protocol preset gives every value; a flag given explicitly overrides it.",
        exit_on_error=False,
    )
    _eval_common(p)
    p.add_argument(
        "--protocol",
        type=Optional[FinetuneProtocolName],
        default=None,
        help="preset (selfsup.eval.finetune_protocols.FINETUNE_PROTOCOLS); default: fast",
    )
    p.add_argument(
        "--amp",
        type=Literal["auto", "none", "bf16", "fp16"],
        default="auto",
        help="autocast dtype; auto: bf16 on a CUDA device that supports it, else fp32",
    )
    hints = typing.get_type_hints(FinetuneConfig)
    for f in dataclasses.fields(FinetuneConfig):  # one override per FinetuneConfig field
        p.add_argument(
            f"--{f.name}",
            type=Optional[hints[f.name]],
            default=None,
            help="default: the protocol's (selfsup.eval.finetune.FinetuneConfig)",
        )
    return p


def run_finetune(argv: list[str]) -> dict:
    import dataclasses

    from selfsup.eval.finetune import FinetuneConfig
    from selfsup.eval.finetune_data import finetune_on_data, prepare_backbone
    from selfsup.eval.finetune_protocols import resolve_finetune
    from selfsup.eval.load import checkpoint_meta

    cfg = _finetune_parser().parse_args(argv)
    _check_output_free(cfg.output)
    protocol = resolve_finetune(
        cfg.protocol or "fast", **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(FinetuneConfig)}
    )
    with reading_checkpoint(cfg.checkpoint):
        backbone, spec = prepare_backbone(cfg.checkpoint, protocol.config, cfg.which)
        meta = checkpoint_meta(cfg.checkpoint)
    data = eval_data_config(cfg.data, meta, cfg.checkpoint)
    t0 = time.time()
    res = finetune_on_data(
        backbone, data, protocol.config, device=_device(cfg.device), amp=cfg.amp, eval_batch_size=cfg.data.batch_size
    )
    result = {
        "checkpoint": cfg.checkpoint,
        "dataset": data.dataset,
        "protocol": protocol.name,
        "backbone": spec,
        **res.to_dict(),
        "total_seconds": round(time.time() - t0, 2),
    }
    _write_output(cfg.output, result, kind="finetune", checkpoint=cfg.checkpoint)
    return result


def _report_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="PNG plots and one self-contained HTML page of one or several pretraining runs "
        "(losses, lr, kNN, effective rank, singular-value spectra, config, eval results); "
        "works on a run that is still going or was killed.",
        exit_on_error=False,
    )
    p.add_argument("run_dirs", nargs="+", type=str, help="run directories (trainer.out_dir of selfsup pretrain)")
    p.add_argument(
        "--out",
        type=Optional[str],
        default=None,
        help="output directory; default RUN_DIR/report for one run, reports/<a>-vs-<b> for several",
    )
    return p


def run_report(argv: list[str]) -> dict:
    cfg = _report_parser().parse_args(argv)
    from selfsup.report import build_report

    result = build_report(cfg.run_dirs, cfg.out, command="selfsup report " + " ".join(argv))
    print(json.dumps(result, indent=2))
    return result


def _select_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="Score every checkpoint of a run on a held-out part of the train split (never the "
        "test split; rankme needs no labels), pick one, and report the test score of the "
        "pick and of last.ckpt side by side.",
        exit_on_error=False,
    )
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("run_dir", type=str, help="run directory (trainer.out_dir of selfsup pretrain)")
    p.add_argument(
        "--by",
        type=Literal["knn", "linear", "rankme"],
        default="knn",
        help="knn: held-out kNN top-1; linear: held-out linear-probe top-1; rankme: RankMe of features",
    )
    p.add_argument("--which", type=str, default="online", help=f"backbone to score: {WHICH_HELP}")
    p.add_class_arguments(EvalData, "data")
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, or auto")
    p.add_argument("--val_fraction", type=float, default=0.1, help="held-out part of the train split (stratified)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split and the RankMe subset")
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--rankme_images", type=int, default=2000, help="train images RankMe is computed on")
    p.add_argument(
        "--protocol",
        type=Optional[ProtocolName],
        default=None,
        help="--by linear: a cached probe preset (default fast); --epochs / --lrs override it",
    )
    p.add_argument("--epochs", type=Optional[int], default=None, help="--by linear: probe epochs")
    p.add_argument("--lrs", type=Optional[list[float]], default=None, help="--by linear: probe lr grid")
    p.add_argument("--test_scores", type=bool, default=True, help="score the pick and last.ckpt on the test split")
    p.add_argument(
        "--diagnostic_best_on_test",
        type=bool,
        default=False,
        help="also score every checkpoint on test and show the best, labelled a diagnostic (never picked)",
    )
    p.add_argument(
        "--output",
        type=Optional[str],
        default=None,
        help="write the result JSON here (not overwritten); default RUN_DIR/eval/select-<by>[-N].json",
    )
    return p


def run_select(argv: list[str]) -> dict:
    cfg = _select_parser().parse_args(argv)
    _check_output_free(cfg.output)
    from selfsup.eval.load import checkpoint_meta
    from selfsup.eval.protocols import resolve
    from selfsup.eval.results import write_eval_result
    from selfsup.eval.select import SelectOptions, list_checkpoints, select_checkpoint

    newest = str(list_checkpoints(cfg.run_dir)[-1]["path"])  # names a missing / empty run dir first
    with reading_checkpoint(newest):
        meta = checkpoint_meta(newest)
    data = eval_data_config(cfg.data, meta, newest)
    protocol = resolve(cfg.protocol or "fast", epochs=cfg.epochs, lrs=cfg.lrs)
    if cfg.by == "linear" and protocol.augmented:
        raise ValueError(
            f"select --by linear trains on cached features; protocol '{protocol.name}' is augmented: "
            "choose a cached one (e.g. fast)"
        )
    opts = SelectOptions(
        by=cfg.by,
        which=cfg.which,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        k=cfg.k,
        temperature=cfg.temperature,
        rankme_images=cfg.rankme_images,
        probe=protocol.probe,
        test_scores=cfg.test_scores,
        diagnostic_best_on_test=cfg.diagnostic_best_on_test,
        batch_size=cfg.data.batch_size,
    )
    with reading_checkpoint(cfg.run_dir):
        result = select_checkpoint(
            cfg.run_dir, data, opts, device=_device(cfg.device), log=lambda msg: print(msg, file=sys.stderr)
        )
    if cfg.output:
        _write_output(cfg.output, result)
    else:
        print(json.dumps(result, indent=2))
        path = write_eval_result(cfg.run_dir, f"select-{cfg.by}", result)
        print(f"result written to {path}", file=sys.stderr)
    return result


def _fewshot_parser() -> ArgumentParser:
    from selfsup.eval.fewshot import FewShotConfig

    p = ArgumentParser(
        description="Few-shot accuracy of a frozen backbone: seeded n-way n-shot episodes (support from "
        "--data.train_split, queries from --data.test_split), a nearest-prototype or linear "
        "classifier per episode, the mean accuracy with its 95% interval.",
        exit_on_error=False,
    )
    _eval_common(p)
    p.add_class_arguments(FewShotConfig, "fewshot")
    _add_pool_argument(p)
    return p


def run_fewshot(argv: list[str]) -> dict:
    parser = _fewshot_parser()
    cfg = parser.parse_args(argv)
    fs = parser.instantiate(cfg).fewshot  # validates the FewShotConfig
    backbone, data, _, device = _eval_setup(cfg)
    from selfsup.data.build import build_eval_dataset, train_augmented_dataset
    from selfsup.eval.fewshot import few_shot_eval
    from selfsup.eval.pool import probe_pool, probe_pool_name

    backbone = probe_pool(backbone, cfg.pool)
    t0 = time.time()
    support = build_eval_dataset(data, data.bank_split)
    query = support if data.test_split == data.bank_split else build_eval_dataset(data, data.test_split)
    augmented = train_augmented_dataset(data, data.bank_split) if fs.augs_per_image > 0 else None
    res = few_shot_eval(
        backbone,
        support,
        query,
        fs,
        support_augmented=augmented,
        device=device,
        batch_size=cfg.data.batch_size,
        num_workers=0 if data.in_memory else data.num_workers,
    )
    print(res.summary, file=sys.stderr)
    result = {
        "checkpoint": cfg.checkpoint,
        "dataset": data.dataset,
        "support_split": data.bank_split,
        "query_split": data.test_split,
        "pool": probe_pool_name(backbone),
        **res.to_dict(),
        "total_seconds": round(time.time() - t0, 2),
    }
    _write_output(cfg.output, result, kind="fewshot", checkpoint=cfg.checkpoint)
    return result


def _submit_parser():
    from selfsup.submit import SubmitParser

    return SubmitParser()  # submit flags, then `--` and the pretrain arguments (selfsup.submit)


def run_submit(argv: list[str]):
    """``selfsup submit [submit flags] -- <pretrain arguments>``: the run as a requeued submitit job."""
    from selfsup.submit import submit

    parsed = _submit_parser().parse_args(argv)
    try:
        job = submit(parsed.pretrain_argv, parsed.options)
    except ImportError as e:  # submitit missing: one line naming the extra
        raise ValueError(str(e)) from None
    if parsed.options.wait:
        print(json.dumps(job.result(), indent=2))
    return job


COMMANDS = {
    "demo": run_demo,
    "pretrain": run_pretrain,
    "knn": run_knn,
    "linear": run_linear,
    "export": run_export,
    "reconstruct": run_reconstruct,
    "finetune": run_finetune,
    "report": run_report,
    "select": run_select,
    "fewshot": run_fewshot,
    "recipes": run_recipes,
    "submit": run_submit,
}


def _one_line(e: BaseException) -> str:
    """The error as one line: a DataLoader worker's re-raised error keeps only its original message."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(e).__name__
    last = lines[-1]  # "pkg.module.ErrorType: message" at the end of the worker's traceback
    head, sep, rest = last.partition(": ")
    return rest if sep and head.rsplit(".", 1)[-1] == type(e).__name__ else " ".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: selfsup {" + ",".join(COMMANDS) + "} [--help] [options]")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"selfsup: unknown command '{argv[0]}'", file=sys.stderr)
            return 2
        return 0
    try:
        COMMANDS[argv[0]](argv[1:])
    except (ArgumentError, FileNotFoundError, FileExistsError, ValueError, FloatingPointError, CorruptImageError) as e:
        print(f"selfsup {argv[0]}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
