"""rnnc/runtime/chunk.py: chunkwise-parallel linear recurrences against plain float64 per-step loops.

Checked: o and S_T and the gradients of q, k, v, the gates, beta and h0, for ragged T, chunk sizes
16/32/64, mild and extreme log-gates, float32 (rel err <= 1e-4 against the float64 loop, relative to
the max magnitude) and float64; no NaN/inf ever. Cross-checked against fla's naive chunk references
(loaded by file path) when fla-core is installed. (Its standalone copy: tests/test_link.py.)
"""
from __future__ import annotations

import importlib.util
import math
import os
import time

import pytest
import torch

import rnnc.runtime.chunk as chunk_ops

N, K, V = 3, 16, 12
TS = [1, 7, 63, 64, 65, 300]
CHUNKS = [16, 32, 64]
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make_gate(kind, shape, gen):
    if kind == "mild":
        return torch.nn.functional.logsigmoid(torch.randn(shape, generator=gen, dtype=torch.float64) + 3)
    return -20 * torch.rand(shape, generator=gen, dtype=torch.float64)


# ---------------------------------------------------------------- float64 per-step references

def ref_linear(q, k, v, gk, gv, h0):
    S, os_ = h0, []
    for t in range(q.shape[0]):
        if gk is not None:
            S = torch.exp(gk[t]).unsqueeze(-1) * S
        if gv is not None:
            S = S * torch.exp(gv[t]).unsqueeze(-2)
        S = S + k[t].unsqueeze(-1) * v[t].unsqueeze(-2)
        os_.append(torch.einsum("nk,nkv->nv", q[t], S))
    return torch.stack(os_), S


def ref_delta(q, k, v, beta, g, h0):
    S, os_ = h0, []
    for t in range(q.shape[0]):
        if g is not None:
            S = torch.exp(g[t])[:, None, None] * S
        kS = torch.einsum("nk,nkv->nv", k[t], S)
        S = S + beta[t][:, None, None] * k[t].unsqueeze(-1) * (v[t] - kS).unsqueeze(-2)
        os_.append(torch.einsum("nk,nkv->nv", q[t], S))
    return torch.stack(os_), S


def run_with_grads(fn, inputs, wo, ws):
    """fn(*inputs) -> (o, S); returns [o, S, *grads of the non-None inputs] (inputs are leaves)."""
    leaves = [x for x in inputs if x is not None]
    o, S = fn(*inputs)
    loss = (o * wo.to(o.dtype)).sum() + (S * ws.to(S.dtype)).sum()
    grads = torch.autograd.grad(loss, leaves)
    return [o, S, *grads]


def as_leaves(tensors, dtype):
    return [None if x is None else x.detach().to(dtype).requires_grad_(True) for x in tensors]


def check_all(name, got, want, dtype, names):
    for g, w, label in zip(got, want, names):
        assert torch.isfinite(g).all(), f"{name}: {label} has NaN/inf"
        err = rel_err(g, w)
        assert err <= TOL[dtype], f"{name}: {label} rel err {err:.3g} > {TOL[dtype]:g}"


# ---------------------------------------------------------------- _chunk_linear

# (gk width, gv width): None = absent, 1 = scalar, "K"/"V" = per channel
LINEAR_GATES = {
    "none": (None, None),
    "gk_scalar": (1, None),
    "gk_vector": ("K", None),
    "gv_scalar": (None, 1),
    "gv_vector": (None, "V"),
    "both_scalar": (1, 1),
    "gk_vector_gv_scalar": ("K", 1),
    "gk_scalar_gv_vector": (1, "V"),
    "both_vector": ("K", "V"),
}


