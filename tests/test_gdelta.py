"""The generalized delta rule cells (kda, rwkv7, deltaproduct, deltaproduct3, deltanet_neg) against
independent references, and their chunk form against the loop.

- The loop (float64) against the paper's equations written here as plain per-step loops (RWKV-7 in
  the paper's own [V, K] orientation, transposed at the end): outputs, final states and the
  gradients of every input and of the initial state.
- The chunk backend (float32 and float64) against the float64 loop at lengths around the chunk size,
  with mild, extreme (down to -20 a step) and -inf log-decays: values, final states, gradients of the
  inputs and the initial state; never a NaN.
- fla's naive references (loaded by file path; skipped without fla-core): naive_recurrent_kda, the
  DPLR recurrence RWKV-7 runs on (dplr_recurrence), naive_recurrent_gated_delta_product (n_h = 2, 3).
"""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import rnnc

from helpers import fla_naive

B, H, K, V = 2, 2, 5, 4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- the papers' equations (float64 loops)

def _read(q, S):
    return torch.einsum("...k,...kv->...v", q, S)


def _scaled(q, S):
    """o = S^T q / sqrt(K): the query scale fla applies by default (kda, deltaproduct, deltanet_neg)."""
    return _read(q, S) / q.shape[-1] ** 0.5


def ref_kda(x, S):
    # S_t = (I - beta k k^T) diag(exp(g)) S_{t-1} + beta k v^T ; o_t = S_t^T q_t / sqrt(K)
    os_ = []
    for t in range(x["q"].shape[1]):
        k, beta = x["k"][:, t], x["beta"][:, t][..., None, None]
        S = torch.exp(x["g"][:, t]).unsqueeze(-1) * S
        S = S - beta * k.unsqueeze(-1) * _read(k, S).unsqueeze(-2) + beta * k.unsqueeze(-1) * x["v"][:, t].unsqueeze(-2)
        os_.append(_scaled(x["q"][:, t], S))
    return torch.stack(os_, 1), S


def ref_rwkv7(x, S):
    # the paper's [V, K] state: wkv_t = wkv_{t-1} (diag(w_t) - kk_t^T (a_t * kk_t)) + v_t^T k_t ; o_t = wkv_t r_t
    P = S.transpose(-1, -2)
    os_ = []
    for t in range(x["r"].shape[1]):
        kk, a = x["kk"][:, t], x["a"][:, t]
        trans = torch.diag_embed(torch.exp(x["w"][:, t])) - kk.unsqueeze(-1) * (a * kk).unsqueeze(-2)
        P = P @ trans + x["v"][:, t].unsqueeze(-1) * x["k"][:, t].unsqueeze(-2)
        os_.append((P @ x["r"][:, t].unsqueeze(-1)).squeeze(-1))
    return torch.stack(os_, 1), P.transpose(-1, -2)


def ref_deltaproduct(x, S):
    # S <- exp(g) S, then per Householder step j: S <- S + beta_j k_j (v_j - S^T k_j)^T ; o_t = S^T q_t / sqrt(K)
    os_ = []
    for t in range(x["q"].shape[1]):
        S = torch.exp(x["g"][:, t])[..., None, None] * S
        for j in range(x["k"].shape[-2]):
            k, v, beta = x["k"][:, t, ..., j, :], x["v"][:, t, ..., j, :], x["beta"][:, t, ..., j]
            S = S + beta[..., None, None] * k.unsqueeze(-1) * (v - _read(k, S)).unsqueeze(-2)
        os_.append(_scaled(x["q"][:, t], S))
    return torch.stack(os_, 1), S


def ref_deltanet_neg(x, S):
    # beta = 2 sigmoid(b); S_t = S_{t-1} + beta k (v - S^T k)^T ; o_t = S_t^T q_t / sqrt(K)
    os_ = []
    for t in range(x["q"].shape[1]):
        k, beta = x["k"][:, t], 2 * torch.sigmoid(x["b"][:, t])
        S = S + beta[..., None, None] * k.unsqueeze(-1) * (x["v"][:, t] - _read(k, S)).unsqueeze(-2)
        os_.append(_scaled(x["q"][:, t], S))
    return torch.stack(os_, 1), S


# ---------------------------------------------------------------- inputs

