#!/usr/bin/env bash
# GPU bench (at most 8 minutes on one GPU with the defaults):
#  (1) views/s of every registered method's training step through selfsup's engine (Lightning) against a bare
#      PyTorch loop doing the same math on the same device, same process (bench/bench_methods_step.py; goal:
#      ratio >= 0.9);
#  (2) time to accuracy: the SimCLR ResNet-18 CIFAR-10 recipe (bf16, batched on-device views, in-memory data) trained
#      for TTA_SECONDS (a short probe run measures its steps/s, so that max_steps, and with it the lr schedule, spans
#      the budget; --trainer.max_time stops it in any case), then `selfsup knn` (k 200, T 0.5).
# Every figure is printed with the device name; the summary is $OUT_DIR/gpu_bench.json.
#   bash scripts/gpu_bench.sh                                  # on a CUDA machine
#   DEVICE=cpu bash scripts/gpu_bench.sh                       # the same path on a CPU: tiny sizes, demo data
#   METHODS="SimCLR MAE" TTA_SECONDS=120 OUT_DIR=/tmp/gb bash scripts/gpu_bench.sh
# Environment: DEVICE (cuda), STEPS / WARMUP (timed / untimed steps per loop: 20 / 5; cpu 2 / 1), BATCH (images per
# step of the step bench: 256; cpu 8), METHODS (default: all registered), TTA_SECONDS (300; cpu 8), TTA_RECIPE
# (simclr-cifar10), TTA_BATCH (512; cpu 32), PROBE_STEPS (40; cpu 6), ZIP (CIFAR-10 zip; default
# ../shared/datasets/cifar10-jpeg.zip where it exists, else, and always on the CPU, the CIFAR-10 sample shipped in
# the package: --data.dataset demo), OUT_DIR (default: a new temporary directory).
set -euo pipefail
if [ -n "${ZIP:-}" ]; then ZIP=$(cd "$(dirname "$ZIP")" && pwd)/$(basename "$ZIP"); fi
OUT_DIR=${OUT_DIR:-$(mktemp -d)}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.."
START=$(date +%s)
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then GPU=1; else GPU=0; fi
STEPS=${STEPS:-$([ $GPU = 1 ] && echo 20 || echo 2)}
WARMUP=${WARMUP:-$([ $GPU = 1 ] && echo 5 || echo 1)}
BATCH=${BATCH:-}
METHODS=${METHODS:-}
TTA_SECONDS=${TTA_SECONDS:-$([ $GPU = 1 ] && echo 300 || echo 8)}
TTA_RECIPE=${TTA_RECIPE:-simclr-cifar10}
TTA_BATCH=${TTA_BATCH:-$([ $GPU = 1 ] && echo 512 || echo 32)}
PROBE_STEPS=${PROBE_STEPS:-$([ $GPU = 1 ] && echo 40 || echo 6)}
ACCEL=$([ $GPU = 1 ] && echo gpu || echo cpu)
PREC=$([ $GPU = 1 ] && echo bf16-mixed || echo 32-true)
if [ $GPU = 0 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny tensors: more threads only add synchronisation
fi
if [ -z "${ZIP:-}" ] && [ $GPU = 1 ] && [ -f ../shared/datasets/cifar10-jpeg.zip ]; then
  ZIP=$(cd ../shared/datasets && pwd)/cifar10-jpeg.zip
fi
if [ -n "${ZIP:-}" ]; then
  [ -f "$ZIP" ] || { echo "gpu_bench: ZIP=$ZIP does not exist" >&2; exit 2; }
  DATA=(--data.dataset cifar10 --data.root "$ZIP")
else
  DATA=(--data.dataset demo)
fi
GPU_NAME=$(python - <<PY
import torch
assert "$DEVICE" != "cuda" or torch.cuda.is_available(), "DEVICE=cuda but no CUDA device"
print(torch.cuda.get_device_name(0) if "$DEVICE" == "cuda" else "cpu")
PY
)
echo "gpu_bench on $GPU_NAME (DEVICE=$DEVICE), torch $(python -c 'import torch; print(torch.__version__)'), out: $OUT_DIR"

# (1) the step bench: engine vs bare loop, every registered method (or METHODS)
STEP_RC=0
# shellcheck disable=SC2086  # METHODS is a list of names
python bench/bench_methods_step.py --device "$DEVICE" --steps "$STEPS" --warmup "$WARMUP" \
  ${BATCH:+--batch "$BATCH"} ${METHODS:+--methods $METHODS} --json "$OUT_DIR/steps.json" || STEP_RC=$?

# (2) time to accuracy
TTA=(--config "$TTA_RECIPE" "${DATA[@]}" --data.view_mode batched --data.in_memory true --data.num_workers 0
     --data.batch_size "$TTA_BATCH" --trainer.accelerator "$ACCEL" --trainer.devices 1 --trainer.precision "$PREC"
     --trainer.channels_last true --trainer.save_every_n_epochs 1000000 --trainer.logger csv
     --trainer.progress_bar lines --monitor.every_n_epochs 0 --monitor.spectrum_every_n_steps 0)
if [ $GPU = 0 ]; then  # tiny network on the CPU
  TTA+=(--method.init_args.backbone '{name: resnet10, kwargs: {cifar_stem: true, width: 8}}'
        --method.init_args.projector '[64, 32]')
fi
set -x
selfsup pretrain "${TTA[@]}" --trainer.max_steps "$PROBE_STEPS" \
  --trainer.log_every_n_steps $(( PROBE_STEPS / 2 > 0 ? PROBE_STEPS / 2 : 1 )) \
  --trainer.out_dir "$OUT_DIR/tta-probe" 2>&1 | tee "$OUT_DIR/tta-probe.log"
set +x
# the rate of the probe's last interval (after cuDNN autotuning and the first allocations)
RATE=$(grep -o '[0-9.]* steps/s' "$OUT_DIR/tta-probe.log" | tail -1 | cut -d' ' -f1)
[ -n "$RATE" ] || { echo "gpu_bench: no steps/s line in the probe's output" >&2; exit 1; }
MAX_STEPS=$(python -c "print(max(1, int($RATE * $TTA_SECONDS * 0.95)))")
MAX_TIME=$(printf '00:%02d:%02d:%02d' $(( TTA_SECONDS / 3600 )) $(( TTA_SECONDS % 3600 / 60 )) $(( TTA_SECONDS % 60 )))
echo "gpu_bench: probe $RATE steps/s on $GPU_NAME -> max_steps $MAX_STEPS, max_time $MAX_TIME"
T0=$(date +%s.%N)
set -x
selfsup pretrain "${TTA[@]}" --trainer.max_steps "$MAX_STEPS" --trainer.max_time "$MAX_TIME" \
  --trainer.log_every_n_steps $(( MAX_STEPS / 20 > 0 ? MAX_STEPS / 20 : 1 )) --trainer.out_dir "$OUT_DIR/tta"
set +x
T1=$(date +%s.%N)
selfsup knn --checkpoint "$OUT_DIR/tta/checkpoints/last.ckpt" --device "$DEVICE" --data.in_memory true \
  --data.num_workers 0 --k 200 --temperature 0.5 --output "$OUT_DIR/tta-knn.json"

python - "$OUT_DIR" <<PY
import json, sys
from pathlib import Path

import torch

out = Path(sys.argv[1])
steps = json.loads((out / "steps.json").read_text()) if (out / "steps.json").exists() else {"rows": []}
knn = json.loads((out / "tta-knn.json").read_text())
trained = int(torch.load(out / "tta/checkpoints/last.ckpt", map_location="cpu", weights_only=True)["global_step"])
tta = {
    "device": "$GPU_NAME",
    "recipe": "$TTA_RECIPE",
    "dataset": knn["dataset"],
    "data_root": "${ZIP:-}" or None,
    "batch": $TTA_BATCH,
    "precision": "$PREC",
    "budget_s": $TTA_SECONDS,
    "probe_steps_s": $RATE,
    "max_steps": $MAX_STEPS,
    "steps_trained": trained,
    "stopped_by": "max_steps" if trained >= $MAX_STEPS else "max_time",
    "pretrain_wall_s": round($T1 - $T0, 1),
    "knn_top1": knn["top1"],
    "knn_top5": knn["top5"],
    "knn_k": knn["k"],
    "knn_temperature": knn["temperature"],
    "knn_bank": knn["bank"],
    "knn_test": knn["test"],
    "run_dir": str(out / "tta"),
}
summary = {"device": "$GPU_NAME", "torch": torch.__version__, "step_bench": steps, "tta": tta}
(out / "gpu_bench.json").write_text(json.dumps(summary, indent=2))
print("\ngpu_bench summary [$GPU_NAME]")
for r in steps["rows"]:
    if "error" in r:
        print(f"  {r['method']:<12} FAILED: {r['error']}")
    else:
        print(
            f"  {r['method']:<12} engine {r['engine_views_s']:>10.1f} views/s  bare {r['bare_views_s']:>10.1f} views/s"
            f"  ratio {r['ratio']:.3f}  [{r['device']}, {r['precision']}]"
        )
print(
    f"  time to accuracy: {tta['recipe']} on {tta['dataset']}, {tta['steps_trained']} steps in a {tta['budget_s']} s "
    f"budget ({tta['stopped_by']}): kNN top-1 {tta['knn_top1']:.2f}% (k 200, T 0.5, {tta['knn_bank']} bank / "
    f"{tta['knn_test']} test) [$GPU_NAME]"
)
print(f"  summary: {out / 'gpu_bench.json'}")
PY
ELAPSED=$(( $(date +%s) - START ))
echo "gpu_bench: done in $ELAPSED s on $GPU_NAME"
if [ $GPU = 1 ] && [ "$ELAPSED" -gt 480 ]; then echo "gpu_bench: WARNING: over the 8-minute bound ($ELAPSED s)" >&2; fi
exit "$STEP_RC"
