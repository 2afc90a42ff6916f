#!/usr/bin/env bash
# Everything issues 4 and 6 need from the lent GPU, in ONE device call (under 10 minutes), from the project root:
#   1. install the wheels the GPU image lacks (prepared here by ../shared/device/wheels.sh, carried as .whl)
#   2. the kernel tests compiled on the GPU (tests/test_kernels_*.py: kernels vs references, CUDA graphs)
#   3. kernel micro-benchmarks at SDXL shapes (bench/kernels_micro.py)
#   4. the pipeline benchmark (bench/gpu_pipeline.py): ours vs diffusers eager vs torch.compile
#   5. the server load benchmark (bench/server_load.py) on SDXL with random fp16 weights: real uvicorn servers,
#      step-level engine vs one at a time (issue 4's GPU target)
# Everything lands in $OUT; append $OUT/BENCHMARKS.section.md and $OUT/server_load.md to BENCHMARKS.md
# afterwards (the device's copy of the tree does not come back). Each step has its own time limit, so a slow
# one cannot eat the rest. TINY=1 runs every step at toy sizes on the CPU, to check the script before the GPU.
set -uo pipefail
OUT=${OUT:-/tmp/nitro-out}
mkdir -p "$OUT"
if [ -z "${SKIP_WHEELS:-}" ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee "$OUT/error.txt"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache TRITON_CACHE_DIR=/tmp/triton-cache
T0=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - T0 )) s)"; }

if [ -n "${TINY:-}" ]; then
  PIPE_ARGS="--tiny --markdown $OUT/BENCHMARKS.section.md"; SERVER_ARGS="--random-sdxl tiny --concurrency 1,4 --requests 8"
else
  PIPE_ARGS="--budget-s ${PIPE_BUDGET:-165} --runs 3 --markdown $OUT/BENCHMARKS.section.md"
  SERVER_ARGS="--random-sdxl full --size ${SERVER_SIZE:-1024} --max-batch 8 --per-client 1"
fi

stamp "gpu and versions"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee "$OUT/versions.txt"

stamp "kernel tests on the GPU"
timeout 100 python3 -m pytest -q -p no:cacheprovider -ra tests/test_kernels_groupnorm.py \
  tests/test_kernels_sampler_step.py tests/test_kernels_patch.py tests/test_kernels_cuda_graphs.py \
  > "$OUT/kernel_tests.txt" 2>&1
echo "pytest exit $?"; tail -25 "$OUT/kernel_tests.txt"

stamp "kernel micro-benchmarks"
timeout 40 python3 bench/kernels_micro.py --out "$OUT/kernels_micro.md" > "$OUT/kernels_micro.log" 2>&1
echo "micro exit $?"; tail -30 "$OUT/kernels_micro.log"

stamp "pipeline benchmark"
timeout ${PIPE_TIMEOUT:-220} python3 bench/gpu_pipeline.py $PIPE_ARGS \
  --json "$OUT/gpu_pipeline.json" > "$OUT/gpu_pipeline.log" 2>&1
echo "pipeline exit $?"; grep -v '^\[transformers\]' "$OUT/gpu_pipeline.log" | tail -45

stamp "server load benchmark"
timeout ${SERVER_TIMEOUT:-190} python3 bench/server_load.py $SERVER_ARGS --format jpeg --write "$OUT/server_load.md" \
  > "$OUT/server_load.log" 2>&1
echo "server exit $?"; grep -v '^\[transformers\]' "$OUT/server_load.log" | tail -20
stamp "done"
