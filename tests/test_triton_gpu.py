"""The triton backend on a real GPU: every library cell it applies to agrees with the loop
backend (values, final states, gradients of the inputs and params) on CUDA tensors, fp32 and bf16
inputs, at lengths that take the recurrent kernel (1), the parallel forms (100, 257) and the fused
scans' time-chunked variant (2048). Skipped without CUDA:
on CPU the same kernels are checked in Triton's interpreter (test_backends_agree.py, test_triton*.py).
Run on a GPU machine with `python -m pytest -q tests/test_triton_gpu.py`."""
import pytest
import torch

import rnnc

from helpers import library_inputs, outputs_and_grads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: GPU-sized dims (the CPU tests' DIMS are tiny): large enough for the kernels' real tile shapes.
DIMS = {"K": 32, "V": 32, "D": 64, "N": 16, "H": 64, "I": 48, "NH": 4, "P": 16, "M": 8}
CELLS = [n for n in rnnc.library() if "triton" in rnnc.backends_for(n)]


@pytest.mark.parametrize("name", CELLS)
# 2048: long enough for the fused scans to cut time into chunks (few channels here)
@pytest.mark.parametrize("T,dtype", [(1, torch.float32), (100, torch.float32), (257, torch.bfloat16), (2048, torch.float32)])
def test_triton_on_cuda_matches_the_loop(name, T, dtype):
    dims = {k: v for k, v in DIMS.items() if k in rnnc.load(name).cell().dims}
    loop = rnnc.build(name, backend="loop", device="cuda", **dims)
    tri = rnnc.build(name, backend="triton", device="cuda", **dims)
    tri.load_state_dict(loop.state_dict())
    # the library's input ranges (unit delta-rule keys, log-space decays, ...), on the GPU
    xs = library_inputs(name, 2, T, 3, False, dtype, dims=DIMS, device="cuda")
    outs = []
    for cell in (loop, tri):
        ys, final, grads = outputs_and_grads(cell, xs)
        outs.append([y.float() for y in ys] + [f.float() for f in final.values()] + [g.float() for g in grads])
    # fp32 matmuls on the GPU may use TF32 in the loop's PyTorch ops: a looser bound than on CPU
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    for a, b in zip(outs[1], outs[0]):
        assert torch.isfinite(a).all()
        assert (a - b).abs().max().item() <= tol * (b.abs().max().item() + 1e-6)
