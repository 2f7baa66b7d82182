"""rnnc/runtime/triton_chunk.py: the Triton chunkwise linear-attention forward against chunk_ops._chunk_linear.

Checked: o and S_T against `_chunk_linear` in float64 (rel err <= 1e-4 relative to the max magnitude,
float32 inputs) for no decay, a scalar decay, a per-key decay, a per-value decay and both, mild and
extreme (down to -20 per step) log-decays and -inf gates (hard resets), ragged T, chunk lengths 16/32
and one that is not a power of two, K and V not powers of two, several V blocks, h0 given or not,
before=True; gradients of every input (Triton backward kernels for no, a scalar, a per-key or a
per-value decay, checked to run without the PyTorch recompute; chunk_ops's recompute when per-key and
per-value decays come together); float16/bfloat16 inputs; the float64 fallback (its standalone copy:
tests/test_link.py). Without a GPU the kernels run in Triton's CPU interpreter (conftest sets
TRITON_INTERPRET=1), so shapes stay small.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import rnnc.runtime.chunk as chunk_ops  # noqa: E402
import rnnc.runtime.triton_chunk as triton_chunk  # noqa: E402

from helpers import slow_except  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
N = 2
TOL = 1e-4


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make_gate(kind, shape, gen):
    if kind == "mild":
        g = torch.nn.functional.logsigmoid(torch.randn(shape, generator=gen, dtype=torch.float64) + 3)
    elif kind == "extreme":
        g = -20 * torch.rand(shape, generator=gen, dtype=torch.float64)
    else:  # "reset": mild gates with some hard resets (-inf)
        g = torch.nn.functional.logsigmoid(torch.randn(shape, generator=gen, dtype=torch.float64) + 3)
        g = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.1, -torch.inf, g)
    return g


def make_inputs(T, K, V, decay, gate, h0=True, seed=0):
    """float64 leaves: q, k, v, gk, gv, h0 (decay: none / scalar / key / value / both / scalar+value)."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(T, N, K, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(T, N, V, generator=gen, dtype=torch.float64)
    gk = gv = None
    if decay in ("scalar", "scalar+value"):
        gk = make_gate(gate, (T, N, 1), gen)
    if decay in ("key", "both"):
        gk = make_gate(gate, (T, N, K), gen)
    if decay in ("value", "both", "scalar+value"):
        gv = make_gate(gate, (T, N, V), gen)
    s0 = torch.randn(N, K, V, generator=gen, dtype=torch.float64) if h0 else None
    return [None if x is None else x.to(DEV) for x in (q, k, v, gk, gv, s0)]


def check(T, K, V, chunk, decay, gate, h0=True, before=False, grads=True, seed=0):
    leaves = make_inputs(T, K, V, decay, gate, h0, seed)
    ref_in = [None if x is None else x.clone().requires_grad_(True) for x in leaves]
    o_ref, s_ref = chunk_ops._chunk_linear(*ref_in, chunk, before)
    tri_in = [None if x is None else x.float().requires_grad_(True) for x in leaves]
    o, s = triton_chunk._triton_chunk_linear(*tri_in, chunk, before)
    assert o.dtype == s.dtype == torch.float32
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert rel_err(o, o_ref) <= TOL, rel_err(o, o_ref)
    assert rel_err(s, s_ref) <= TOL, rel_err(s, s_ref)
    if not grads or T == 0:
        return
    gen = torch.Generator().manual_seed(seed + 1)
    wo = torch.randn(o_ref.shape, generator=gen, dtype=torch.float64).to(DEV)
    ws = torch.randn(s_ref.shape, generator=gen, dtype=torch.float64).to(DEV)
    ((o_ref * wo).sum() + (s_ref * ws).sum()).backward()
    ((o * wo.float()).sum() + (s * ws.float()).sum()).backward()
    for name, a, b in zip("q k v gk gv h0".split(), tri_in, ref_in):
        if a is None:
            continue
        assert a.grad is not None and torch.isfinite(a.grad).all(), name
        if gate != "reset":  # gradients at -inf gates: only finiteness (chunk_ops's own tests cover them)
            assert rel_err(a.grad, b.grad) <= TOL, (name, rel_err(a.grad, b.grad))


# ---------------------------------------------------------------- the cheap path: no decay, scalar decay

SCALAR_GATES = [("none", "mild"), ("scalar", "mild"), ("scalar", "extreme")]


@pytest.mark.parametrize("T,chunk,decay,gate", slow_except(  # fast: every pair of length, chunk and gate
    [(T, c, *g) for T in (1, 17, 64, 70) for c in (16, 32) for g in SCALAR_GATES],
    [(T, (16, 32)[(t + i) % 2], *g) for t, T in enumerate((1, 17, 64, 70)) for i, g in enumerate(SCALAR_GATES)]))
def test_no_or_scalar_decay(T, chunk, decay, gate):
    check(T, 24, 24, chunk, decay, gate)


def _no_recompute(*args):
    raise AssertionError("the backward fell back to the PyTorch recompute")


@pytest.mark.parametrize("T,chunk,h0", [(1, 16, False), (40, 24, True), (70, 32, False)])
def test_scalar_backward_runs_in_triton(monkeypatch, T, chunk, h0):
    """No PyTorch recompute: the dh and dq/dk/dv/dg kernels. T = 1 without h0: dg is exactly 0 (the
    decay of a zero state), and the term-by-term sum gives exactly 0, not a rounding residue."""
    monkeypatch.setattr(triton_chunk, "_chunk_recompute_backward", _no_recompute)
    check(T, 24, 20, chunk, "scalar", "mild", h0=h0)
    check(T, 16, 80, chunk, "none", "mild", h0=h0)


