"""Few-shot evaluation: seeded episodes, features once, prototype / linear classifiers, the 95% interval, the CLI."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torchvision.transforms.v2 as T
from cli_args import TINY_RUN

from selfsup.cli import main, run_pretrain
from selfsup.data.build import build_eval_dataset
from selfsup.data.datasets import build_dataset
from selfsup.engine.config import DataConfig
from selfsup.engine.fewshot_callback import FewShotMonitor
from selfsup.eval.fewshot import (
    FewShotConfig,
    confidence_interval,
    episode_accuracy,
    episode_seed,
    few_shot_eval,
    few_shot_from_features,
    sample_episodes,
)

TO_TENSOR = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True)])
FLIP = T.Compose([T.ToImage(), T.RandomHorizontalFlip(), T.ToDtype(torch.float32, scale=True)])


def _key(img: torch.Tensor) -> bytes:
    """The image's pixel values, sorted: the same for an image and its horizontal flip."""
    return img.flatten().sort().values.numpy().tobytes()


class LabelLookup(nn.Module):
    """A deterministic 'backbone' whose answer is known: real images -> a vector fixed per image.

    ``mode="label"``: one-hot of the image's true label (found by its pixels) plus N(0, 0.05²) noise fixed
    per image; ``mode="random"``: a random vector fixed per image, independent of the label. Counts the
    images it embeds.
    """

    def __init__(self, datasets, num_classes: int, mode: str):
        super().__init__()
        self.table: dict[bytes, torch.Tensor] = {}
        g = torch.Generator().manual_seed(0)
        for ds in datasets:
            for img, y in ds:
                noise = torch.randn(num_classes, generator=g)
                self.table[_key(img)] = noise * 0.05 + torch.eye(num_classes)[y] if mode == "label" else noise
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return torch.stack([self.table[_key(img)] for img in x])


@pytest.fixture(scope="module")
def splits(cifar_slice):
    """Real CIFAR-10: 20 train / 10 test images per class, as tensors."""
    return (
        build_dataset("cifar10", cifar_slice, "train", TO_TENSOR),
        build_dataset("cifar10", cifar_slice, "test", TO_TENSOR),
    )


def test_confidence_interval_by_hand():
    mean, ci, std = confidence_interval([50.0, 60.0, 70.0, 80.0])
    # deviations -15, -5, 5, 15: sample variance (225 + 25 + 25 + 225) / 3
    assert mean == 65.0
    assert std == pytest.approx(math.sqrt(500 / 3))
    assert ci == pytest.approx(1.96 * math.sqrt(500 / 3) / 2)  # / sqrt(4)
    mean1, ci1, _ = confidence_interval([42.0])
    assert mean1 == 42.0 and math.isnan(ci1)


def test_episodes_have_exact_sizes_are_seeded_and_disjoint_within_one_split():
    labels = torch.arange(6).repeat_interleave(12)  # 6 classes x 12 images
    cfg = FewShotConfig(n_way=3, n_shot=4, n_query=5, episodes=6, seed=1)
    eps = sample_episodes(labels, labels, cfg, same_split=True)
    again = sample_episodes(labels, labels, cfg, same_split=True)
    other = sample_episodes(
        labels, labels, FewShotConfig(n_way=3, n_shot=4, n_query=5, episodes=6, seed=2), same_split=True
    )
    assert all(torch.equal(a.support, b.support) and torch.equal(a.query, b.query) for a, b in zip(eps, again))
    assert any(not torch.equal(a.support, b.support) for a, b in zip(eps, other))
    for ep in eps:
        assert ep.classes.tolist() == sorted(ep.classes.tolist()) and ep.classes.numel() == 3
        assert Counter(ep.support_y.tolist()) == {0: 4, 1: 4, 2: 4}
        assert Counter(ep.query_y.tolist()) == {0: 5, 1: 5, 2: 5}
        assert not set(ep.support.tolist()) & set(ep.query.tolist())
        assert torch.equal(labels[ep.support], ep.classes[ep.support_y])  # episode label j = j-th class
        assert torch.equal(labels[ep.query], ep.classes[ep.query_y])
    assert len({tuple(ep.classes.tolist()) for ep in eps}) > 1
    with pytest.raises(
        ValueError,
        match=r"6 classes have 4 support and 5 query images \(disjoint, one split\) but an "
        "episode needs 7",
    ):
        sample_episodes(labels, labels, FewShotConfig(n_way=7, n_shot=4, n_query=5), same_split=True)
    with pytest.raises(ValueError, match="0 classes have 4 support and 9 query images"):  # 4 + 9 > 12
        sample_episodes(labels, labels, FewShotConfig(n_way=3, n_shot=4, n_query=9), same_split=True)


