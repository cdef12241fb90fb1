"""n-way n-shot subsets on real CIFAR-10 images: exact counts, the evenly-spaced formula, seeded shots."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from selfsup.data.datasets import build_dataset
from selfsup.data.subsets import (
    ClassSubset,
    choose_classes,
    matching_subset,
    nway_nshot_indices,
    nway_nshot_subset,
    shot_indices,
)


@pytest.fixture(scope="module")
def train(cifar_slice):
    return build_dataset("cifar10", cifar_slice, "train")  # 20 images per class


@pytest.fixture(scope="module")
def test_split(cifar_slice):
    return build_dataset("cifar10", cifar_slice, "test")  # 10 images per class


def test_evenly_spaced_classes_follow_the_formula():
    assert choose_classes(10, 4) == [0, 3, 6, 9]  # floor(j * 9 / 3)
    assert choose_classes(10, 3) == [0, 4, 9]  # floor(j * 9 / 2) = 0, 4.5 -> 4, 9
    assert choose_classes(100, 32)[:8] == [0, 3, 6, 9, 12, 15, 19, 22]  # floor(j * 99 / 31)
    assert choose_classes(100, 32)[-1] == 99 and len(set(choose_classes(100, 32))) == 32
    assert choose_classes(7, 1) == [0]
    assert choose_classes(7, 7) == list(range(7)) == choose_classes(7, -1)


def test_random_classes_are_seeded_sorted_and_distinct():
    a = choose_classes(100, 32, "random", seed=3)
    assert a == choose_classes(100, 32, "random", seed=3)
    assert a != choose_classes(100, 32, "random", seed=4)
    assert a == sorted(a) and len(set(a)) == 32 and all(0 <= c < 100 for c in a)


def test_subset_has_exact_class_and_shot_counts_on_real_images(train):
    sub = nway_nshot_subset(train, 4, 7, seed=0)
    assert len(sub) == 28
    assert sub.class_ids == [0, 3, 6, 9]
    assert sub.classes == [train.classes[c] for c in (0, 3, 6, 9)] == ["airplane", "cat", "frog", "truck"]
    assert Counter(sub.targets) == {0: 7, 1: 7, 2: 7, 3: 7}
    assert Counter(train.targets[i] for i in sub.indices) == {0: 7, 3: 7, 6: 7, 9: 7}
    assert len(set(sub.indices)) == 28
    for i in (0, 9, 27):  # items carry the new label of the image they return
        img, y = sub[i]
        ref_img, ref_y = train[sub.indices[i]]
        assert y == sub.targets[i] == sub.class_map[ref_y]
        assert img.tobytes() == ref_img.tobytes()
    everything = nway_nshot_subset(train, -1, -1)
    assert len(everything) == len(train) and everything.targets == [train.targets[i] for i in everything.indices]


def test_shots_are_seeded_nested_and_independent_of_the_other_classes(train):
    a, _ = nway_nshot_indices(train.targets, 4, 7, seed=0)
    assert a == nway_nshot_indices(train.targets, 4, 7, seed=0)[0]
    assert a != nway_nshot_indices(train.targets, 4, 7, seed=1)[0]
    small = shot_indices(train.targets, [3], 3, seed=0)
    big = shot_indices(train.targets, [3], 7, seed=0)
    assert set(small) <= set(big)
    assert set(big) == {i for i in a if train.targets[i] == 3}  # class 3's shots do not depend on the others
    r, chosen = nway_nshot_indices(train.targets, 5, 2, classes="random", seed=7, num_classes=10)
    assert len(r) == 10 and chosen == choose_classes(10, 5, "random", seed=7)


def test_matching_subset_takes_the_same_classes_from_another_split(train, test_split):
    sub = nway_nshot_subset(train, 3, 5, classes="random", seed=2)
    val = matching_subset(test_split, sub, n_shot=50, seed=0)  # only 10 per class: min(n_shot, available)
    assert val.classes == sub.classes and val.class_ids == sub.class_ids
    assert Counter(val.targets) == {0: 10, 1: 10, 2: 10}
    held = matching_subset(train, sub, n_shot=-1)  # the same split: disjoint from the subset
    assert not set(held.indices) & set(sub.indices)
    assert Counter(held.targets) == {0: 15, 1: 15, 2: 15}


def test_targets_follow_the_order_of_the_indices(train):
    nine = [i for i, t in enumerate(train.targets) if t == 9][:2]
    zero = [i for i, t in enumerate(train.targets) if t == 0][:2]
    sub = ClassSubset(train, nine + zero, [9, 0])
    assert sub.classes == ["airplane", "truck"] and sub.targets == [1, 1, 0, 0]


def test_bad_requests_are_named(train):
    with pytest.raises(ValueError, match="n_way = 11 classes asked for, but the dataset has only 10"):
        nway_nshot_subset(train, 11, 1)
    with pytest.raises(ValueError, match=r"class 0 \('airplane'\) has 20 images available, fewer than n_shot = 21"):
        nway_nshot_subset(train, 2, 21)
    with pytest.raises(ValueError, match="n_shot must be a positive integer or -1"):
        nway_nshot_subset(train, 2, 0)
    with pytest.raises(ValueError, match="unknown class mode 'evenly'"):
        choose_classes(10, 2, "evenly")
    with pytest.raises(ValueError, match="has no .targets"):
        nway_nshot_subset(torch.utils.data.TensorDataset(torch.zeros(3)), 1, 1)
    with pytest.raises(ValueError, match="not in class_ids"):
        ClassSubset(train, [0], [5])
