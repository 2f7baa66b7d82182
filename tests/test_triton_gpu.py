"""The triton backend on a real GPU: every library cell it applies to agrees with the loop
backend (values, final states, gradients of the inputs and params) on CUDA tensors, fp32 and bf16
inputs, at lengths that take the recurrent kernel (1), the parallel forms (100, 257) and the fused
scans' time-chunked variant (2048). Skipped without CUDA:
on CPU the same kernels are checked in Triton's interpreter (test_backends_agree.py, test_triton*.py).
Run on a GPU machine with `python -m pytest -q tests/test_triton_gpu.py`."""
import pytest
import torch
import torch.nn.functional as F

import rnnc

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DIMS = {"K": 32, "V": 32, "D": 64, "N": 16, "H": 64, "I": 48}
CELLS = [n for n in rnnc.library() if "triton" in rnnc.backends_for(n)]


def _inputs(name: str, T: int, dtype) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(T)
    out = []
    for p in rnnc.load(name).cell().inputs:
        x = torch.randn(2, T, 3, *[DIMS[str(d)] for d in p.shape], generator=gen, device="cuda")
        if p.name in ("g", "w"):
            x = F.logsigmoid(x + 3)
        elif p.name == "delta":
            x = F.softplus(x)
        elif p.name == "beta":
            x = torch.sigmoid(x)
        elif p.name == "k" and "delta" in name:
            x = F.normalize(x, dim=-1)
        out.append(x.to(dtype).requires_grad_())
    return out


@pytest.mark.parametrize("name", CELLS)
# 2048: long enough for the fused scans to cut time into chunks (few channels here)
@pytest.mark.parametrize("T,dtype", [(1, torch.float32), (100, torch.float32), (257, torch.bfloat16), (2048, torch.float32)])
def test_triton_on_cuda_matches_the_loop(name, T, dtype):
    dims = {k: v for k, v in DIMS.items() if k in rnnc.load(name).cell().dims}
    loop = rnnc.build(name, backend="loop", device="cuda", **dims)
    tri = rnnc.build(name, backend="triton", device="cuda", **dims)
    tri.load_state_dict(loop.state_dict())
    xs = _inputs(name, T, dtype)
    outs = []
    for cell in (loop, tri):
        y, final = cell(*xs)
        loss = (y.float() * torch.cos(torch.arange(y.numel(), device="cuda")).view_as(y)).sum()
        params = [p for _, p in sorted(cell.named_parameters())]
        grads = torch.autograd.grad(loss, xs + params, allow_unused=True)
        outs.append([y.float(), *[f.float() for f in final.values()],
                     *[g.float() for g in grads if g is not None]])
    # fp32 matmuls on the GPU may use TF32 in the loop's PyTorch ops: a looser bound than on CPU
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    for a, b in zip(outs[1], outs[0]):
        assert torch.isfinite(a).all()
        assert (a - b).abs().max().item() <= tol * (b.abs().max().item() + 1e-6)