def linear_case(T, gates, mag, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v, h0 = rnd(T, N, K), rnd(T, N, K), rnd(T, N, V), rnd(N, K, V)
    wk, wv = LINEAR_GATES[gates]
    width = {"K": K, "V": V, 1: 1}
    gk = None if wk is None else make_gate(mag, (T, N, width[wk]), gen)
    gv = None if wv is None else make_gate(mag, (T, N, width[wv]), gen)
    wo, ws = rnd(T, N, V), rnd(N, K, V)
    return [q, k, v, gk, gv, h0], wo, ws


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("mag", ["mild", "extreme"])
@pytest.mark.parametrize("gates", list(LINEAR_GATES))
def test_linear_matches_loop(T, gates, mag):
    if gates == "none" and mag == "extreme":
        pytest.skip("no gates")
    inputs, wo, ws = linear_case(T, gates, mag, seed=T)
    names = ["o", "S_T"] + [f"d{n}" for n, x in zip(["q", "k", "v", "gk", "gv", "h0"], inputs) if x is not None]
    want = run_with_grads(ref_linear, as_leaves(inputs, torch.float64), wo, ws)
    for dtype in (torch.float32, torch.float64):
        for C in CHUNKS:
            fn = lambda q, k, v, gk, gv, h0: chunk_ops._chunk_linear(q, k, v, gk, gv, h0, C)  # noqa: E731
            got = run_with_grads(fn, as_leaves(inputs, dtype), wo, ws)
            assert got[0].dtype == dtype and got[1].dtype == dtype
            check_all(f"linear {gates} {mag} T={T} C={C} {dtype}", got, want, dtype, names)


def test_linear_no_h0_and_other_chunks():
    """h0=None means zeros; chunk sizes that are not powers of two (and C > T) work too."""
    inputs, wo, ws = linear_case(50, "both_vector", "mild", seed=1)
    inputs[-1] = torch.zeros(N, K, V, dtype=torch.float64)
    want = ref_linear(*inputs)
    for C in (1, 5, 12, 24, 100):
        o, S = chunk_ops._chunk_linear(*inputs[:-1], None, C)
        assert rel_err(o, want[0]) < 1e-10 and rel_err(S, want[1]) < 1e-10, C
    o, S = chunk_ops._chunk_linear(*[x[:0] for x in inputs[:-1]], inputs[-1], 16)  # T = 0
    assert o.shape == (0, N, V) and torch.equal(S, inputs[-1])


# ---------------------------------------------------------------- _chunk_delta

def delta_case(T, gate, keys, seed=0, n=N):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v, h0 = rnd(T, n, K), rnd(T, n, K), rnd(T, n, V), rnd(n, K, V)
    if keys == "l2":
        k = k / k.norm(dim=-1, keepdim=True)
    else:  # not normalised: |k|^2 around 1 (the recurrence stays contractive for beta < 1)
        k = k / math.sqrt(K)
    beta = torch.sigmoid(rnd(T, n))
    g = None if gate == "none" else make_gate(gate, (T, n), gen)
    wo, ws = rnd(T, n, V), rnd(n, K, V)
    return [q, k, v, beta, g, h0], wo, ws


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("gate", ["none", "mild", "extreme"])
@pytest.mark.parametrize("keys", ["l2", "raw"])
def test_delta_matches_loop(T, gate, keys):
    inputs, wo, ws = delta_case(T, gate, keys, seed=T + 7)
    names = ["o", "S_T"] + [f"d{n}" for n, x in zip(["q", "k", "v", "beta", "g", "h0"], inputs) if x is not None]
    want = run_with_grads(ref_delta, as_leaves(inputs, torch.float64), wo, ws)
    for dtype in (torch.float32, torch.float64):
        for C in CHUNKS:
            fn = lambda q, k, v, b, g, h0: chunk_ops._chunk_delta(q, k, v, b, g, h0, C)  # noqa: E731
            got = run_with_grads(fn, as_leaves(inputs, dtype), wo, ws)
            assert got[0].dtype == dtype and got[1].dtype == dtype
            check_all(f"delta {gate} {keys} T={T} C={C} {dtype}", got, want, dtype, names)


def test_delta_no_h0_and_other_chunks():
    inputs, wo, ws = delta_case(50, "mild", "l2", seed=3)
    inputs[-1] = torch.zeros(N, K, V, dtype=torch.float64)
    want = ref_delta(*inputs)
    for C in (1, 5, 12, 24, 100):
        o, S = chunk_ops._chunk_delta(*inputs[:-1], None, C)
        assert rel_err(o, want[0]) < 1e-10 and rel_err(S, want[1]) < 1e-10, C
    o, S = chunk_ops._chunk_delta(*[x[:0] for x in inputs[:-1]], inputs[-1], 16)  # T = 0
    assert o.shape == (0, N, V) and torch.equal(S, inputs[-1])


# ---------------------------------------------------------------- the readout before the update (RWKV)

def ref_before(ref, inputs):
    """o_t = S_{t-1}^T q_t from a reference whose readout follows the update: run it step by step."""
    q, h0 = inputs[0], inputs[-1]
    os_, S = [], h0
    for t in range(q.shape[0]):
        os_.append(torch.einsum("nk,nkv->nv", q[t], S))
        step = [x[t:t + 1] if x is not None else None for x in inputs[:-1]]
        S = ref(*step, S)[1]
    return (torch.stack(os_) if os_ else q.new_zeros(0, *h0.shape[::2])), S


@pytest.mark.parametrize("T", [1, 7, 64, 65, 130])
@pytest.mark.parametrize("gates", ["none", "gk_scalar", "gk_vector", "gv_vector", "both_vector"])
def test_linear_readout_before_update(T, gates):
    inputs, wo, ws = linear_case(T, gates, "mild" if T % 2 else "extreme", seed=T + 1)
    names = ["o", "S_T"] + [f"d{n}" for n, x in zip(["q", "k", "v", "gk", "gv", "h0"], inputs) if x is not None]
    want = run_with_grads(lambda *a: ref_before(ref_linear, a), as_leaves(inputs, torch.float64), wo, ws)
    for dtype in (torch.float32, torch.float64):
        for C in (8, 16, 24):
            fn = lambda *a: chunk_ops._chunk_linear(*a, C, before=True)  # noqa: E731
            check_all(f"before {gates} T={T} C={C}", run_with_grads(fn, as_leaves(inputs, dtype), wo, ws), want,
                      dtype, names)


@pytest.mark.parametrize("T", [1, 7, 65])
@pytest.mark.parametrize("gate", ["none", "mild"])
def test_delta_readout_before_update(T, gate):
    inputs, wo, ws = delta_case(T, gate, "l2", seed=T + 2)
    names = ["o", "S_T"] + [f"d{n}" for n, x in zip(["q", "k", "v", "beta", "g", "h0"], inputs) if x is not None]
    want = run_with_grads(lambda *a: ref_before(ref_delta, a), as_leaves(inputs, torch.float64), wo, ws)
    for C in (16, 24):
        fn = lambda *a: chunk_ops._chunk_delta(*a, C, before=True)  # noqa: E731
        check_all(f"delta before T={T} C={C}", run_with_grads(fn, as_leaves(inputs, torch.float32), wo, ws), want,
                  torch.float32, names)


def test_readout_before_update_without_h0():
    inputs, _, _ = linear_case(20, "gk_vector", "mild", seed=9)
    inputs[-1] = torch.zeros(N, K, V, dtype=torch.float64)
    want = ref_before(ref_linear, inputs)
    o, S = chunk_ops._chunk_linear(*inputs[:-1], None, 8, before=True)
    assert rel_err(o, want[0]) < 1e-10 and rel_err(S, want[1]) < 1e-10
    assert torch.equal(o[0], torch.zeros_like(o[0]))


# ---------------------------------------------------------------- numerics beyond the tolerance grid

def test_extreme_gates_float32_has_no_cancellation():
    """Exponents are direct sums of same-sign gates, never G_i - G_j of two cumulative sums reaching
    -20 * C (that loses ~|G| * eps, i.e. ~5e-5 relative in float32); so float32 stays ~1e-6 here."""
    for gates in ("gk_scalar", "gk_vector", "both_vector"):
        inputs, wo, ws = linear_case(300, gates, "extreme", seed=2)
        want = run_with_grads(ref_linear, as_leaves(inputs, torch.float64), wo, ws)
        got = run_with_grads(lambda *a: chunk_ops._chunk_linear(*a, 64), as_leaves(inputs, torch.float32), wo, ws)
        assert max(rel_err(g, w) for g, w in zip(got, want)) < 1e-5, gates
    inputs, wo, ws = delta_case(300, "extreme", "l2", seed=2)
    want = run_with_grads(ref_delta, as_leaves(inputs, torch.float64), wo, ws)
    got = run_with_grads(lambda *a: chunk_ops._chunk_delta(*a, 64), as_leaves(inputs, torch.float32), wo, ws)
    assert max(rel_err(g, w) for g, w in zip(got, want)) < 1e-5


def test_infinite_gates_reset_without_nan():
    """A log-gate of -inf (decay exactly 0, a hard reset) gives finite values and gradients, equal to the loop."""
    inputs, wo, ws = linear_case(100, "both_vector", "mild", seed=4)
    inputs[3][5, 0, 3] = -math.inf
    inputs[3][40] = -math.inf
    inputs[4][70, 1] = -math.inf
    want = run_with_grads(ref_linear, as_leaves(inputs, torch.float64), wo, ws)
    for C in CHUNKS:
        got = run_with_grads(lambda *a: chunk_ops._chunk_linear(*a, C), as_leaves(inputs, torch.float64), wo, ws)
        check_all(f"linear -inf C={C}", got, want, torch.float64, ["o", "S", "dq", "dk", "dv", "dgk", "dgv", "dh0"])
    inputs, wo, ws = delta_case(100, "mild", "l2", seed=4)
    inputs[4][33] = -math.inf
    inputs[4][64, 2] = -math.inf
    want = run_with_grads(ref_delta, as_leaves(inputs, torch.float64), wo, ws)
    for C in CHUNKS:
        got = run_with_grads(lambda *a: chunk_ops._chunk_delta(*a, C), as_leaves(inputs, torch.float64), wo, ws)
        check_all(f"delta -inf C={C}", got, want, torch.float64, ["o", "S", "dq", "dk", "dv", "dbeta", "dg", "dh0"])


# ---------------------------------------------------------------- fla's naive chunk references

def load_fla_naive(rel):
    pytest.importorskip("fla")
    root = os.path.dirname(importlib.util.find_spec("fla").origin)  # does not execute fla/__init__
    pytest.importorskip("einops")
    spec = importlib.util.spec_from_file_location("ref_" + rel.replace("/", "_")[:-3], os.path.join(root, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def to_fla(x, B, H):  # [T, B*H, D] -> [B, T, H, D]   ([T, B*H] -> [B, T, H])
    T = x.shape[0]
    return x.reshape(T, B, H, *x.shape[2:]).transpose(0, 1)


@pytest.mark.parametrize("mag", ["mild", "extreme"])
@pytest.mark.parametrize("T", [65, 300])
def test_linear_vs_fla_naive_chunk_simple_gla(T, mag):
    ref = load_fla_naive("ops/simple_gla/naive.py")
    B, H = 2, 2
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(T, B * H, K, generator=gen), torch.randn(T, B * H, K, generator=gen)
    v, h0 = torch.randn(T, B * H, V, generator=gen), torch.randn(B * H, K, V, generator=gen)
    g = make_gate(mag, (T, B * H), gen).float()
    for C in CHUNKS:
        o, S = chunk_ops._chunk_linear(q, k, v, g.unsqueeze(-1), None, h0, C)
        of, Sf = ref.naive_chunk_simple_gla(to_fla(q, B, H), to_fla(k, B, H), to_fla(v, B, H), to_fla(g, B, H),
                                            initial_state=h0.reshape(B, H, K, V).clone(), output_final_state=True,
                                            chunk_size=C, scale=1.0)
        assert rel_err(to_fla(o, B, H), of) < 1e-4
        assert rel_err(S.reshape(B, H, K, V), Sf) < 1e-4


@pytest.mark.parametrize("gate", ["none", "mild", "extreme"])
@pytest.mark.parametrize("T", [65, 300])
def test_delta_vs_fla_naive_chunk_gated_delta_rule(T, gate):
    ref = load_fla_naive("ops/gated_delta_rule/naive.py")
    B, H = 2, 2
    inputs, _, _ = delta_case(T, gate, "l2", seed=11, n=B * H)
    q, k, v, beta, g, h0 = [None if x is None else x.float() for x in inputs]
    gf = torch.zeros_like(beta) if g is None else g
    for C in CHUNKS:
        o, S = chunk_ops._chunk_delta(q, k, v, beta, g, h0, C)
        of, Sf = ref.naive_chunk_gated_delta_rule(to_fla(q, B, H), to_fla(k, B, H), to_fla(v, B, H), to_fla(gf, B, H),
                                                  to_fla(beta, B, H), chunk_size=C, scale=1.0,
                                                  initial_state=h0.reshape(B, H, K, V).clone(),
                                                  output_final_state=True)
        assert rel_err(to_fla(o, B, H), of) < 1e-4
        assert rel_err(S.reshape(B, H, K, V), Sf) < 1e-4


# ---------------------------------------------------------------- timing (printed, never asserted)

def _time(fn, reps=3):
    fn()  # warm-up
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def test_timing_scalar_decay_vs_fla_naive(capsys):
    ref = load_fla_naive("ops/simple_gla/naive.py")
    B, T, H, D = 2, 2048, 4, 64
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=gen) + 3)
    h0 = torch.randn(B, H, D, D, generator=gen)
    leaves = [x.requires_grad_(True) for x in (q, k, v, g, h0)]

    def ours():
        qq, kk, vv = (x.transpose(0, 1).reshape(T, B * H, D) for x in leaves[:3])
        gg = leaves[3].transpose(0, 1).reshape(T, B * H, 1)
        o, S = chunk_ops._chunk_linear(qq, kk, vv, gg, None, leaves[4].reshape(B * H, D, D), 64)
        (o.sum() + S.sum()).backward()

    def fla():
        o, S = ref.naive_chunk_simple_gla(*leaves[:4], initial_state=leaves[4] + 0, output_final_state=True,
                                          chunk_size=64, scale=1.0)
        (o.sum() + S.sum()).backward()

    t_ours, t_fla = _time(ours), _time(fla)
    with capsys.disabled():
        print(f"\n[chunk_ops timing] B={B} T={T} H={H} K=V={D} C=64 fp32 fwd+bwd, torch threads="
              f"{torch.get_num_threads()}: _chunk_linear(scalar gk) {t_ours * 1e3:.1f} ms, "
              f"fla naive_chunk_simple_gla {t_fla * 1e3:.1f} ms")
