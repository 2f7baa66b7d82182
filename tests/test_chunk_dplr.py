"""rnnc/runtime/chunk_dplr.py: the generalized delta rule chunkwise against a plain float64 per-step loop.

Checked: o and S_T and the gradients of q, every micro-step's k, v, a, b and log-gate, and h0, for
T around the chunk size and ragged, no/scalar/per-key decays (mild, extreme down to -20 a step, and
-inf hard resets), one to three micro-steps a token, readout after and before the update; float32
(rel err <= 1e-4 against the float64 loop, relative to the max magnitude) and float64; never a NaN
or an inf. Cross-checked against fla's naive DPLR and KDA chunk references when fla-core is installed.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rnnc.runtime.chunk_dplr import _chunk_dplr

from helpers import fla_naive

N, K, V = 3, 8, 5
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def ref_dplr(q, ks, vs, as_, bs, gs, h0, before=False):
    """Per token, per micro-step m: S <- diag(exp(g_m)) S + a_m (b_m^T S) + k_m v_m^T; o_t = S^T q_t."""
    T = q.shape[0]
    S, os_ = h0, []
    for t in range(T):
        if before:
            os_.append(torch.einsum("nk,nkv->nv", q[t], S))
        for m in range(len(ks)):
            new = S
            if gs[m] is not None:
                e = torch.exp(gs[m][t])
                new = (e.unsqueeze(-1) if e.dim() == 2 else e[:, None, None]) * S
            if as_[m] is not None:
                new = new + as_[m][t].unsqueeze(-1) * torch.einsum("nk,nkv->nv", bs[m][t], S).unsqueeze(-2)
            if ks[m] is not None:
                new = new + ks[m][t].unsqueeze(-1) * vs[m][t].unsqueeze(-2)
            S = new
        if not before:
            os_.append(torch.einsum("nk,nkv->nv", q[t], S))
    return torch.stack(os_), S


def case(T, M, gate, seed, n=N):
    """q, per-step keys/values, a = -beta kk and b = kk (a delta rule, beta in (0, 1)) or b = kk * w
    (DPLR with a != b), gates: none, scalar (first step only, as DeltaProduct), per key, extreme, -inf."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, h0 = rnd(T, n, K), rnd(n, K, V)
    ks = [F.normalize(rnd(T, n, K), dim=-1) for _ in range(M)]
    vs = [rnd(T, n, V) for _ in range(M)]
    kk = [F.normalize(rnd(T, n, K), dim=-1) for _ in range(M)]
    as_ = [-x * torch.sigmoid(rnd(T, n, 1)) for x in kk]
    bs = [x * torch.sigmoid(rnd(T, n, K)) if m % 2 else x for m, x in enumerate(kk)]
    if gate == "none":
        gs = [None] * M
    elif gate == "scalar":
        gs = [F.logsigmoid(rnd(T, n) + 2)] + [None] * (M - 1)
    elif gate == "key":
        gs = [F.logsigmoid(rnd(T, n, K) + 2) for _ in range(M)]
    elif gate == "extreme":
        gs = [-20 * torch.rand(T, n, K, generator=gen, dtype=torch.float64)] + [None] * (M - 1)
    else:  # -inf: hard resets of some channels (per key) or whole states (scalar)
        gk = F.logsigmoid(rnd(T, n, K))
        gk[torch.rand(T, n, K, generator=gen) < 0.1] = -math.inf
        gs = [gk] + [None] * (M - 1)
    return q, ks, vs, as_, bs, gs, h0


def flat(inputs):
    q, ks, vs, as_, bs, gs, h0 = inputs
    return [q, *ks, *vs, *as_, *bs, *gs, h0]


def unflat(xs, M):
    q, rest, h0 = xs[0], xs[1:-1], xs[-1]
    return (q, *[list(rest[i * M:(i + 1) * M]) for i in range(5)], h0)


def run(fn, inputs, dtype, wo, ws):
    """fn's (o, S_T) and the gradients of a weighted loss w.r.t. every tensor input."""
    M = len(inputs[1])
    leaves = [None if x is None else x.detach().to(dtype).requires_grad_() for x in flat(inputs)]
    o, S = fn(*unflat(leaves, M))
    loss = (o * wo.to(o.dtype)).sum() + (S * ws.to(S.dtype)).sum()
    used = [x for x in leaves if x is not None]
    grads = torch.autograd.grad(loss, used)
    return [o, S, *grads]


