r"""Latent-code injection into chosen blocks of a ViT encoder (IMLE-SSL's ``MaskedIPViT``, spec §3.1).

Notation: ``N`` token sequences, ``T`` tokens (class token included), ``C`` encoder width, ``d`` code size,
``W`` wrapped blocks, ``k`` codes scored per example in one pass.

For every wrapped block ``i`` a code ``z_i ~ N(0, I_d)`` is drawn per sample. A mapping network turns it
into a per-sample shift ``s`` and scale ``g`` (``[N, C]`` each), applied to **every token** of the
block's output (class token included):

    u      = z / sqrt(mean_j z_j² + ε)                               PixelNorm              [N, d]
    h      = MLP(u): ``depth`` equalised-lr linears d -> hidden -> ... -> 2C,
             LeakyReLU(0.2) after each hidden layer (and after the last with ``final_activation``)
    s, g   = h[:, :C], h[:, C:]                                                             [N, C]
    (``center``: s <- s − s̄, g <- ReLU(g − ḡ), s̄ and ḡ averaged over 2048 fixed codes at construction)
    out    = s[:, None, :] + y ⊙ (1 + g[:, None, :]),   y = block(x)                        [N, T, C]

This is not an instance norm: ``y`` is not normalised first (the seeds' ``adain_x_norm none``).
Defaults are IMLE-R's (the code behind the README's published runs): ε = 1e-8, lr multiplier 0.01,
LeakyReLU after the last layer, s and g used raw. ``MappingConfig.imle_h()`` gives IMLE-H's form (no final
activation, centred s, ReLU'd g) **without** its lr multiplier 1e-5, which freezes the net (spec §7).

**Equalised learning rate** (StyleGAN, :class:`EqualLinear`, the seeds' ``EqualizedLinear``): the stored
weight is ``w_s ~ N(0, 1) / m`` and the layer uses ``w = w_s · γ · m / sqrt(in)``; the stored bias is
``b_s = b_init / m``, used as ``b = b_s · m`` (``m`` = lr multiplier, ``γ`` = gain, StyleGAN's He gain
``sqrt(2)`` as in the seeds: ``γ / sqrt(in)`` is their "He-std"). At initialisation ``w ~ N(0, γ²/in)``
whatever ``m`` is, but a gradient step of size ``η`` on ``w_s`` moves ``w`` by ``η · γ m / sqrt(in)`` per
unit step: SGD changes ``w`` by ``η γ² m² / in · ∂L/∂w``, Adam (whose step on ``w_s`` is about ``η`` per
coordinate) by about ``η γ m / sqrt(in)``. (Before ``MappingConfig.gain`` existed selfsup used ``γ = 1``:
an 8-layer net's output was ``sqrt(2)⁸ = 16`` times smaller at init than the seeds'; ``gain: 1.0``
reproduces it.) The net's optimiser group may get its own ``lr_mult`` on top
(:meth:`LatentInjector.param_group`; the seeds' ``--lr_z``).

**The encoder stays a plain timm ViT.** :class:`LatentInjector` is a separate module (its parameters
under its own prefix, e.g. ``latent.adain.11.mapping.layers.0.weight``) that registers forward hooks
on ``encoder.blocks[i]``; the encoder's parameter names, its state dict and its modules are untouched,
so its weights load into ``timm.create_model(...)`` and every existing pass (``vit(x)``, the MAE's
kept-token pass) runs unchanged. The hooks act only inside ``with injector.codes(z):``; outside it,
or with ``z=None``, every block's output is returned as computed (**bit-identical** to the encoder
without the injector: codes ignored is the MAE). :meth:`LatentInjector.run_blocks` is the same
computation as an explicit loop over the blocks, for callers that prefer not to use hooks.

**Several codes per example.** Codes ``z [N·k, W, d]`` against tokens ``[N, T, C]``: at the first wrapped
block the block output is repeated ``k`` times, example-major (rows ``i·k .. i·k + k − 1`` are example
``i``, :func:`selfsup.losses.imle.repeat_examples`), so the blocks before it run once per example and one
pass scores ``k`` codes per image. Everything after that block (the other blocks, the final norm, the
decoder) sees ``N·k`` rows; the caller repeats masks and targets the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses.imle import repeat_examples

__all__ = [
    "INJECTION_METHODS",
    "AdaINInjection",
    "EqualLinear",
    "LatentConfig",
    "LatentInjector",
    "MappingConfig",
    "MappingNetwork",
    "PixelNorm",
    "inject_codes",
    "parse_inject_spec",
]

#: Injection methods a block can be wrapped with.
INJECTION_METHODS: tuple[str, ...] = ("adain",)

InjectSpec = Union[Sequence[Sequence[Any]], Sequence[Any]]


# ----------------------------------------------------------------------------------------- configs
@dataclass
class MappingConfig:
    """The mapping network of an AdaIN injection (defaults: IMLE-R, the published runs).

    Attributes:
        depth: linear layers (>= 1): ``d -> hidden -> ... -> hidden -> 2C``.
        hidden: width of the hidden layers.
        lr_mul: equalised-lr multiplier ``m`` of every layer (StyleGAN's mapping net and IMLE-R: 0.01).
        gain: equalised-lr gain ``γ`` of every layer (:class:`EqualLinear`: ``w = w_s · γ · m / sqrt(in)``):
            ``sqrt(2)``, the StyleGAN He gain for LeakyReLU, as the seeds' ``EqualizedLinear``. ``gain: 1.0``
            reproduces selfsup's earlier (wrong) behaviour, for runs and checkpoints made before this field existed
            (their config has no ``gain``; at the same stored weights and zero biases their ``depth``-layer net's
            output is ``sqrt(2)^depth`` times smaller).
        eps: PixelNorm's ε (IMLE-R 1e-8; IMLE-H uses 0, kept > 0 here so a zero code cannot divide by 0).
        final_activation: LeakyReLU(0.2) after the last layer too (IMLE-R); False = raw output (IMLE-H).
        center: IMLE-H: ``s <- s − s̄``, ``g <- ReLU(g − ḡ)`` with ``s̄, ḡ`` the mean outputs over
            ``center_codes`` codes drawn (seed ``center_seed``) at construction, kept as buffers.
        center_codes: codes averaged for ``center``.
        center_seed: seed of those codes.
    """

    depth: int = 8
    hidden: int = 512
    lr_mul: float = 0.01
    gain: float = math.sqrt(2)
    eps: float = 1e-8
    final_activation: bool = True
    center: bool = False
    center_codes: int = 2048
    center_seed: int = 0

    def __post_init__(self) -> None:
        if int(self.depth) != self.depth or self.depth < 1:
            raise ValueError(f"mapping.depth must be an integer >= 1, got {self.depth}")
        if int(self.hidden) != self.hidden or self.hidden < 1:
            raise ValueError(f"mapping.hidden must be an integer >= 1, got {self.hidden}")
        if not (self.lr_mul > 0 and math.isfinite(self.lr_mul)):
            raise ValueError(f"mapping.lr_mul must be a finite number > 0, got {self.lr_mul}")
        if not (self.gain > 0 and math.isfinite(self.gain)):
            raise ValueError(f"mapping.gain must be a finite number > 0, got {self.gain}")
        if self.eps < 0:
            raise ValueError(f"mapping.eps must be >= 0, got {self.eps}")
        if self.center and self.center_codes < 1:
            raise ValueError(f"mapping.center_codes must be >= 1 with center, got {self.center_codes}")

    @classmethod
    def imle_h(cls, **overrides: Any) -> MappingConfig:
        """IMLE-H's form: no final activation, centred ``s``, ReLU'd centred ``g`` (lr_mul stays 0.01: HEAD's
        1e-5 freezes the net)."""
        return cls(**{"final_activation": False, "center": True, **overrides})


@dataclass
class LatentConfig:
    """Which encoder blocks get codes, and how.

    Attributes:
        inject: ``[[block, method], ...]`` (0-based; negative counts from the end), e.g. ``[[11, adain]]``
            (the last block of ViT-B) or ``[[5, adain], [11, adain]]``; the seeds' flat form
            ``[11, adain, 5, adain]`` is accepted too. Codes are ordered by increasing block index.
        code_dim: size ``d`` of each block's code.
        mapping: the mapping network.
    """

    inject: list = field(default_factory=lambda: [[11, "adain"]])
    code_dim: int = 512
    mapping: MappingConfig = field(default_factory=MappingConfig)

    def __post_init__(self) -> None:
        if isinstance(self.mapping, dict):
            self.mapping = MappingConfig(**self.mapping)
        if int(self.code_dim) != self.code_dim or self.code_dim < 1:
            raise ValueError(f"code_dim must be an integer >= 1, got {self.code_dim}")


def parse_inject_spec(spec: InjectSpec, depth: int) -> list[tuple[int, str]]:
    """``[(block, method), ...]`` sorted by block, from pairs or the flat ``[i, m, i, m, ...]`` form.

    Negative blocks count from the end (``-1`` = the last of ``depth``). A block out of range, a repeated
    block, an unknown method or an odd flat list is a ``ValueError`` naming it.
    """
    items = list(spec)
    if not items:
        raise ValueError("inject names no block: give [[block, method], ...], e.g. [[11, adain]]")
    if all(isinstance(x, (list, tuple)) for x in items):
        pairs = [tuple(x) for x in items]
    elif not any(isinstance(x, (list, tuple)) for x in items):
        if len(items) % 2:
            raise ValueError(f"inject as a flat list needs block/method pairs, got an odd number of items: {items}")
        pairs = [(items[j], items[j + 1]) for j in range(0, len(items), 2)]
    else:
        raise ValueError(f"inject mixes pairs and flat items: {items}")
    out: dict[int, str] = {}
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"inject entry {list(pair)} is not a [block, method] pair")
        raw, method = pair
        try:
            idx = int(raw)
            if isinstance(raw, float) and raw != idx:
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"inject: block index {raw!r} is not an integer") from None
        if isinstance(raw, bool):
            raise ValueError(f"inject: block index {raw!r} is not an integer")
        if not -depth <= idx < depth:
            raise ValueError(f"inject: block {idx} does not exist; the encoder has {depth} blocks (0..{depth - 1})")
        idx %= depth
        method = str(method).lower()
        if method not in INJECTION_METHODS:
            raise ValueError(
                f"inject: unknown method {method!r} for block {idx}; supported: {', '.join(INJECTION_METHODS)}"
            )
        if idx in out:
            raise ValueError(f"inject: block {idx} is named twice")
        out[idx] = method
    return sorted(out.items())


# ----------------------------------------------------------------------------------------- layers
class EqualLinear(nn.Module):
    r"""Linear layer with StyleGAN's equalised learning rate (the seeds' ``EqualizedLinear``).

    Stored ``weight [out, in] ~ N(0, 1) / m`` and ``bias [out] = b_init / m``; the forward computes

        y = x @ (w · g · m / sqrt(in))ᵀ + b · m

    with ``w, b`` the stored parameters, ``m = lr_mul`` and ``g = gain`` (default ``sqrt(2)``: StyleGAN's He gain
    for LeakyReLU, so ``g / sqrt(in)`` is the seeds' "He-std"). The effective weight starts ``~ N(0, g²/in)``
    whatever ``m`` is; an SGD step of lr ``η`` moves it by ``−η · (g m / sqrt(in))² · ∂L/∂W_eff``.
    ``gain=1.0`` is selfsup's earlier (wrong) form.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        lr_mul: float = 1.0,
        bias: bool = True,
        bias_init: float = 0.0,
        gain: float = math.sqrt(2),
    ):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"EqualLinear needs positive sizes, got {in_features} -> {out_features}")
        if not lr_mul > 0:
            raise ValueError(f"EqualLinear: lr_mul must be > 0, got {lr_mul}")
        if not (gain > 0 and math.isfinite(gain)):
            raise ValueError(f"EqualLinear: gain must be a finite number > 0, got {gain}")
        self.in_features, self.out_features, self.lr_mul = int(in_features), int(out_features), float(lr_mul)
        self.gain = float(gain)
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / self.lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / self.lr_mul)) if bias else None
        #: the run-time weight multiplier ``g · m / sqrt(in)`` (StyleGAN's ``w_mul = he_std · lrmul``)
        self.scale = self.gain * self.lr_mul / math.sqrt(in_features)

    def effective_weight(self) -> Tensor:
        """The weight the layer computes with, ``weight · g · m / sqrt(in)`` ``[out, in]``."""
        return self.weight * self.scale

    def effective_bias(self) -> Optional[Tensor]:
        """The bias the layer computes with, ``bias · m`` ``[out]`` (None without a bias)."""
        return None if self.bias is None else self.bias * self.lr_mul

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight(), self.effective_bias())

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, lr_mul={self.lr_mul}, gain={self.gain:.6g}, "
            f"bias={self.bias is not None}"
        )


