#!/usr/bin/env bash
# The device check, as one command for a GPU machine (see /work/.library/device): puts rnnc and the
# pure-Python wheels the GPU image lacks (carried in .whl/: lark, fla-core; see the device README for
# `pip download`) on PYTHONPATH, then runs, each phase under its own time limit (seconds; 0 skips it)
# so that a slow phase leaves the others their turn, its output written to $OUT (or ./gpu_out) as it
# goes so that a killed run still returns it:
#   newton  GPU_NEWTON_S (90)   benchmarks/gpu_families.py --part newton (issue 11)
#   gdelta  GPU_GDELTA_S (100)  benchmarks/gpu_families.py --part gdelta --no-peer (issue 10)
#   tests   GPU_TESTS_S (170)   tests/test_triton_gpu.py (-k "$GPU_TESTS_K" when set)
#   peers   GPU_PEERS_S (0)     gpu_families.py --part gdelta with fla's ops (their autotuning is slow)
#   table   GPU_TABLE_S (120)   benchmarks/gpu.py --tier M (issue 4's table against the peers)
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

phase() {  # phase NAME LIMIT COMMAND...: run COMMAND under LIMIT seconds, output to $out/NAME.txt
    local name=$1 limit=$2
    shift 2
    [ "$limit" -gt 0 ] || return 0
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    echo "$name: exit $? ($(date -u +%T))" | tee -a "$out/device.txt"
}
phase newton "${GPU_NEWTON_S:-90}" python3 benchmarks/gpu_families.py --part newton
phase gdelta "${GPU_GDELTA_S:-100}" python3 benchmarks/gpu_families.py --part gdelta --no-peer
phase tests "${GPU_TESTS_S:-170}" python3 -m pytest -v -p no:cacheprovider -n 12 --durations=10 \
    tests/test_triton_gpu.py ${GPU_TESTS_K:+-k "$GPU_TESTS_K"}
phase peers "${GPU_PEERS_S:-0}" python3 benchmarks/gpu_families.py --part gdelta
phase table "${GPU_TABLE_S:-120}" python3 benchmarks/gpu.py --tier M
grep -hE "^\|" "$out"/newton.txt "$out"/gdelta.txt 2>/dev/null
grep -E "FAILED|ERROR|passed|failed" "$out/tests.txt" 2>/dev/null | tail -30
