"""The embedding-spectrum monitor: hand-derived statistics, the ``"embeddings"`` seam of every method, and what a
real pretraining run writes to ``spectrum.jsonl`` and ``logs/metrics.csv``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from method_cases import make_batch, method_cases, random_views, step_outputs

from selfsup.engine.config import DataConfig, MonitorConfig, OptimConfig, TrainerConfig
from selfsup.engine.pretrain import pretrain
from selfsup.engine.spectrum import SpectrumMonitor, as_views, spectrum_stats
from selfsup.losses.spectrum import alignment, effective_rank, rankme, uniformity
from selfsup.methods import BYOL, MEC, MMCR

TINY_BACKBONE = {"name": "resnet10", "kwargs": {"cifar_stem": True, "width": 8}}
B, D = 20, 8


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one intra-op thread


def signed_directions(r: int, n: int = B, d: int = D) -> torch.Tensor:
    """``n`` rows ``±e_k`` (``k < r``), each direction and sign equally often: zero mean, ``r`` equal singular
    values."""
    assert n % (2 * r) == 0
    rows = torch.zeros(n, d)
    for i in range(n):
        k = i % (2 * r)
        rows[i, k // 2] = 1.0 if k % 2 == 0 else -1.0
    return rows


def _uniformity_hand(r: int, n: int = B) -> float:
    # Per row: n/(2r) - 1 equal rows (|d|^2 = 0), n/(2r) opposite (4), n - n/r orthogonal (2); t = 2.
    same, opposite, orth = n // (2 * r) - 1, n // (2 * r), n - n // r
    return math.log((same + opposite * math.exp(-8) + orth * math.exp(-4)) / (n - 1))


# --------------------------------------------------------------------------------------------- hand cases
@pytest.mark.parametrize("r", [1, 2, 5])
def test_rank_r_data_has_effective_rank_r_and_rankme_r(r):
    z = signed_directions(r)
    assert effective_rank(z).item() == pytest.approx(r, rel=1e-5)
    assert rankme(z).item() == pytest.approx(r, rel=1e-4)  # raw rows, r equal singular values
    assert uniformity(z).item() == pytest.approx(_uniformity_hand(r), rel=1e-6)


def test_one_direction_gives_one():
    z = signed_directions(1) * torch.linspace(0.5, 2.0, B)[:, None]  # ±e_1 with any lengths
    assert effective_rank(z).item() == pytest.approx(1.0, rel=1e-6)
    assert rankme(z).item() == pytest.approx(1.0, abs=1e-4)


def test_alignment_and_uniformity_hand_values():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    views = torch.stack([torch.stack([e1, e1]), torch.stack([e1, -e1]), torch.stack([e2, 3 * e1])])  # [3, 2, 2]
    assert alignment(views).item() == pytest.approx((0 + 4 + 2) / 3)
    assert alignment(views, alpha=1).item() == pytest.approx((0 + 2 + math.sqrt(2)) / 3)
    assert uniformity(torch.stack([e1, -e1])).item() == pytest.approx(-8.0)
    with pytest.raises(ValueError, match="V >= 2"):
        alignment(views[:, :1])


def test_spectrum_stats_of_each_embedding_form():
    z = signed_directions(5)
    stats, spectra = spectrum_stats({"a": torch.stack([z, z], 1), "b": (z, -z), "c": z})
    assert stats["spectrum/a/effective_rank"] == pytest.approx(5, rel=1e-5)
    assert stats["spectrum/a/alignment"] == pytest.approx(0.0, abs=1e-7)
    assert stats["spectrum/b/alignment"] == pytest.approx(4.0)  # tuple of per-view tensors, antipodal
    assert "spectrum/c/alignment" not in stats  # one view: no pairs
    assert stats["spectrum/c/uniformity"] == pytest.approx(_uniformity_hand(5), rel=1e-6)
    # Centred, normalised ±e_k rows: 5 singular values sqrt(20 / 5) = 2, the rest 0.
    torch.testing.assert_close(torch.tensor(spectra["a"]), torch.tensor([2.0] * 5 + [0.0] * 3), atol=1e-5, rtol=0)
    assert as_views(z).shape == (B, 1, D) and as_views((z, z)).shape == (B, 2, D)
    with pytest.raises(ValueError, match="embeddings 'x'"):
        as_views(torch.zeros(2, 3, 4, 5), "x")
    with pytest.raises(ValueError, match="spectrum_every_n_steps"):
        SpectrumMonitor(0)


@pytest.mark.parametrize("case", method_cases(), ids=lambda c: c.id)
def test_every_method_returns_detached_embeddings_of_the_step(case):
    """Every registered method (tiny configuration, from the registry) hands the monitor the step's own features."""
    method = case.build().train()
    views = random_views(case.cls)
    b, v = views.shape[:2]
    out = step_outputs(method, make_batch(views))
    emb = out["embeddings"]
    assert "backbone" in emb, f"{case.id}: return embeddings['backbone'] (the pooled backbone features)"
    for name, value in emb.items():
        z = as_views(value, name)
        assert z.shape[0] == b and z.shape[1] in (1, v), (case.id, name, tuple(z.shape))
        assert not z.requires_grad, f"{case.id}: embeddings['{name}'] must be detached"
        assert torch.isfinite(z).all()
    assert as_views(emb["backbone"]).shape[-1] == method.num_features
    stats, _ = spectrum_stats(emb)  # the monitor accepts every form the method returns
    assert all(math.isfinite(x) for x in stats.values())
    assert not {k for k, val in out.items() if k != "embeddings" and getattr(val, "requires_grad", False)} - {"loss"}


