#!/usr/bin/env bash
# GPU issue 16's decoder measurements in ONE device call, from the project root (a few minutes):
#   1. install the wheels the GPU image lacks (carried as .whl; see ../shared/device/wheels.sh)
#   2. the decoder-option and fused-kernel tests on the GPU (tests/test_kernels_vae_fast.py, test_kernels_patch.py)
#   3. where the decoder's kernel time goes (bench/vae_profile.py): today's default vs the option candidates
#   4. every decoder option at 1024^2 / 512^2, batch 1 / 8 (bench/vae_decoder.py; VAE_BUDGET seconds, default 150)
# Everything lands in $OUT: append $OUT/vae_decoder.md to BENCHMARKS.md afterwards.
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
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - T0 )) s)"; }

stamp "gpu and versions"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"

stamp "decoder-option and kernel-patch tests on the GPU"
timeout "${TEST_LIMIT:-150}" python3 -m pytest -q -p no:cacheprovider -ra tests/test_kernels_vae_fast.py \
  tests/test_kernels_patch.py > "$OUT/vae_tests.txt" 2>&1
tail -n 6 "$OUT/vae_tests.txt"

stamp "decoder profile"
timeout "${PROFILE_LIMIT:-90}" python3 bench/vae_profile.py --spec channels_last,cudnn_benchmark \
  --spec channels_last,cudnn_benchmark,subpixel > "$OUT/vae_profile.txt" 2>&1
grep -v "^    " "$OUT/vae_profile.txt" | grep -v "should be kept in float32" | tail -n 30

stamp "decoder options"
BUDGET=${VAE_BUDGET:-150}
timeout $(( BUDGET + 90 )) python3 bench/vae_decoder.py --budget-s "$BUDGET" --json "$OUT/vae_decoder.json" \
  --markdown "$OUT/vae_decoder.md" > "$OUT/vae_decoder.log" 2>&1
grep -v "should be kept in float32" "$OUT/vae_decoder.log" | tail -n 24
stamp "done"
