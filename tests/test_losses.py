"""MMCR losses: hand-derived values, invariances, dtypes, gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.losses import mmcr_loss, mmcr_momentum_loss


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# ----------------------------------------------------------------- exact values


@pytest.mark.parametrize("B,V,D", [(4, 3, 4), (5, 2, 16), (8, 4, 8)])
def test_orthogonal_samples_give_minus_B(B: int, V: int, D: int) -> None:
    # Image b: every view is a (scaled) copy of e_b -> centroids = orthonormal rows -> G = B.
    z = torch.zeros(B, V, D)
    for b in range(B):
        z[b, :, b] = torch.arange(1, V + 1, dtype=torch.float32)  # positive scales
    assert mmcr_loss(z).item() == pytest.approx(-B, abs=1e-5)


@pytest.mark.parametrize("B,V,D", [(4, 3, 4), (9, 2, 5), (16, 4, 8)])
def test_full_collapse_gives_minus_sqrt_B(B: int, V: int, D: int) -> None:
    # Every output the same unit vector u: C = 1 u^T has one singular value sqrt(B).
    u = _rand(D, seed=1)
    z = u.expand(B, V, D).clone()
    assert mmcr_loss(z).item() == pytest.approx(-math.sqrt(B), rel=1e-5)


def test_local_term_orthonormal_views() -> None:
    # B=3, V=2, D=6: image b has views e_{2b}, e_{2b+1} (times arbitrary positive scales).
    # ||Z_b||_* = V = 2 (orthonormal rows), so L = B·V = 6.
    # c_b = (e_{2b} + e_{2b+1}) / 2, mutually orthogonal with norm 1/sqrt(2) -> G = 3/sqrt(2).
    B, V, D, lmbda = 3, 2, 6, 0.5
    z = torch.zeros(B, V, D)
    for b in range(B):
        z[b, 0, 2 * b] = 3.0
        z[b, 1, 2 * b + 1] = 0.25
    expected = lmbda * (B * V) / B - B / math.sqrt(2)  # = 1 - 2.1213...
    loss, parts = mmcr_loss(z, lmbda=lmbda, return_parts=True)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert parts["local_nuc"].item() == pytest.approx(6.0, abs=1e-5)
    assert parts["global_nuc"].item() == pytest.approx(3 / math.sqrt(2), abs=1e-5)


def test_local_term_views_at_an_angle() -> None:
    # Image b lives in the plane (e_{2b}, e_{2b+1}); its views are u = (1, 0), w = (cos θ_b, sin θ_b).
    # Gram matrix [[1, c], [c, 1]] has eigenvalues 1 ± c, so ||Z_b||_* = sqrt(1+c) + sqrt(1-c).
    # Centroid (u + w)/2 has norm sqrt((1+c)/2); centroids of different images are orthogonal,
    # so G = Σ_b sqrt((1+c_b)/2).
    thetas = [0.3, 1.1]
    B, V, D, lmbda = 2, 2, 4, 0.7
    z = torch.zeros(B, V, D, dtype=torch.float64)
    for b, th in enumerate(thetas):
        z[b, 0, 2 * b] = 2.0
        z[b, 1, 2 * b] = 5.0 * math.cos(th)
        z[b, 1, 2 * b + 1] = 5.0 * math.sin(th)
    cs = [math.cos(t) for t in thetas]
    L = sum(math.sqrt(1 + c) + math.sqrt(1 - c) for c in cs)
    G = sum(math.sqrt((1 + c) / 2) for c in cs)
    assert mmcr_loss(z, lmbda=lmbda).item() == pytest.approx(lmbda * L / B - G, abs=1e-12)
    assert mmcr_loss(z).item() == pytest.approx(-G, abs=1e-12)


def test_return_parts_are_tensors() -> None:
    z = _rand(6, 3, 5)
    loss, parts = mmcr_loss(z, return_parts=True)
    assert set(parts) == {"global_nuc", "local_nuc"}
    for v in parts.values():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and v.device == z.device
        assert not v.requires_grad
    assert parts["local_nuc"].item() == 0.0
    assert loss.item() == pytest.approx(-parts["global_nuc"].item())
    assert torch.equal(loss, mmcr_loss(z))


# ------------------------------------------------------------------- invariances


def test_invariances() -> None:
    z = _rand(6, 4, 10, seed=3)
    for lmbda in (0.0, 0.4):
        ref = mmcr_loss(z, lmbda=lmbda)
        scales = torch.rand(6, 4, 1, generator=torch.Generator().manual_seed(5)) * 10 + 0.01
        torch.testing.assert_close(mmcr_loss(z * scales, lmbda=lmbda), ref, rtol=1e-5, atol=1e-5)
        perm_b = torch.randperm(6, generator=torch.Generator().manual_seed(6))
        torch.testing.assert_close(mmcr_loss(z[perm_b], lmbda=lmbda), ref, rtol=1e-5, atol=1e-5)
        # A different view permutation for every sample.
        z_v = torch.stack([z[b, torch.randperm(4)] for b in range(6)])
        torch.testing.assert_close(mmcr_loss(z_v, lmbda=lmbda), ref, rtol=1e-5, atol=1e-5)


def test_normalisation_is_over_features_not_views() -> None:
    z = _rand(5, 3, 7, seed=4)
    right = -torch.linalg.svdvals(F.normalize(z, dim=-1).mean(1)).sum()
    wrong = -torch.linalg.svdvals(F.normalize(z, dim=1).mean(1)).sum()  # historical bug
    got = mmcr_loss(z)
    torch.testing.assert_close(got, right)
    assert abs(got.item() - wrong.item()) > 1e-2


# ------------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_fp32(dtype: torch.dtype) -> None:
    z = _rand(8, 4, 16, seed=7)
    zh = z.to(dtype)
    out = mmcr_loss(zh, lmbda=0.3)
    assert out.dtype == torch.float32
    # Exactly the fp32 computation on the (exactly representable) upcast input ...
    torch.testing.assert_close(out, mmcr_loss(zh.float(), lmbda=0.3), rtol=1e-6, atol=1e-6)
    # ... and close to the fp32 value of the original input.
    torch.testing.assert_close(out, mmcr_loss(z, lmbda=0.3), rtol=2e-2, atol=2e-2)


def test_float64_stays_float64() -> None:
    assert mmcr_loss(_rand(4, 2, 5, dtype=torch.float64)).dtype == torch.float64


def test_autocast_bf16_is_disabled_inside() -> None:
    z = _rand(8, 4, 16, seed=8)
    ref = mmcr_loss(z, lmbda=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mmcr_loss(z, lmbda=0.5)
        lin = torch.nn.Linear(16, 16)
        z_bf = lin(z)  # bf16 under autocast
        out_bf = mmcr_loss(z_bf, lmbda=0.5)
    assert z_bf.dtype == torch.bfloat16
    assert out.dtype == torch.float32 and out_bf.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(out_bf, mmcr_loss(z_bf.float(), lmbda=0.5), rtol=1e-5, atol=0)


# --------------------------------------------------------------------- gradients


@pytest.mark.parametrize("lmbda", [0.0, 0.7])
def test_gradcheck_float64(lmbda: float) -> None:
    # Views = a per-image direction plus noise: full-rank blocks with well-separated
    # singular values, so the nuclear norm is smooth around z.
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 1, 5, generator=g, dtype=torch.float64)
    z = z + 0.6 * torch.randn(3, 3, 5, generator=g, dtype=torch.float64)
    zn = F.normalize(z, dim=-1)
    s_c = torch.linalg.svdvals(zn.mean(1))
    s_l = torch.linalg.svdvals(zn)
    assert (s_c.diff().abs().min() > 0.1) and (s_c.min() > 0.1)
    assert (s_l.min() > 0.1) and (s_l.diff(dim=-1).abs().min() > 0.1)
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: mmcr_loss(t, lmbda=lmbda), (z,), eps=1e-6, atol=1e-6)
    ema = _rand(3, 3, 5, seed=12, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: mmcr_momentum_loss(t, ema, lmbda=lmbda), (z,), eps=1e-6, atol=1e-6)


# -------------------------------------------------------------------- momentum


@pytest.mark.parametrize("lmbda", [0.0, 0.5])
def test_momentum_equals_plain_when_branches_agree(lmbda: float) -> None:
    z = _rand(6, 3, 8, seed=13)
    torch.testing.assert_close(mmcr_momentum_loss(z, z.clone(), lmbda=lmbda), mmcr_loss(z, lmbda=lmbda))


def test_momentum_gradient_reaches_online_only() -> None:
    z = _rand(6, 3, 8, seed=14).requires_grad_(True)
    z_ema = z.detach().clone().requires_grad_(True)
    mmcr_momentum_loss(z, z_ema).backward()
    assert z_ema.grad is None
    assert z.grad is not None and z.grad.abs().sum() > 0
    # With λ = 0 and equal branches the online branch owns half of each centroid,
    # so its gradient is half the plain MMCR gradient.
    z2 = z.detach().clone().requires_grad_(True)
    mmcr_loss(z2).backward()
    torch.testing.assert_close(z.grad, 0.5 * z2.grad)


def test_momentum_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\(4, 2, 8\).*\(4, 3, 8\)"):
        mmcr_momentum_loss(torch.randn(4, 2, 8), torch.randn(4, 3, 8))


# ------------------------------------------------------------------------ errors


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_raises(bad: float) -> None:
    z = _rand(4, 2, 5)
    z[2, 1, 3] = bad
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        mmcr_loss(z)
    with pytest.raises(FloatingPointError, match="z_ema contains NaN or Inf"):
        mmcr_momentum_loss(_rand(4, 2, 5), z)


def test_bad_shape_raises_naming_the_shape() -> None:
    with pytest.raises(ValueError, match=r"\[B, V, D\].*\(8, 16\)"):
        mmcr_loss(torch.randn(8, 16))
    with pytest.raises(TypeError, match="floating"):
        mmcr_loss(torch.ones(2, 2, 2, dtype=torch.long))