def check(label, got, want, dtype):
    for k, (g, w) in enumerate(zip(got, want)):
        assert torch.isfinite(g).all(), f"{label}: output {k} has NaN/inf"
        err = rel_err(g, w)
        assert err <= TOL[dtype], f"{label}: output {k} rel err {err:.3g} > {TOL[dtype]:g}"


#: A fast subset (every gate once, each micro-step count, T at and around the chunk), the rest slow.
FAST = {(65, g, 1) for g in ("none", "scalar", "key", "extreme", "-inf")} | {(1, "key", 1), (64, "key", 1)} \
    | {(63, g, 2) for g in ("scalar", "key", "-inf")} | {(130, "scalar", 3)}
DPLR_CASES = [pytest.param(T, gate, M, marks=[] if (T, gate, M) in FAST else [pytest.mark.slow])
              for T in (1, 7, 63, 64, 65, 130) for gate in ("none", "scalar", "key", "extreme", "-inf")
              for M in (1, 2, 3)]


@pytest.mark.parametrize("T,gate,M", DPLR_CASES)
def test_dplr_matches_loop(T, gate, M):
    inputs = case(T, M, gate, seed=T * 10 + M)
    gen = torch.Generator().manual_seed(1)
    wo, ws = torch.randn(T, N, V, generator=gen, dtype=torch.float64), torch.randn(N, K, V, generator=gen,
                                                                                    dtype=torch.float64)
    want = run(ref_dplr, inputs, torch.float64, wo, ws)
    for dtype, C in ((torch.float32, 16), (torch.float64, 64)):
        got = run(lambda *a: _chunk_dplr(*a, C), inputs, dtype, wo, ws)
        assert got[0].dtype == dtype and got[1].dtype == dtype
        check(f"dplr gate={gate} M={M} T={T} C={C} {dtype}", got, want, dtype)


@pytest.mark.parametrize("T", [1, 9, 64, 65])
@pytest.mark.parametrize("gate", ["none", "key"])
@pytest.mark.parametrize("M", [1, 2])
def test_dplr_readout_before_update(T, gate, M):
    inputs = case(T, M, gate, seed=T + M)
    gen = torch.Generator().manual_seed(2)
    wo, ws = torch.randn(T, N, V, generator=gen, dtype=torch.float64), torch.randn(N, K, V, generator=gen,
                                                                                    dtype=torch.float64)
    want = run(lambda *a: ref_dplr(*a, before=True), inputs, torch.float64, wo, ws)
    got = run(lambda *a: _chunk_dplr(*a, 16, before=True), inputs, torch.float32, wo, ws)
    check(f"dplr before gate={gate} M={M} T={T}", got, want, torch.float32)


@pytest.mark.parametrize("gate,M", [("key", 1), ("scalar", 2), ("none", 1)])
@pytest.mark.parametrize("used", ["o", "S"])
def test_dplr_gradients_when_only_outputs_or_only_the_final_state_are_used(gate, M, used):
    """The pass over chunks has its own backward (_DplrPass): with the final state unused it gets no
    state gradient, with the outputs unused none for the entering states and pseudo-values."""
    q, ks, vs, as_, bs, gs, h0 = case(37, M, gate, seed=3)
    leaves = [q, *ks, *vs, *as_, *bs, h0]
    for x in leaves:
        x.requires_grad_()

    def grads(fn):
        o, S = fn(q, ks, vs, as_, bs, gs, h0)
        loss = o.sum() if used == "o" else (S * S).sum()
        return torch.autograd.grad(loss, leaves, allow_unused=True)
    want = grads(ref_dplr)
    for got, ref in zip(grads(lambda *a: _chunk_dplr(*a, 8)), want):
        if got is None or ref is None:  # not reached by the loss on one side: zero on the other
            assert all(x is None or not x.any() for x in (got, ref))
        else:
            assert rel_err(got, ref) < 1e-10


def test_dplr_absent_parts_no_h0_and_odd_chunks():
    """Micro-steps without a low-rank part, an update or a decay; h0=None means zeros; chunk sizes that
    are not powers of two and larger than T; T = 0."""
    q, ks, vs, as_, bs, gs, h0 = case(50, 3, "key", seed=5)
    as_[1] = bs[1] = None
    ks[2] = vs[2] = None
    gs[1] = None
    h0 = torch.zeros_like(h0)
    want = ref_dplr(q, ks, vs, as_, bs, gs, h0)
    for C in (1, 5, 12, 100):
        o, S = _chunk_dplr(q, ks, vs, as_, bs, gs, None, C)
        assert rel_err(o, want[0]) < 1e-10 and rel_err(S, want[1]) < 1e-10, C
    empty = [[None if x is None else x[:0] for x in xs] for xs in (ks, vs, as_, bs, gs)]
    o, S = _chunk_dplr(q[:0], *empty, h0, 16)
    assert o.shape == (0, N, V) and torch.equal(S, h0)


