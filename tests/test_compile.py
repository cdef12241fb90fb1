"""``trainer.compile``: the training step with the method's trainable modules compiled by ``torch.compile`` (inductor,
CPU, fp32) trains as the eager step does, resumes exactly, and writes checkpoints with the same keys, so a compiled
run's checkpoint continues in an eager run and back.

Real runs of a tiny ViT MMCR (1 block, width 32, patch 8) on 80 real CIFAR-10 images, 4 steps of 20 images x 2 views:
every compiled run has the same graphs, so only the first one pays the compilation (inductor's cache serves the rest).
"""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import torch
from cli_args import BATCHED_IN_MEMORY

from selfsup.cli import main
from selfsup.engine.compile import COMPILE_MODES, TrainingCompiled, compile_mode, compile_trainable_modules
from selfsup.methods import MMCR
from selfsup.models import TINY_VIT

VIT = "{name: vit_tiny, kwargs: {img_size: 32, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}}"
STEPS = 4  # 80 images / 20 per step, one epoch; step checkpoints at 2 and 4


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "pretrain",
        "--method",
        "MMCR",
        "--method.init_args.backbone",
        VIT,
        "--method.init_args.projector",
        "[16, 8]",
        "--data.dataset",
        "cifar10",
        "--data.root",
        str(root),
        "--data.subset",
        "80",
        "--data.batch_size",
        "20",
        *BATCHED_IN_MEMORY,
        "--optim.name",
        "sgd",
        "--optim.lr",
        "0.02",
        "--optim.momentum",
        "0.9",
        "--trainer.precision",
        "32-true",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.max_epochs",
        "1",
        "--trainer.save_every_n_steps",
        "2",
        "--trainer.seed",
        "3",
        "--trainer.logger",
        "csv",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.progress_bar",
        "false",
        "--monitor.every_n_epochs",
        "0",
        "--monitor.spectrum_every_n_steps",
        "0",
        "--trainer.out_dir",
        str(out),
        *extra,
    ]


def _losses(run: Path) -> dict[int, float]:
    rows = csv.DictReader((run / "logs" / "metrics.csv").read_text().splitlines())
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def _ckpt(run: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cifar_slice, one_thread) -> dict:
    """The same 4-step run eager and compiled (the compiled one pays the compilation); ``runs["compiled_calls"]``:
    ``{module name: calls of its compiled code}`` of the compiled run."""
    root = tmp_path_factory.mktemp("compile")
    out, made = {}, []
    init = TrainingCompiled.__init__

    def recording_init(self, module, compiled):
        init(self, module, compiled)
        made.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TrainingCompiled, "__init__", recording_init)
        for name, extra in (("eager", ()), ("compiled", ("--trainer.compile", "true"))):
            out[name] = root / name
            assert main(_args(cifar_slice, out[name], *extra)) == 0
            if name == "eager":
                assert not made, "an eager run compiled something"
    out["compiled_calls"] = {type(c.module).__name__: c.calls for c in made}
    return out


def test_the_compiled_run_ran_its_modules_compiled(runs):
    assert runs["compiled_calls"] == {"VisionTransformer": STEPS, "MLP": STEPS}  # backbone, projector: once a step


def test_compiled_losses_equal_the_eager_ones(runs):
    eager, compiled = _losses(runs["eager"]), _losses(runs["compiled"])
    assert sorted(eager) == sorted(compiled) == list(range(STEPS))
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-5, abs=1e-6), step
    a, b = _ckpt(runs["eager"])["state_dict"], _ckpt(runs["compiled"])["state_dict"]
    for k in a:  # the weights after 4 Adam steps: the same up to float rounding
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4, msg=f"compiled run differs at {k}")


