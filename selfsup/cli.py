"""``selfsup`` command line: ``demo``, ``pretrain``, ``knn``, ``linear``, ``export``.

Configs are typed (jsonargparse): a recipe YAML is read with ``--config``, any field can be
overridden on the command line (``--optim.lr 0.002``, ``--method.init_args.lmbda 0.1``), and an
unknown key is rejected by name. ``selfsup pretrain --print_config`` shows the resolved config.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from jsonargparse import ActionConfigFile, ArgumentParser
from jsonargparse import ArgumentError

from selfsup.engine.config import DataConfig, MonitorConfig, OptimConfig, TrainerConfig
from selfsup.methods import Method


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
    return p


def _eval_common(p: ArgumentParser) -> None:
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--checkpoint", type=str, required=True, help="a selfsup .ckpt or an export directory/file")
    p.add_argument("--which", type=str, default="online", help="online or momentum (EMA) backbone")
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
    p = ArgumentParser(description="Frozen linear probe (backbone in eval mode), selected on a held-out part of train.",
                       exit_on_error=False)
    _eval_common(p)
    p.add_argument("--augmented", type=bool, default=False,
                   help="seeds' protocol: a fresh augmented view every epoch (slow); default: cached features")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lrs", type=list[float], default=[0.1, 0.3, 1.0])
    p.add_argument("--weight_decays", type=list[float], default=[0.0, 1e-5])
    p.add_argument("--optimizer", type=str, default="sgd")
    p.add_argument("--probe_batch_size", type=int, default=256)
    p.add_argument("--val_fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    return p


def _export_parser() -> ArgumentParser:
    p = ArgumentParser(description="Export the backbone as a torchvision state dict and safetensors.",
                       exit_on_error=False)
    p.add_argument("--checkpoint", type=str, required=True)
    p.add_argument("--out", type=str, required=True, help="output directory")
    p.add_argument("--which", type=str, default="online")
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
def run_pretrain(argv: list[str], extra_callbacks=()) -> dict:
    parser = _pretrain_parser()
    cfg = parser.parse_args(argv)
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


def _eval_setup(cfg):
    """Backbone + the eval DataConfig, with defaults taken from the checkpoint."""
    from selfsup.eval.load import checkpoint_meta, load_backbone

    if cfg.output and Path(cfg.output).exists():  # fail before any work
        raise FileExistsError(f"--output '{cfg.output}' exists; refusing to overwrite it")
    backbone, _ = load_backbone(cfg.checkpoint, cfg.which)
    meta = checkpoint_meta(cfg.checkpoint)
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
    return backbone, data


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
    backbone, data = _eval_setup(cfg)
    device = _device(cfg.device)
    from selfsup.eval.knn import knn_accuracy

    t0 = time.time()
    bank_f, bank_y, c = _features(backbone, data, data.bank_split, cfg.data.batch_size, device)
    test_f, test_y, _ = _features(backbone, data, data.test_split, cfg.data.batch_size, device)
    acc = knn_accuracy(bank_f, bank_y, test_f, test_y, num_classes=c, k=cfg.k, temperature=cfg.temperature)
    result = {"checkpoint": cfg.checkpoint, "dataset": data.dataset, "k": cfg.k, "temperature": cfg.temperature,
              "bank": int(bank_y.numel()), "test": int(test_y.numel()), **acc, "seconds": round(time.time() - t0, 2)}
    _write_output(cfg.output, result)
    return result


def run_linear(argv: list[str]) -> dict:
    parser = _linear_parser()
    cfg = parser.parse_args(argv)
    backbone, data = _eval_setup(cfg)
    device = _device(cfg.device)
    from selfsup.eval.linear import linear_probe_augmented, linear_probe_cached

    t0 = time.time()
    common = dict(val_fraction=cfg.val_fraction, lrs=tuple(cfg.lrs), weight_decays=tuple(cfg.weight_decays),
                  epochs=cfg.epochs, batch_size=cfg.probe_batch_size, optimizer=cfg.optimizer, seed=cfg.seed)
    if cfg.augmented:
        from selfsup.data.build import build_eval_dataset, num_classes, train_augmented_dataset

        train_ds = train_augmented_dataset(data, data.bank_split)
        val_ds = build_eval_dataset(data, data.bank_split)
        test_ds = build_eval_dataset(data, data.test_split)
        res = linear_probe_augmented(backbone, train_ds, test_ds, num_classes(val_ds), val_dataset=val_ds,
                                     device=device, num_workers=0 if data.in_memory else data.num_workers, **common)
    else:
        train_f, train_y, c = _features(backbone, data, data.bank_split, cfg.data.batch_size, device)
        test_f, test_y, _ = _features(backbone, data, data.test_split, cfg.data.batch_size, device)
        res = linear_probe_cached(train_f, train_y, test_f, test_y, c, device=device, **common)
    result = {"checkpoint": cfg.checkpoint, "dataset": data.dataset, "augmented": cfg.augmented, **res.to_dict(),
              "total_seconds": round(time.time() - t0, 2)}
    _write_output(cfg.output, result)
    return result


def run_export(argv: list[str]) -> dict:
    cfg = _export_parser().parse_args(argv)
    from selfsup.eval.load import export_backbone

    paths = export_backbone(cfg.checkpoint, cfg.out, overwrite=cfg.overwrite, which=cfg.which)
    print(json.dumps(paths, indent=2))
    return paths


def run_demo(argv: list[str]) -> dict:
    cfg = _demo_parser().parse_args(argv)
    from selfsup.demo import demo

    return demo(out_dir=cfg.out_dir, epochs=cfg.epochs, progress_bar=cfg.progress_bar)


COMMANDS = {"demo": run_demo, "pretrain": run_pretrain, "knn": run_knn, "linear": run_linear, "export": run_export}


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
    except (ArgumentError, FileNotFoundError, FileExistsError, ValueError, FloatingPointError) as e:
        print(f"selfsup {argv[0]}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
