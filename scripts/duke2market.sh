#!/usr/bin/env bash
# duke -> market: pretrain on duke if no source model exists, adapt to market, print the table (see uda_pipeline.sh).
exec bash "$(dirname "$0")/uda_pipeline.sh" duke market "$@"
