#!/usr/bin/env bash
# The two data pipelines on the same pretrain run, one after the other: data.pipeline=loader (PIL +
# torchvision transforms per image in DataLoader workers) vs data.pipeline=device (images resized once,
# whole batches augmented where the model trains). Prints the median epoch time and the evaluation time.
#
#   bash scripts/bench_pipeline.sh [CONFIG] [SOURCE] [EPOCHS] [--opts k=v ...]
#   bash scripts/bench_pipeline.sh configs/pretrain/synth_market.yaml synth_market 8          (CPU demo model)
#   bash scripts/bench_pipeline.sh configs/pretrain/market.yaml market 3 --opts data.num_workers=12 model.pretrained=none
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/pretrain/synth_market.yaml}; source_name=${2:-synth_market}; epochs=${3:-8}
shift $(( $# < 3 ? $# : 3 )); [ "${1:-}" = "--opts" ] && shift
PY=${PYTHON:-python}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
printf "%-8s %18s %14s %10s\n" pipeline "median epoch s" "evaluation s" "mAP"
for pipeline in loader device; do
  "$PY" uda/pretrain.py --config "$config" --source "$source_name" --output-dir "$out/$pipeline" \
    --opts data.pipeline=$pipeline optim.epochs=$epochs train.eval_every=$epochs "$@" > "$out/$pipeline.txt" 2>&1 \
    || { cat "$out/$pipeline.txt" >&2; exit 1; }
  "$PY" - "$out/$pipeline/log.txt" "$pipeline" <<'EOF'
import re, statistics, sys
log = open(sys.argv[1]).read()
epochs = [float(s) for s in re.findall(r"epoch \d+/\d+ .*\(([\d.]+) s\)", log)]
evaluation = re.findall(r"evaluation took ([\d.]+) s", log)[-1]
mean_ap = re.findall(r"mAP ([\d.]+%)", log)[0]
print(f"{sys.argv[2]:<8s} {statistics.median(epochs):18.2f} {float(evaluation):14.1f} {mean_ap:>10s}")
EOF
done
