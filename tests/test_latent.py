"""Latent-code injection (IMLE-SSL's AdaIN blocks, spec §3.1): codes ignored = the plain encoder bit for bit,
out = s + y (1 + g) on every token, k codes per example, equalised-lr multipliers derived by hand.

Equalised lr as the seeds' (StyleGAN's) EqualizedLinear: effective weight ``w_s · γ · m / sqrt(in)`` with the He
gain ``γ = sqrt(2)`` by default (``MappingConfig.gain``; ``1.0`` was selfsup's earlier, wrong form)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

from selfsup.engine.optim import build_optimizer, method_param_groups
from selfsup.models.latent import (
    AdaINInjection,
    EqualLinear,
    LatentConfig,
    LatentInjector,
    MappingConfig,
    MappingNetwork,
    PixelNorm,
    inject_codes,
    parse_inject_spec,
)

SMALL = MappingConfig(depth=2, hidden=32)
SQRT2 = math.sqrt(2)  # StyleGAN's He gain for LeakyReLU: the seeds' EqualizedLinear default


def tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=2
    )


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class Pair(nn.Module):
    """An encoder with an injector beside it, as a method would hold them."""

    def __init__(self, inject=((0, "adain"), (1, "adain")), mapping=SMALL):
        super().__init__()
        self.encoder = tiny_vit()
        self.latent = inject_codes(self.encoder, inject, code_dim=16, mapping=mapping)


def test_codes_ignored_is_bit_identical_to_the_unwrapped_encoder(images):
    plain = tiny_vit()
    m = Pair()
    assert torch.equal(m.encoder(images), plain(images))  # no codes set: hooks are no-ops
    with m.latent.codes(None):
        assert torch.equal(m.encoder.forward_features(images), plain.forward_features(images))
    tokens = plain.norm_pre(plain._pos_embed(plain.patch_embed(images)))
    assert torch.equal(m.latent.run_blocks(m.encoder.blocks, tokens, None), plain.blocks(tokens))
    # the encoder is untouched: a plain timm model with its keys loads its weights strictly
    assert list(m.encoder.state_dict()) == list(plain.state_dict())
    fresh = tiny_vit(seed=5)
    fresh.load_state_dict(m.encoder.state_dict(), strict=True)
    assert torch.equal(fresh(images), plain(images))
    assert all(k.startswith("latent.adain.") for k in m.state_dict() if not k.startswith("encoder."))
    assert "latent.adain.1.mapping.layers.0.weight" in m.state_dict()


def test_codes_change_each_sample_and_hooks_equal_the_explicit_loop(images):
    m = Pair()
    x = images[:1].expand(2, -1, -1, -1)  # the same image twice
    z = m.latent.sample_codes(2, generator=torch.Generator().manual_seed(1))
    with m.latent.codes(z):
        out = m.encoder.forward_features(x)
    with m.latent.codes(z[[0, 0]]):
        same = m.encoder.forward_features(x)
    assert not torch.allclose(out[0], out[1])  # different codes, different outputs
    assert torch.equal(same[0], same[1]) and torch.equal(same[0], out[0])
    assert not torch.allclose(out[0], m.encoder.forward_features(x[:1])[0])  # codes matter
    enc = m.encoder
    tokens = enc.norm_pre(enc._pos_embed(enc.patch_embed(x)))
    with m.latent.codes(z):
        hooked = enc.blocks(tokens)
    assert torch.equal(m.latent.run_blocks(enc.blocks, tokens, z), hooked)


def test_shift_and_scale_by_hand_on_every_token(images):
    """Depth-1 mapping net with hand-set weights: h = M u + b with u = PixelNorm(z); s, g = h[:C], h[C:].

    The stored weight is M · sqrt(in) / γ with the default gain γ = sqrt(2) (it was M · sqrt(in) while selfsup
    omitted the gain), so that the effective weight stored · γ · m / sqrt(in) is M at m = 1."""
    m = Pair(inject=((1, "adain"),), mapping=MappingConfig(depth=1, lr_mul=1.0, final_activation=False))
    c = m.encoder.embed_dim
    layer = m.latent.adain["1"].mapping.layers[0]
    gm = torch.Generator().manual_seed(3)
    big_m, bias = torch.randn(2 * c, 16, generator=gm) * 0.1, torch.randn(2 * c, generator=gm) * 0.1
    with torch.no_grad():
        layer.weight.copy_(big_m * math.sqrt(16) / SQRT2)  # effective weight = stored * sqrt(2) * 1 / sqrt(in) = M
        layer.bias.copy_(bias)
    z = torch.randn(3, 1, 16, generator=gm)
    u = z[:, 0] / torch.sqrt((z[:, 0] ** 2).mean(1, keepdim=True) + 1e-8)
    h = u @ big_m.T + bias
    s, g = h[:, :c], h[:, c:]
    enc = m.encoder
    tokens = enc.norm_pre(enc._pos_embed(enc.patch_embed(images)))
    y = enc.blocks[1](enc.blocks[0](tokens))  # hooks inactive: the plain block output
    with m.latent.codes(z):
        out = enc.blocks(tokens)
    expected = s[:, None, :] + y * (1 + g[:, None, :])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # with g = 0 the shift is added to every token, the class token included
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.cat([torch.arange(c).float(), torch.zeros(c)]))
    with m.latent.codes(z):
        out = enc.blocks(tokens)
    torch.testing.assert_close(out - y, torch.arange(c).float().expand_as(y), rtol=0, atol=1e-4)


def test_k_codes_per_example_repeat_at_the_first_wrapped_block(images):
    m = Pair(inject=((1, "adain"),))
    rows_seen = []
    m.encoder.blocks[0].register_forward_hook(lambda mod, a, out: rows_seen.append(out.shape[0]))
    k = 4
    z = m.latent.sample_codes(3 * k, generator=torch.Generator().manual_seed(2))  # [N·k, 1, 16]
    with m.latent.codes(z):
        out = m.encoder.forward_features(images)  # [N·k, T, C]
    assert out.shape[0] == 3 * k and rows_seen == [3]  # block 0 ran once per example
    for i in range(3):
        for j in range(k):
            with m.latent.codes(z[i * k + j : i * k + j + 1]):
                one = m.encoder.forward_features(images[i : i + 1])
            torch.testing.assert_close(out[i * k + j], one[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="do not cover 3 token sequences"), m.latent.codes(z[:5]):
        m.encoder(images)


def test_equal_linear_sgd_step_by_hand():
    """w = γ m w_s / sqrt(in): an SGD step of lr η moves w by −η γ² m² / in · ∂L/∂w, b by −η m² ∂L/∂b.

    (γ = sqrt(2), the default gain: this test had −η m² / in while selfsup omitted the gain.)"""
    torch.manual_seed(0)
    n_in, m, eta = 8, 0.01, 0.5
    layer = EqualLinear(n_in, 3, lr_mul=m)
    assert layer.gain == SQRT2
    x = torch.randn(5, n_in)
    w0, b0 = layer.effective_weight().detach().clone(), layer.effective_bias().detach().clone()
    w_leaf, b_leaf = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    (x @ w_leaf.T + b_leaf).pow(2).sum().backward()  # the gradient w.r.t. the effective parameters
    layer(x).pow(2).sum().backward()
    torch.optim.SGD(layer.parameters(), lr=eta).step()
    torch.testing.assert_close(layer.effective_weight().detach() - w0, -eta * 2 * m**2 / n_in * w_leaf.grad)
    torch.testing.assert_close(layer.effective_bias().detach() - b0, -eta * m**2 * b_leaf.grad)


def test_equal_linear_adam_step_and_init_scale():
    """Adam's first step on w_s is η·sign(grad), so w moves by η γ m / sqrt(in); the init is N(0, γ²/in) for any m.

    (γ = sqrt(2) by default; this test had η m / sqrt(in) and N(0, 1/in) while selfsup omitted the gain, which
    ``gain=1.0`` still gives.)"""
    torch.manual_seed(0)
    n_in, m, eta = 16, 0.01, 1e-3
    layer = EqualLinear(n_in, 4, lr_mul=m)
    w0 = layer.effective_weight().detach().clone()
    layer(torch.randn(7, n_in)).sum().backward()
    sign = layer.weight.grad.sign()
    torch.optim.Adam(layer.parameters(), lr=eta, eps=1e-30).step()
    torch.testing.assert_close(layer.effective_weight().detach() - w0, -eta * SQRT2 * m / math.sqrt(n_in) * sign)
    for lr_mul in (1.0, 0.01):
        for gain in (SQRT2, 1.0):
            std = EqualLinear(512, 512, lr_mul=lr_mul, gain=gain).effective_weight().std().item()
            assert abs(std * math.sqrt(512) / gain - 1) < 0.02


# ---------------------------------------------------------------- the He gain (the seeds' EqualizedLinear, γ = sqrt(2))
def test_equal_linear_forward_is_the_seeds_formula_by_hand():
    """y = x @ (w · sqrt(2) · m / sqrt(in))ᵀ + b · m with the stored w, b (He-std · lrmul on the weight, lrmul alone on
    the bias). in = 8, m = 1/2: the weight factor is sqrt(2) · (1/2) / sqrt(8) = 1/4 exactly, so with integer stored
    values every product and sum is exact in float64 and the output must equal the formula bit for bit."""
    n_in, n_out, m = 8, 5, 0.5
    layer = EqualLinear(n_in, n_out, lr_mul=m).double()
    assert layer.gain == SQRT2 and layer.scale == 0.25  # without the gain it would be 0.5 / sqrt(8) ≈ 0.177
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-9, 10, (n_out, n_in), generator=g).double()
    b = torch.randint(-9, 10, (n_out,), generator=g).double()
    x = torch.randint(-9, 10, (6, n_in), generator=g).double()
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    expected = x @ (w * (math.sqrt(2) * m / math.sqrt(n_in))).T + b * m
    assert torch.equal(layer(x), expected)
    assert torch.equal(layer.effective_weight(), w / 4) and torch.equal(layer.effective_bias(), b / 2)
    # random stored values, m = 0.01 (IMLE-R): the same formula up to float64 rounding
    m = 0.01
    layer = EqualLinear(n_in, n_out, lr_mul=m).double()
    w, b, x = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((n_out, n_in), (n_out,), (6, n_in)))
    with torch.no_grad():
        layer.weight.copy_(w / m)
        layer.bias.copy_(b / m)
    expected = x @ (w / m * math.sqrt(2) * m / math.sqrt(n_in)).T + b / m * m
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    # gain=1.0 (selfsup's earlier form): at the same stored values only the weight term shrinks, by sqrt(2)
    old = EqualLinear(n_in, n_out, lr_mul=m, gain=1.0).double()
    old.load_state_dict(layer.state_dict())
    torch.testing.assert_close(old(x), x @ (w / math.sqrt(n_in)).T + b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("final_activation", [True, False])
def test_default_mapping_net_output_grows_by_sqrt2_per_layer(final_activation):
    """The default-shaped net (PixelNorm, then 8 layers 512 -> 512 -> ... -> 2·768 with LeakyReLU(0.2)).

    Every layer multiplies its pre-activation by γ; LeakyReLU is positively homogeneous (f(a x) = a f(x), a > 0) and
    the biases are zero at init, so at the same stored weights the output with γ = sqrt(2) is exactly
    sqrt(2)^8 = 16 times the output with γ = 1 (float64 rounding aside), the IMLE-H form (no final activation) too.

    The scale by hand: PixelNorm gives codes of mean square 1; W_eff ~ N(0, γ²/in) makes a pre-activation's mean
    square γ² times its input's; LeakyReLU(0.2) keeps (1 + 0.2²)/2 = 0.52 of a symmetric input's. Output mean
    square: (0.52 γ²)^8 with the final activation (γ = sqrt(2): 1.04^8, RMS ≈ 1.17, the He gain keeps the signal at
    unit scale; γ = 1: 0.52^8, RMS ≈ 0.073), (0.52 γ²)^7 · γ² without (RMS ≈ 1.62 and 0.101)."""
    cfg = MappingConfig(final_activation=final_activation)
    assert (cfg.depth, cfg.hidden, cfg.gain) == (8, 512, SQRT2)
    torch.manual_seed(0)
    net = MappingNetwork(512, 2 * 768, cfg).double()
    old = MappingNetwork(512, 2 * 768, dataclasses.replace(cfg, gain=1.0)).double()
    old.load_state_dict(net.state_dict())  # the same stored weights
    assert all(bool((layer.bias == 0).all()) for layer in net.layers)
    z = torch.randn(256, 512, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        out, out_old = net(z), old(z)
    torch.testing.assert_close(out, SQRT2**cfg.depth * out_old, rtol=1e-12, atol=1e-12)

    def rms(t: torch.Tensor) -> float:
        return t.pow(2).mean().sqrt().item()

    assert rms(out) / rms(out_old) == pytest.approx(16.0, rel=1e-12)
    last = 1.0 if final_activation else 1 / 0.52  # no LeakyReLU after the last layer: its 0.52 is not applied
    for gain, value in ((SQRT2, rms(out)), (1.0, rms(out_old))):
        assert value == pytest.approx(math.sqrt((0.52 * gain**2) ** cfg.depth * last), rel=0.2)


@pytest.mark.parametrize("loss", ["sum", "half_square"])
def test_equal_linear_sgd_step_matches_the_official_formula_by_hand(loss):
    """Stored w, SGD lr η: w moves by −η ∂L/∂w with ∂L/∂w = ∂L/∂W_eff · c, c = γ m / sqrt(in), so W_eff = c w moves
    by −η c² ∂L/∂W_eff; the stored bias moves by −η m ∂L/∂b_eff and b_eff = m b by −η m² ∂L/∂b_eff.

    ∂L/∂W_eff by hand, with y = x W_effᵀ + b_eff: L = Σ y gives ∂L/∂y = 1, L = ½‖y‖² gives ∂L/∂y = y; then
    ∂L/∂W_eff = (∂L/∂y)ᵀ x and ∂L/∂b_eff = Σ_rows ∂L/∂y."""
    n_in, n_out, m, eta = 4, 3, 0.1, 0.3
    c = SQRT2 * m / math.sqrt(n_in)
    layer = EqualLinear(n_in, n_out, lr_mul=m).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n_out, n_in, generator=g, dtype=torch.float64) / m)
        layer.bias.copy_(torch.randn(n_out, generator=g, dtype=torch.float64) / m)
    x = torch.randn(5, n_in, generator=g, dtype=torch.float64)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    w_eff0, b_eff0 = w0 * c, b0 * m
    y = x @ w_eff0.T + b_eff0
    dy = torch.ones_like(y) if loss == "sum" else y
    d_w_eff, d_b_eff = dy.T @ x, dy.sum(0)  # [out, in], [out]
    out = layer(x)
    (out.sum() if loss == "sum" else 0.5 * out.pow(2).sum()).backward()
    torch.testing.assert_close(layer.weight.grad, d_w_eff * c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, d_b_eff * m, rtol=1e-12, atol=1e-12)
    torch.optim.SGD(layer.parameters(), lr=eta).step()
    with torch.no_grad():
        torch.testing.assert_close(layer.weight - w0, -eta * c * d_w_eff, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.bias - b0, -eta * m * d_b_eff, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.effective_weight() - w_eff0, -eta * c**2 * d_w_eff, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.effective_bias() - b_eff0, -eta * m**2 * d_b_eff, rtol=1e-12, atol=1e-12)
    assert c**2 == pytest.approx(2 * m**2 / n_in)  # twice the step of the gain-less form: (1 / sqrt(2))² as far


def test_gain_round_trips_through_configs_and_reaches_every_layer():
    """``mapping.gain`` (default sqrt(2)) travels through LatentConfig dicts (the recipes' ``latent: {...}``), their
    ``asdict`` and the CLI's config dump (what checkpoints record), and every EqualLinear gets it."""
    assert MappingConfig().gain == SQRT2 == LatentConfig(mapping={"depth": 2}).mapping.gain  # dicts without gain
    cfg = LatentConfig(inject=[[1, "adain"]], code_dim=16, mapping={"depth": 3, "hidden": 8, "gain": 1.0})
    again = LatentConfig(**dataclasses.asdict(cfg))
    assert again == cfg and again.mapping.gain == 1.0
    inj = LatentInjector(192, 2, again)
    assert [layer.gain for layer in inj.adain["1"].mapping.layers] == [1.0] * 3
    assert "gain=1" in repr(inj.adain["1"].mapping.layers[0])
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="mapping.gain must be a finite number > 0"):
            MappingConfig(gain=bad)
        with pytest.raises(ValueError, match="EqualLinear: gain must be a finite number > 0"):
            EqualLinear(2, 2, gain=bad)
    from selfsup.cli import _pretrain_parser

    parser = _pretrain_parser()
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "imle-cifar10.yaml")
    for args, gain in (([], SQRT2), (["--method.init_args.latent.mapping.gain", "1.0"], 1.0)):
        dumped = json.loads(parser.dump(parser.parse_args(["--config", recipe, *args]), format="json"))
        latent = dumped["method"]["init_args"]["latent"]
        assert latent["mapping"]["gain"] == gain and LatentConfig(**latent).mapping.gain == gain


