"""Tests for selfsup.eval: feature extraction, kNN monitor, linear probes (cached and augmented)."""

from __future__ import annotations

import io
import json
import math
import zipfile

import numpy as np
import pytest
import torch
from conftest import SAMPLE_ZIP as CIFAR_ZIP  # real CIFAR-10 JPEGs shipped in the package (200/50 per class fit)
from torch import nn
from torch.utils.data import DataLoader, Dataset

from selfsup.eval import (
    ProbeConfig,
    ProbeResult,
    evaluate_head,
    extract_features,
    knn_accuracy,
    knn_scores,
    linear_probe_augmented,
    linear_probe_cached,
    split_train_val,
    train_linear_on_features,
)

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def load_cifar_slice(split: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First ``per_class`` images of every class of a split of the shipped CIFAR-10 sample.

    Returns ``uint8 [N, 32, 32, 3]`` images and int64 labels (classes in sorted order).
    """
    from PIL import Image

    with zipfile.ZipFile(CIFAR_ZIP) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith(f"cifar10/{split}/") and n.endswith(".jpg"))
        classes = sorted({n.split("/")[2] for n in names})
        images, labels = [], []
        for ci, cls in enumerate(classes):
            members = [n for n in names if n.split("/")[2] == cls][:per_class]
            for m in members:
                images.append(np.asarray(Image.open(io.BytesIO(zf.read(m))).convert("RGB")))
                labels.append(ci)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


def tiny_bn_backbone() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    # Non-trivial running statistics, so "unchanged" is a meaningful check.
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].num_batches_tracked.fill_(7)
    return net


class ColourDataset(Dataset):
    """Images whose mean colour encodes the class; ``augment`` adds fresh noise on every call."""

    def __init__(self, n: int, num_classes: int = 3, augment: bool = False, seed: int = 0, noise: float = 0.3) -> None:
        g = torch.Generator().manual_seed(seed)
        self.targets = [i % num_classes for i in range(n)]
        palette = torch.eye(3)[:num_classes] * 2 - 0.5
        self.base = torch.stack([palette[t] for t in self.targets])[:, :, None, None] + noise * torch.randn(
            n, 3, 8, 8, generator=g
        )
        self.augment = augment

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.base[i]
        if self.augment:
            x = x + 0.3 * torch.randn_like(x)
        return x, self.targets[i]


def gaussian_blobs(
    n: int, num_classes: int, dim: int, sep: float, seed: int, noise_seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-variance Gaussian classes around centres drawn from ``seed`` (noise from ``noise_seed``)."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed)) * sep
    g = torch.Generator().manual_seed(seed + 1 if noise_seed is None else noise_seed)
    y = torch.arange(n) % num_classes
    return centres[y] + torch.randn(n, dim, generator=g), y


# ----------------------------------------------------------------------------------------------
# kNN
# ----------------------------------------------------------------------------------------------

# Bank on the unit circle (one entry deliberately not unit-norm): cosines with the queries are
# exact decimals, so the class scores can be written by hand.
BANK = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [-3.0, 0.0]])
BANK_Y = torch.tensor([0, 1, 1, 0])
QUERIES = torch.tensor([[5.0, 0.0], [0.0, 2.0]])  # cosines: q0 -> (1, .6, .8, -1), q1 -> (0, .8, .6, 0)
e = math.exp


def test_knn_scores_by_hand() -> None:
    # k = 2, T = 0.5: q0 keeps bank 0 (sim 1) and bank 2 (sim .8); q1 keeps bank 1 (.8), bank 2 (.6).
    s = knn_scores(BANK, BANK_Y, QUERIES, num_classes=4, k=2, temperature=0.5)
    assert s.shape == (2, 4)  # num_classes wider than the labels present
    expected = torch.tensor([[e(2.0), e(1.6), 0, 0], [0, e(1.6) + e(1.2), 0, 0]])
    torch.testing.assert_close(s, expected)

    # k larger than the bank is clipped to 4: every entry votes.
    s = knn_scores(BANK, BANK_Y, QUERIES, num_classes=4, k=100, temperature=0.5)
    expected = torch.tensor([[e(2.0) + e(-2.0), e(1.6) + e(1.2), 0, 0], [e(0.0) + e(0.0), e(1.6) + e(1.2), 0, 0]])
    torch.testing.assert_close(s, expected)
    # With every neighbour voting, q0 (identical to a class-0 entry) is outvoted by class 1 ...
    assert s[0].argmax().item() == 1
    # ... but a sharper temperature lets the exact match win: e^10 + e^-10 > e^8 + e^6.
    s = knn_scores(BANK, BANK_Y, QUERIES, num_classes=2, k=4, temperature=0.1)
    torch.testing.assert_close(s[0], torch.tensor([e(10.0) + e(-10.0), e(8.0) + e(6.0)]))
    assert s[0].argmax().item() == 0


def test_knn_accuracy_by_hand_and_top5_with_few_classes() -> None:
    labels = torch.tensor([0, 1])
    # k = 1: q0 -> bank 0 (class 0), q1 -> bank 1 (class 1): both right.
    assert knn_accuracy(BANK, BANK_Y, QUERIES, labels, num_classes=3, k=1) == {"top1": 100.0, "top5": 100.0}
    # k = 4, T = 0.5: both predicted class 1 -> top-1 50 %; top-5 = top-min(5, 3) -> 100 %.
    acc = knn_accuracy(BANK, BANK_Y, QUERIES, labels, num_classes=3, k=4)
    assert acc["top1"] == pytest.approx(50.0)
    assert acc["top5"] == pytest.approx(100.0)
    # With C = 2 the top-5 covers both classes.
    assert knn_accuracy(BANK, BANK_Y, QUERIES, torch.tensor([1, 0]), num_classes=2, k=1)["top5"] == 100.0


def test_knn_rejects_labels_outside_num_classes() -> None:
    with pytest.raises(ValueError):
        knn_scores(BANK, torch.tensor([0, 1, 2, 0]), QUERIES, num_classes=2)
    with pytest.raises(ValueError):
        knn_accuracy(BANK, BANK_Y, QUERIES, torch.tensor([0, 5]), num_classes=2)


def test_knn_chunked_equals_unchunked() -> None:
    g = torch.Generator().manual_seed(1)
    bank, bank_y = torch.randn(500, 16, generator=g), torch.randint(0, 7, (500,), generator=g)
    queries = torch.randn(301, 16, generator=g)
    full = knn_scores(bank, bank_y, queries, num_classes=7, k=25, chunk_size=10_000)
    chunked = knn_scores(bank, bank_y, queries, num_classes=7, k=25, chunk_size=7)
    torch.testing.assert_close(chunked, full)


def test_knn_on_real_cifar_pixels() -> None:
    x_tr, y_tr = load_cifar_slice("train", 200)
    x_te, y_te = load_cifar_slice("test", 50)
    f_tr = x_tr.float().div(255).flatten(1)
    f_te = x_te.float().div(255).flatten(1)
    mean = f_tr.mean(0)  # centre the pixels so that cosine similarity is not dominated by brightness
    acc = knn_accuracy(f_tr - mean, y_tr, f_te - mean, y_te, num_classes=10, k=20, chunk_size=128)
    assert acc["top1"] > 20.0  # chance is 10 %
    assert acc["top5"] >= acc["top1"]


# ----------------------------------------------------------------------------------------------
# split
# ----------------------------------------------------------------------------------------------


def test_split_train_val_stratified_disjoint_deterministic() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20 + [3] * 1)
    tr, va = split_train_val(labels, val_fraction=0.1, seed=3)
    assert torch.cat([tr, va]).sort().values.tolist() == list(range(labels.numel()))
    assert set(tr.tolist()).isdisjoint(va.tolist())
    counts = torch.bincount(labels[va], minlength=4).tolist()
    assert counts == [5, 3, 2, 0]  # round(0.1 * n_c); a single-sample class stays in train
    tr2, va2 = split_train_val(labels.tolist(), val_fraction=0.1, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    _, va3 = split_train_val(labels, val_fraction=0.1, seed=4)
    assert not torch.equal(va, va3)
    tr0, va0 = split_train_val(labels, val_fraction=0.0)
    assert va0.numel() == 0 and tr0.numel() == labels.numel()


# ----------------------------------------------------------------------------------------------
# linear probe on cached features
# ----------------------------------------------------------------------------------------------


def test_linear_probe_cached_separable_reaches_100() -> None:
    x, y = gaussian_blobs(800, 4, 16, sep=4.0, seed=0)
    xt, yt = gaussian_blobs(400, 4, 16, sep=4.0, seed=0, noise_seed=5)  # same classes, fresh samples
    res = linear_probe_cached(x, y, xt, yt, 4, ProbeConfig(lrs=(0.1,), weight_decays=(0.0,), epochs=10, batch_size=64))
    assert isinstance(res, ProbeResult)
    assert res.val_top1 >= 99.0
    assert res.test_top1 >= 99.0 and res.test_top1_last >= 99.0
    assert res.test_top5 == 100.0  # top-min(5, 4) of 4 classes
    assert (res.n_train, res.n_val, res.n_test) == (720, 80, 400)
    assert 1 <= res.epoch <= res.epochs == 10
    d = res.to_dict()
    assert "head" not in d and "head_last" not in d
    json.dumps(d)
    for key in (
        "val_top1",
        "test_top1",
        "test_top5",
        "test_top1_last",
        "test_top5_last",
        "lr",
        "weight_decay",
        "epoch",
        "seconds",
    ):
        assert key in d
    assert d["mode"] == "cached" and d["config"]["batch_size"] == 64 and d["config"]["lrs"] == (0.1,)


def test_selection_never_uses_test() -> None:
    # Two classes, noisy so that validation accuracy varies across epochs. The "test" split is
    # the validation split with every label flipped, so test top-1 = 100 - val top-1 at every
    # epoch: the best-validation epoch is the *worst* test epoch. A probe that peeked at the
    # test set would report 100 - min(val curve) instead.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=g)
    y = ((x[:, 0] + 0.8 * torch.randn(400, generator=g)) > 0).long()
    _, va = split_train_val(y, val_fraction=0.25, seed=0)
    test_f, test_y = x[va], 1 - y[va]
    probe = ProbeConfig(
        val_fraction=0.25,
        lrs=(0.003, 0.03),
        weight_decays=(0.0,),
        epochs=12,
        batch_size=32,
        seed=0,
        feature_norm="none",
    )
    res = linear_probe_cached(x, y, test_f, test_y, 2, probe)
    assert min(res.val_curve) < max(res.val_curve)  # the construction is informative
    assert res.val_top1 == pytest.approx(max(res.val_curve))
    assert res.test_top1 == pytest.approx(100.0 - res.val_top1)
    assert res.test_top1_last == pytest.approx(100.0 - res.val_curve[-1])

    # Replay the selected run and score the test split at every epoch (outside the probe).
    tr, va = split_train_val(y, val_fraction=0.25, seed=0)
    test_curve: list[float] = []
    run = train_linear_on_features(
        x[tr],
        y[tr],
        x[va],
        y[va],
        2,
        probe,
        lr=res.lr,
        weight_decay=res.weight_decay,
        on_epoch_end=lambda ep, head: test_curve.append(evaluate_head(head, test_f, test_y)["top1"]),
    )
    assert run["val_top1"] == res.val_curve and run["best_epoch"] == res.epoch
    assert res.test_top1 == pytest.approx(test_curve[res.epoch - 1])
    assert max(test_curve) > res.test_top1  # the reported number is not the max over test epochs
    # The grid was selected on validation too.
    assert res.val_top1 == max(c["best_val_top1"] for c in res.grid)


def test_train_linear_on_features_is_deterministic_and_tracks_best() -> None:
    x, y = gaussian_blobs(300, 3, 8, sep=1.0, seed=2)
    probe = ProbeConfig(epochs=5, lrs=0.05, batch_size=50, seed=1)
    a = train_linear_on_features(x[:250], y[:250], x[250:], y[250:], 3, probe)
    b = train_linear_on_features(x[:250], y[:250], x[250:], y[250:], 3, probe)
    assert a["val_top1"] == b["val_top1"] and a["train_loss"] == b["train_loss"]
    torch.testing.assert_close(a["last_head"].fc.weight, b["last_head"].fc.weight, rtol=0, atol=0)
    assert len(a["val_top1"]) == 5
    assert a["best_val_top1"] == max(a["val_top1"])
    assert a["val_top1"][a["best_epoch"] - 1] == a["best_val_top1"]
    assert evaluate_head(a["best_head"], x[250:], y[250:])["top1"] == pytest.approx(a["best_val_top1"])
    assert evaluate_head(a["last_head"], x[250:], y[250:])["top1"] == pytest.approx(a["val_top1"][-1])
    assert isinstance(a["best_head"].norm, nn.BatchNorm1d) and not a["best_head"].norm.affine


def test_refit_on_full_train() -> None:
    x, y = gaussian_blobs(400, 4, 16, sep=4.0, seed=0)
    res = linear_probe_cached(x, y, x[:100], y[:100], 4, ProbeConfig(epochs=3, refit_on_full_train=True))
    assert res.refit_on_full_train and res.n_train == 400 and res.n_val == 40
    assert res.test_top1 >= 99.0


# ----------------------------------------------------------------------------------------------
# augmented probe and feature extraction
# ----------------------------------------------------------------------------------------------


def test_linear_probe_augmented_keeps_backbone_frozen() -> None:
    net = tiny_bn_backbone()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    train_ds = ColourDataset(120, augment=True)
    val_ds = ColourDataset(120, augment=False)  # same images, eval "transform"
    test_ds = ColourDataset(60, augment=False, seed=1)
    res = linear_probe_augmented(net, train_ds, test_ds, 3, ProbeConfig(epochs=3, batch_size=16), val_dataset=val_ds)
    after = net.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"{k} changed"  # bit-identical, BN running stats included
    assert all(p.grad is None for p in net.parameters())
    assert net.training and net[1].training  # train/eval flags restored
    assert res.mode == "augmented" and res.n_val == 12 and res.n_train == 108
    assert res.test_top1 > 90.0


def test_augmented_without_augmentation_matches_cached() -> None:
    net = tiny_bn_backbone()
    # Noisy enough that the accuracies are not all 100 % (the comparison is informative).
    train_ds, test_ds = ColourDataset(150, noise=6.0), ColourDataset(60, seed=1, noise=6.0)
    probe = ProbeConfig(lrs=0.05, weight_decays=0.0, epochs=4, batch_size=16, seed=2, warmup_epochs=1)
    aug = linear_probe_augmented(net, train_ds, test_ds, 3, probe, val_dataset=train_ds)
    tr_f, tr_y = extract_features(net, DataLoader(train_ds, batch_size=64))
    te_f, te_y = extract_features(net, DataLoader(test_ds, batch_size=64))
    cached = linear_probe_cached(tr_f, tr_y, te_f, te_y, 3, probe)
    assert min(cached.val_curve) < 100.0 and cached.test_top1 < 100.0
    assert aug.val_curve == pytest.approx(cached.val_curve)
    assert (aug.epoch, aug.test_top1, aug.test_top1_last) == (cached.epoch, cached.test_top1, cached.test_top1_last)
    torch.testing.assert_close(aug.head.fc.weight, cached.head.fc.weight, rtol=1e-4, atol=1e-5)


def test_augmented_requires_val_dataset() -> None:
    with pytest.raises(ValueError):
        linear_probe_augmented(tiny_bn_backbone(), ColourDataset(30), ColourDataset(9), 3, ProbeConfig(epochs=1))


def test_extract_features_eval_mode_and_restores_flags() -> None:
    net = tiny_bn_backbone()
    net.train()
    net[0].eval()  # mixed modes must come back as they were
    flags = [m.training for m in net.modules()]
    stats = net[1].running_mean.clone()
    ds = ColourDataset(20)
    feats, labels = extract_features(net, DataLoader(ds, batch_size=8))
    assert [m.training for m in net.modules()] == flags
    assert torch.equal(net[1].running_mean, stats)
    assert feats.dtype == torch.float32 and feats.shape == (20, 8)
    assert labels.dtype == torch.int64 and labels.tolist() == ds.targets
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(feats, net(ds.base))
    unit, _ = extract_features(net, DataLoader(ds, batch_size=8), normalize=True)
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(20))


# ----------------------------------------------------------------------------------------------
# ProbeConfig, the shared schedule and label check
# ----------------------------------------------------------------------------------------------


def test_probe_config_normalises_validates_and_overrides() -> None:
    cfg = ProbeConfig(lrs=0.5, weight_decays=[0.0, 1e-4], batch_size=512, scale_lr="linear")
    assert cfg.lrs == (0.5,) and cfg.weight_decays == (0.0, 1e-4)
    assert cfg.peak_lr(0.5) == pytest.approx(1.0)  # 0.5 x 512 / 256
    for bad in (
        dict(optimizer="rmsprop"),
        dict(feature_norm="ln"),
        dict(val_fraction=1.0),
        dict(epochs=0),
        dict(lrs=()),
        dict(scale_lr="cubic"),
        dict(warmup_epochs=-1),
    ):
        with pytest.raises(ValueError):
            ProbeConfig(**bad)
    x, y = gaussian_blobs(200, 2, 4, sep=3.0, seed=0)
    a = linear_probe_cached(x, y, x, y, 2, ProbeConfig(epochs=2, batch_size=32))
    b = linear_probe_cached(x, y, x, y, 2, ProbeConfig(epochs=7), epochs=2, batch_size=32)  # overrides by name
    assert a.val_curve == b.val_curve and a.config == b.config
    with pytest.raises(TypeError):
        linear_probe_cached(x, y, x, y, 2, ProbeConfig(), epochz=2)


def test_probe_lr_follows_the_shared_warmup_cosine(monkeypatch) -> None:
    """Per step: linear warm-up from a non-zero first lr, then half-cosine (selfsup.engine.optim.warmup_cosine).

    Fails before the ProbeConfig change: the probe had its own warm-up-less ``_cosine``.
    """
    import selfsup.eval.linear as linear
    from selfsup.engine.optim import warmup_cosine

    seen: list[float] = []
    real = linear.build_scheduler

    def spy(opt, *args, **kwargs):
        sched = real(opt, *args, **kwargs)
        step = sched.step

        def recording_step(*a, **k):  # called after each optimiser step: the group holds the lr just used
            seen.append(opt.param_groups[0]["lr"])
            return step(*a, **k)

        sched.step = recording_step
        return sched

    monkeypatch.setattr(linear, "build_scheduler", spy)
    assert not hasattr(linear, "_cosine")
    x, y = gaussian_blobs(100, 2, 4, sep=3.0, seed=0)
    cfg = ProbeConfig(epochs=4, lrs=0.2, batch_size=25, warmup_epochs=1, scale_lr="linear", val_fraction=0.0)
    linear.linear_probe_cached(x, y, x, y, 2, cfg)
    peak = 0.2 * 25 / 256
    assert seen == pytest.approx([warmup_cosine(s, 16, 4, peak) for s in range(16)])
    assert seen[0] == pytest.approx(peak / 4) and max(seen) == pytest.approx(peak)


@pytest.mark.parametrize("optimizer", ["adam", "lars"])
def test_probe_optimizers_learn(optimizer: str) -> None:
    x, y = gaussian_blobs(400, 4, 16, sep=4.0, seed=0)
    lr = {"adam": 0.01, "lars": 1.0}[optimizer]
    res = linear_probe_cached(
        x,
        y,
        x,
        y,
        4,
        ProbeConfig(epochs=5, lrs=lr, batch_size=50, optimizer=optimizer, weight_decays=1e-6, feature_norm="none"),
    )
    assert res.test_top1 >= 95.0 and res.config["optimizer"] == optimizer


def test_one_shared_label_check() -> None:
    """kNN and the probes use the same check (fails before: each module had its own ``_check_labels``)."""
    import selfsup.eval.features as features
    import selfsup.eval.knn as knn
    import selfsup.eval.linear as linear

    assert not hasattr(knn, "_check_labels") and not hasattr(linear, "_check_labels")
    assert knn.check_labels is features.check_labels and linear.check_labels is features.check_labels
    with pytest.raises(ValueError, match=r"train_y must lie in \[0, num_classes=2\), got range \[0, 2\]"):
        linear_probe_cached(torch.zeros(3, 2), torch.tensor([0, 1, 2]), torch.zeros(1, 2), torch.tensor([0]), 2)


# ----------------------------------------------------------------------------------------------
# kNN by shards: knn_topk + merge_topk + vote == knn_scores on the whole bank
# ----------------------------------------------------------------------------------------------


def _by_shards(bank, bank_y, queries, sizes, k, num_classes, temperature=0.5):
    from selfsup.eval import knn_topk, merge_topk, vote

    assert sum(sizes) == bank.shape[0]
    top_s, top_y = torch.zeros(queries.shape[0], 0), torch.zeros(queries.shape[0], 0, dtype=torch.long)
    start = 0
    for n in sizes:
        s, y = knn_topk(bank[start : start + n], bank_y[start : start + n], queries, k, chunk_size=5)
        assert s.shape == (queries.shape[0], min(k, n))
        top_s, top_y = merge_topk(top_s, top_y, s, y, k)
        start += n
    return vote(top_s, top_y, num_classes, temperature)


@pytest.mark.parametrize("k", [1, 3, 7, 50])
def test_knn_by_shards_equals_whole_bank_with_ties(k: int) -> None:
    """Features in {-1, 1}^4: every cosine is an exact multiple of 1/4, so ties abound (16 distinct vectors for 40
    bank rows with random labels); the k-th neighbour is decided by bank order in both computations."""
    g = torch.Generator().manual_seed(k)
    signs = lambda n: torch.randint(0, 2, (n, 4), generator=g).float() * 2 - 1
    bank, bank_y, queries = signs(40), torch.randint(0, 5, (40,), generator=g), signs(13)
    whole = knn_scores(bank, bank_y, queries, num_classes=5, k=k, chunk_size=4)
    for sizes in ([40], [20, 20], [3, 0, 30, 7], [1] * 40, [6, 11, 2, 21]):  # shards smaller than k, empty ones
        torch.testing.assert_close(_by_shards(bank, bank_y, queries, sizes, k, 5), whole, rtol=0, atol=0)


def test_knn_ties_go_to_the_first_bank_entry() -> None:
    bank = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # entries 0 and 1 tie for every query
    q = torch.tensor([[1.0, 0.0]])
    assert knn_scores(bank, torch.tensor([0, 1, 1]), q, num_classes=2, k=1).argmax().item() == 0
    assert knn_scores(bank, torch.tensor([1, 0, 1]), q, num_classes=2, k=1).argmax().item() == 1
    # k = 2: both tied entries, whatever the order
    s = knn_scores(bank, torch.tensor([1, 0, 0]), q, num_classes=2, k=2)
    torch.testing.assert_close(s, torch.tensor([[e(2.0), e(2.0)]]))


def test_knn_by_shards_on_random_features() -> None:
    g = torch.Generator().manual_seed(3)
    bank, bank_y, queries = (
        torch.randn(300, 16, generator=g),
        torch.randint(0, 7, (300,), generator=g),
        torch.randn(50, 16, generator=g),
    )
    whole = knn_scores(bank, bank_y, queries, num_classes=7, k=25)
    torch.testing.assert_close(_by_shards(bank, bank_y, queries, [150, 10, 140], 25, 7), whole)
