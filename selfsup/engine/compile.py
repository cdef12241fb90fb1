"""``trainer.compile``: the training step compiled with ``torch.compile`` (inductor), module by module.

:func:`compile_trainable_modules` compiles the method's trainable children in place; :class:`TrainingCompiled` runs
the compiled call only in training mode with gradients on; :func:`check_compile_available` fails early, naming what
is missing; :func:`compile_mode` reads the setting. :class:`selfsup.engine.module.SelfSupModule` calls them when the
fit starts.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from typing import Any, Optional, Union

import torch
from torch import nn

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(setting: Union[bool, str, None]) -> Optional[str]:
    """The ``torch.compile`` mode of a ``trainer.compile`` setting: ``None`` (off) for ``False`` / ``None``,
    ``"default"`` for ``True``, a mode of :data:`COMPILE_MODES` as it is; anything else is an error naming them."""
    if setting is None or setting is False:
        return None
    if setting is True:
        return "default"
    if isinstance(setting, str) and setting in COMPILE_MODES:
        return setting
    raise ValueError(f"trainer.compile must be true, false or one of {', '.join(COMPILE_MODES)}; got {setting!r}")


class CompileUnavailable(ValueError):
    """``trainer.compile`` cannot work here (a ``ValueError``: the CLI reports it in one line, as other settings that
    cannot run)."""


def check_compile_available(device: Union[torch.device, str]) -> None:
    """Raise :class:`CompileUnavailable` naming what is missing when ``torch.compile`` (inductor) cannot compile for
    ``device``: torch older than 2.2 (no ``nn.Module.compile``), a Python / platform dynamo does not support, no C++
    compiler (CPU), no Triton (CUDA). Nothing falls back silently: the run fails before training."""
    off = "or set --trainer.compile false"
    if not hasattr(nn.Module, "compile"):
        raise CompileUnavailable(
            f"trainer.compile needs torch >= 2.2 (nn.Module.compile); this is torch {torch.__version__}: upgrade it {off}"
        )
    import torch._dynamo as dynamo

    if not dynamo.is_dynamo_supported():
        raise CompileUnavailable(
            f"trainer.compile: torch.compile does not support this Python / platform (torch {torch.__version__}, "
            f"Python {platform.python_version()}, {sys.platform}); {off}"
        )
    kind = torch.device(device).type
    if kind == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except ImportError:  # an older torch: inductor reports a missing compiler at the first step
            pass
        except Exception as e:
            raise CompileUnavailable(
                "trainer.compile on CPU needs a C++ compiler for inductor (g++ or clang++ on PATH, or CXX): "
                f"{e}; install one {off}"
            ) from e
    elif kind == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise CompileUnavailable(f"trainer.compile on CUDA needs Triton (pip install triton) {off}")


_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)  # torch < 2.3: never


class TrainingCompiled:
    """What a module compiled by :func:`compile_trainable_modules` runs when called: the compiled call in training
    mode with gradients on (the training step), the eager one otherwise (the monitors' eval-mode feature passes,
    no-grad passes inside a step), so those neither recompile nor use up torch's per-process limit of compiled
    variants (``torch._dynamo.config.recompile_limit``, shared by every module compiled with ``nn.Module.compile``).
    ``calls`` counts the compiled calls."""

    def __init__(self, module: nn.Module, compiled: Callable[..., Any]):
        self.module, self.compiled, self.calls = module, compiled, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        m = self.module
        if m.training and torch.is_grad_enabled() and not _is_compiling():
            self.calls += 1
            return self.compiled(*args, **kwargs)
        return m._call_impl(*args, **kwargs)


def compile_trainable_modules(method: nn.Module, mode: str = "default") -> list[str]:
    """Compile ``method``'s trainable modules in place for the training step; returns their names.

    What is compiled: each child module of the method that holds a trainable parameter (the backbone, projector,
    predictor, heads; the items of a ``ModuleList`` / ``ModuleDict`` child one by one), each with
    ``nn.Module.compile(mode=mode, dynamic=False)``, used in training mode with gradients on
    (:class:`TrainingCompiled`). Not compiled: declared EMA teachers (frozen; they take the EMA step in place),
    the loss and the rest of ``training_loss``.

    Why modules and not the whole step: ``nn.Module.compile`` keeps the module object and its parameters, so
    ``state_dict`` keys, checkpoints (a compiled run's checkpoint loads into an eager run and back), export, the
    teachers' EMA step and resume are unchanged, and a module is a tensor-in tensor-out function with fixed shapes
    (training batches are full). Compiling ``training_loss`` itself would specialise on the step's Python values
    (``batch.step``, epoch, schedules), recompiling at every step until torch gives up and runs it eagerly; its
    ``torch.Generator`` draws (masks, noise) break the graph anyway. A method whose step calls only a child's submodules (MAE-style: the ViT's
    blocks one by one) gets no speed-up from that child; the engine warns after the first step.

    ``dynamic=False``: one graph per input shape (multi-crop: one for the global and one for the local views).
    Idempotent: a module already compiled is left as it is.
    """
    teachers = set(getattr(method, "teacher_names", ()))
    names = []

    def visit(prefix: str, module: nn.Module) -> None:
        if not any(p.requires_grad for p in module.parameters()):
            return
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):  # never called itself: its items are
            for name, child in module.named_children():
                visit(f"{prefix}.{name}", child)
            return
        if not isinstance(getattr(module, "_compiled_call_impl", None), TrainingCompiled):
            module.compile(mode=mode, dynamic=False)
            module._compiled_call_impl = TrainingCompiled(module, module._compiled_call_impl)
        names.append(prefix)

    for name, child in method.named_children():
        if name not in teachers:
            visit(name, child)
    return names
