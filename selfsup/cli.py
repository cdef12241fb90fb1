"""``selfsup`` command line: ``demo``, ``pretrain``, ``knn``, ``linear``, ``export``.

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
from typing import Literal, Optional

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

from selfsup.data.datasets import CorruptImageError
from selfsup.engine.config import DataConfig, MonitorConfig, OptimConfig, TrainerConfig
from selfsup.eval.protocols import protocol_names
from selfsup.methods import Method

#: A linear-probe protocol name, checked when the command line / recipe is parsed.
ProtocolName = Literal[protocol_names()]  # type: ignore[valid-type]
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


# ---------------------------------------------------------------------------------------------- parsers
def _pretrain_parser() -> ArgumentParser:
    p = ArgumentParser(description="Pretrain a backbone without labels.", exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="recipe YAML")
    p.add_subclass_arguments(Method, "method", required=True, help="method: class_path (e.g. MMCR) and init_args")
    p.add_class_arguments(DataConfig, "data")
    p.add_class_arguments(OptimConfig, "optim")
    p.add_class_arguments(TrainerConfig, "trainer")
    p.add_class_arguments(MonitorConfig, "monitor")
    p.add_argument("--protocol", type=Optional[ProtocolName], default=None,
                   help="linear-probe protocol of this recipe (selfsup.eval.protocols), stored in the run config; "
                        "`selfsup linear` uses it by default")
    return p


def _eval_common(p: ArgumentParser) -> None:
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--checkpoint", type=str, required=True, help="a selfsup .ckpt or an export directory/file")
    p.add_argument("--which", type=str, default="online", help=f"backbone to evaluate: {WHICH_HELP}")
    p.add_class_arguments(EvalData, "data")
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, or auto")
    p.add_argument("--output", type=Optional[str], default=None, help="write the result JSON here (not overwritten)")


def _knn_parser() -> ArgumentParser:
    p = ArgumentParser(description="kNN accuracy of a backbone (cosine, top-k vote weighted by exp(sim/T)).",
                       exit_on_error=False)
    _eval_common(p)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.5)
    return p


def _linear_parser() -> ArgumentParser:
    p = ArgumentParser(description="Frozen linear probe (backbone in eval mode), selected on a held-out part of train. "
                                   "A protocol preset gives every value; a flag given explicitly overrides it.",
                       exit_on_error=False)
    _eval_common(p)
    p.add_argument("--protocol", type=Optional[ProtocolName], default=None,
                   help="preset (selfsup.eval.protocols); default: the checkpoint's recipe protocol, else fast")
    p.add_argument("--augmented", type=Optional[bool], default=None,
                   help="a fresh augmented view every epoch (seeds) or cached features (default: the protocol's)")
    p.add_argument("--epochs", type=Optional[int], default=None, help="default: the protocol's")
    p.add_argument("--lrs", type=Optional[list[float]], default=None, help="lr grid (default: the protocol's)")
    p.add_argument("--weight_decays", type=Optional[list[float]], default=None,
                   help="weight-decay grid (default: the protocol's)")
    p.add_argument("--optimizer", type=Optional[Literal["sgd", "adam", "lars"]], default=None)
    p.add_argument("--momentum", type=Optional[float], default=None)
    p.add_argument("--probe_batch_size", type=Optional[int], default=None, help="head mini-batch")
    p.add_argument("--feature_norm", type=Optional[Literal["bn", "none"]], default=None,
                   help="bn: BatchNorm1d(affine=False) before the linear layer; none: bare linear layer")
    p.add_argument("--warmup_epochs", type=Optional[float], default=None)
    p.add_argument("--scale_lr", type=Optional[Literal["none", "linear", "sqrt"]], default=None,
                   help="scale the lrs by probe_batch_size / 256")
    p.add_argument("--val_fraction", type=Optional[float], default=None)
    p.add_argument("--seed", type=Optional[int], default=None)
    return p


def _export_parser() -> ArgumentParser:
    p = ArgumentParser(description="Export the backbone as a torchvision state dict and safetensors.",
                       exit_on_error=False)
    p.add_argument("--checkpoint", type=str, required=True)
    p.add_argument("--out", type=str, required=True, help="output directory")
    p.add_argument("--which", type=str, default="online", help=f"backbone to export: {WHICH_HELP}")
    p.add_argument("--overwrite", type=bool, default=False)
    return p


def _demo_parser() -> ArgumentParser:
    p = ArgumentParser(description="Pretrain MMCR on the CIFAR-10 sample shipped in the package and evaluate it.",
                       exit_on_error=False)
    p.add_argument("--out_dir", type=Optional[str], default=None, help="default: runs/demo-<time>")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--progress_bar", type=bool, default=True)
    return p


# ---------------------------------------------------------------------------------------------- commands
def _check_resume_file(trainer) -> None:
    """A resume checkpoint that cannot be read is named before any work is done."""
    from selfsup.engine.checkpoint import resolve_resume
    from selfsup.eval.load import checkpoint_meta

    path = resolve_resume(trainer.out_dir, trainer.resume)
    if path is None:
        return
    with reading_checkpoint(path):
        meta = checkpoint_meta(path)
    if not meta:
        raise ValueError(f"'{path}' was not written by selfsup pretrain (no 'selfsup' entry); cannot resume from it")


def run_pretrain(argv: list[str], extra_callbacks=()) -> dict:
    parser = _pretrain_parser()
    cfg = parser.parse_args(argv)
    _check_resume_file(cfg.trainer)
    import lightning as L

    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)  # before the model is built
    init = parser.instantiate(cfg)
    from selfsup.engine.pretrain import pretrain

    config = json.loads(parser.dump(cfg, format="json"))
    config.pop("config", None)
    result = pretrain(init.method, init.data, init.optim, init.trainer, init.monitor, config=config,
                      extra_callbacks=extra_callbacks)
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


def _eval_setup(cfg):
    """``(backbone on the --device, eval DataConfig, checkpoint meta, device)``, defaults from the checkpoint."""
    if cfg.output and Path(cfg.output).exists():  # fail before any work
        raise FileExistsError(f"--output '{cfg.output}' exists; refusing to overwrite it")
    backbone, meta = _read_checkpoint(cfg.checkpoint, cfg.which)
    d = cfg.data
    dataset = d.dataset or meta.get("dataset")
    if dataset is None:
        raise ValueError(f"'{cfg.checkpoint}' does not say which dataset it was trained on: pass --data.dataset")
    root = d.root if d.root is not None else (meta.get("root") if dataset == meta.get("dataset") else None)
    augment = d.augment or meta.get("augment") or ("cifar10" if dataset == "demo" else dataset)
    overrides = meta.get("config", {}).get("data", {}).get("augment_overrides") if not d.augment else None
    data = DataConfig(dataset=dataset, root=root, download=d.download, bank_split=d.train_split,
                      augment_overrides=overrides,
                      test_split=d.test_split, class_list=d.class_list, augment=augment, in_memory=d.in_memory,
                      image_size=d.image_size, num_workers=d.num_workers, skip_corrupt=d.skip_corrupt)
    device = _device(cfg.device)
    return on_device(backbone, device), data, meta, device


def on_device(backbone, device):
    """The backbone moved to ``device`` (the inputs go there too), so features are computed where asked."""
    return backbone.to(device)


def _write_output(path: Optional[str], result: dict) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        p = Path(path)
        if p.exists():
            raise FileExistsError(f"--output '{p}' exists; refusing to overwrite it (result printed above)")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


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
    from selfsup.eval.knn import knn_accuracy

    t0 = time.time()
    bank_f, bank_y, c = _features(backbone, data, data.bank_split, cfg.data.batch_size, device)
    test_f, test_y, _ = _features(backbone, data, data.test_split, cfg.data.batch_size, device)
    acc = knn_accuracy(bank_f, bank_y, test_f, test_y, num_classes=c, k=cfg.k, temperature=cfg.temperature)
    result = {"checkpoint": cfg.checkpoint, "dataset": data.dataset, "k": cfg.k, "temperature": cfg.temperature,
              "bank": int(bank_y.numel()), "test": int(test_y.numel()), **acc, "seconds": round(time.time() - t0, 2)}
    _write_output(cfg.output, result)
    return result


def linear_protocol(cfg, meta: dict):
    """The probe protocol of a ``selfsup linear`` call: ``--protocol``, else the checkpoint recipe's, else
    ``fast``; each flag given explicitly replaces the preset's value."""
    from selfsup.eval.protocols import resolve

    name = cfg.protocol or (meta.get("config") or {}).get("protocol") or "fast"
    return resolve(name, augmented=cfg.augmented, epochs=cfg.epochs, lrs=cfg.lrs, weight_decays=cfg.weight_decays,
                   optimizer=cfg.optimizer, momentum=cfg.momentum, batch_size=cfg.probe_batch_size,
                   feature_norm=cfg.feature_norm, warmup_epochs=cfg.warmup_epochs, scale_lr=cfg.scale_lr,
                   val_fraction=cfg.val_fraction, seed=cfg.seed)