def test_dplr_extreme_gates_keep_float32_accuracy():
    """Per-key gates near -20 a step over long chunks: the direct gate sums keep float32 near 1e-6."""
    inputs = case(256, 1, "extreme", seed=3)
    want = ref_dplr(*inputs)
    got = _chunk_dplr(*[x.float() if torch.is_tensor(x) else [None if y is None else y.float() for y in x]
                        for x in inputs], 64)
    assert max(rel_err(a, b) for a, b in zip(got, want)) < 1e-5


# ---------------------------------------------------------------- fla's naive references (optional)

def test_dplr_matches_fla_naive_chunk_dplr():
    """fla's dplr_chunkwise (head-first, q scaled by K^-1/2, S_t = diag(e^g) S + b (aᵀ S) + k vᵀ)."""
    naive = fla_naive("ops/generalized_delta_rule/dplr/naive.py")
    T, n = 64, 2
    q, ks, vs, as_, bs, gs, h0 = case(T, 1, "key", seed=11, n=n)
    hf = lambda x: x.transpose(0, 1).unsqueeze(0).float()  # noqa: E731  [T, n, D] -> [1, n, T, D]
    # fla's alpha (read by b^T S) is our b, its beta (the column) our a; it computes in float32
    o_ref, S_ref = naive.dplr_chunkwise(hf(q), hf(ks[0]), hf(vs[0]), hf(bs[0]), hf(as_[0]), hf(gs[0]),
                                        initial_state=h0.unsqueeze(0).float(), chunk_size=16)
    o, S = _chunk_dplr(q * K ** -0.5, ks, vs, as_, bs, gs, h0, 16)
    assert rel_err(o_ref[0].transpose(0, 1), o) < 1e-5 and rel_err(S_ref[0], S) < 1e-5


def test_kda_matches_fla_naive_chunk_kda():
    """fla's naive_chunk_kda: S_t = (I - β k kᵀ) diag(e^g) S + β k vᵀ, as a = -β k, b = e^g ⊙ k."""
    naive = fla_naive("ops/kda/naive.py")
    T, n = 128, 2
    gen = torch.Generator().manual_seed(4)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, v, h0 = rnd(T, n, K), rnd(T, n, V), rnd(n, K, V)
    k = F.normalize(rnd(T, n, K), dim=-1)
    g, beta = F.logsigmoid(rnd(T, n, K) + 2), torch.sigmoid(rnd(T, n))
    seq = lambda x: x.unsqueeze(0)  # noqa: E731  [T, n, ...] -> fla's [1, T, n, ...]
    o_ref, S_ref = naive.naive_chunk_kda(seq(q), seq(k), seq(v), seq(g), seq(beta), scale=1.0,
                                         initial_state=h0.unsqueeze(0), output_final_state=True, chunk_size=64)
    o, S = _chunk_dplr(q, [k], [v * beta[..., None]], [-beta[..., None] * k], [torch.exp(g) * k], [g], h0, 16)
    assert rel_err(o_ref[0], o) < 1e-5 and rel_err(S_ref[0], S) < 1e-5  # fla computes in float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dplr_direct_pairs_match_halving_up_to_the_gate_bound(dtype):
    """Bounded per-key gates (a chunk's sum down to just inside -log(max)/2) take the one-matmul factored
    pairs; they agree with the recursive-halving pairs, and anything past the bound (or -inf, NaN) does not
    take them."""
    from rnnc.runtime.chunk_dplr import _dplr_gates_bounded, _dplr_key_direct, _dplr_key_parts
    gen = torch.Generator().manual_seed(4)
    C, limit = 16, 0.5 * math.log(torch.finfo(dtype).max)
    g = -torch.rand(5, C, K, generator=gen, dtype=torch.float64)
    g = (g / g.sum(-2, keepdim=True) * (-0.99 * limit)).to(dtype)     # every chunk and key sums to -0.99 limit
    xs = [torch.randn(5, C, K, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2)]
    ys = [torch.randn(5, C, K, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2)]
    assert _dplr_gates_bounded(g)
    for got, want in zip(_dplr_key_direct(xs, ys, g), _dplr_key_parts(xs, ys, g)):
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < TOL[dtype] / 10
    assert not _dplr_gates_bounded(g * 1.02)
    for bad in (-math.inf, math.nan):
        g2 = g.clone()
        g2[2, 3, 1] = bad
        assert not _dplr_gates_bounded(g2)
