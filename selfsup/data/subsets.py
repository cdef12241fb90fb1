r"""n-way n-shot subsets of a labelled dataset (IMLE-SSL's training / probe subsets, spec §3.4).

Notation: ``C`` classes (labels ``0 .. C−1``, the dataset's sorted class list), ``n_way`` chosen classes,
``n_shot`` images per chosen class; ``−1`` for either means "all".

* **Classes** (:func:`choose_classes`):
  ``even`` (IMLE-R): evenly spaced in sorted class order, ``c_j = floor(j · (C − 1) / (n_way − 1))`` for
  ``j = 0 .. n_way − 1`` (``n_way = 1``: class 0); distinct whenever ``n_way <= C``.
  ``random`` (IMLE-H): a seeded sample of the sorted class list, returned sorted (the seed sampled a
  ``set``, whose order depends on string hashing, spec §7).
* **Shots** (:func:`shot_indices`): for each chosen class ``c`` a seeded sample without replacement of its
  images, drawn by a generator keyed on ``(seed, c)``, so a class gets the same images whichever other
  classes are chosen, and ``n_shot = a`` is a prefix of ``n_shot = b > a``. A class with fewer than
  ``n_shot`` images is an error naming it (``strict``), or gives what it has (``min(n_shot, available)``,
  the validation-subset rule).
* **Datasets** (:class:`ClassSubset`): the chosen images, relabelled ``0 .. n_way − 1`` in increasing
  original-label order, with ``.classes`` (the chosen names), ``.targets`` (the new labels **in the
  order of** ``.indices``; the seeds' ``ImageFolderSubset`` followed the original order instead, spec §7),
  ``.class_ids`` (original labels) and ``.class_map`` (original -> new).
  :func:`nway_nshot_subset` builds the training subset; :func:`matching_subset` the same classes from another
  split (matched by class name, ``min(n_shot, available)`` each) or, from the same dataset, disjoint images.

Indices are listed class by class (new label order), ascending within a class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset

from selfsup.data.keyed import key_seed

__all__ = [
    "CLASS_MODES",
    "ClassSubset",
    "choose_classes",
    "dataset_targets",
    "matching_subset",
    "nway_nshot_indices",
    "nway_nshot_subset",
    "shot_indices",
]

ClassMode = Literal["even", "random"]
#: How :func:`choose_classes` picks classes.
CLASS_MODES: tuple[str, ...] = ("even", "random")

_CLASS_STREAM, _SHOT_STREAM = 0xC1A55, 0x5407


def _count(value: int, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or (value < 1 and value != -1):
        raise ValueError(f"{name} must be a positive integer or -1 (all), got {value!r}")
    return int(value)


def dataset_targets(dataset: Dataset) -> list[int]:
    """``dataset.targets`` as a list of ints (every selfsup dataset has it); a clear error otherwise."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise ValueError(f"{type(dataset).__name__} has no .targets; n-way n-shot subsets need labelled data")
    return torch.as_tensor(targets, dtype=torch.long).reshape(-1).tolist()


