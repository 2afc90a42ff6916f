#!/usr/bin/env bash
# Everything issue 6 needs from the lent GPU, in ONE device call (~8 minutes), from the project root:
#   1. install the wheels the GPU image lacks (prepared here by ../shared/device/wheels.sh, carried as .whl)
#   2. the kernel tests compiled on the GPU (tests/test_kernels_*.py: kernels vs references, CUDA graphs)
#   3. kernel micro-benchmarks at SDXL shapes (bench/kernels_micro.py)
#   4. the pipeline benchmark (bench/gpu_pipeline.py): ours vs diffusers eager vs torch.compile
# Everything lands in $OUT; append $OUT/BENCHMARKS.section.md to BENCHMARKS.md afterwards (the device's
# copy of the tree does not come back). Each step has its own time limit, so a slow one cannot eat the rest.
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

stamp "gpu and versions"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee "$OUT/versions.txt"

stamp "kernel tests on the GPU"
timeout 120 python3 -m pytest -q -p no:cacheprovider -ra tests/test_kernels_groupnorm.py \
  tests/test_kernels_sampler_step.py tests/test_kernels_patch.py tests/test_kernels_cuda_graphs.py \
  > "$OUT/kernel_tests.txt" 2>&1
echo "pytest exit $?"; tail -25 "$OUT/kernel_tests.txt"

stamp "kernel micro-benchmarks"
timeout 60 python3 bench/kernels_micro.py --out "$OUT/kernels_micro.md" > "$OUT/kernels_micro.log" 2>&1
echo "micro exit $?"; tail -30 "$OUT/kernels_micro.log"

stamp "pipeline benchmark"
timeout 285 python3 bench/gpu_pipeline.py --budget-s 220 --runs 3 --markdown "$OUT/BENCHMARKS.section.md" \
  --json "$OUT/gpu_pipeline.json" > "$OUT/gpu_pipeline.log" 2>&1
echo "pipeline exit $?"; grep -v '^\[transformers\]' "$OUT/gpu_pipeline.log" | tail -60
stamp "done"