def test_mapping_group_lr_mult_composes_with_the_equalised_lr(images):
    """The injector's optimiser group gets lr_mult a: SGD then moves w by −(a η) γ² m² / in · ∂L/∂w
    (γ² = 2 with the default gain; the factor was m² / in while selfsup omitted it)."""

    class Method(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair(inject=((1, "adain"),), mapping=MappingConfig(depth=1, lr_mul=0.1))

        def param_groups(self):
            return [
                {"name": "encoder", "params": list(self.pair.encoder.parameters())},
                self.pair.latent.param_group(lr_mult=0.25, name="mapping"),
            ]

    meth = Method()
    groups = method_param_groups(meth, lr=2.0, weight_decay=0.0, exclude=True)
    mapping = [g for g in groups if g["name"].startswith("mapping")]
    assert {g["name"] for g in mapping} == {"mapping", "mapping/no_decay"}
    assert all(g["lr"] == 0.5 and g["lr_mult"] == 0.25 for g in mapping)
    layer = meth.pair.latent.adain["1"].mapping.layers[0]
    z = meth.pair.latent.sample_codes(3, generator=torch.Generator().manual_seed(0))
    w0 = layer.effective_weight().detach().clone()
    with meth.pair.latent.codes(z):
        meth.pair.encoder.forward_features(images).pow(2).mean().backward()
    # ∂L/∂w = (1 / scale) ∂L/∂w_s with scale = γ m / sqrt(in)
    scale = SQRT2 * 0.1 / math.sqrt(16)
    grad_eff = layer.weight.grad / scale
    build_optimizer(groups, "sgd", lr=2.0, momentum=0.0).step()
    torch.testing.assert_close(layer.effective_weight().detach() - w0, -(0.25 * 2.0) * 2 * 0.1**2 / 16 * grad_eff)


def test_imle_h_centring_and_pixel_norm():
    inj = AdaINInjection(8, code_dim=16, config=MappingConfig.imle_h(depth=3, hidden=32, center_codes=512))
    z = torch.randn(512, 16, generator=torch.Generator().manual_seed(0))  # the construction codes
    s, g = inj.style(z)
    torch.testing.assert_close(s.mean(0), torch.zeros(8), rtol=0, atol=1e-5)
    assert bool((g >= 0).all()) and float((g == 0).float().mean()) > 0.2
    u = PixelNorm(0.0)(torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(u, torch.tensor([[3.0, 4.0]]) / math.sqrt(12.5))


def test_bad_specs_and_codes_are_named(images):
    assert parse_inject_spec([11, "adain", 5, "adain"], 12) == [(5, "adain"), (11, "adain")]
    assert parse_inject_spec([[-1, "AdaIN"]], 12) == [(11, "adain")]
    with pytest.raises(ValueError, match="block 12 does not exist; the encoder has 12 blocks"):
        parse_inject_spec([[12, "adain"]], 12)
    with pytest.raises(ValueError, match="unknown method 'add' for block 3; supported: adain"):
        parse_inject_spec([[3, "add"]], 12)
    with pytest.raises(ValueError, match="block 11 is named twice"):
        parse_inject_spec([[11, "adain"], [-1, "adain"]], 12)
    with pytest.raises(ValueError, match="mapping.depth"):
        MappingConfig(depth=0)
    m = Pair()
    with pytest.raises(ValueError, match=r"codes must be \[N, 2, 16\]"), m.latent.codes(torch.zeros(3, 1, 16)):
        pass
    with pytest.raises(ValueError, match="built for width 192, the encoder's is 384"):
        LatentInjector(192, 2, LatentConfig(inject=[[0, "adain"]], code_dim=4)).attach(
            timm.create_model("vit_small_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=2)
        )
    unattached = LatentInjector(192, 2, LatentConfig(inject=[[0, "adain"]], code_dim=16))
    with pytest.raises(RuntimeError, match="not attached"), unattached.codes(torch.zeros(1, 1, 16)):
        pass


def test_a_deep_copy_carries_its_own_injector(images):
    m = Pair()
    twin = copy.deepcopy(m)
    z = m.latent.sample_codes(3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        twin.latent.adain["0"].mapping.layers[0].bias.add_(1.0)
    with m.latent.codes(z):
        a = m.encoder(images)
    with twin.latent.codes(z):
        b = twin.encoder(images)
    assert not torch.allclose(a, b)  # the twin's hooks use the twin's (changed) mapping net
    twin.latent.detach()
    assert torch.equal(twin.encoder(images), m.encoder(images)) and m.latent.attached


def test_the_mae_kept_token_pass_sees_the_codes_through_the_hooks(images):
    """MAE's encoder pass (selfsup.models.masked_vit.forward_kept) runs ``vit.blocks``: codes ignored gives the
    plain encoder's tokens exactly; k codes give N·k rows, each the single-code pass."""
    forward_kept = getattr(pytest.importorskip("selfsup.models.masked_vit"), "forward_kept", None)
    if forward_kept is None:
        pytest.skip("selfsup.models.masked_vit.forward_kept is not there (the MAE module changed)")
    plain, m = tiny_vit(), Pair(inject=((1, "adain"),))
    keep = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i))[:4] for i in range(3)])
    assert torch.equal(forward_kept(m.encoder, images, keep), forward_kept(plain, images, keep))
    z = m.latent.sample_codes(6, generator=torch.Generator().manual_seed(5))  # k = 2 codes per image
    with m.latent.codes(z):
        out = forward_kept(m.encoder, images, keep)
    assert out.shape == (6, 5, 192)
    with m.latent.codes(z[3:4]):
        one = forward_kept(m.encoder, images[1:2], keep[1:2])
    torch.testing.assert_close(out[3], one[0], rtol=1e-5, atol=1e-6)