@pytest.mark.parametrize("T,chunk,gate,decay", slow_except(
    [(T, c, g, d) for T, c, g in ((5, 16, "extreme"), (40, 32, "mild"), (33, 24, "reset"))
     for d in ("key", "value", "scalar+value")],
    [(5, 16, "extreme", "key"), (5, 16, "extreme", "value"), (5, 16, "extreme", "scalar+value"),
     (40, 32, "mild", "key"), (40, 32, "mild", "scalar+value"), (33, 24, "reset", "value")]))
def test_channel_decay_backward_runs_in_triton(monkeypatch, T, chunk, gate, decay):
    """Per-key (GLA) or per-value decays: the dh kernel, the secondary-chunked dq/dk/dv kernel and the
    gate's gradient, no recompute (its element-wise accuracy at extreme gates: test_gate_grad_numerics).
    Fast: every decay at one short extreme chunk; the key and value kernels at chunk 32 (two sub-chunks;
    scalar+value runs the value kernel) and the value kernel at chunk 24 with resets (the key kernel's
    resets and unaligned chunks: test_hard_resets_no_nan, test_key_decay_chunk_not_pow2)."""
    monkeypatch.setattr(triton_chunk, "_chunk_recompute_backward", _no_recompute)
    check(T, 24, 20, chunk, decay, gate, h0=gate != "mild")
    check(T, 16, 80, chunk, decay, "mild")


@pytest.mark.parametrize("K,V", [(16, 16), (24, 20), (16, 80)])   # 80: two V blocks of 64
def test_shapes_scalar(K, V):
    check(33, K, V, 16, "scalar", "mild")


# ---------------------------------------------------------------- per-key decay (GLA): secondary chunking

@pytest.mark.parametrize("T,gate", slow_except(
    [(T, g) for T in (1, 17, 64, 70) for g in ("mild", "extreme")],
    [(1, "mild"), (1, "extreme"), (17, "mild"), (17, "extreme"), (64, "extreme"), (70, "mild")]))
def test_key_decay_chunk16(T, gate):
    check(T, 24, 24, 16, "key", gate)


@pytest.mark.parametrize("T,gate", [(17, "mild"), (40, "extreme"), (64, "mild")])
def test_key_decay_chunk32(T, gate):
    """Two sub-chunks per chunk: the off-diagonal block through the sub-chunk's first row."""
    check(T, 16, 16, 32, "key", gate)


def test_key_decay_chunk_not_pow2():
    """Chunk 20: a 32-row block with rows 20..31 masked (rows beyond the chunk are zero steps)."""
    check(45, 16, 16, 20, "key", "extreme")


@pytest.mark.parametrize("decay", ["key", "value"])
def test_vector_two_v_blocks(decay):
    """V = 80: two programs per row (BV = 64), the second one masked past column 80."""
    check(20, 16, 80, 16, decay, "mild")


@pytest.mark.parametrize("decay", ["scalar", "key"])
def test_hard_resets_no_nan(decay):
    check(40, 16, 16, 16, decay, "reset")


def test_no_h0():
    check(30, 16, 24, 16, "key", "mild", h0=False)
    check(30, 16, 24, 16, "scalar", "mild", h0=False)


@pytest.mark.parametrize("decay", ["none", "key"])
def test_readout_before(decay):
    check(25, 16, 16, 16, decay, "mild", before=True)


# ---------------------------------------------------------------- per-value decay (supported too)

@pytest.mark.parametrize("decay,gate", [("value", "extreme"), ("both", "mild"), ("scalar+value", "mild")])
def test_value_decay(decay, gate):
    check(20, 16, 16, 16, decay, gate)


@pytest.mark.slow
@pytest.mark.parametrize("decay", ["value", "both"])
@pytest.mark.parametrize("gate", ["mild", "extreme", "reset"])
def test_value_decay_long(decay, gate):
    check(70, 24, 20, 32, decay, gate)


@pytest.mark.slow
@pytest.mark.parametrize("decay", ["none", "scalar", "key"])
def test_chunk64_long(decay):
    check(150, 24, 24, 64, decay, "extreme")


# ---------------------------------------------------------------- dtypes, fallbacks, contract

def test_empty():
    o, s = triton_chunk._triton_chunk_linear(*[None if x is None else x.float() for x in
                                               make_inputs(0, 16, 16, "key", "mild")], 16)
    assert o.shape == (0, N, 16) and s.shape == (N, 16, 16)


def test_float64_falls_back():
    leaves = make_inputs(20, 16, 16, "key", "mild")
    o, s = triton_chunk._triton_chunk_linear(*leaves, 16)
    o_ref, s_ref = chunk_ops._chunk_linear(*leaves, 16)
    assert o.dtype == torch.float64 and torch.equal(o, o_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    """Loaded and upcast to float32 in the kernel; outputs and gradients in the input dtype."""
    leaves = make_inputs(20, 16, 16, "key", "mild")
    o_ref, s_ref = chunk_ops._chunk_linear(*[None if x is None else x.to(dtype).double() for x in leaves], 16)
    xs = [None if x is None else x.to(dtype).requires_grad_(True) for x in leaves]
    o, s = triton_chunk._triton_chunk_linear(*xs, 16)
    assert o.dtype == s.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3   # the rounding of the outputs themselves
    assert rel_err(o, o_ref) <= tol and rel_err(s, s_ref) <= tol
    (o.float().sum() + s.float().sum()).backward()
    for x in xs:
        if x is not None:
            assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()