class PixelNorm(nn.Module):
    """``z / sqrt(mean(z², last axis) + ε)``: every code rescaled to unit root-mean-square, ``[..., d]``."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = float(eps)

    def forward(self, z: Tensor) -> Tensor:
        return z * torch.rsqrt(z.pow(2).mean(dim=-1, keepdim=True) + self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class MappingNetwork(nn.Module):
    """``PixelNorm -> [EqualLinear -> LeakyReLU(0.2)] x (depth - 1) -> EqualLinear [-> LeakyReLU(0.2)]``,
    ``[N, d] -> [N, out_dim]`` (see :class:`MappingConfig`; every layer gets its ``lr_mul`` and ``gain``)."""

    def __init__(self, code_dim: int, out_dim: int, config: Optional[MappingConfig] = None):
        super().__init__()
        cfg = config or MappingConfig()
        self.config, self.code_dim, self.out_dim = cfg, int(code_dim), int(out_dim)
        self.norm = PixelNorm(cfg.eps)
        widths = [code_dim] + [cfg.hidden] * (cfg.depth - 1) + [out_dim]
        self.layers = nn.ModuleList(
            EqualLinear(a, b, lr_mul=cfg.lr_mul, gain=cfg.gain) for a, b in itertools.pairwise(widths)
        )

    def forward(self, z: Tensor) -> Tensor:
        if z.shape[-1] != self.code_dim:
            raise ValueError(f"the mapping network takes codes of size {self.code_dim}, got shape {tuple(z.shape)}")
        h = self.norm(z)
        last = len(self.layers) - 1
        for j, layer in enumerate(self.layers):
            h = layer(h)
            if j < last or self.config.final_activation:
                h = F.leaky_relu(h, 0.2)
        return h


class AdaINInjection(nn.Module):
    """One wrapped block's modulation: codes ``z [N, d]`` -> ``(s, g)`` ``[N, C]`` -> ``s + y ⊙ (1 + g)``.

    Attributes:
        mapping: the :class:`MappingNetwork` ``d -> 2C``.
        s_mean, g_mean: ``[C]`` buffers (zeros unless ``config.center``).
    """

    def __init__(self, width: int, code_dim: int = 512, config: Optional[MappingConfig] = None):
        super().__init__()
        cfg = config or MappingConfig()
        self.width, self.code_dim, self.center = int(width), int(code_dim), bool(cfg.center)
        self.mapping = MappingNetwork(code_dim, 2 * width, cfg)
        self.register_buffer("s_mean", torch.zeros(width))
        self.register_buffer("g_mean", torch.zeros(width))
        if self.center:
            with torch.no_grad():
                g = torch.Generator().manual_seed(int(cfg.center_seed))
                h = self.mapping(torch.randn(cfg.center_codes, code_dim, generator=g))
                self.s_mean.copy_(h[:, :width].mean(0))
                self.g_mean.copy_(h[:, width:].mean(0))

    def style(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(s, g)``, each ``[N, C]``, of codes ``z [N, d]``."""
        if z.dim() != 2 or z.shape[1] != self.code_dim:
            raise ValueError(f"AdaIN codes must be [N, {self.code_dim}], got shape {tuple(z.shape)}")
        h = self.mapping(z)
        s, g = h[:, : self.width], h[:, self.width :]
        if self.center:
            s, g = s - self.s_mean, F.relu(g - self.g_mean)
        return s, g

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        """``y [N, T, C]``, ``z [N, d]`` -> ``s[:, None] + y ⊙ (1 + g[:, None])`` ``[N, T, C]``."""
        if y.dim() != 3 or y.shape[-1] != self.width or y.shape[0] != z.shape[0]:
            raise ValueError(
                f"AdaIN: tokens must be [N, T, {self.width}] with N = {z.shape[0]} codes, got {tuple(y.shape)}"
            )
        s, g = self.style(z)
        return s[:, None, :].to(y.dtype) + y * (1 + g[:, None, :].to(y.dtype))


