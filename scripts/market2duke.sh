#!/usr/bin/env bash
# market -> duke: pretrain on market if no source model exists, adapt to duke, print the table (see uda_pipeline.sh).
exec bash "$(dirname "$0")/uda_pipeline.sh" market duke "$@"
