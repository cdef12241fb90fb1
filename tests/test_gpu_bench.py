"""``scripts/gpu_bench.sh`` runs end to end on the CPU (``DEVICE=cpu``: tiny shapes, 2 timed steps, the CIFAR-10 sample
shipped in the package) and its JSON summary holds real measurements: a step-bench row for every registered method
(engine and bare-loop views/s, their ratio, and the two loops ending on the same weights) and a kNN figure after a
time-to-accuracy run that trained."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from selfsup.methods import available_methods

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "STEPS": "2",
        "WARMUP": "1",
        "TTA_SECONDS": "5",
        "PROBE_STEPS": "4",
        "OMP_NUM_THREADS": "1",
        "OUT_DIR": str(out),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # this python, its selfsup
    }
    env.pop("ZIP", None)  # the demo sample, as on a fresh clone
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts/gpu_bench.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "gpu_bench.json").read_text())
    assert summary["device"] == "cpu"

    rows = {r["method"]: r for r in summary["step_bench"]["rows"]}
    assert sorted(rows) == available_methods()
    for name, r in rows.items():
        assert "error" not in r, f"{name}: {r.get('error')}"
        assert r["engine_views_s"] > 0 and r["bare_views_s"] > 0, r
        assert math.isclose(r["ratio"], r["engine_views_s"] / r["bare_views_s"], rel_tol=1e-9), r
        assert r["engine_views_s"] == r["engine_steps_s"] * r["views_per_step"], r
        assert r["device"].startswith("cpu") and r["steps"] == 2 and r["warmup"] == 1, r
        # the bare loop does the engine's math: on the CPU in fp32 both end on the same weights, which training moved
        assert r["max_param_change"] > 0, f"{name}: training did not move the weights"
        assert r["max_param_diff"] <= 1e-6, f"{name}: engine and bare loop weights differ by {r['max_param_diff']}"
        assert f"{name:<12} engine" in proc.stdout  # the printed table

    tta = summary["tta"]
    assert tta["dataset"] == "demo" and tta["device"] == "cpu"
    assert tta["steps_trained"] >= 1 and tta["steps_trained"] <= tta["max_steps"]
    assert 0 < tta["knn_top1"] < 100
    assert (tta["knn_k"], tta["knn_temperature"]) == (200, 0.5)
    assert (tta["knn_bank"], tta["knn_test"]) == (4000, 1000)
    assert "time to accuracy" in proc.stdout and "kNN top-1" in proc.stdout
