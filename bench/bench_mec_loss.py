"""Bench: forward+backward time of ``mec_loss`` in the m×m form against the d×d form.

Both forms give the same value (tr((P̂Ẑᵀ)^k) = tr((ẐᵀP̂)^k)); the cost of the
K = 4 series is one product forming the n×n matrix (2·m·d·n flops) plus one
n×n×n product, n = m (m×m form) or d (d×d form), per pair, and about twice
that again backward. The automatic choice takes n = min(m, d).

    python bench/bench_mec_loss.py [--shapes 1024x2048 4096x512] [--reps 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from selfsup.losses.mec import choose_form, mec_loss


def time_form(inputs: list[torch.Tensor], form: str, reps: int) -> tuple[float, float]:
    """Median seconds of forward+backward over ``reps`` runs (after one warm-up) and the loss value."""
    times, value = [], float("nan")
    for i in range(reps + 1):
        for t in inputs:
            t.grad = None
        t0 = time.perf_counter()
        loss = mec_loss(*inputs, eps_sq=64.0, order=4, lamda_inv=None, return_parts=False, form=form)
        loss.backward()
        dt = time.perf_counter() - t0
        value = loss.item()
        if i:  # the first run is a warm-up
            times.append(dt)
    return statistics.median(times), value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["1024x2048", "4096x512"], help="m x d pairs")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU, order 4, "
        f"median of {args.reps} (after 1 warm-up), forward+backward, teacher given (4 inputs, grads on z1, z2)"
    )
    for shape in args.shapes:
        m, d = (int(v) for v in shape.lower().split("x"))
        g = torch.Generator().manual_seed(0)
        z1, z2, p1, p2 = (torch.randn(m, d, generator=g) for _ in range(4))
        z1.requires_grad_(True)
        z2.requires_grad_(True)
        inputs = [z1, z2, p1, p2]
        t_mm, v_mm = time_form(inputs, "mm", args.reps)
        t_dd, v_dd = time_form(inputs, "dd", args.reps)
        auto = choose_form(m, d)
        rel = abs(v_mm - v_dd) / max(abs(v_mm), 1e-30)
        print(
            f"m={m:5d} d={d:5d}: m×m {t_mm * 1e3:8.1f} ms   d×d {t_dd * 1e3:8.1f} ms   "
            f"d×d/m×m = {t_dd / t_mm:5.2f}   loss m×m {v_mm:.7f} d×d {v_dd:.7f} (rel diff {rel:.1e})   "
            f"auto picks {'m×m' if auto == 'mm' else 'd×d'} "
            f"({'faster' if (t_mm <= t_dd) == (auto == 'mm') else 'SLOWER'})"
        )


if __name__ == "__main__":
    main()
