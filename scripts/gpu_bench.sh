#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one run: the clustering step (ours vs the SpCL-style one) at
# DukeMTMC-reID and MSMT17 sizes, Market-sized re-ranking, the UDA training step alone, the two data
# pipelines, and the stages' speed (pretrain and one adaptation epoch, ResNet-50 from scratch, bf16 +
# channels_last) on the full-size synthetic domains.
#
#   bash scripts/gpu_bench.sh [OUT_DIR]      (about 9 minutes on one H100)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_bench}
mkdir -p "$out"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
"$PY" -c "import torch; print('torch', torch.__version__)" | tee -a "$out/device.txt"

"$PY" scripts/bench_cluster.py --n 16522 --dim 2048 --device cuda --variants ours,spcl | tee "$out/cluster_duke.txt"
"$PY" scripts/bench_cluster.py --n 126441 --dim 2048 --device cuda --variants ours | tee "$out/cluster_msmt.txt"
"$PY" scripts/bench_rerank.py --q 3368 --g 19732 --dim 2048 --device cuda | tee "$out/rerank.txt"

"$PY" scripts/bench_train_step.py | tee "$out/train_step.txt"

export UDA_DATA="$out/data"
PYTHON="$PY" bash scripts/bench_pipeline.sh configs/pretrain/market.yaml synth_market 3 \
  --opts data.synth_preset=full data.num_workers=12 model.pretrained=none | tee "$out/pipeline.txt"
speed=(train.amp=true train.channels_last=true data.num_workers=12 data.synth_preset=full)
"$PY" uda/pretrain.py --config configs/pretrain/market.yaml --source synth_market --target synth_duke --pretrained none \
  --output-dir "$out/pretrain" --opts optim.epochs=6 optim.warmup_epochs=2 train.eval_every=6 "${speed[@]}" 2>&1 | tee "$out/pretrain.txt"
"$PY" uda/adapt.py --source synth_market --target synth_duke --init "$out/pretrain/model_final.pth" \
  --output-dir "$out/adapt" --opts optim.epochs=1 adapt.iters=100 model.backbone=resnet50 "${speed[@]}" 2>&1 | tee "$out/adapt.txt" || true
