"""rnnc/runtime/triton_delta.py: the Triton chunkwise (gated) delta rule, forward and backward, against chunk_ops._chunk_delta.

Checked: o and S_T against `_chunk_delta` in float64 (rel err <= 1e-4 relative to the max magnitude,
float32 inputs) with unit-norm keys, beta in (0, 1) and beta = 1, no decay, mild and extreme (down to
-20 per step) scalar log-decays and -inf gates (hard resets), ragged T, chunk lengths 16/32 and one that
is not a power of two, K and V not powers of two, several V blocks, h0 given or not, before=True;
gradients of every input (the Triton backward kernels, against chunk_ops's autograd gradients in
float64); float16/bfloat16 inputs; the float64
fallback; a token-by-token recurrence as an independent reference (its standalone copy:
tests/test_link.py). Without
a GPU the kernels run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay small.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import rnnc.runtime.chunk as chunk_ops  # noqa: E402
import rnnc.runtime.triton_delta as triton_delta  # noqa: E402

from helpers import slow_except  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
N = 2
TOL = 1e-4
NAMES = "q k v beta g h0".split()


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make_inputs(T, K, V, gate, beta="rand", h0=True, seed=0):
    """float64 leaves: q, k (unit norm), v, beta [T, N], g [T, N] or None, h0 (gate: none/mild/extreme/reset)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(T, N, K, generator=gen, dtype=torch.float64)
    k = F.normalize(torch.randn(T, N, K, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(T, N, V, generator=gen, dtype=torch.float64)
    if beta == "one":
        b = torch.ones(T, N, dtype=torch.float64)
    else:
        b = torch.rand(T, N, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    g = None
    if gate == "mild":
        g = F.logsigmoid(torch.randn(T, N, generator=gen, dtype=torch.float64) + 3)
    elif gate == "extreme":
        g = -20 * torch.rand(T, N, generator=gen, dtype=torch.float64)
    elif gate == "reset":  # mild gates with some hard resets (-inf)
        g = F.logsigmoid(torch.randn(T, N, generator=gen, dtype=torch.float64) + 3)
        g = torch.where(torch.rand(T, N, generator=gen, dtype=torch.float64) < 0.1, -torch.inf, g)
    s0 = torch.randn(N, K, V, generator=gen, dtype=torch.float64) if h0 else None
    return [None if x is None else x.to(DEV) for x in (q, k, v, b, g, s0)]


def check(T, K, V, chunk, gate, beta="rand", h0=True, before=False, grads=True, seed=0):
    leaves = make_inputs(T, K, V, gate, beta, h0, seed)
    ref_in = [None if x is None else x.clone().requires_grad_(True) for x in leaves]
    o_ref, s_ref = chunk_ops._chunk_delta(*ref_in, chunk, before)
    tri_in = [None if x is None else x.float().requires_grad_(True) for x in leaves]
    o, s = triton_delta._triton_delta_chunk(*tri_in, chunk, before)
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
    for name, a, b in zip(NAMES, tri_in, ref_in):
        if a is None:
            continue
        assert a.grad is not None and a.grad.dtype == torch.float32, name
        assert torch.isfinite(a.grad).all(), name      # -inf gates included (chunk_ops's delta backward is finite)
        assert rel_err(a.grad, b.grad) <= TOL, (name, rel_err(a.grad, b.grad))


def recurrent(q, k, v, beta, g, h0):
    """Token by token, float64: S_t = e^{g_t} (I - b k k^T) S_{t-1} + b k v^T, o_t = S_t^T q_t."""
    T, n, K = q.shape
    S = torch.zeros(n, K, v.shape[-1], dtype=q.dtype) if h0 is None else h0.clone()
    out = []
    for t in range(T):
        if g is not None:
            S = S * torch.exp(g[t])[:, None, None]
        kt, bt = k[t], beta[t][:, None]
        S = S + kt[:, :, None] * (bt * (v[t] - (kt[:, :, None] * S).sum(1)))[:, None, :]
        out.append((q[t][:, :, None] * S).sum(1))
    return torch.stack(out), S


# ---------------------------------------------------------------- values and gradients

GATES = ("none", "mild", "extreme")


@pytest.mark.parametrize("T,chunk,gate", slow_except(  # fast: every pair of length, chunk and gate
    [(T, c, g) for T in (1, 17, 64, 70) for c in (16, 32) for g in GATES],
    [(T, (16, 32)[(t + i) % 2], g) for t, T in enumerate((1, 17, 64, 70)) for i, g in enumerate(GATES)]))
def test_delta(T, chunk, gate):
    check(T, 24, 24, chunk, gate)


@pytest.mark.parametrize("T,chunk,gate", [(17, 16, "none"), (70, 16, "mild"), (64, 32, "extreme")])
def test_beta_one(T, chunk, gate):
    """b = 1: each step projects the state off k_t exactly (I - k k^T) before writing v_t."""
    check(T, 16, 16, chunk, gate, beta="one")


@pytest.mark.parametrize("K,V", [(16, 16), (24, 20), (20, 24), (16, 80)])   # 80: two V blocks of 64
def test_shapes(K, V):
    check(33, K, V, 16, "mild")


def test_chunk_not_pow2():
    """Chunk 20: a 32-row block with rows 20..31 masked (zero rows of A, W, U, D)."""
    check(45, 16, 16, 20, "extreme")


@pytest.mark.parametrize("chunk", [16, 32])
def test_extreme_gates_direct_sums(chunk):
    """Gates near -20 per step: exponents summed directly (no difference of cumulative sums, which would
    lose ~|G| * eps, a few 1e-5 relative in float32), so the error stays near float32 rounding."""
    leaves = make_inputs(64, 16, 16, "extreme", seed=5)
    o_ref, s_ref = chunk_ops._chunk_delta(*leaves, chunk)
    o, s = triton_delta._triton_delta_chunk(*[None if x is None else x.float() for x in leaves], chunk)
    assert rel_err(o, o_ref) <= 2e-6 and rel_err(s, s_ref) <= 2e-6, (rel_err(o, o_ref), rel_err(s, s_ref))


def test_hard_resets_no_nan():
    check(40, 16, 16, 16, "reset")


@pytest.mark.parametrize("gate", ["none", "mild"])
def test_no_h0(gate):
    check(30, 16, 24, 16, gate, h0=False)


@pytest.mark.parametrize("gate,h0", [("none", True), ("mild", True), ("extreme", False)])
def test_readout_before(gate, h0):
    check(25, 16, 16, 16, gate, h0=h0, before=True)


@pytest.mark.parametrize("gate", ["none", "mild", "extreme"])
def test_against_recurrence(gate):
    """An independent reference: the token-by-token recurrence (not via chunk_ops)."""
    leaves = make_inputs(37, 16, 16, gate, seed=3)
    o_ref, s_ref = recurrent(*leaves)
    o, s = triton_delta._triton_delta_chunk(*[None if x is None else x.float() for x in leaves], 16)
    assert rel_err(o, o_ref) <= TOL and rel_err(s, s_ref) <= TOL, (rel_err(o, o_ref), rel_err(s, s_ref))


def test_partial_requires_grad():
    """Only some inputs require grad (S_T then may not depend on any of them: q alone)."""
    leaves = [None if x is None else x.float() for x in make_inputs(20, 16, 16, "mild")]
    q = leaves[0].requires_grad_(True)
    o, s = triton_delta._triton_delta_chunk(*leaves, 16)
    assert not s.requires_grad or s.grad_fn is not None
    o.sum().backward()
    ref = make_inputs(20, 16, 16, "mild")
    qr = ref[0].requires_grad_(True)
    chunk_ops._chunk_delta(*ref, 16)[0].sum().backward()
    assert rel_err(q.grad, qr.grad) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("gate", ["none", "mild", "extreme"])
@pytest.mark.parametrize("beta", ["rand", "one"])
def test_chunk64_long(gate, beta):
    check(150, 24, 24, 64, gate, beta=beta)


@pytest.mark.slow
@pytest.mark.parametrize("gate", ["mild", "extreme", "reset"])
def test_long_two_v_blocks(gate):
    check(130, 32, 96, 32, gate)


# ---------------------------------------------------------------- dtypes, fallbacks, contract

def test_empty():
    o, s = triton_delta._triton_delta_chunk(*[None if x is None else x.float() for x in
                                              make_inputs(0, 16, 16, "mild")], 16)
    assert o.shape == (0, N, 16) and s.shape == (N, 16, 16)


def test_float64_falls_back():
    leaves = make_inputs(20, 16, 16, "mild")
    o, s = triton_delta._triton_delta_chunk(*leaves, 16)
    o_ref, s_ref = chunk_ops._chunk_delta(*leaves, 16)
    assert o.dtype == torch.float64 and torch.equal(o, o_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gate", ["none", "mild"])
def test_half_inputs(dtype, gate):
    """Loaded and upcast to float32 in the kernel; outputs and gradients in the input dtype."""
    leaves = make_inputs(20, 16, 16, gate)
    o_ref, s_ref = chunk_ops._chunk_delta(*[None if x is None else x.to(dtype).double() for x in leaves], 16)
    xs = [None if x is None else x.to(dtype).requires_grad_(True) for x in leaves]
    o, s = triton_delta._triton_delta_chunk(*xs, 16)
    assert o.dtype == s.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3   # the rounding of the outputs themselves
    assert rel_err(o, o_ref) <= tol and rel_err(s, s_ref) <= tol
    (o.float().sum() + s.float().sum()).backward()
    for x in xs:
        if x is not None:
            assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()
