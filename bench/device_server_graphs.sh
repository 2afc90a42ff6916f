#!/usr/bin/env bash
# Issue 4's GPU server benchmark alone, CUDA graphs on (the default now; set explicitly, as when it was
# measured). One device call: 130 s on the H100 on 2026-11-26, model save included.
set -uo pipefail
OUT=${OUT:-/tmp/nitro-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NITROFUSION_CUDA_GRAPHS=1
timeout ${SERVER_TIMEOUT:-200} python3 bench/server_load.py --random-sdxl full --size 1024 --max-batch 8 --per-client 1 \
  --format jpeg --write "$OUT/server_load.md" > "$OUT/server_load.log" 2>&1
echo "server exit $?"; grep -v '^\[transformers\]\|Writing model\|should be kept' "$OUT/server_load.log" | tail -20
