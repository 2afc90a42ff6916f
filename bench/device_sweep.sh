#!/usr/bin/env bash
# The stage-3 sweep (bench/nitro_sweep.py) on the lent GPU, in ONE device call, from the project root:
#   carry: [".whl_sweep", "outputs/sweep_base"]
# .whl_sweep: the diffusers, importlib_metadata, typing_extensions and packaging wheels from .whl
# (../shared/device/wheels.sh); outputs/sweep_base: `python bench/nitro_sweep.py pack --half` (22 MB).
# Every variant trains at once (one process each, sharing the card), then scores its snapshots. Results land in
# $OUT/sweep.md and $OUT/sweep.json (and each run's metrics.csv under $OUT/runs). TINY=1 checks the script on
# the CPU at toy sizes against a tiny recipe's packed base (BASE=..., MODEL=...).
set -uo pipefail
OUT=${OUT:-/tmp/nitro-out}
mkdir -p "$OUT"
WHL=${WHL:-.whl_sweep}
if [ -z "${SKIP_WHEELS:-}" ] && [ -d "$WHL" ] && ls "$WHL"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl \
    || { echo "wheel install failed" | tee "$OUT/error.txt"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
# Tiny UNets: Triton kernels and CUDA graphs would only add compile/capture time to every scoring process.
export NITROFUSION_KERNELS=0 NITROFUSION_CUDA_GRAPHS=0 TRITON_CACHE_DIR=/tmp/triton-cache
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee "$OUT/versions.txt"
BASE=${BASE:-$([ -n "${TINY:-}" ] && echo /tmp/tinybase || echo outputs/sweep_base)}
python3 bench/nitro_sweep.py unpack --base "$BASE" --recipe "$([ -n "${TINY:-}" ] && echo tiny || echo shapes)" 2>&1 \
  | tr '\r' '\n' | grep -v "latent pool" | tail -3
if [ -n "${TINY:-}" ]; then
  ARGS="--base $BASE --model ${MODEL:-/tmp/tinywork/model} --recipe tiny --iters 4 --every 2
        --images 16 --device cpu --variants base,data+reg1,init4k --set cache.num_pairs=8 --set init.optim.steps=2"
else
  ARGS="--base $BASE --iters ${ITERS:-1500} --every ${EVERY:-250} --parallel ${PARALLEL:-17}
        --train-timeout ${TRAIN_TIMEOUT:-290} --score-timeout ${SCORE_TIMEOUT:-150} --images 2000 --device cuda
        ${VARIANTS:+--variants $VARIANTS}"
fi
python3 bench/nitro_sweep.py run --out "$OUT/sweep" $ARGS 2>&1 | tee "$OUT/sweep.log" | grep -v "^\[transformers\]"
# Keep the small files (metrics, logs, scores), not the snapshots.
find "$OUT/sweep/runs" -name "unet_step*" -type d -prune -exec rm -rf {} + 2>/dev/null
find "$OUT/sweep/runs" \( -name "*.safetensors" -o -name "*.pt" \) -delete 2>/dev/null
find "$OUT/sweep/runs" -type l -delete 2>/dev/null
cat "$OUT/sweep/sweep.md"