def run_linear(argv: list[str]) -> dict:
    parser = _linear_parser()
    cfg = parser.parse_args(argv)
    backbone, data, meta, device = _eval_setup(cfg)
    protocol = linear_protocol(cfg, meta)
    from selfsup.eval.linear import linear_probe_augmented, linear_probe_cached

    t0 = time.time()
    if protocol.augmented:
        import dataclasses

        from selfsup.data.build import build_eval_dataset, num_classes, train_augmented_dataset

        train_data = dataclasses.replace(data, augment_overrides=protocol.train_augment_overrides(data.augment_overrides))
        train_ds = train_augmented_dataset(train_data, data.bank_split)
        val_ds = build_eval_dataset(data, data.bank_split)
        test_ds = build_eval_dataset(data, data.test_split)
        res = linear_probe_augmented(backbone, train_ds, test_ds, num_classes(val_ds), protocol.probe,
                                     val_dataset=val_ds, device=device,
                                     num_workers=0 if data.in_memory else data.num_workers,
                                     eval_batch_size=cfg.data.batch_size)
    else:
        train_f, train_y, c = _features(backbone, data, data.bank_split, cfg.data.batch_size, device)
        test_f, test_y, _ = _features(backbone, data, data.test_split, cfg.data.batch_size, device)
        res = linear_probe_cached(train_f, train_y, test_f, test_y, c, protocol.probe, device=device)
    result = {"checkpoint": cfg.checkpoint, "dataset": data.dataset, "protocol": protocol.name,
              "augmented": protocol.augmented, "train_augment": protocol.train_augment, **res.to_dict(),
              "total_seconds": round(time.time() - t0, 2)}
    _write_output(cfg.output, result)
    return result


def run_export(argv: list[str]) -> dict:
    cfg = _export_parser().parse_args(argv)
    from selfsup.eval.load import export_backbone

    _read_checkpoint(cfg.checkpoint, cfg.which)  # a bad file is named before anything is written
    paths = export_backbone(cfg.checkpoint, cfg.out, overwrite=cfg.overwrite, which=cfg.which)
    print(json.dumps(paths, indent=2))
    return paths


def run_demo(argv: list[str]) -> dict:
    cfg = _demo_parser().parse_args(argv)
    from selfsup.demo import demo

    return demo(out_dir=cfg.out_dir, epochs=cfg.epochs, progress_bar=cfg.progress_bar)


COMMANDS = {"demo": run_demo, "pretrain": run_pretrain, "knn": run_knn, "linear": run_linear, "export": run_export}


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
    except (ArgumentError, FileNotFoundError, FileExistsError, ValueError, FloatingPointError,
            CorruptImageError) as e:
        print(f"selfsup {argv[0]}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
