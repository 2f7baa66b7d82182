#!/usr/bin/env bash
# The device check, as one command for a GPU machine (see /work/.library/device): puts rnnc and the
# pure-Python wheels the GPU image lacks (carried in .whl/: lark, fla-core, accelerated-scan; see the
# device README for `pip download`) on PYTHONPATH, runs gpu_families.py (issues 10 and 11), the triton backend's
# CUDA tests, then gpu.py (issue 4's table against the peers).
# Each phase has its own time limit so that one slow phase leaves the others their turn; every
# phase writes its output to $OUT (or ./gpu_out) as it goes, so a killed run still returns it.
# Phase limits in seconds: GPU_FAMILIES_S (200), GPU_TESTS_S (170), GPU_TABLE_S (130).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
site=/tmp/site
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RNNC_CACHE_DIR=/tmp/rnnc
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton, rnnc; print('torch', torch.__version__, 'triton', triton.__version__, 'rnnc', rnnc.__file__)"
} 2>&1 | tee "$out/device.txt"
timeout "${GPU_FAMILIES_S:-200}" python3 benchmarks/gpu_families.py 2>&1 | tee "$out/families.md"
echo "families: exit $?" | tee -a "$out/device.txt"
timeout "${GPU_TESTS_S:-170}" python3 -m pytest -v -p no:cacheprovider -n 12 --durations=10 tests/test_triton_gpu.py \
    > "$out/tests.txt" 2>&1
echo "tests: exit $?" | tee -a "$out/device.txt"
grep -E "FAILED|ERROR|passed|failed" "$out/tests.txt" | tail -40
timeout "${GPU_TABLE_S:-130}" python3 benchmarks/gpu.py --tier M 2>&1 | tee "$out/gpu.md"
echo "table: exit $?" | tee -a "$out/device.txt"
