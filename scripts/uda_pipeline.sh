#!/usr/bin/env bash
# Source model (pretrained on SOURCE if none exists yet) -> adaptation to the unlabelled TARGET ->
# the final table: direct transfer vs adapted, mAP and rank-1/5/10, with and without re-ranking.
#
#   bash scripts/uda_pipeline.sh SOURCE TARGET [--variant NAME] [--pretrained imagenet|none|PATH] [--data-root DIR]
#       [--runs-dir DIR] [--opts k=v ...]
#
# Wrapped by scripts/market2duke.sh, duke2market.sh and market2msmt.sh. Configs: configs/pretrain/SOURCE.yaml
# and configs/uda/SOURCE2TARGET.yaml (with --variant NAME: SOURCE_NAME.yaml and SOURCE2TARGET_NAME.yaml,
# e.g. --variant cpu). Runs go to RUNS/pretrain/SOURCE[_NAME] and RUNS/adapt/SOURCE2TARGET[_NAME] (RUNS:
# --runs-dir, default runs); an interrupted stage resumes from its last checkpoint when re-run, a finished
# one is skipped. --pretrained overrides the config's model.pretrained; --opts applies to the adaptation stage.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash scripts/uda_pipeline.sh SOURCE TARGET [--variant NAME] [--pretrained imagenet|none|PATH] [--data-root DIR] [--runs-dir DIR] [--opts k=v ...]"
[ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
source_name=$1; target_name=$2; shift 2
suffix=""; pretrained=(); data_root=(); runs=runs; opts=()
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) suffix="_$2"; shift 2 ;;
    --pretrained) pretrained=(--pretrained "$2"); shift 2 ;;
    --data-root) data_root=(--data-root "$2"); shift 2 ;;
    --runs-dir) runs="$2"; shift 2 ;;
    --opts) shift; opts=("$@"); break ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python}
pretrain_config=configs/pretrain/${source_name}${suffix}.yaml
adapt_config=configs/uda/${source_name}2${target_name}${suffix}.yaml
for config in "$pretrain_config" "$adapt_config"; do
  [ -f "$config" ] || { echo "error: no config $config (check SOURCE, TARGET and --variant)" >&2; exit 2; }
done
pretrain_dir=$runs/pretrain/${source_name}${suffix}
adapt_dir=$runs/adapt/${source_name}2${target_name}${suffix}

resume_flag() { [ -f "$1/last.pth" ] && echo --resume || true; }

if [ ! -f "$pretrain_dir/model_final.pth" ]; then
  echo "== pretrain on $source_name ($pretrain_dir)"
  "$PY" uda/pretrain.py --config "$pretrain_config" --source "$source_name" --target "$target_name" \
    "${pretrained[@]}" --output-dir "$pretrain_dir" "${data_root[@]}" $(resume_flag "$pretrain_dir")
fi
if [ ! -f "$adapt_dir/model_final.pth" ]; then
  echo "== adapt $source_name -> $target_name ($adapt_dir)"
  "$PY" uda/adapt.py --config "$adapt_config" --init "$pretrain_dir/model_final.pth" \
    --output-dir "$adapt_dir" "${data_root[@]}" $(resume_flag "$adapt_dir") --opts "${opts[@]}"
fi
"$PY" -m uda.report --adapt "$adapt_dir" --target "$target_name" --json "$adapt_dir/results.json"
