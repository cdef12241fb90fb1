r"""IMLE code selection: keep, per example, the latent code with the smallest loss (spec §3.2).

Implicit Maximum Likelihood Estimation trains a generator so that every data point has *some*
nearby sample. IMLE-SSL scores ``K = ns`` random codes per example with the per-example masked
reconstruction loss and trains on the best one. The codes are drawn and scored in rounds of ``sp``
codes (one forward pass each, ``ns / sp`` rounds):

    scores[n, k] = loss of example n under code k,   k = r·sp + j  (round r, slot j)     [N, K]

    within round r:  k*_r = first argmin_j scores[n, r·sp + j]
    across rounds:   the incumbent (start: index 0, score +inf) is replaced by k*_r
                     only when scores[n, k*_r] < incumbent score   (strictly smaller)

Because the incumbent values decrease strictly, the final incumbent is the first round that attains
the row minimum, and inside it the first slot: the selection is exactly the **first occurrence of
the minimum over all K codes in drawing order**, whatever ``sp`` is. Both the streamed form
(:func:`imle_update`, :class:`IMLEIncumbent`: one round at a time, as the search runs) and the
one-shot form (:func:`imle_select`) implement the rule above and agree exactly.

Scores:

* ``+inf`` is allowed and means "no usable score" (e.g. an fp16 overflow): it never beats anything,
  so a row that is ``+inf`` everywhere keeps index 0 with score ``+inf`` (callers can test
  ``best_score.isinf()``);
* ``NaN`` and ``-inf`` are errors (``FloatingPointError`` naming the rows): a loss cannot be ``-inf``,
  and a NaN would silently win or lose depending on the comparison.

Comparisons are exact floating-point comparisons on the given dtype; nothing is upcast or rounded.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["IMLEIncumbent", "IMLEUpdate", "imle_select", "imle_update", "repeat_examples"]


def repeat_examples(x: Tensor, k: int) -> Tensor:
    """``[N, ...] -> [N·k, ...]``, example-major: rows ``i·k .. i·k + k − 1`` are copies of row ``i``.

    The layout in which one forward pass scores ``k`` codes per example (spec §3.1 "Shapes"); the codes
    for that pass are ``[N·k, ...]`` in the same order and the scores reshape to ``[N, k]``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"repeat_examples expects a tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("repeat_examples needs a tensor with a leading example axis, got a 0-d tensor")
    if int(k) != k or k < 1:
        raise ValueError(f"repeat_examples: k (codes per example) must be a positive integer, got {k}")
    return x.repeat_interleave(int(k), dim=0)


def _check_scores(scores: Tensor, name: str) -> None:
    if not isinstance(scores, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"{name} must be [N, K] (examples, codes), got shape {tuple(scores.shape)}")
    if scores.shape[1] == 0:
        raise ValueError(f"{name} has no codes: shape {tuple(scores.shape)} [N, K]")
    if not scores.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {scores.dtype}")
    bad = torch.isnan(scores) | (scores == float("-inf"))
    if bool(bad.any()):
        rows = bad.any(dim=1).nonzero().flatten().tolist()
        raise FloatingPointError(
            f"{name} holds NaN or -inf in rows {rows[:10]}{' ...' if len(rows) > 10 else ''} "
            f"(shape {tuple(scores.shape)}); a code's loss must be finite or +inf"
        )


def _first_argmin(scores: Tensor) -> tuple[Tensor, Tensor]:
    """``(min [N], first index attaining it [N] int64)`` of ``scores [N, K]``; an all-+inf row gives index 0.

    Written out (not ``torch.argmin``) so the tie rule does not depend on the device's kernel.
    """
    values = scores.min(dim=1).values  # [N]
    k = scores.shape[1]
    slots = torch.arange(k, device=scores.device).expand_as(scores)
    hit = scores == values[:, None]  # an all-+inf row: inf == inf, every slot hits, slot 0 wins
    idx = torch.where(hit, slots, torch.full_like(slots, k)).min(dim=1).values
    return values, idx.long()


class IMLEUpdate(NamedTuple):
    """The incumbent after one round.

    Attributes:
        best_idx: ``[N]`` int64 index of each example's best code among all codes drawn so far.
        best_score: ``[N]`` its score.
        improved: ``[N]`` bool, True where this round replaced the incumbent (strictly smaller).
        round_idx: ``[N]`` int64 first argmin inside this round (slot ``0 .. sp − 1``), improved or not.
    """

    best_idx: Tensor
    best_score: Tensor
    improved: Tensor
    round_idx: Tensor


