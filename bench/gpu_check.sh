#!/usr/bin/env bash
# The whole GPU check of the training path, as one command (about 9 minutes on one H200):
#
#   bash bench/gpu_check.sh [OUT_DIR]          # default OUT_DIR: bench/results/gpu
#
# 1. bench/train_bench.py at 64 px, batch 128, bf16: our ~116M UNet and our DiT (4x4 patches,
#    12 heads, 9 blocks, its width matched: 768, 121M), both torch.compile, against diffusers'
#    UNet2DConditionModel matched in parameters (eager, on folded and on raw pixels), with img/s,
#    TFLOP/s and MFU, and the data loader against what training consumes.
# 2. The train stage itself on CUDA: `t2i ingest` and `t2i embed` of the built-in set at 64 px,
#    then `t2i train` (its Prefect flow, MLflow logging, checkpoints, export) for TRAIN_STEPS steps
#    (default 300) with train.size base, batch 128, 4 data workers, eager.
# 3. bench/gpu_variants.py on those shards: fp16 with the grad scaler, the DiT, torch.compile.
# 4. (only when PARTS names it: PARTS=profile) bench/step_profile.py --profile on the compiled UNet
#    and DiT of part 1: kernel time by kind and how busy each keeps the GPU (about 5 minutes,
#    compiles included).
#
# Each part writes its log under OUT_DIR and has its own time limit (BENCH_TIMEOUT, TRAIN_TIMEOUT,
# PROFILE_TIMEOUT seconds), so a part that hangs or fails leaves the other's results. PYTHON names the interpreter
# (default python3); the project and its dependencies must import there (pip install -e '.[test]').
# PARTS (default bench,train,variants) picks parts; TRAIN_ARGS and BENCH_ARGS add arguments; DITS
# (space-separated --dit specs, default "patch=4,heads=12,depth=9") picks the DiTs part 1 times: several
# shapes in one run, e.g. the MFU candidates
#   PARTS=bench BENCH_TIMEOUT=540 BENCH_ARGS="--arch diffusers,dit" DITS="patch=4,heads=12,depth=9 patch=4,heads=16,depth=5 patch=4,heads=18,depth=4" bash bench/gpu_check.sh
# (each more DiT adds about a minute, its compile included); IMAGE_SIZE, N_TRAIN, TRAIN_SIZE change part 2 (a CPU smoke run:
# PARTS=train IMAGE_SIZE=16 N_TRAIN=500 TRAIN_SIZE=tiny TRAIN_STEPS=4 bash bench/gpu_check.sh /tmp/x).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 PREFECT_UI_ENABLED=false
export PREFECT_SERVER_ANALYTICS_ENABLED=false
steps=${TRAIN_STEPS:-300}
parts=${PARTS:-bench,train,variants}
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$out/gpu.txt"
lscpu | grep -m1 "Model name" | tee -a "$out/gpu.txt"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

if [[ $parts == *bench* ]]; then
echo "== 1. bench/train_bench.py (64 px, ~110M, bf16, batch 128)"
dit_args=()
for spec in ${DITS:-patch=4,heads=12,depth=9}; do dit_args+=(--dit "$spec"); done
timeout "${BENCH_TIMEOUT:-330}" "$py" bench/train_bench.py --device cuda --preset 100m --sizes 64 --batch 128 \
    "${dit_args[@]}" \
    --compile --diffusers-pixels --steps 20 --warmup 3 --loader-workers 4 ${BENCH_ARGS:-} --out "$out/train-gpu.json" 2>&1 \
    | tee "$out/train-bench.log"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "bench: failed"; status=1; }
fi
if [[ $parts == *profile* ]]; then
echo "== 4. bench/step_profile.py: where the compiled UNet's and DiT's step time goes"
timeout "${PROFILE_TIMEOUT:-420}" "$py" bench/step_profile.py --device cuda --size 64 --batch 128 --profile --top 15 \
    --variant unet-compiled=train.unet.patch=2,train.compile=true \
    --variant dit-compiled=train.denoiser=dit,train.compile=true,train.dit.patch=4,train.dit.width=768,train.dit.heads=12,train.dit.depth=9 \
    --out "$out/step-profile.json" 2>&1 | tee "$out/step-profile.log"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "profile: failed"; status=1; }
fi
[[ $parts == *train* ]] || exit $status

size=${IMAGE_SIZE:-64}
echo "== 2. t2i ingest / embed / train ($size px, train.size ${TRAIN_SIZE:-base}, $steps steps)"
work=$(mktemp -d)
set_=(-s dataset.image_size=$size -s dataset.n_train=${N_TRAIN:-8000} -s dataset.n_val=200 -s ingest.workers=8 -s ingest.samples_per_shard=1000
      -s mlflow.tracking_uri="sqlite:///$work/mlflow.db")
train_=(-s train.size=${TRAIN_SIZE:-base} -s train.steps="$steps" -s train.batch_size=128 -s train.data_workers=4
        -s train.warmup_steps=50 -s train.log_every=50 -s train.checkpoint_every=100 -s train.keep_checkpoints=2
        ${TRAIN_ARGS:-})
(
  set -e
  "$py" -m flows.cli ingest --out "$work/shards" "${set_[@]}"
  "$py" -m flows.cli embed --shards "$work/shards" --out "$work/embeddings" "${set_[@]}"
  t0=$(date +%s)
  timeout "${TRAIN_TIMEOUT:-240}" "$py" -m flows.cli train --shards "$work/shards" --embeddings "$work/embeddings" \
      --out "$work/model" "${set_[@]}" "${train_[@]}"
  echo "t2i train: $(( $(date +%s) - t0 )) s wall (Prefect flow start, model build, $steps steps, grid, export)"
  ls -la "$work/model"
  "$py" - "$work" <<'EOF'
import json, sqlite3, sys
from pathlib import Path
work = Path(sys.argv[1])
meta = json.loads((work / "model" / "model.json").read_text())
print("model.json:", {k: meta.get(k) for k in ("steps_done", "params", "device", "train_seconds", "train_img_per_s")})
db = sqlite3.connect(work / "mlflow.db")
for key, step, value in db.execute("select key, step, value from metrics where key in "
                                   "('loss', 'img_per_s', 'data_wait_fraction', 'grad_norm') order by key, step"):
    print(f"mlflow {key:20s} step {step:4d}: {value:.4g}")
EOF
) 2>&1 | tee "$out/t2i-train.log"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "t2i train: failed"; status=1; }

[[ $parts == *variants* ]] || { rm -rf "$work"; exit $status; }
echo "== 3. the loop's other CUDA paths on the same shards: fp16 + grad scaler, DiT, torch.compile"
timeout "${VARIANTS_TIMEOUT:-150}" "$py" bench/gpu_variants.py "$work/shards" "$work/embeddings" \
    --steps "${VARIANT_STEPS:-60}" --out "$work/variants" 2>&1 | tee "$out/variants.log"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "variants: failed"; status=1; }
rm -rf "$work"
exit $status
