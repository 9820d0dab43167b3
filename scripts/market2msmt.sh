#!/usr/bin/env bash
# market -> msmt17: pretrain on market if no source model exists, adapt to msmt17, print the table (see uda_pipeline.sh).
exec bash "$(dirname "$0")/uda_pipeline.sh" market msmt17 "$@"
