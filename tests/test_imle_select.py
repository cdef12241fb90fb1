"""IMLE code selection: first minimum inside a round, strictly smaller to replace across rounds (spec §3.2)."""

from __future__ import annotations

import math

import pytest
import torch

from selfsup.losses import IMLEIncumbent, imle_select, imle_update, repeat_examples

INF = math.inf


def _reference(scores: list[list[float]], sp: int) -> tuple[list[int], list[float]]:
    """The seeds' loop, written out: incumbent (random code, +inf); per round first argmin; replace if <."""
    out_i, out_s = [], []
    for row in scores:
        best_i, best_s = 0, INF
        for r in range(len(row) // sp):
            chunk = row[r * sp : (r + 1) * sp]
            j = min(range(sp), key=lambda t: (chunk[t], t))
            if chunk[j] < best_s:
                best_i, best_s = r * sp + j, chunk[j]
        out_i.append(best_i)
        out_s.append(best_s)
    return out_i, out_s


def test_hand_cases_ties_inside_and_across_rounds():
    scores = torch.tensor(
        [
            [3.0, 1.0, 1.0, 2.0, 5.0, 4.0],  # tie inside round 0 (slots 1, 2): the first, index 1
            [2.0, 4.0, 3.0, 2.0, 9.0, 2.0],  # 2.0 in rounds 0, 1, 2: never strictly smaller, keep index 0
            [5.0, 6.0, 7.0, 4.0, 1.0, 0.5],  # strictly smaller every round: round 2, slot 1 -> index 5
            [1.0, 0.5, 0.5, 0.25, 0.25, 9.0],  # round 1 (0.5, 0.25) beats 0.5, round 2 ties 0.25: index 3
        ]
    )
    idx, best = imle_select(scores, sp=2)
    assert idx.dtype == torch.int64
    assert idx.tolist() == [1, 0, 5, 3]
    assert best.tolist() == [1.0, 2.0, 0.5, 0.25]
    # sp = 3: rounds [0:3], [3:6]
    idx3, best3 = imle_select(scores, sp=3)
    assert idx3.tolist() == [1, 0, 5, 3]
    assert best3.tolist() == [1.0, 2.0, 0.5, 0.25]
    assert (idx.tolist(), best.tolist()) == _reference(scores.tolist(), 2)


def test_round_boundary_matters_only_through_the_rule():
    # one round of 4: first minimum is slot 1; the same scores in rounds of 1 give the same answer
    # (the incumbent is replaced only by strictly smaller values), so the result is the first argmin.
    s = torch.tensor([[7.0, 3.0, 3.0, 3.0]])
    for sp in (1, 2, 4):
        assert imle_select(s, sp)[0].tolist() == [1]


def test_inf_never_wins_and_an_all_inf_row_keeps_index_zero():
    s = torch.tensor([[INF, INF, 2.0, INF], [INF, INF, INF, INF]])
    idx, best = imle_select(s, 2)
    assert idx.tolist() == [2, 0]
    assert best[0].item() == 2.0 and math.isinf(best[1].item())


def test_matches_the_seed_loop_on_random_scores_with_many_ties():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 4, (64, 12), generator=g).float()  # values 0..3: ties everywhere
    for sp in (1, 2, 3, 4, 6, 12):
        idx, best = imle_select(s, sp)
        ref_i, ref_s = _reference(s.tolist(), sp)
        assert idx.tolist() == ref_i and best.tolist() == ref_s


def test_streamed_rounds_equal_the_one_shot_selection_and_carry_the_codes():
    g = torch.Generator().manual_seed(1)
    n, sp, rounds = 5, 3, 4
    scores = torch.randint(0, 3, (n, sp * rounds), generator=g).float()
    codes = torch.randn(n, sp * rounds, 2, 7, generator=g)  # [N, K, W, d]
    inc = IMLEIncumbent(n)
    improved_any = torch.zeros(n, dtype=torch.bool)
    for r in range(rounds):
        sl = slice(r * sp, (r + 1) * sp)
        improved_any |= inc.update(scores[:, sl], codes[:, sl])
    idx, best = imle_select(scores, sp)
    assert torch.equal(inc.idx, idx) and torch.equal(inc.score, best)
    assert torch.equal(inc.codes, codes[torch.arange(n), idx])
    assert inc.rounds == rounds and inc.seen == sp * rounds and bool(improved_any.all())


def test_imle_update_is_pure_and_reports_improvement():
    best_i = torch.tensor([4, 0])
    best_s = torch.tensor([1.0, 5.0])
    res = imle_update(best_i, best_s, torch.tensor([[1.0, 2.0], [3.0, 3.0]]), round_offset=6)
    assert res.best_idx.tolist() == [4, 6]  # row 0: 1.0 is not < 1.0; row 1: first 3.0 -> 6 + 0
    assert res.best_score.tolist() == [1.0, 3.0]
    assert res.improved.tolist() == [False, True] and res.round_idx.tolist() == [0, 0]
    assert best_i.tolist() == [4, 0] and best_s.tolist() == [1.0, 5.0]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="multiple of sp = 4"):
        imle_select(torch.zeros(2, 6), 4)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        imle_select(torch.zeros(6), 2)
    with pytest.raises(ValueError, match="positive integer"):
        imle_select(torch.zeros(2, 6), 0)
    with pytest.raises(TypeError, match="floating-point"):
        imle_select(torch.zeros(2, 6, dtype=torch.long), 2)
    with pytest.raises(FloatingPointError, match=r"rows \[1\]"):
        imle_select(torch.tensor([[1.0, 2.0], [math.nan, 0.0]]), 1)
    with pytest.raises(FloatingPointError, match="-inf"):
        imle_select(torch.tensor([[1.0, -INF]]), 1)
    with pytest.raises(ValueError, match="codes must be given with every round"):
        inc = IMLEIncumbent(1)
        inc.update(torch.zeros(1, 2), torch.zeros(1, 2, 3))
        inc.update(torch.zeros(1, 2))


def test_repeat_examples_is_example_major():
    x = torch.tensor([[1, 1], [2, 2]])
    assert repeat_examples(x, 3).tolist() == [[1, 1], [1, 1], [1, 1], [2, 2], [2, 2], [2, 2]]
    with pytest.raises(ValueError, match="positive integer"):
        repeat_examples(x, 0)