def test_separate_pass_methods_report_the_backbone_features_of_view_0():
    """BYOL / MEC run one backbone pass per view: recomputing view 0 alone gives the same features (no extra pass,
    train-mode BN per call)."""
    for cls, kwargs in ((BYOL, BYOL.tiny), (MEC, MEC.tiny)):
        torch.manual_seed(0)
        method = cls(**kwargs)
        views = torch.randn(6, 2, 3, 32, 32)
        h = as_views(step_outputs(method, make_batch(views))["embeddings"]["backbone"])
        torch.testing.assert_close(h[:, 0], method.backbone(views[:, 0]).detach())


# ------------------------------------------------------------------------------------- in a real run
class HandMMCR(MMCR):
    """MMCR whose "embeddings" are hand-made: rank 5 (two equal views) and one signed direction."""

    def training_loss(self, batch):
        out = super().training_loss(batch)
        z5, z1 = signed_directions(5), signed_directions(1)
        out["embeddings"] = {"rank5": torch.stack([z5, z5], 1), "one": (z1, -z1)}
        return out


def _run(tmp: Path, root: Path, method, every: int, steps: int) -> Path:
    data = DataConfig(
        dataset="cifar10",
        root=str(root),
        batch_size=B,
        views=2,
        view_mode="batched",
        in_memory=True,
        num_workers=0,
        subset=60,
    )
    trainer = TrainerConfig(
        out_dir=str(tmp), max_epochs=10, max_steps=steps, logger="csv", log_every_n_steps=1, progress_bar=False
    )
    pretrain(method, data, OptimConfig(lr=1e-3), trainer, MonitorConfig(every_n_epochs=0, spectrum_every_n_steps=every))
    return tmp


def _csv(run: Path) -> list[dict[str, str]]:
    with open(run / "logs" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_monitor_logs_hand_values_every_n_steps_to_csv_and_jsonl(tmp_path, cifar_slice):
    torch.manual_seed(0)
    run = _run(tmp_path / "hand", cifar_slice, HandMMCR(backbone=TINY_BACKBONE, projector=[16, 8]), every=2, steps=5)
    records = [json.loads(line) for line in (run / "spectrum.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]  # every 2 steps from 0; 4 is also the last step
    for r in records:
        m = r["metrics"]
        assert m["spectrum/rank5/effective_rank"] == pytest.approx(5.0, rel=1e-5)
        assert m["spectrum/rank5/rankme"] == pytest.approx(5.0, rel=1e-4)
        assert m["spectrum/rank5/alignment"] == pytest.approx(0.0, abs=1e-6)
        assert m["spectrum/rank5/uniformity"] == pytest.approx(_uniformity_hand(5), rel=1e-5)
        assert m["spectrum/one/effective_rank"] == pytest.approx(1.0, rel=1e-5)
        assert m["spectrum/one/alignment"] == pytest.approx(4.0, rel=1e-6)
        assert r["singular_values"]["rank5"][:5] == pytest.approx([2.0] * 5, rel=1e-5)
    rows = _csv(run)
    assert not any("embeddings" in k for k in rows[0])  # the seam is never logged as a scalar
    logged = {
        int(r["step"]): float(r["spectrum/rank5/effective_rank"])
        for r in rows
        if r.get("spectrum/rank5/effective_rank")
    }
    assert logged == pytest.approx({0: 5.0, 2: 5.0, 4: 5.0}, rel=1e-5)
    assert {int(r["step"]) for r in rows if r.get("train/loss")} == {0, 1, 2, 3, 4}  # losses on the same step axis


def test_real_mmcr_spectrum_is_consistent_and_off_means_off(tmp_path, cifar_slice):
    torch.manual_seed(0)
    run = _run(tmp_path / "on", cifar_slice, MMCR(backbone=TINY_BACKBONE, projector=[16, 8]), every=3, steps=4)
    records = [json.loads(line) for line in (run / "spectrum.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 3]
    for r in records:
        for name, width in (("backbone", 64), ("projector", 8)):
            s = torch.tensor(r["singular_values"][name], dtype=torch.float64)
            assert len(s) == min(B, width) and bool((s[:-1] >= s[1:]).all())
            # Effective rank = exp(entropy) of the logged spectrum (rounding-level values dropped).
            s = s[s > 1e-4 * s[0]]
            p = s / s.sum()
            assert r["metrics"][f"spectrum/{name}/effective_rank"] == pytest.approx(
                math.exp(-(p * p.log()).sum().item()), rel=1e-4
            )
            assert 1.0 < r["metrics"][f"spectrum/{name}/effective_rank"] < min(B - 1, width) + 1e-3
            assert 0.0 < r["metrics"][f"spectrum/{name}/alignment"] < 4.0
            assert r["metrics"][f"spectrum/{name}/uniformity"] < 0.0
    torch.manual_seed(0)
    off = _run(tmp_path / "off", cifar_slice, MMCR(backbone=TINY_BACKBONE, projector=[16, 8]), every=0, steps=2)
    assert not (off / "spectrum.jsonl").exists()
    assert not any(k.startswith("spectrum/") for k in _csv(off)[0])
