#!/usr/bin/env bash
# The whole UDA pipeline on our synthetic domains, on a CPU: generate synth_market (source) and
# synth_duke (target), pretrain the strong baseline on the source, adapt to the unlabelled target,
# train the target-supervised oracle, print the table and write OUTPUT_DIR/results.json.
#
#   bash scripts/demo.sh [--preset small|tiny] [--output-dir runs/demo]
#
# Re-running continues where a killed run stopped (each stage resumes from its last checkpoint) and
# skips the stages that finished.
set -euo pipefail
cd "$(dirname "$0")/.."
preset=small
out=runs/demo
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) preset="$2"; shift 2 ;;
    --output-dir) out="$2"; shift 2 ;;
    *) echo "usage: bash scripts/demo.sh [--preset small|tiny] [--output-dir DIR]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python}
case "$preset" in
  small) pretrain_opts=(); adapt_opts=() ;;
  tiny) # a smoke test of the same pipeline (26 s once the synthetic data is generated)
    pretrain_opts=(optim.epochs=24 optim.milestones=[18] train.eval_every=12 data.num_pids=8)
    adapt_opts=(optim.epochs=5 optim.milestones=[10] adapt.iters=20 data.num_pids=4 cluster.k1=8 cluster.k2=3 cluster.min_samples=3) ;;
  *) echo "error: --preset must be small or tiny" >&2; exit 2 ;;
esac

# stage DIR CMD...: run a stage into DIR unless it finished; resume it if it was interrupted
stage() {
  local dir="$1"; shift
  if [ -f "$dir/model_final.pth" ]; then echo "== $dir: done, skipped"; return; fi
  local resume=(); [ -f "$dir/last.pth" ] && resume=(--resume)
  echo "== $dir"
  "$PY" "$@" --output-dir "$dir" "${resume[@]}"
}

start=$(date +%s)
stage "$out/pretrain" uda/pretrain.py --config configs/pretrain/synth_market.yaml --source synth_market --target synth_duke \
  --opts data.synth_preset="$preset" "${pretrain_opts[@]}"
stage "$out/adapt" uda/adapt.py --config configs/uda/synth_market2synth_duke.yaml --init "$out/pretrain/model_final.pth" \
  --opts data.synth_preset="$preset" "${adapt_opts[@]}"
stage "$out/oracle" uda/pretrain.py --config configs/pretrain/synth_duke.yaml --source synth_duke \
  --opts data.synth_preset="$preset" "${pretrain_opts[@]}"
echo
"$PY" -m uda.report --adapt "$out/adapt" --oracle "$out/oracle" --target synth_duke --json "$out/results.json"
echo "results: $out/results.json ($(( $(date +%s) - start )) s)"