def test_prototype_classifier_by_hand():
    # two classes, support features along the axes; the query at 30 degrees is nearer class 0
    sf = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 5.0]])
    sy = torch.tensor([0, 0, 1])
    q = torch.tensor([[math.cos(0.5), math.sin(0.5)], [0.1, 1.0]])
    for metric in ("cosine", "euclidean"):
        cfg = FewShotConfig(n_way=2, metric=metric)
        assert episode_accuracy(sf, sy, q, torch.tensor([0, 1]), 2, cfg) == 100.0
        assert episode_accuracy(sf, sy, q, torch.tensor([1, 1]), 2, cfg) == 50.0


def test_label_features_score_100_and_random_features_score_one_in_n_way(splits):
    train, test = splits
    cfg = FewShotConfig(n_way=5, n_shot=3, n_query=10, episodes=40, seed=0)
    known = LabelLookup(splits, 10, "label")
    res = few_shot_eval(known, train, test, cfg)
    assert res.per_episode == [100.0] * 40 and res.accuracy == 100.0 and res.ci95 == 0.0
    # features once: every image used is embedded exactly once
    assert known.rows == res.n_embedded == res.n_support_images + res.n_query_images
    assert res.n_query_images == 100 and res.n_support_images <= 40 * 15
    rand = few_shot_eval(LabelLookup(splits, 10, "random"), train, test, cfg)
    assert 14.0 < rand.accuracy < 26.0  # chance is 20% over 2,000 queries
    assert 0.5 < rand.ci95 < 6.0
    mean, ci, _ = confidence_interval(rand.per_episode)
    assert (rand.accuracy, rand.ci95) == (mean, ci)
    linear = few_shot_eval(
        known,
        train,
        test,
        FewShotConfig(n_way=5, n_shot=3, n_query=10, episodes=4, classifier="linear", epochs=30, lr=0.1),
    )
    assert linear.accuracy == 100.0


def test_one_split_and_augmented_support_views(splits, cifar_slice):
    train, _ = splits
    known = LabelLookup(splits, 10, "label")
    res = few_shot_eval(known, train, train, FewShotConfig(n_way=4, n_shot=5, n_query=15, episodes=3))
    used = res.n_support_images + res.n_query_images
    assert res.accuracy == 100.0 and known.rows == res.n_embedded  # an image in both roles is embedded once
    assert max(res.n_support_images, res.n_query_images) <= res.n_embedded <= used
    flipped = build_dataset("cifar10", cifar_slice, "train", FLIP)
    known.rows = 0
    cfg = FewShotConfig(n_way=4, n_shot=2, n_query=5, episodes=3, augs_per_image=3)
    res = few_shot_eval(known, train, splits[1], cfg, support_augmented=flipped)
    assert res.accuracy == 100.0 and known.rows == res.n_embedded == 3 * res.n_support_images + res.n_query_images
    with pytest.raises(ValueError, match="augs_per_image > 0 needs support_augmented"):
        few_shot_eval(known, train, splits[1], cfg)