def gen_inputs(name: str, T: int, gates: str, seed: int, n_h: int = 2) -> dict[str, torch.Tensor]:
    """Inputs [B, T, H, ...] (float64) in each cell's range; gates "mild", "extreme" (down to -20 a
    step) or "-inf" (some hard resets)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(B, T, H, *s, generator=gen, dtype=torch.float64)  # noqa: E731

    def gate(*s):
        if gates == "mild":
            return F.logsigmoid(rnd(*s) + 2)
        x = -20 * torch.rand(B, T, H, *s, generator=gen, dtype=torch.float64)
        if gates == "-inf":
            x = F.logsigmoid(rnd(*s))
            x[torch.rand(B, T, H, *s, generator=gen) < 0.1] = -math.inf
        return x

    unit = lambda *s: F.normalize(rnd(*s), dim=-1)  # noqa: E731
    if name == "kda":
        return {"q": rnd(K), "k": unit(K), "v": rnd(V), "g": gate(K), "beta": torch.sigmoid(rnd())}
    if name == "rwkv7":
        return {"r": rnd(K), "w": gate(K), "k": rnd(K) / math.sqrt(K), "v": rnd(V), "kk": unit(K),
                "a": torch.sigmoid(rnd(K))}
    if name.startswith("deltaproduct"):
        return {"q": rnd(K), "k": unit(n_h, K), "v": rnd(n_h, V), "beta": torch.sigmoid(rnd(n_h)), "g": gate()}
    return {"q": rnd(K), "k": unit(K), "v": rnd(V), "b": rnd()}


# name -> (spec, cell, reference, n_h)
CELLS = {
    "kda": ("kda", None, ref_kda, 0),
    "rwkv7": ("rwkv7", None, ref_rwkv7, 0),
    "deltaproduct": ("deltaproduct", None, ref_deltaproduct, 2),
    "deltaproduct3": ("deltaproduct", "deltaproduct3", ref_deltaproduct, 3),
    "deltanet_neg": ("deltanet_neg", None, ref_deltanet_neg, 0),
}


def run(fn, x: dict, h0: torch.Tensor, dtype, weights):
    """(o, S_T, gradients of every input and of h0) of fn(inputs, h0) -> (o, S_T), in `dtype`."""
    leaves = {k: v.detach().to(dtype).requires_grad_() for k, v in x.items()}
    s0 = h0.detach().to(dtype).requires_grad_()
    o, S = fn(leaves, s0)
    loss = (o * weights[0].to(o.dtype)).sum() + (S * weights[1].to(S.dtype)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()) + [s0])
    return [o, S, *grads]


def via_cell(cell):
    def fn(x, s0):
        o, final = cell(**x, state={"S": s0})
        return o, final["S"]
    return fn


def _weights(T: int):
    gen = torch.Generator().manual_seed(T)
    return torch.randn(B, T, H, V, generator=gen, dtype=torch.float64), torch.randn(B, H, K, V, generator=gen,
                                                                                    dtype=torch.float64)


def _h0(seed: int):
    return torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_loop_matches_the_papers_equations(name):
    spec, cell_name, ref, n_h = CELLS[name]
    T = 9
    x, h0 = gen_inputs(name, T, "mild", seed=1, n_h=n_h), _h0(1)
    loop = rnnc.build(spec, cell=cell_name, backend="loop", dtype=torch.float64)
    got = run(via_cell(loop), x, h0, torch.float64, _weights(T))
    want = run(ref, x, h0, torch.float64, _weights(T))
    for k, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) < 1e-10, (name, k)


def _chunk_cases():
    out = []
    for name in sorted(CELLS):
        for T in (63, 64, 65):
            for gates in ("mild", "extreme", "-inf"):
                fast = (T, gates) in {(65, "mild"), (64, "extreme"), (63, "-inf")}
                out.append(pytest.param(name, T, gates, marks=[] if fast else [pytest.mark.slow]))
    return out


@pytest.mark.parametrize("name,T,gates", _chunk_cases())
def test_chunk_matches_loop(name, T, gates):
    """Values, final state and the gradients of every input and of the initial state; float32 within
    1e-4 (relative to the largest magnitude) of the float64 loop, float64 within 1e-9."""
    spec, cell_name, _, n_h = CELLS[name]
    if gates != "mild" and name == "deltanet_neg":
        pytest.skip("no decay")
    x, h0 = gen_inputs(name, T, gates, seed=T, n_h=n_h), _h0(T)
    loop = rnnc.build(spec, cell=cell_name, backend="loop", dtype=torch.float64)
    want = run(via_cell(loop), x, h0, torch.float64, _weights(T))
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-9)):
        chunk = rnnc.build(spec, cell=cell_name, backend="chunk", dtype=dtype)
        got = run(via_cell(chunk), x, h0, dtype, _weights(T))
        for k, (a, b) in enumerate(zip(got, want)):
            assert torch.isfinite(a).all(), (name, k)
            assert rel_err(a, b) < tol, (name, dtype, k, rel_err(a, b))


def test_the_chunk_plans():
    """KDA and RWKV-7 are one generalized micro-step with a per-key decay, DeltaProduct n_h steps with
    the scalar decay in the first, deltanet_neg the delta kind (Triton kernels too) with β = 2 σ(b)."""
    from rnnc.analysis import analyze_cell
    from rnnc.optimize import optimize
    from rnnc.plans import chunk_plan

    def plan(spec, cell=None):
        c = optimize(rnnc.load(spec).cell(cell))
        return c.graph, chunk_plan(c, analyze_cell(c))

    for spec in ("kda", "rwkv7"):
        g, p = plan(spec)
        (step,) = p.steps
        assert p.kind == "dplr" and step.gk is not None and step.g is None and g[step.gk].name in ("g", "w")
    for cell, n in (("deltaproduct", 2), ("deltaproduct3", 3)):
        g, p = plan("deltaproduct", cell)
        assert p.kind == "dplr" and len(p.steps) == n and g[p.steps[0].g].name == "g"
        assert all(st.gk is None for st in p.steps) and all(st.g is None for st in p.steps[1:])
    g, p = plan("deltanet_neg")
    assert p.kind == "delta" and g[p.beta].op == "mul"


# ---------------------------------------------------------------- fla's naive references (optional)

def _against(name: str, fla_fn, T: int = 40):
    """The chunk cell (float64) against fla's reference (which computes in float32): values, final
    state and the gradients of the inputs and the initial state within 1e-4 relative."""
    spec, cell_name, _, n_h = CELLS[name]
    x, h0 = gen_inputs(name, T, "mild", seed=3, n_h=n_h), _h0(3)
    chunk = rnnc.build(spec, cell=cell_name, backend="chunk", dtype=torch.float64, chunk_size=16)
    got = run(via_cell(chunk), x, h0, torch.float64, _weights(T))
    want = run(lambda x, s0: fla_fn(x, s0), x, h0, torch.float32, _weights(T))
    for k, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) < 1e-4, (name, k, rel_err(a, b))


def test_kda_against_fla_naive_recurrent_kda():
    naive = fla_naive("ops/kda/naive.py")
    _against("kda", lambda x, s0: naive.naive_recurrent_kda(x["q"], x["k"], x["v"], x["g"], x["beta"],
                                                            initial_state=s0, output_final_state=True))


def test_rwkv7_against_fla_dplr_recurrence():
    """fla's chunk_rwkv7 is its DPLR op with a = -kk, b = kk * a, gk = w (rwkv7/chunk.py); the naive
    dplr_recurrence is head-first and scales q by K^-1/2, undone here."""
    naive = fla_naive("ops/generalized_delta_rule/dplr/naive.py")
    hf = lambda t: t.transpose(1, 2)  # noqa: E731  [B, T, H, D] <-> [B, H, T, D]

    def fla(x, s0):
        o, S = naive.dplr_recurrence(hf(x["r"] * K ** 0.5), hf(x["k"]), hf(x["v"]), hf(-x["kk"]),
                                     hf(x["kk"] * x["a"]), hf(x["w"]), initial_state=s0, output_final_state=True)
        return hf(o), S
    _against("rwkv7", fla)


@pytest.mark.parametrize("name", ["deltaproduct", "deltaproduct3"])
def test_deltaproduct_against_fla_naive_gated_delta_product(name):
    """fla interleaves the n_h keys, values and betas of a token into sequences of length T * n_h; its
    naive reference takes the scale explicitly (chunk_gated_delta_product defaults to K^-1/2)."""
    naive = fla_naive("ops/gated_delta_product/naive.py")
    n_h = CELLS[name][3]

    def inter(t):  # [B, T, H, n_h, ...] -> [B, T * n_h, H, ...]
        t = t.movedim(3, 2)
        return t.reshape(t.shape[0], -1, *t.shape[3:])

    def fla(x, s0):
        return naive.naive_recurrent_gated_delta_product(
            x["q"], inter(x["k"]), inter(x["v"]), x["g"], inter(x["beta"]), scale=K ** -0.5, initial_state=s0,
            output_final_state=True, num_householder=n_h)
    _against(name, fla)


@pytest.mark.parametrize("name", ["kda", "rwkv7", "deltaproduct", "deltanet_neg"])
def test_spec_cites_its_paper_and_writes_the_equations(name):
    from rnnc.resources import specs_dir

    assert rnnc.load(name).cell().name == name  # the default cell is named like the file
    header = "\n".join(line for line in (specs_dir() / f"{name}.rnn").read_text().splitlines() if line.startswith("#"))
    assert re.search(r"arXiv \d{4}\.\d{4,5}", header) and re.search(r"\b20\d\d\b", header)
    assert "S_t =" in header and "o_t = S_t^T" in header
