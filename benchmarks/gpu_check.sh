#!/usr/bin/env bash
# The device check, as one command for a GPU machine (see /work/.library/device): installs rnnc
# and the pure-Python wheels the GPU image lacks (carried in .whl/: lark, fla-core, einops; see
# the device README for `pip download`), runs the triton backend's CUDA tests, then the
# benchmark. Results go to $OUT (or ./gpu_out).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python -m pip install -q --no-deps --no-index .whl/*.whl
fi
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$out/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
RNNC_CACHE_DIR=/tmp/rnnc python -m pytest -q -x tests/test_triton_gpu.py 2>&1 | tee "$out/tests.txt" | tail -15
RNNC_CACHE_DIR=/tmp/rnnc python benchmarks/gpu.py --tier M 2>&1 | tee "$out/gpu.md"
