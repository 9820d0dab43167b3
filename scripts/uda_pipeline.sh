#!/usr/bin/env bash
# Source model (pretrained on SOURCE if none exists yet) -> adaptation to the unlabelled TARGET ->
# the final table: direct transfer vs adapted, mAP and rank-1/5/10, with and without re-ranking.
#
#   bash scripts/uda_pipeline.sh SOURCE TARGET [--pretrained imagenet|none|PATH] [--data-root DIR] [--opts k=v ...]
#
# Wrapped by scripts/market2duke.sh, duke2market.sh and market2msmt.sh. Runs go to runs/pretrain/SOURCE
# and runs/adapt/SOURCE2TARGET; an interrupted stage resumes from its last checkpoint when re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: bash scripts/uda_pipeline.sh SOURCE TARGET [--pretrained imagenet|none|PATH] [--data-root DIR] [--opts k=v ...]" >&2; exit 2; }
source_name=$1; target_name=$2; shift 2
pretrained=imagenet; data_root=(); opts=()
while [ $# -gt 0 ]; do
  case "$1" in
    --pretrained) pretrained="$2"; shift 2 ;;
    --data-root) data_root=(--data-root "$2"); shift 2 ;;
    --opts) shift; opts=("$@"); break ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python}
pretrain_dir=runs/pretrain/$source_name
adapt_dir=runs/adapt/${source_name}2${target_name}

resume_flag() { [ -f "$1/last.pth" ] && echo --resume || true; }

if [ ! -f "$pretrain_dir/model_final.pth" ]; then
  echo "== pretrain on $source_name ($pretrain_dir)"
  "$PY" uda/pretrain.py --config "configs/pretrain/$source_name.yaml" --source "$source_name" --target "$target_name" \
    --pretrained "$pretrained" --output-dir "$pretrain_dir" "${data_root[@]}" $(resume_flag "$pretrain_dir")
fi
if [ ! -f "$adapt_dir/model_final.pth" ]; then
  echo "== adapt $source_name -> $target_name ($adapt_dir)"
  "$PY" uda/adapt.py --config "configs/uda/${source_name}2${target_name}.yaml" --init "$pretrain_dir/model_final.pth" \
    --output-dir "$adapt_dir" "${data_root[@]}" $(resume_flag "$adapt_dir") --opts "${opts[@]}"
fi
"$PY" -m uda.report --adapt "$adapt_dir" --target "$target_name" --json "$adapt_dir/results.json"