# ----------------------------------------------------------------------------------------- injector
class LatentInjector(nn.Module):
    """The injections of one encoder: one :class:`AdaINInjection` per wrapped block, under ``adain.<i>``.

    Args:
        width: encoder width ``C`` (``vit.embed_dim``).
        depth: number of encoder blocks (``len(vit.blocks)``).
        config: :class:`LatentConfig` (which blocks, code size, mapping network).

    Attributes:
        indices: wrapped blocks, increasing; code column ``j`` of ``z [N, W, d]`` feeds block ``indices[j]``.
        code_dim: ``d``.
    """

    def __init__(self, width: int, depth: int, config: Optional[LatentConfig] = None):
        super().__init__()
        cfg = config or LatentConfig()
        self.config, self.width, self.depth, self.code_dim = cfg, int(width), int(depth), int(cfg.code_dim)
        self.spec = parse_inject_spec(cfg.inject, depth)
        self.indices: list[int] = [i for i, _ in self.spec]
        self.adain = nn.ModuleDict({str(i): AdaINInjection(width, cfg.code_dim, cfg.mapping) for i, _ in self.spec})
        self._codes: Optional[Tensor] = None
        self._repeat_at = -1
        self._handles: list[Any] = []

    @property
    def num_codes(self) -> int:
        """``W``: codes per sample (one per wrapped block)."""
        return len(self.indices)

    def sample_codes(
        self, n: int, generator: Optional[torch.Generator] = None, device=None, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """``z ~ N(0, I)`` of shape ``[n, W, d]``, drawn from ``generator`` (on its device by default)."""
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        return torch.randn(int(n), self.num_codes, self.code_dim, generator=generator, device=device, dtype=dtype)

    def param_group(self, lr_mult: float = 1.0, name: str = "latent") -> dict[str, Any]:
        """The optimiser group of the mapping networks, ``{"name", "params", "lr_mult"}``
        (for ``Method.param_groups()``; the seeds' ``--lr_z`` is ``lr_mult · lr``)."""
        return {"name": name, "params": [p for p in self.parameters() if p.requires_grad], "lr_mult": float(lr_mult)}

    # ------------------------------------------------------------------------------- the modulation
    def _check_codes(self, z: Tensor) -> None:
        if not isinstance(z, Tensor) or z.dim() != 3 or tuple(z.shape[1:]) != (self.num_codes, self.code_dim):
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(
                f"codes must be [N, {self.num_codes}, {self.code_dim}] (samples, wrapped blocks "
                f"{self.indices}, code size), got {shape}"
            )

    def modulate(self, block: int, y: Tensor, z: Tensor) -> Tensor:
        """Apply block ``block``'s injection to its output ``y [N, T, C]`` with the codes ``z [N·k, W, d]``.

        ``y`` with ``N`` rows is first repeated ``k`` times (example-major) when ``z`` has ``N·k`` rows.
        """
        n, m = y.shape[0], z.shape[0]
        if m != n:
            if n == 0 or m % n:
                raise ValueError(
                    f"block {block}: {m} code rows do not cover {n} token sequences k times each "
                    "(codes [N·k, W, d] for tokens [N, T, C])"
                )
            y = repeat_examples(y, m // n)
        return self.adain[str(block)](y, z[:, self.indices.index(block)])

    def run_blocks(self, blocks: Sequence[nn.Module], x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        """The encoder blocks as an explicit loop: ``x = blocks[i](x)``, then the injection of every wrapped
        ``i`` when ``z`` is given. ``z=None`` returns exactly ``blocks(x)``."""
        if self._codes is not None:
            raise RuntimeError("run_blocks inside `with injector.codes(z)`: the hooks would modulate twice")
        if len(blocks) != self.depth:
            raise ValueError(f"the injector was built for {self.depth} blocks, got {len(blocks)}")
        if z is not None:
            self._check_codes(z)
        for i, blk in enumerate(blocks):
            x = blk(x)
            if z is not None and str(i) in self.adain:
                x = self.modulate(i, x, z)
        return x

    # ------------------------------------------------------------------------------- hooks
    def attach(self, encoder: nn.Module) -> LatentInjector:
        """Register forward hooks on ``encoder.blocks[i]`` for the wrapped blocks (once per encoder).

        The encoder is not modified otherwise and not stored as a submodule (its parameters stay the
        encoder's). The hooks are no-ops outside :meth:`codes`.
        """
        blocks = getattr(encoder, "blocks", None)
        if blocks is None:
            raise ValueError(f"{type(encoder).__name__} has no .blocks; latent injection needs a ViT encoder")
        if len(blocks) != self.depth:
            raise ValueError(f"the injector was built for {self.depth} blocks, the encoder has {len(blocks)}")
        width = getattr(encoder, "embed_dim", self.width)
        if width != self.width:
            raise ValueError(f"the injector was built for width {self.width}, the encoder's is {width}")
        if self._handles:
            raise RuntimeError("this injector is already attached to an encoder; detach() it first")
        self._handles = [blocks[i].register_forward_hook(functools.partial(_hook, self, i)) for i in self.indices]
        return self

    def detach(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @contextlib.contextmanager
    def codes(self, z: Optional[Tensor]) -> Iterator[None]:
        """Within the block, the attached encoder's wrapped blocks are modulated by ``z [N·k, W, d]``
        (``None``: codes ignored, the plain encoder)."""
        if z is not None:
            self._check_codes(z)
            if not self._handles:
                raise RuntimeError("the injector is not attached to an encoder: call attach(encoder) first")
        if self._codes is not None:
            raise RuntimeError("injector.codes(...) blocks cannot be nested")
        self._codes = z
        try:
            yield
        finally:
            self._codes = None

    def extra_repr(self) -> str:
        return f"blocks={self.spec}, code_dim={self.code_dim}, width={self.width}"


def _hook(injector: LatentInjector, block: int, module: nn.Module, args: Any, output: Tensor) -> Optional[Tensor]:
    """Forward hook of wrapped block ``block``: ``None`` (output unchanged) unless codes are set."""
    z = injector._codes
    if z is None:
        return None
    return injector.modulate(block, output, z)


def inject_codes(
    encoder: nn.Module,
    inject: InjectSpec = ((11, "adain"),),
    code_dim: int = 512,
    mapping: Optional[MappingConfig] = None,
) -> LatentInjector:
    """A :class:`LatentInjector` for ``encoder`` (a timm ViT), attached to its blocks.

    ``inject``: ``[[block, method], ...]`` (see :class:`LatentConfig`). Keep the returned module as a
    submodule of the method so its parameters train and checkpoint; the encoder's keys are unchanged.
    """
    cfg = LatentConfig(
        inject=[list(p) if isinstance(p, (list, tuple)) else p for p in inject],
        code_dim=code_dim,
        mapping=dataclasses.replace(mapping) if mapping is not None else MappingConfig(),
    )
    width = getattr(encoder, "embed_dim", None)
    blocks = getattr(encoder, "blocks", None)
    if width is None or blocks is None:
        raise ValueError(f"{type(encoder).__name__} is not a ViT encoder (needs .embed_dim and .blocks)")
    return LatentInjector(int(width), len(blocks), cfg).attach(encoder)
