"""rnnc/runtime/triton_dplr.py: the generalized delta rule's Triton kernels, forward and backward.

Checked against the plain float64 per-micro-step loop of tests/test_chunk_dplr.py (`ref_dplr`, an
independent reference) at rel err <= 1e-4 (float32 inputs, relative to the max magnitude): o, S_T and
the gradients of q, every micro-step's k, v, a, b and log-gate, and h0 (the Triton backward kernels);
the forms of KDA (a = -beta k, b = k, per-key decay), RWKV-7 (a != b), DeltaProduct (two and three
micro-steps a token, a scalar decay in the first); no, scalar, per-key, extreme (down to -20 a step)
and -inf gates (scalar and per key: the kernels' matmul and row-loop paths); T ragged and around the
chunk, chunk lengths that are not powers of two; K and V not powers of two and V over 64 (two V
blocks); readout before the update; absent parts (no low-rank term, no update, no decay) and h0 =
None; bf16 inputs; the float64 fallback; T == 0; and that a library cell built for the triton backend
runs these kernels. Without a GPU the kernels run in Triton's CPU interpreter (conftest sets
TRITON_INTERPRET=1), so shapes stay small and longer cases are `slow`.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import rnnc  # noqa: E402
import rnnc.runtime.triton_dplr as triton_dplr  # noqa: E402
from rnnc.runtime.chunk_dplr import _chunk_dplr  # noqa: E402

from helpers import count_calls, library_inputs, outputs_and_grads  # noqa: E402
from test_chunk_dplr import K, V, case, ref_dplr, rel_err, run  # noqa: E402

N = 2
TOL = 1e-4


def weights(T, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(T, N, V, generator=gen, dtype=torch.float64),
            torch.randn(N, K, V, generator=gen, dtype=torch.float64))


def check(got, want, tol=TOL, label=""):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.isfinite(g.float()).all(), f"{label}: output {i} has NaN/inf"
        err = rel_err(g, w)
        assert err <= tol, f"{label}: output {i} rel err {err:.3g} > {tol:g}"


def no_fallback(monkeypatch):
    """Fail if the PyTorch rows ran instead of the kernels."""
    import rnnc.runtime.chunk_dplr as chunk_dplr

    def refuse(*args):
        raise AssertionError("the PyTorch chunk rows ran")
    monkeypatch.setattr(chunk_dplr, "_chunk_dplr_rows", refuse)


FAST = {(17, "key", 1, 16), (17, "none", 1, 16), (20, "scalar", 2, 8), (20, "-inf", 1, 16),
        (20, "extreme", 1, 16), (9, "key", 3, 5)}
CASES = [pytest.param(T, gate, M, C, marks=[] if (T, gate, M, C) in FAST else [pytest.mark.slow])
         for T, gate, M, C in sorted(FAST | {(1, "key", 1, 16), (16, "key", 1, 16), (33, "key", 1, 16),
                                              (65, "key", 1, 16), (65, "none", 1, 64), (40, "scalar", 2, 32),
                                              (65, "-inf", 2, 16), (30, "extreme", 1, 32), (21, "scalar", 3, 16),
                                              (40, "key", 2, 16)})]


@pytest.mark.parametrize("T,gate,M,C", CASES)
def test_triton_dplr_matches_loop(monkeypatch, T, gate, M, C):
    inputs = case(T, M, gate, seed=T * 10 + M, n=N)
    wo, ws = weights(T)
    want = run(ref_dplr, inputs, torch.float64, wo, ws)
    no_fallback(monkeypatch)
    got = run(lambda *a: triton_dplr._triton_chunk_dplr(*a, C), inputs, torch.float32, wo, ws)
    assert got[0].dtype == got[1].dtype == torch.float32
    check(got, want, label=f"T={T} gate={gate} M={M} C={C}")


@pytest.mark.parametrize("M", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_triton_dplr_scalar_decay_extreme_and_reset(monkeypatch, M):
    """A scalar decay (the kernels' matmul path) down to -20 a step with some -inf (whole-state resets)."""
    inputs = case(20, M, "scalar", seed=4, n=N)
    gen = torch.Generator().manual_seed(4)
    g = -20 * torch.rand(20, N, generator=gen, dtype=torch.float64)
    inputs[5][0] = torch.where(torch.rand(20, N, generator=gen) < 0.15, -torch.inf, g)
    wo, ws = weights(20)
    want = run(ref_dplr, inputs, torch.float64, wo, ws)
    no_fallback(monkeypatch)
    check(run(lambda *a: triton_dplr._triton_chunk_dplr(*a, 8), inputs, torch.float32, wo, ws), want)


@pytest.mark.parametrize("M,gate", [(1, "key"), pytest.param(2, "none", marks=pytest.mark.slow)])
def test_triton_dplr_readout_before_update(M, gate):
    inputs = case(19, M, gate, seed=3, n=N)
    wo, ws = weights(19)
    want = run(lambda *a: ref_dplr(*a, before=True), inputs, torch.float64, wo, ws)
    got = run(lambda *a: triton_dplr._triton_chunk_dplr(*a, 8, before=True), inputs, torch.float32, wo, ws)
    check(got, want)


def test_triton_dplr_kda_and_rwkv7_forms_with_wide_keys_and_values(monkeypatch):
    """KDA's micro-step (a = -beta k, b = e^g k, v' = beta v; gradients reach k, v, beta and g through
    both) and RWKV-7's (a = -kk, b = kk * a_gate, per-key decay w) at K = 20, V = 80: BK 32 with masked
    keys, two V blocks of 64 in the forward."""
    no_fallback(monkeypatch)
    Kw, Vw, T = 20, 80, 17
    gen = torch.Generator().manual_seed(9)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, v, h0 = rnd(T, N, Kw), rnd(T, N, Vw), rnd(N, Kw, Vw)
    k = F.normalize(rnd(T, N, Kw), dim=-1)
    g = -5 * torch.rand(T, N, Kw, generator=gen, dtype=torch.float64)
    beta, gate = torch.sigmoid(rnd(T, N)), torch.sigmoid(rnd(T, N, Kw))
    leaves = [q, k, v, g, beta, gate, h0]

    def kda(fn, q, k, v, g, beta, gate, h0):
        b = beta[..., None]
        return fn(q, [k], [v * b], [-b * k], [torch.exp(g) * k], [g], h0)

    def rwkv7(fn, q, k, v, g, beta, gate, h0):
        return fn(q, [k], [v], [-k], [k * gate], [g], h0)

    for form in (kda, rwkv7):
        outs = []
        for fn, dt in ((lambda *a: ref_dplr(*a), torch.float64), (lambda *a: triton_dplr._triton_chunk_dplr(*a, 16),
                                                                   torch.float32)):
            xs = [x.detach().to(dt).requires_grad_() for x in leaves]
            o, S = form(fn, *xs)
            wo = torch.cos(torch.arange(o.numel(), dtype=dt)).view_as(o)
            grads = torch.autograd.grad((o * wo).sum() + S.sum(), xs, allow_unused=True)  # kda: no gate
            outs.append([o, S, *(x for x in grads if x is not None)])
        check(outs[1], outs[0], label=form.__name__)


def test_triton_dplr_absent_parts_no_h0_and_empty(monkeypatch):
    """Micro-steps without a low-rank part, an update or a decay (zeros rows), h0 = None (zeros), a
    chunk of 7 rows (BT 16, rows 7..15 masked); T = 0 gives empty outputs and the initial state."""
    q, ks, vs, as_, bs, gs, h0 = case(10, 3, "key", seed=5, n=N)
    as_[1] = bs[1] = None
    ks[2] = vs[2] = None
    gs[1] = None
    want = ref_dplr(q, ks, vs, as_, bs, gs, torch.zeros_like(h0))
    no_fallback(monkeypatch)
    f32 = lambda xs: [None if x is None else x.float() for x in xs]  # noqa: E731
    o, S = triton_dplr._triton_chunk_dplr(q.float(), f32(ks), f32(vs), f32(as_), f32(bs), f32(gs), None, 7)
    assert rel_err(o, want[0]) <= TOL and rel_err(S, want[1]) <= TOL
    empty = [[None if x is None else x[:0].float() for x in xs] for xs in (ks, vs, as_, bs, gs)]
    o, S = triton_dplr._triton_chunk_dplr(q[:0].float(), *empty, h0.float(), 16)
    assert o.shape == (0, N, V) and torch.equal(S, h0.float())


def test_triton_dplr_bf16_inputs(monkeypatch):
    """bf16 inputs: the kernels upcast on load (the interpreter's bf16 rule) and compute in float32;
    results and gradients come back in bf16, within bf16 rounding of the float64 loop on the same
    rounded inputs; -inf gates included."""
    inputs = case(20, 1, "-inf", seed=8, n=N)
    inputs = tuple(x.to(torch.bfloat16).double() if torch.is_tensor(x)
                   else [None if y is None else y.to(torch.bfloat16).double() for y in x] for x in inputs)
    wo, ws = weights(20)
    want = run(ref_dplr, inputs, torch.float64, wo, ws)
    no_fallback(monkeypatch)
    got = run(lambda *a: triton_dplr._triton_chunk_dplr(*a, 16), inputs, torch.bfloat16, wo, ws)
    assert all(x.dtype == torch.bfloat16 for x in got)
    check(got, want, tol=2e-2)


def test_triton_dplr_float64_runs_the_pytorch_rows(monkeypatch):
    monkeypatch.setattr(triton_dplr, "_triton_dplr_rows", lambda *a: pytest.fail("the kernels ran on float64"))
    inputs = case(9, 2, "key", seed=6, n=N)
    wo, ws = weights(9)
    got = run(lambda *a: triton_dplr._triton_chunk_dplr(*a, 4), inputs, torch.float64, wo, ws)
    check(got, run(ref_dplr, inputs, torch.float64, wo, ws), tol=1e-10)


@pytest.mark.parametrize("name", ["kda", pytest.param("rwkv7", marks=pytest.mark.slow),
                                  pytest.param("deltaproduct", marks=pytest.mark.slow)])
def test_library_cell_on_the_triton_backend_runs_the_kernels(monkeypatch, name):
    """A library cell built for the triton backend runs `_triton_chunk_dplr` (65 steps: past the
    recurrent kernel's short sequences) and agrees with the loop, values, final states, gradients."""
    dims = {"K": 4, "V": 3}
    loop = rnnc.build(name, backend="loop", **dims)
    cell = rnnc.build(name, backend="triton", **dims)
    calls = count_calls(monkeypatch, cell, "_triton_chunk_dplr")
    no_fallback(monkeypatch)
    inputs = library_inputs(name, 1, 65, 2, True, torch.float32)
    ys_l, fin_l, g_l = outputs_and_grads(loop, inputs)
    ys_o, fin_o, g_o = outputs_and_grads(cell, inputs)
    assert calls == ["_triton_chunk_dplr"]
    for a, b in list(zip(ys_o, ys_l)) + [(fin_o[k], fin_l[k]) for k in fin_l] + list(zip(g_o, g_l)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item() + 1e-6)
