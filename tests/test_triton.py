"""The triton backend's fused scans (run by Triton's CPU interpreter here, see conftest.py):
fp16 inputs, the fused prologue in the kernel source, and its device check. fp32 and bf16
against the loop, varlen, and the extreme gates are in test_backends_agree.py / test_varlen.py."""
import sys

import pytest
import torch

import rnnc
from tests.helpers import count_calls, library_inputs

DIMS = {"mingru": {"I": 3, "H": 5}, "hgrn": {}, "minlstm": {"I": 3, "H": 5}}


def _inputs(cell, T, dtype):
    gen = torch.Generator().manual_seed(T)
    out = []
    for name in cell.INPUTS:
        size = cell.dims.get("I", 3) if name == "x" and "I" in cell.dims else 3
        x = torch.randn(2, T, size, generator=gen)
        if name == "g":
            x = torch.nn.functional.logsigmoid(x)
        elif name == "delta":
            x = torch.nn.functional.softplus(x)
        out.append(x.to(dtype).requires_grad_())
    return out


@pytest.mark.parametrize("name", ["mingru", "hgrn", "minlstm"])
def test_fp16_inputs_match_the_loop(name):
    loop = rnnc.build(name, backend="loop", **DIMS[name])
    tri = rnnc.build(name, backend="triton", **DIMS[name])
    tri.load_state_dict(loop.state_dict())
    xs = _inputs(loop, 37, torch.float16)
    y_l, _ = loop(*xs)
    y_t, _ = tri(*xs)
    assert y_t.dtype == torch.float16
    torch.testing.assert_close(y_t.float(), y_l.float(), rtol=2e-3, atol=2e-3)
    g_l = torch.autograd.grad(y_l.float().sum(), xs)
    g_t = torch.autograd.grad(y_t.float().sum(), xs)
    for a, b in zip(g_t, g_l):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_the_gates_are_computed_in_the_kernel():
    source = rnnc.compile("mingru", backend="triton")
    kernel = source[source.index("def _scan_h_fwd"):source.index("def _scan_h_bwd")]
    assert "@triton.jit" in source and "tl.sigmoid" in kernel  # z = sigmoid(W_z x + b_z), fused
    assert "F.linear" not in kernel  # the projections stay with PyTorch


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    cell = rnnc.build("hgrn", backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(rnnc.InputError, match="CUDA tensors"):
        cell(torch.randn(1, 4, 3), torch.randn(1, 4, 3))


def _run_long(name, monkeypatch, kernel):
    """A 70-step forward (past the short-sequence switch) of the triton build, counting calls of the
    runtime entry `kernel`; the outputs are checked against the loop so the count is of a real run."""
    loop = rnnc.build(name, backend="loop", K=4, V=3)
    tri = rnnc.build(name, backend="triton", K=4, V=3)
    tri.load_state_dict(loop.state_dict())
    calls = count_calls(monkeypatch, tri, kernel)
    xs = library_inputs(name, B=2, T=70, heads=1, extreme=False, dtype=torch.float32, seed=0)
    torch.testing.assert_close(tri(*xs)[0], loop(*xs)[0], rtol=1e-4, atol=1e-4)
    return tri, calls


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_delta_rule_cells_take_the_triton_wy_kernel(name, monkeypatch):
    _, calls = _run_long(name, monkeypatch, "_triton_delta_chunk")
    assert len(calls) == 1


@pytest.mark.parametrize("name", ["gla", "simple_gla", "linear_attn", "rwkv6"])
def test_additive_matrix_states_take_the_triton_chunk_kernel(name, monkeypatch):
    tri, calls = _run_long(name, monkeypatch, "_triton_chunk_linear")
    assert len(calls) == 1  # the forward runs the chunk kernel's entry once
    module = sys.modules[type(tri).__module__]
    assert not any(n.startswith("_Scan_") for n in vars(module))  # not the fused scan (every step's state)


@pytest.mark.parametrize("name", ["mingru", "hgrn", "minlstm", "mamba"])
@pytest.mark.parametrize("steps", [1, 8, 37])
def test_time_chunked_scan_matches_the_loop(name, steps, monkeypatch):
    """The chunked variant (time cut into chunks that run in parallel after a scan over their
    summaries; on a GPU when the channels give few programs), forced here at small T."""
    import sys

    dims = {**DIMS.get(name, {}), **({"D": 3, "N": 2} if name == "mamba" else {})}
    loop = rnnc.build(name, backend="loop", **dims).double()
    tri = rnnc.build(name, backend="triton", **dims).double()
    tri.load_state_dict(loop.state_dict())
    monkeypatch.setattr(sys.modules[type(tri).__module__], "SCAN_CHUNK", steps)
    xs = [x.double().detach().requires_grad_() for x in _inputs(loop, 37, torch.float64)]
    if name == "mamba":
        xs = [torch.randn(2, 37, *s, dtype=torch.float64, requires_grad=True) for s in ((3,), (3,), (2,), (2,))]
        xs[1] = torch.nn.functional.softplus(xs[1].detach()).requires_grad_()
    state = {s: torch.randn(v.shape, dtype=torch.float64, requires_grad=True) for s, v in loop(*xs)[1].items()}
    (y_l, f_l), (y_t, f_t) = loop(*xs, state=state), tri(*xs, state=state)
    torch.testing.assert_close(y_t, y_l)
    loss_l = (y_l * torch.cos(y_l)).sum() + sum(f.sum() for f in f_l.values())
    loss_t = (y_t * torch.cos(y_t)).sum() + sum(f.sum() for f in f_t.values())
    wrt_l = xs + list(state.values()) + list(loop.parameters())
    wrt_t = xs + list(state.values()) + list(tri.parameters())
    for a, b in zip(torch.autograd.grad(loss_t, wrt_t), torch.autograd.grad(loss_l, wrt_l)):
        torch.testing.assert_close(a, b)
