"""The log-decay gradient of the chunkwise kernels at extreme gates, element by element (issue 13).

The gradient of a gate g_s is a sum of terms, one per pair of a contribution entering the state
before s and a read or adjoint after it; each carries e^{sum of the gates in between}. At g = -20 the
exact value is ~1e-8 and at g = -inf it is exactly 0, so a kernel that forms it as a difference of two
O(1) quantities (fla's `q·dq − k·dk`) returns rounding residue (~1e-6) there. The check is relative
per element, to the element's own condition: |dg − dg_ref| <= RTOL · scale, where scale is the same
gradient with every input and output weight replaced by its absolute value (float64), a bound on the
sum of the terms' magnitudes. Where scale is 0 (a gate whose every term passes a -inf gate or a zero
state), the gradient must be exactly 0.

Reference: the recurrence S_t = diag(e^{gk_t}) S_{t-1} diag(e^{gv_t}) + k_t v_t^T, o_t = S_t^T q_t
(delta rule: S_t = e^{g_t} (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T), step by step in float64
under autograd, from the very float32 inputs the kernels get.
"""
from __future__ import annotations

import pytest
import torch

import rnnc.runtime.chunk as chunk_ops

pytest.importorskip("triton")

import rnnc.runtime.triton_chunk as triton_chunk  # noqa: E402
import rnnc.runtime.triton_delta as triton_delta  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
N, K, V = 2, 16, 16
RTOL = 2e-5


def gates(kind, shape, gen):
    """float32 log-decays: 'minus20' (all -20), 'inf' (all -inf), 'mixed' (mild, -20 and -inf)."""
    if kind == "minus20":
        return torch.full(shape, -20.0)
    if kind == "inf":
        return torch.full(shape, -torch.inf)
    mild = torch.nn.functional.logsigmoid(torch.randn(shape, generator=gen) + 2)
    pick = torch.rand(shape, generator=gen)
    return torch.where(pick < 0.2, -torch.inf, torch.where(pick < 0.5, torch.tensor(-20.0), mild))


def linear_ref(q, k, v, gk, gv, h0, wo, ws, beta=None):
    """sum(o * wo) + sum(S_T * ws) of the recurrence, step by step (gk [T, N, K|1] or None, gv [T, N, V]
    or None; with beta [T, N], the gated delta rule with the scalar gate gk [T, N])."""
    S = torch.zeros(q.shape[1], q.shape[2], v.shape[2], dtype=q.dtype) if h0 is None else h0
    loss = 0.0
    for t in range(q.shape[0]):
        if beta is not None:
            S = torch.exp(gk[t])[:, None, None] * S
            S = S - beta[t][:, None, None] * k[t][:, :, None] * torch.einsum("nk,nkv->nv", k[t], S)[:, None, :]
            S = S + beta[t][:, None, None] * k[t][:, :, None] * v[t][:, None, :]
        else:
            if gk is not None:
                S = torch.exp(gk[t])[:, :, None] * S
            if gv is not None:
                S = S * torch.exp(gv[t])[:, None, :]
            S = S + k[t][:, :, None] * v[t][:, None, :]
        loss = loss + (torch.einsum("nk,nkv->nv", q[t], S) * wo[t]).sum()
    return loss + (S * ws).sum()


def ref_grad(inputs, gate_index, beta_index=None):
    """The gate's exact gradient and its scale (the same with |inputs| and |weights|), float64."""
    out = []
    for absolute in (False, True):
        xs = [None if x is None else x.double() for x in inputs]
        if absolute:
            xs = [x if x is None or i == gate_index else x.abs() for i, x in enumerate(xs)]
        xs[gate_index].requires_grad_(True)
        if beta_index is None:
            loss = linear_ref(*xs)
        else:
            *rest, beta = xs
            loss = linear_ref(*rest, beta=beta)
        (g,) = torch.autograd.grad(loss, xs[gate_index])
        out.append(g)
    return out


def make(T, side, kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(T, N, K, generator=gen) for _ in range(2))
    v = torch.randn(T, N, V, generator=gen)
    gk = gates(kind, (T, N, K), gen) if side == "key" else None
    gv = gates(kind, (T, N, V), gen) if side == "value" else None
    h0 = torch.randn(N, K, V, generator=gen)
    wo, ws = torch.randn(T, N, V, generator=gen), torch.randn(N, K, V, generator=gen)
    return [q, k, v, gk, gv, h0, wo, ws]