def test_from_features_is_seeded():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(8).repeat_interleave(10)
    f = torch.randn(80, 16, generator=g) + 2 * torch.eye(16)[y]
    cfg = FewShotConfig(n_way=4, n_shot=2, n_query=3, episodes=10)
    a = few_shot_from_features(f[::2], y[::2], f[1::2], y[1::2], cfg)
    b = few_shot_from_features(f[::2], y[::2], f[1::2], y[1::2], cfg)
    assert a.per_episode == b.per_episode and 25.0 < a.accuracy <= 100.0
    # the linear heads of all episodes train in one batch, each exactly as alone
    lin = FewShotConfig(n_way=4, n_shot=2, n_query=3, episodes=4, classifier="linear", epochs=5)
    batched = few_shot_from_features(f[::2], y[::2], f[1::2], y[1::2], lin)
    eps = sample_episodes(y[::2], y[1::2], lin)
    alone = [
        episode_accuracy(
            f[::2][ep.support], ep.support_y, f[1::2][ep.query], ep.query_y, 4, lin, seed=episode_seed(lin.seed, e)
        )
        for e, ep in enumerate(eps)
    ]
    assert batched.per_episode == alone
    with pytest.raises(ValueError, match="fewshot.n_way must be >= 2"):
        FewShotConfig(n_way=1)


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory, cifar_slice):
    """A 1-epoch tiny pretraining run with the few-shot monitor on: ``(last.ckpt, monitor)``."""
    data = DataConfig(dataset="cifar10", root=str(cifar_slice), augment="cifar10")
    support, query = build_eval_dataset(data, "train"), build_eval_dataset(data, "test")
    monitor = FewShotMonitor(support, query, FewShotConfig(n_way=5, n_shot=2, n_query=4, episodes=3), every_n_epochs=1)
    run = tmp_path_factory.mktemp("fewshot") / "run"
    run_pretrain(
        [
            *TINY_RUN,
            "--data.root",
            str(cifar_slice),
            "--data.subset",
            "40",
            "--trainer.max_epochs",
            "1",
            "--trainer.out_dir",
            str(run),
            "--trainer.logger",
            "csv",
            "--trainer.log_every_n_steps",
            "1",
        ],
        extra_callbacks=[monitor],
    )
    return run / "checkpoints" / "last.ckpt", monitor


def test_monitor_logs_fewshot_accuracy_during_pretraining(monitored_run):
    ckpt, monitor = monitored_run
    assert [h["epoch"] for h in monitor.history] == [1] and monitor.history[0]["episodes"] == 3
    acc, ci = monitor.history[0]["acc"], monitor.history[0]["ci95"]
    assert 0.0 <= acc <= 100.0 and ci >= 0.0
    with open(ckpt.parent.parent / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [float(r["fewshot/acc"]) for r in rows if r.get("fewshot/acc")]
    assert logged == [pytest.approx(acc)]


def test_cli_reports_accuracy_with_its_interval(monitored_run, cifar_slice, capsys):
    ckpt, _ = monitored_run
    argv = [
        "fewshot",
        "--checkpoint",
        str(ckpt),
        "--data.root",
        str(cifar_slice),
        "--data.num_workers",
        "0",
        "--data.batch_size",
        "64",
        "--fewshot.n_way",
        "5",
        "--fewshot.n_shot",
        "2",
        "--fewshot.n_query",
        "4",
        "--fewshot.episodes",
        "5",
    ]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert len(result["per_episode"]) == 5
    mean, ci, _ = confidence_interval(result["per_episode"])
    assert result["accuracy"] == pytest.approx(mean) and result["ci95"] == pytest.approx(ci)
    assert result["summary"].startswith(f"5-way 2-shot prototype: {mean:.2f} ± {ci:.2f} %")
    assert result["summary"] in err
    written = ckpt.parent.parent / "eval" / "fewshot-last.json"
    assert json.loads(written.read_text())["accuracy"] == result["accuracy"]
    assert main([*argv, "--fewshot.classifier", "knn"]) == 1
    assert "fewshot.classifier" in capsys.readouterr().err
    assert main([*argv, "--fewshot.n_shot", "25"]) == 1  # the slice has 20 train images per class
    assert "have 25 support and 4 query images" in capsys.readouterr().err
