"""Latent-code injection (IMLE-SSL's AdaIN blocks, spec §3.1): codes ignored = the plain encoder bit for bit,
out = s + y (1 + g) on every token, k codes per example, equalised-lr multipliers derived by hand."""

from __future__ import annotations

import copy
import math

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
    PixelNorm,
    inject_codes,
    parse_inject_spec,
)

SMALL = MappingConfig(depth=2, hidden=32)


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
    """Depth-1 mapping net with hand-set weights: h = M u + b with u = PixelNorm(z); s, g = h[:C], h[C:]."""
    m = Pair(inject=((1, "adain"),), mapping=MappingConfig(depth=1, lr_mul=1.0, final_activation=False))
    c = m.encoder.embed_dim
    layer = m.latent.adain["1"].mapping.layers[0]
    gm = torch.Generator().manual_seed(3)
    big_m, bias = torch.randn(2 * c, 16, generator=gm) * 0.1, torch.randn(2 * c, generator=gm) * 0.1
    with torch.no_grad():
        layer.weight.copy_(big_m * math.sqrt(16))  # effective weight = stored * 1 / sqrt(in) = M
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
    """w = m w_s / sqrt(in): an SGD step of lr η moves w by −η m² / in · ∂L/∂w, b by −η m² ∂L/∂b."""
    torch.manual_seed(0)
    n_in, m, eta = 8, 0.01, 0.5
    layer = EqualLinear(n_in, 3, lr_mul=m)
    x = torch.randn(5, n_in)
    w0, b0 = layer.effective_weight().detach().clone(), layer.effective_bias().detach().clone()
    w_leaf, b_leaf = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    (x @ w_leaf.T + b_leaf).pow(2).sum().backward()  # the gradient w.r.t. the effective parameters
    layer(x).pow(2).sum().backward()
    torch.optim.SGD(layer.parameters(), lr=eta).step()
    torch.testing.assert_close(layer.effective_weight().detach() - w0, -eta * m**2 / n_in * w_leaf.grad)
    torch.testing.assert_close(layer.effective_bias().detach() - b0, -eta * m**2 * b_leaf.grad)


def test_equal_linear_adam_step_and_init_scale():
    """Adam's first step on w_s is η·sign(grad), so w moves by η m / sqrt(in); the init is N(0, 1/in) for any m."""
    torch.manual_seed(0)
    n_in, m, eta = 16, 0.01, 1e-3
    layer = EqualLinear(n_in, 4, lr_mul=m)
    w0 = layer.effective_weight().detach().clone()
    layer(torch.randn(7, n_in)).sum().backward()
    sign = layer.weight.grad.sign()
    torch.optim.Adam(layer.parameters(), lr=eta, eps=1e-30).step()
    torch.testing.assert_close(layer.effective_weight().detach() - w0, -eta * m / math.sqrt(n_in) * sign)
    for lr_mul in (1.0, 0.01):
        std = EqualLinear(512, 512, lr_mul=lr_mul).effective_weight().std().item()
        assert abs(std * math.sqrt(512) - 1) < 0.02


def test_mapping_group_lr_mult_composes_with_the_equalised_lr(images):
    """The injector's optimiser group gets lr_mult a: SGD then moves w by −(a η) m² / in · ∂L/∂w."""

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
    # ∂L/∂w = (1 / scale) ∂L/∂w_s with scale = m / sqrt(in)
    scale = 0.1 / math.sqrt(16)
    grad_eff = layer.weight.grad / scale
    build_optimizer(groups, "sgd", lr=2.0, momentum=0.0).step()
    torch.testing.assert_close(layer.effective_weight().detach() - w0, -(0.25 * 2.0) * 0.1**2 / 16 * grad_eff)


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
