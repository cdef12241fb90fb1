"""``bench/bench_peers.py``: the shared harness for real without lightly (selfsup's side, the kNN, the table and the
JSON on real CIFAR-10 images), and lightly's side for two methods where lightly (the ``bench`` extra) is installed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_peers.py"

#: A width-8 ResNet-10 (CIFAR stem) and a 16-8 projector, batch 16: both sides stay tiny; no logger, no progress.
TINY = [
    "--",
    "--data.batch_size",
    "16",
    "--method.init_args.backbone",
    "{name: resnet10, kwargs: {cifar_stem: true, width: 8}}",
    "--method.init_args.projector",
    "[16, 8]",
    "--trainer.logger",
    "none",
    "--trainer.progress_bar",
    "none",
]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_peers", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_peers"] = module
    spec.loader.exec_module(module)  # puts bench/ on sys.path: peerbench (lightly's side) imports without lightly
    return module


BENCH_MODULE = _load_bench()


@pytest.fixture(scope="module")
def bench():
    return BENCH_MODULE


def _run(bench, cifar_slice: Path, tmp_path: Path, methods: list[str], sides: list[str], *extra: str) -> dict:
    out = tmp_path / "peers.json"
    argv = [
        "--zip",
        str(cifar_slice),
        "--methods",
        *methods,
        "--steps",
        "2",
        "--warmup-steps",
        "1",
        "--knn-subset",
        "60",
        "--threads",
        "1",
        "--sides",
        *sides,
        "--output",
        str(out),
        *extra,
        *TINY,
    ]
    payload = bench.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload, default=str))  # the JSON is the result
    return payload


def test_selfsup_side_knn_table_and_json_without_lightly(bench, cifar_slice, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lightly", None)  # as in CI: any import of lightly fails
    payload = _run(bench, cifar_slice, tmp_path, ["simclr"], ["selfsup"])
    rec = payload["results"]["simclr"]
    ours = rec["selfsup"]
    assert rec["method"] == "SimCLR" and rec["steps"] == 2 and rec["batch_size"] == 16
    assert ours["steps"] == 2 and ours["timed_steps"] == 1 and ours["seconds_per_step"] > 0
    assert ours["knn"]["n_bank"] == 60 and ours["knn"]["n_test"] == 60 and 0 <= ours["knn"]["top1"] <= 100
    assert "lightly" not in rec and rec["knn_diff"] is None and rec["speed_ratio"] is None
    assert payload["environment"]["lightly"] is None and payload["skipped"] == {}
    assert payload["config"]["overrides"][:2] == ["--data.batch_size", "16"]
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("simclr "))
    assert f"{ours['knn']['top1']:.2f}" in line and f"{ours['seconds_per_step']:.3f}" in line

    with pytest.raises(SystemExit, match="bench"):  # lightly's side without lightly names the extra
        bench.main(["--zip", str(cifar_slice), "--methods", "simclr", "--sides", "lightly"])


def test_harness_pieces(bench):
    from peerbench.loop import recipe_param_groups  # lightly's side, importable without lightly

    clock = bench.StepClock()
    clock.ends = [10.0, 11.0, 12.0, 13.0, 15.0]  # step ends; the first step (setup, first batch) is left out
    assert clock.seconds_per_step(1) == (5.0 / 4, 4) and clock.seconds_per_step(3) == (1.5, 2)
    assert clock.seconds_per_step(9) == (2.0, 1)  # the warm-up is cut so that one step is timed

    rec = {"steps": 5, "selfsup": {"knn": {"top1": 50.0}, "seconds_per_step": 0.5, "precision": "bf16-mixed"}}
    rec["lightly"] = {"knn": {"top1": 45.5}, "seconds_per_step": 1.0, "precision": "32-true"}
    row = bench.result_row("byol", rec)
    assert row["knn_diff"] == pytest.approx(4.5) and row["speed_ratio"] == pytest.approx(2.0)
    text = bench.table({"byol": rec}, {"ijepa": "a reason"})
    assert "+4.50" in text and "2.00" in text and "ijepa    skipped: a reason" in text

    # the recipe's optimiser rules: 1-D parameters, no_weight_decay() names and tokens decay-free; lr_mult; fixed lr
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.norm = nn.Linear(4, 4), nn.LayerNorm(4)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, 4))

    net, head = Net(), nn.Linear(4, 2)
    optim = type("O", (), {"lr": 0.1, "scale_lr": "none", "exclude_1d": True, "name": "adamw", "weight_decay": 0.05})
    spec = [
        {"name": "net", "params": list(net.named_parameters()), "lr_mult": 0.5},
        {"name": "head", "params": list(head.named_parameters()), "fixed_lr": True},
    ]
    groups = {g["name"]: g for g in recipe_param_groups(spec, optim, 256, set())}
    assert [p.shape for p in groups["net"]["params"]] == [(4, 4)] and groups["net"]["weight_decay"] == 0.05
    assert len(groups["net/no_decay"]["params"]) == 4 and groups["net/no_decay"]["weight_decay"] == 0.0
    assert groups["net"]["peak_lr"] == pytest.approx(0.05) and groups["head"]["fixed_lr"]
    optim.exclude_1d = False
    assert [g["name"] for g in recipe_param_groups(spec, optim, 256, set())] == ["net", "head"]


def test_lightly_side(bench, cifar_slice, tmp_path):
    pytest.importorskip("lightly", reason='lightly is a bench-only dependency: pip install -e ".[bench]"')
    from lightly.utils.scheduler import cosine_warmup_schedule

    from selfsup.engine.optim import WarmupSchedule

    for total, warm, final in ((400, 20, 0.05), (3, 3, 0.05), (50, 0, 0.0)):  # the engine's lr schedule, exactly
        ours = WarmupSchedule(total, warm, final)
        assert all(
            cosine_warmup_schedule(s, total, 1.0, final, warm, 0.0) == pytest.approx(ours(s)) for s in range(total)
        )

    payload = _run(bench, cifar_slice, tmp_path, ["simclr", "byol"], ["selfsup", "lightly"], "--peer-workers", "1")
    for name in ("simclr", "byol"):
        rec = payload["results"][name]
        peer = rec["lightly"]
        assert peer["steps"] == 2 and peer["seconds_per_step"] > 0 and peer["workers"] == 1
        assert peer["precision"] == "32-true" and 0 <= peer["knn"]["top1"] <= 100 and peer["knn"]["n_bank"] == 60
        assert rec["speed_ratio"] == pytest.approx(peer["seconds_per_step"] / rec["selfsup"]["seconds_per_step"])
        assert rec["knn_diff"] == pytest.approx(rec["selfsup"]["knn"]["top1"] - peer["knn"]["top1"])
        assert peer["differences"] and peer["components"]
    assert "NTXentLoss" in payload["results"]["simclr"]["lightly"]["components"]
    assert "update_momentum" in payload["results"]["byol"]["lightly"]["components"]

    # a recipe value lightly's components cannot express: the method is skipped, with the reason, before training
    argv = [
        "--zip",
        str(cifar_slice),
        "--methods",
        "swav",
        "--steps",
        "2",
        "--",
        "--method.init_args.queue_length",
        "64",
    ]
    payload = bench.main(argv)
    assert "swav" not in payload["results"] and "queue" in payload["skipped"]["swav"]


@pytest.mark.parametrize("name", BENCH_MODULE.METHODS)
def test_every_lightly_builder_trains(name, cifar_slice, tmp_path):
    """Every registered lightly-side builder (``bench/peerbench``), on its shipped cpu-small recipe (its heads, which
    lightly's heads must be able to express) with the backbone shrunk (ResNet width 8, ViT depth 1): lightly's
    transform, loader, loss and the plain loop train 2 steps on real images, the backbone's weights move, and the
    record names lightly's components and the settings that differ. Derived from the registry: a new builder is
    covered without editing this test."""
    pytest.importorskip("lightly", reason='lightly is a bench-only dependency: pip install -e ".[bench]"')
    import yaml
    from peerbench import train_peer

    from selfsup.recipes import RECIPES_DIR

    recipe = BENCH_MODULE.recipe_path(name)
    assert Path(recipe).parent == RECIPES_DIR
    spec = yaml.safe_load(Path(recipe).read_text())["method"]["init_args"]["backbone"]
    small = {"width": 8} if spec["name"].startswith("resnet") else {"depth": 1}
    backbone_arg = json.dumps({"name": spec["name"], "kwargs": {**spec.get("kwargs", {}), **small}})
    overrides = ["--data.batch_size", "8", "--trainer.logger", "none", "--trainer.progress_bar", "none"]
    overrides += ["--method.init_args.backbone", backbone_arg]
    init, cfg = BENCH_MODULE.instantiate_recipe(recipe, str(cifar_slice), overrides, str(tmp_path))
    backbone = init.method.backbone
    before = {k: v.clone() for k, v in backbone.state_dict().items() if v.is_floating_point()}
    trained, rec = train_peer(name, cfg, backbone, 2, 1, 0, False, log_every=0)
    assert trained is backbone and rec["steps"] == 2 and rec["timed_steps"] == 1 and rec["seconds_per_step"] > 0
    moved = [k for k, v in trained.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert moved, f"lightly's {name}: no backbone weight changed in 2 steps"
    assert rec["components"] and rec["differences"] and rec["precision"] == "32-true"