def choose_classes(num_classes: int, n_way: int, mode: ClassMode = "even", seed: int = 0) -> list[int]:
    """``n_way`` of the labels ``0 .. num_classes − 1``, increasing (see the module docstring).

    Raises ``ValueError`` when ``n_way > num_classes`` or the mode is unknown.
    """
    c = int(num_classes)
    if c < 1:
        raise ValueError(f"there are no classes to choose from (num_classes = {num_classes})")
    n = _count(n_way, "n_way")
    if n == -1:
        return list(range(c))
    if n > c:
        raise ValueError(f"n_way = {n} classes asked for, but the dataset has only {c}")
    if mode == "even":
        return [0] if n == 1 else [j * (c - 1) // (n - 1) for j in range(n)]
    if mode == "random":
        g = torch.Generator().manual_seed(key_seed(seed, _CLASS_STREAM))
        return sorted(torch.randperm(c, generator=g)[:n].tolist())
    raise ValueError(f"unknown class mode {mode!r}; valid: {', '.join(CLASS_MODES)}")


def shot_indices(
    targets: Sequence[int] | Tensor,
    classes: Sequence[int],
    n_shot: int,
    seed: int = 0,
    *,
    exclude: Optional[Sequence[int]] = None,
    strict: bool = True,
    class_names: Optional[Sequence[str]] = None,
) -> list[int]:
    """Up to ``n_shot`` seeded images of each class in ``classes`` (original labels), class by class.

    Args:
        targets: ``[N]`` label of every image.
        classes: labels to take images of, in output order.
        n_shot: images per class (``−1``: all).
        seed: with the class label, keys each class's sample.
        exclude: indices never taken (e.g. a support set, for a disjoint query set).
        strict: a class with fewer than ``n_shot`` available images is an error naming it; otherwise it
            gives ``min(n_shot, available)``.
        class_names: names for the error messages.
    """
    n_shot = _count(n_shot, "n_shot")
    t = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    allowed = torch.ones(t.numel(), dtype=torch.bool)
    if exclude is not None and len(exclude):
        allowed[torch.as_tensor(list(exclude), dtype=torch.long)] = False
    out: list[int] = []
    for c in classes:
        pool = ((t == int(c)) & allowed).nonzero().flatten()  # ascending
        if n_shot == -1:
            out.extend(pool.tolist())
            continue
        if pool.numel() < n_shot and strict:
            name = f" ('{class_names[int(c)]}')" if class_names is not None and 0 <= int(c) < len(class_names) else ""
            raise ValueError(f"class {int(c)}{name} has {pool.numel()} images available, fewer than n_shot = {n_shot}")
        g = torch.Generator().manual_seed(key_seed(seed, _SHOT_STREAM, int(c)))
        take = pool[torch.randperm(pool.numel(), generator=g)[:n_shot]]
        out.extend(sorted(take.tolist()))
    return out


def nway_nshot_indices(
    targets: Sequence[int] | Tensor,
    n_way: int,
    n_shot: int,
    *,
    classes: ClassMode = "even",
    seed: int = 0,
    num_classes: Optional[int] = None,
    class_names: Optional[Sequence[str]] = None,
) -> tuple[list[int], list[int]]:
    """``(indices, chosen classes)`` of an n-way n-shot subset.

    Args:
        targets: ``[N]`` labels.
        n_way, n_shot: classes and images per class (``−1``: all).
        classes: ``even`` or ``random`` (see :func:`choose_classes`).
        seed: class sample (``random``) and shots.
        num_classes: ``C`` (default: ``max(targets) + 1``; pass ``len(dataset.classes)``).
        class_names: for error messages.

    Returns:
        ``indices`` (class by class, ascending within a class; exactly ``n_way · n_shot`` unless ``−1``)
        and the chosen original labels (increasing).
    """
    t = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    if num_classes is None:
        if t.numel() == 0:
            raise ValueError("the dataset is empty")
        num_classes = int(t.max()) + 1
    chosen = choose_classes(num_classes, n_way, classes, seed)
    return shot_indices(t, chosen, n_shot, seed, class_names=class_names), chosen


class ClassSubset(Dataset):
    """Images ``indices`` of ``base``, classes ``class_ids`` relabelled ``0 .. len(class_ids) − 1``.

    ``subset[i] = (image, class_map[label], *rest)`` of ``base[indices[i]]``.

    Attributes:
        base: the dataset.
        indices: ``list[int]`` into ``base``.
        class_ids: original labels of the kept classes, increasing.
        classes: their names (``base.classes``), in new-label order.
        class_map: ``{original label: new label}``.
        targets: ``list[int]`` new label of each item, in the order of ``indices``.
    """

    def __init__(self, base: Dataset, indices: Sequence[int], class_ids: Sequence[int]):
        self.base = base
        self.indices = [int(i) for i in indices]
        self.class_ids = sorted(int(c) for c in class_ids)
        if len(set(self.class_ids)) != len(self.class_ids):
            raise ValueError(f"class_ids repeat a class: {list(class_ids)}")
        self.class_map = {c: j for j, c in enumerate(self.class_ids)}
        names = getattr(base, "classes", None)
        self.classes = [names[c] if names is not None else str(c) for c in self.class_ids]
        base_targets = dataset_targets(base)
        n = len(base_targets)
        bad = [i for i in self.indices if not 0 <= i < n]
        if bad:
            raise ValueError(f"indices {bad[:5]} out of range for a dataset of {n} images")
        stray = sorted({base_targets[i] for i in self.indices} - set(self.class_map))
        if stray:
            raise ValueError(f"indices hold images of classes {stray[:5]} that are not in class_ids {self.class_ids}")
        self.targets = [self.class_map[base_targets[i]] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        item = self.base[self.indices[i]]
        return (item[0], self.class_map[int(item[1])], *item[2:])

    def __repr__(self) -> str:
        return f"ClassSubset({len(self.indices)} images of {len(self.class_ids)} classes of {type(self.base).__name__})"


def nway_nshot_subset(
    dataset: Dataset, n_way: int, n_shot: int, *, classes: ClassMode = "even", seed: int = 0
) -> ClassSubset:
    """The n-way n-shot :class:`ClassSubset` of ``dataset`` (classes from ``len(dataset.classes)``)."""
    names = getattr(dataset, "classes", None)
    targets = dataset_targets(dataset)
    num = len(names) if names else None
    idx, chosen = nway_nshot_indices(
        targets, n_way, n_shot, classes=classes, seed=seed, num_classes=num, class_names=names
    )
    return ClassSubset(dataset, idx, chosen)


def matching_subset(dataset: Dataset, like: ClassSubset, n_shot: int = -1, *, seed: int = 0) -> ClassSubset:
    """The classes of ``like`` in ``dataset`` (another split), ``min(n_shot, available)`` images each.

    Classes are matched **by name** (``.classes``); a class of ``like`` that ``dataset`` lacks is an error.
    When ``dataset`` is ``like.base`` itself, ``like``'s images are excluded (a disjoint set). The new labels
    are those of ``like`` (same class, same label).
    """
    names = getattr(dataset, "classes", None)
    if names is None:
        raise ValueError(f"{type(dataset).__name__} has no .classes; cannot match the classes {like.classes}")
    where = {str(n): j for j, n in enumerate(names)}
    missing = [n for n in like.classes if str(n) not in where]
    if missing:
        raise ValueError(
            f"classes {missing[:5]} of the subset are not in the other split "
            f"({len(names)} classes: {list(names)[:5]}...)"
        )
    ids = [where[str(n)] for n in like.classes]  # same new-label order as ``like``
    if sorted(ids) != ids:
        raise ValueError("the two splits order the shared classes differently; rename or use the same class list")
    exclude = like.indices if dataset is like.base else None
    idx = shot_indices(dataset_targets(dataset), ids, n_shot, seed, exclude=exclude, strict=False, class_names=names)
    return ClassSubset(dataset, idx, ids)