def imle_update(best_idx: Tensor, best_score: Tensor, round_scores: Tensor, round_offset: int) -> IMLEUpdate:
    r"""Apply one round of ``sp`` codes to the incumbent (pure: new tensors, inputs untouched).

    ``j* = first argmin_j round_scores[n, j]``; where ``round_scores[n, j*] < best_score[n]``
    (strictly) the incumbent becomes ``(round_offset + j*, round_scores[n, j*])``.

    Args:
        best_idx: ``[N]`` int64 incumbent indices (start: zeros).
        best_score: ``[N]`` incumbent scores (start: ``+inf``), same dtype as ``round_scores``.
        round_scores: ``[N, sp]`` scores of this round's codes, in the order drawn.
        round_offset: index of this round's first code among all codes (``r · sp``).

    Returns:
        :class:`IMLEUpdate` ``(best_idx, best_score, improved, round_idx)``.
    """
    _check_scores(round_scores, "round_scores")
    n = round_scores.shape[0]
    if best_idx.shape != (n,) or best_score.shape != (n,):
        raise ValueError(
            f"best_idx and best_score must be [N] = [{n}] for round_scores {tuple(round_scores.shape)}; "
            f"got {tuple(best_idx.shape)} and {tuple(best_score.shape)}"
        )
    if int(round_offset) < 0:
        raise ValueError(f"round_offset must be >= 0, got {round_offset}")
    if bool(torch.isnan(best_score).any()):
        raise FloatingPointError("best_score holds NaN; start from +inf")
    values, slot = _first_argmin(round_scores)
    improved = values < best_score.to(values.dtype)
    new_idx = torch.where(improved, slot + int(round_offset), best_idx.long())
    new_score = torch.where(improved, values, best_score.to(values.dtype))
    return IMLEUpdate(new_idx, new_score, improved, slot)


def imle_select(scores: Tensor, sp: int) -> tuple[Tensor, Tensor]:
    r"""Best code per example over rounds of ``sp`` consecutive codes (see the module docstring).

    Args:
        scores: ``[N, K]`` loss of example ``n`` under code ``k``, codes in the order drawn; ``K`` a
            multiple of ``sp``. Finite or ``+inf``.
        sp: codes per round.

    Returns:
        ``(best_idx [N] int64, best_score [N])``: within a round the first minimum wins; a later round
        replaces the incumbent only when strictly smaller. Equal to applying :func:`imle_update` round
        by round from ``(0, +inf)``, and to the first occurrence of each row's minimum.

    Raises:
        ValueError: ``scores`` is not 2-D, has no codes, or ``K`` is not a positive multiple of ``sp``.
        TypeError: ``scores`` is not floating point.
        FloatingPointError: NaN or ``-inf`` in ``scores``.
    """
    _check_scores(scores, "scores")
    k = scores.shape[1]
    if int(sp) != sp or sp < 1:
        raise ValueError(f"sp (codes per round) must be a positive integer, got {sp}")
    if k % int(sp):
        raise ValueError(f"scores has K = {k} codes, not a multiple of sp = {sp} (rounds of sp codes)")
    rounds = scores.reshape(scores.shape[0], k // int(sp), int(sp))  # [N, R, sp]
    round_min, round_slot = _first_argmin(rounds.flatten(0, 1))  # [N·R]
    round_min = round_min.view(-1, k // int(sp))  # [N, R]
    round_slot = round_slot.view(-1, k // int(sp))
    # Strict replacement across rounds = the first round attaining the minimum of the round minima.
    best_score, best_round = _first_argmin(round_min)
    best_idx = best_round * int(sp) + round_slot.gather(1, best_round[:, None]).squeeze(1)
    return best_idx, best_score


class IMLEIncumbent:
    """The running best code of ``N`` examples while rounds are scored one forward pass at a time.

    ::

        inc = IMLEIncumbent(n, device)
        for r in range(ns // sp):
            z = draw codes [N, sp, ...]; s = scores [N, sp]
            inc.update(s, z)
        inc.idx, inc.score, inc.codes      # [N], [N], [N, ...]

    ``codes`` holds each example's best code (a copy). Before any improvement a row holds its first
    round's slot-0 code, matching ``idx = 0`` (all-``+inf`` rows keep it). ``update`` infers each round's
    offset from the codes seen so far; :attr:`rounds` and :attr:`seen` count them.
    """

    def __init__(self, n: int, device: Optional[torch.device | str] = None, dtype: torch.dtype = torch.float32):
        if int(n) != n or n < 0:
            raise ValueError(f"IMLEIncumbent needs a number of examples n >= 0, got {n}")
        self.idx = torch.zeros(int(n), dtype=torch.long, device=device)
        self.score = torch.full((int(n),), float("inf"), dtype=dtype, device=device)
        self.codes: Optional[Tensor] = None
        self.seen = 0
        self.rounds = 0

    def update(self, round_scores: Tensor, round_codes: Optional[Tensor] = None) -> Tensor:
        """Apply one round: ``round_scores [N, sp]`` and optionally its codes ``[N, sp, ...]``.

        Returns the ``[N]`` bool mask of rows whose incumbent this round replaced.
        """
        if round_codes is not None:
            if round_codes.dim() < 2 or tuple(round_codes.shape[:2]) != tuple(round_scores.shape):
                raise ValueError(
                    f"round_codes must be [N, sp, ...] matching round_scores {tuple(round_scores.shape)}, "
                    f"got {tuple(round_codes.shape)}"
                )
            if self.rounds and self.codes is None:
                raise ValueError("codes must be given with every round or with none")
        elif self.codes is not None:
            raise ValueError("codes must be given with every round or with none")
        res = imle_update(self.idx, self.score.to(round_scores.dtype), round_scores, self.seen)
        if round_codes is not None:
            if self.codes is None:
                self.codes = round_codes[:, 0].detach().clone()
            rows = res.improved.nonzero().flatten()
            self.codes[rows] = round_codes[rows, res.round_idx[rows]].detach().to(self.codes.dtype)
        self.idx, self.score = res.best_idx, res.best_score
        self.seen += round_scores.shape[1]
        self.rounds += 1
        return res.improved
