#!/usr/bin/env bash
# GPU smoke test: pretrain a few steps with batched views and bf16, then knn, linear and export, all on the
# device, then the views/s of the MIN-MMCR step (ResNet-18, 16 views x 64 images); then the ViT track: MAE, CAN and
# IMLE cpu-small recipes a few steps each on the device (IMLE: 2 planned epochs with the code search), reconstruct
# with several codes, few-shot, the kept-token encoder ratio (ViT-B/16) and the IMLE code-search throughput. Uses
# the CIFAR-10 sample shipped in the package, so it needs no download.
#   bash scripts/gpu_smoke.sh                 # on a CUDA machine
#   DEVICE=cpu STEPS=3 bash scripts/gpu_smoke.sh   # the same path on a CPU (what CI can run)
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-30}
OUT=${SMOKE_DIR:-$(mktemp -d)}
ACCEL=$([ "$DEVICE" = cuda ] && echo gpu || echo cpu)
PREC=$([ "$DEVICE" = cuda ] && echo bf16-mixed || echo 32-true)
python - <<PY
import torch
print("torch", torch.__version__, "cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
assert "$DEVICE" != "cuda" or torch.cuda.is_available(), "DEVICE=cuda but no CUDA device"
PY
set -x
selfsup pretrain --method MMCR --method.init_args.backbone '{name: resnet18, kwargs: {cifar_stem: true}}' \
  --method.init_args.projector '[512, 128]' --data.dataset demo --data.view_mode batched --data.in_memory true \
  --data.num_workers 0 --data.batch_size 64 --data.views 4 --trainer.accelerator "$ACCEL" --trainer.devices 1 \
  --trainer.precision "$PREC" --trainer.max_steps "$STEPS" --trainer.max_epochs 1 --trainer.progress_bar false \
  --monitor.every_n_epochs 1 --monitor.bank_size 1000 --monitor.test_size 500 --trainer.out_dir "$OUT/run"
selfsup knn --checkpoint "$OUT/run/checkpoints/last.ckpt" --device "$DEVICE" --data.num_workers 0 --output "$OUT/knn.json"
selfsup linear --checkpoint "$OUT/run/checkpoints/last.ckpt" --device "$DEVICE" --data.num_workers 0 --epochs 3 \
  --output "$OUT/linear.json"
selfsup export --checkpoint "$OUT/run/checkpoints/last.ckpt" --out "$OUT/export"
python scripts/step_throughput.py --device "$DEVICE" --steps "$STEPS" $([ "$DEVICE" = cuda ] || echo "--batch 16 --views 4")
VIT=(--data.dataset demo --data.num_workers 0 --trainer.accelerator "$ACCEL" --trainer.devices 1
     --trainer.precision "$PREC" --trainer.progress_bar false --monitor.every_n_epochs 0 --trainer.logger csv)
for r in mae can; do
  selfsup pretrain --config recipes/$r-cpu-small.yaml "${VIT[@]}" --trainer.max_steps "$STEPS" --trainer.out_dir "$OUT/$r"
done
selfsup pretrain --config recipes/imle-cpu-small.yaml "${VIT[@]}" --method.init_args.examples_per_epoch 512 \
  --method.init_args.init_from "$OUT/mae/checkpoints/last.ckpt" --trainer.max_epochs 2 \
  --monitor.recon_every_n_epochs 1 --monitor.recon_examples 256 --trainer.out_dir "$OUT/imle"
grep -h "epoch/codes_s\|recon" "$OUT/imle/logs/metrics.csv" | head -3 || true
selfsup reconstruct --checkpoint "$OUT/imle/checkpoints/last.ckpt" --codes 4 --device "$DEVICE" --output "$OUT/imle.png"
selfsup fewshot --checkpoint "$OUT/imle/checkpoints/last.ckpt" --device "$DEVICE" --data.num_workers 0 \
  --fewshot.episodes 100 --output "$OUT/fewshot.json"
if [ "$DEVICE" = cuda ]; then
  python bench/bench_mae_encoder.py --device cuda --batch 128 --reps 10
  python bench/bench_imle.py --throughput-only --device cuda --examples 256 --codes 64 --reps 10
fi
set +x
echo "gpu_smoke: OK ($OUT)"