def test_a_compiled_checkpoint_has_the_keys_of_an_eager_one(runs):
    eager, compiled = _ckpt(runs["eager"]), _ckpt(runs["compiled"])
    assert list(compiled["state_dict"]) == list(eager["state_dict"])
    assert not [k for k in compiled["state_dict"] if "_orig_mod" in k]
    assert compiled["global_step"] == eager["global_step"] == STEPS
    opt_e, opt_c = eager["optimizer_states"][0], compiled["optimizer_states"][0]
    assert sorted(opt_c["state"]) == sorted(opt_e["state"])
    assert [len(g["params"]) for g in opt_c["param_groups"]] == [len(g["params"]) for g in opt_e["param_groups"]]
    assert compiled["selfsup"]["backbones"] == eager["selfsup"]["backbones"] == {"online": "method.backbone."}


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_compiled_resume_is_exact(runs, cifar_slice, tmp_path, one_thread):
    """Compiled steps 0-1, checkpoint, then compiled steps 2-3 in a second run resumed from it == the uninterrupted
    compiled run, bit for bit."""
    out = tmp_path / "resumed"
    start = runs["compiled"] / "checkpoints" / "step00000002.ckpt"
    assert main(_args(cifar_slice, out, "--trainer.compile", "true", "--trainer.resume", str(start))) == 0
    a, b = _ckpt(runs["compiled"]), _ckpt(out)
    assert b["global_step"] == STEPS
    for k in a["state_dict"]:
        assert torch.equal(b["state_dict"][k], a["state_dict"][k]), f"resumed compiled run differs at {k}"
    full, resumed = _losses(runs["compiled"]), _losses(out)
    assert sorted(resumed) == [2, 3]
    for step in resumed:
        assert resumed[step] == full[step], step


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
@pytest.mark.parametrize("first,second", [("compiled", "eager"), ("eager", "compiled")])
def test_cross_resume_between_compiled_and_eager(runs, cifar_slice, tmp_path, one_thread, first, second):
    """A checkpoint of one kind continues in the other: loads strictly (same keys) and trains on as the run of the
    first kind did, up to float rounding."""
    out = tmp_path / f"{first}-then-{second}"
    start = runs[first] / "checkpoints" / "step00000002.ckpt"
    flag = ("--trainer.compile", "true" if second == "compiled" else "false")
    assert main(_args(cifar_slice, out, *flag, "--trainer.resume", str(start))) == 0
    full, resumed = _losses(runs[first]), _losses(out)
    assert sorted(resumed) == [2, 3]
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step
    a, b = _ckpt(runs[first])["state_dict"], _ckpt(out)["state_dict"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4, msg=f"{first} -> {second} differs at {k}")


def test_only_training_calls_are_compiled_teachers_and_copies_are_eager():
    """Compiled: the trainable children, for calls in training mode with gradients on. Eval-mode or no-grad calls (the
    monitors' feature passes) run eagerly and compile nothing; the EMA teacher is not compiled; a deep copy (an
    EMATeacher of a compiled module, a pickled module) is a plain eager module; state-dict keys are unchanged."""
    torch.manual_seed(0)
    m = MMCR(backbone=TINY_VIT, projector=[16, 8], momentum_tau=0.9)
    keys = list(m.state_dict())
    assert compile_trainable_modules(m) == ["backbone", "projector"]
    call = m.backbone._compiled_call_impl
    assert isinstance(call, TrainingCompiled)
    assert compile_trainable_modules(m) == ["backbone", "projector"] and m.backbone._compiled_call_impl is call
    assert m.teacher._compiled_call_impl is None and m.teacher.backbone._compiled_call_impl is None
    assert list(m.state_dict()) == keys

    def never(*args, **kwargs):
        raise AssertionError("the compiled call ran")

    call.compiled = never
    eager = copy.deepcopy(m.backbone)
    assert eager._compiled_call_impl is None
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m.backbone(x), eager(x), rtol=0, atol=0)  # training mode, no grad
    m.eval()
    eager.eval()
    torch.testing.assert_close(m.backbone(x), eager(x), rtol=0, atol=0)  # eval mode, grad on
    assert call.calls == 0
    m.train()
    with pytest.raises(AssertionError, match="the compiled call ran"):
        m.backbone(x)
    assert call.calls == 1


def test_compile_setting_values():
    assert compile_mode(False) is None and compile_mode(None) is None
    assert compile_mode(True) == "default"
    for mode in COMPILE_MODES:
        assert compile_mode(mode) == mode
    with pytest.raises(ValueError, match="max-autotune"):
        compile_mode("fastest")


def test_a_misspelt_mode_is_rejected_by_the_cli(cifar_slice, tmp_path, capsys):
    assert main(_args(cifar_slice, tmp_path / "run", "--trainer.compile", "fastest")) != 0
    assert "compile" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_without_a_cpp_compiler_the_run_fails_before_training(cifar_slice, tmp_path, capsys, monkeypatch):
    """Inductor on CPU needs a C++ compiler: none found is a one-line error naming it, before anything is written."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("selfsup-no-such-compiler",))
    assert main(_args(cifar_slice, tmp_path / "run", "--trainer.compile", "true")) == 1
    err = capsys.readouterr().err
    assert "trainer.compile on CPU needs a C++ compiler" in err and "--trainer.compile false" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