def assert_elementwise(dg, ref, scale):
    dg = dg.double().cpu()
    assert torch.isfinite(dg).all()
    zero = scale == 0
    assert (dg[zero] == 0).all(), f"{int((dg[zero] != 0).sum())} gradients that must be exactly 0 are not"
    ratio = ((dg - ref).abs() / scale)[~zero]
    assert ratio.numel() == 0 or ratio.max() <= RTOL, f"error up to {ratio.max():.3g} x the element's scale"


def linear_grad(fn, inputs, gate_index, chunk=16):
    q, k, v, gk, gv, h0, wo, ws = [None if x is None else x.to(DEV) for x in inputs]
    g = (gk if gate_index == 3 else gv).clone().requires_grad_(True)
    gk, gv = (g, gv) if gate_index == 3 else (gk, g)
    o, S = fn(q, k, v, gk, gv, h0, chunk)
    ((o * wo).sum() + (S * ws).sum()).backward()
    return g.grad


IMPLS = {"triton": triton_chunk._triton_chunk_linear, "chunk": chunk_ops._chunk_linear}
SLOW = pytest.mark.slow
CASES = [  # (T, chunk, gates, key/value side, implementation); the fast ones cover each gate kind once
    *[(65, 16, kind, "key", "triton") for kind in ("minus20", "inf", "mixed")],
    (65, 16, "mixed", "value", "triton"),
    (65, 16, "mixed", "key", "chunk"),
    *[pytest.param(65, 16, kind, "value", "triton", marks=SLOW) for kind in ("minus20", "inf")],
    *[pytest.param(130, c, kind, side, "triton", marks=SLOW)
      for c in (16, 64) for kind in ("minus20", "inf", "mixed") for side in ("key", "value")],
    *[pytest.param(T, 16, kind, side, "chunk", marks=SLOW)
      for T in (65, 130) for kind in ("minus20", "inf", "mixed") for side in ("key", "value")
      if (T, kind, side) != (65, "mixed", "key")],
]


@pytest.mark.parametrize("T,chunk,kind,side,impl", CASES)
def test_channel_gate_gradient(T, chunk, kind, side, impl):
    """GLA (per-key) and per-value decays: the Triton kernels' and the PyTorch chunk form's dg."""
    inputs = make(T, side, kind)
    gate_index = 3 if side == "key" else 4
    ref, scale = ref_grad(inputs, gate_index)
    assert_elementwise(linear_grad(IMPLS[impl], inputs, gate_index, chunk), ref, scale)


@pytest.mark.parametrize("kind", ["minus20", "inf", "mixed"])
@pytest.mark.parametrize("T", [65, pytest.param(130, marks=pytest.mark.slow)])
def test_scalar_gate_gradient(T, kind):
    """Simple GLA / RetNet (one log-decay per step): the Triton scalar kernel's dg."""
    q, k, v, _, _, h0, wo, ws = make(T, "key", "minus20")
    g = gates(kind, (T, N, 1), torch.Generator().manual_seed(5))
    ref, scale = ref_grad([q, k, v, g, None, h0, wo, ws], 3)
    assert_elementwise(linear_grad(IMPLS["triton"], [q, k, v, g, None, h0, wo, ws], 3), ref, scale)


@pytest.mark.parametrize("kind", ["minus20", "inf", "mixed"])
@pytest.mark.parametrize("T", [65, pytest.param(130, marks=pytest.mark.slow)])
def test_delta_gate_gradient(T, kind):
    """Gated DeltaNet (triton_delta): the Triton kernel's dg."""
    gen = torch.Generator().manual_seed(3)
    q, k, v, _, _, h0, wo, ws = make(T, "key", "minus20")
    k = torch.nn.functional.normalize(k, dim=-1)
    beta = torch.rand(T, N, generator=gen)
    g = gates(kind, (T, N), gen)
    ref, scale = ref_grad([q, k, v, g, None, h0, wo, ws, beta], 3, beta_index=8)
    gd = g.clone().to(DEV).requires_grad_(True)
    o, S = triton_delta._triton_delta_chunk(q.to(DEV), k.to(DEV), v.to(DEV), beta.to(DEV), gd, h0.to(DEV), 16)
    ((o * wo.to(DEV)).sum() + (S * ws.to(DEV)).sum()).backward()
    assert_elementwise(gd.grad, ref, scale)
