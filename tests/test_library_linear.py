"""The linear-attention family of the spec library against references written from the papers.

Specs: linear_attn, simple_gla, hgrn, rwkv6, gated_deltanet (fla's recurrent conventions: per
head, inputs already projected, gates in natural-log space, and fla's default query scale
K^-1/2 where fla applies it: all but rwkv6, whose layer passes scale=1).

1. A plain-PyTorch float64 per-step loop written here from each paper's equations (see the spec
   file's comment), independently of rnnc. rnnc (loop backend, float32) must agree on outputs,
   final states and the gradients of every input, param and initial state, within 1e-5 relative
   to the float64 reference computed on the same float32 data; with and without head dims, for
   T = 1 and T = 37.
2. flash-linear-attention's pure-torch naive references (fla-core 0.6.0) as an independent
   oracle, loaded by file path so that triton is never imported. Skipped when fla is absent.
3. Extreme gates (log-decays from -20 to 0 per step): finite values and gradients, and exact
   limits (g = 0 is the ungated cell, g = -20 forgets everything).
4. Identities between library cells, streaming with the state carried over, and step().
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import rnnc

from helpers import fla_naive

B = 2
K, V, D = 4, 5, 6  # K != V so a transposed state cannot pass
TOL = 1e-5  # fp32 rnnc vs float64 reference on the same fp32 data
TOL_FLA = 1e-5  # fp32 rnnc vs fp32 fla naive (both round; observed <= 4e-7)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- references (float64 loops)
# Every tensor is [B, T, *extra, ...] (inputs) or [B, *extra, ...] (states); `...` is the declared
# shape. Matrix states are S[k, v]; o_t = S_t^T q_t is einsum("...k,...kv->...v", q_t, S_t).

def _outer(a, b):
    return a.unsqueeze(-1) * b.unsqueeze(-2)


def _readout(q, S):
    return torch.einsum("...k,...kv->...v", q, S)


def _scaled_readout(q, S):
    """o = S^T q / sqrt(K): fla's default query scale."""
    return _readout(q, S) / q.shape[-1] ** 0.5


def ref_linear_attn(inp, p, s0):
    # Katharopoulos et al. 2020: S_t = S_{t-1} + k_t v_t^T ; o_t = S_t^T q_t / sqrt(K)
    q, k, v = inp["q"], inp["k"], inp["v"]
    S = s0["S"]
    os_ = []
    for t in range(q.shape[1]):
        S = S + _outer(k[:, t], v[:, t])
        os_.append(_scaled_readout(q[:, t], S))
    return [torch.stack(os_, 1)], {"S": S}


def ref_simple_gla(inp, p, s0):
    # S_t = exp(g_t) S_{t-1} + k_t v_t^T (g_t a scalar per step and head) ; o_t = S_t^T q_t / sqrt(K)
    q, k, v, g = inp["q"], inp["k"], inp["v"], inp["g"]
    S = s0["S"]
    os_ = []
    for t in range(q.shape[1]):
        S = torch.exp(g[:, t])[..., None, None] * S + _outer(k[:, t], v[:, t])
        os_.append(_scaled_readout(q[:, t], S))
    return [torch.stack(os_, 1)], {"S": S}


def ref_hgrn(inp, p, s0):
    # Qin et al. 2023: h_t = lambda_t * h_{t-1} + (1 - lambda_t) c_t with g = log lambda and
    # x = (1 - lambda) c already formed: h_t = exp(g_t) * h_{t-1} + x_t ; o_t = h_t
    x, g = inp["x"], inp["g"]
    h = s0["h"]
    os_ = []
    for t in range(x.shape[1]):
        h = torch.exp(g[:, t]) * h + x[:, t]
        os_.append(h)
    return [torch.stack(os_, 1)], {"h": h}


def ref_rwkv6(inp, p, s0):
    # Peng et al. 2024 (Finch): wkv_t = diag(u) k_t^T v_t + S_{t-1} ; o_t = r_t wkv_t ;
    # S_t = diag(w_t) S_{t-1} + k_t^T v_t with w_t = exp(w) here (w given in log space).
    r, k, v, w = inp["r"], inp["k"], inp["v"], inp["w"]
    u = p["u"]
    S = s0["S"]
    os_ = []
    for t in range(r.shape[1]):
        kv = _outer(k[:, t], v[:, t])
        wkv = S + u[:, None] * kv
        os_.append(_readout(r[:, t], wkv))
        S = torch.exp(w[:, t]).unsqueeze(-1) * S + kv
    return [torch.stack(os_, 1)], {"S": S}


def ref_gated_deltanet(inp, p, s0):
    # Yang, Kautz, Hatamizadeh 2024, eq. (gated delta rule):
    #   S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T ; o_t = S_t^T q_t / sqrt(K)
    # written here with an explicit identity matrix and a matrix product (the spec is the same
    # form; fla's naive is the "decay, then error-correct" form, checked further down).
    q, k, v, g, beta = inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"]
    S = s0["S"]
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    os_ = []
    for t in range(q.shape[1]):
        a = torch.exp(g[:, t])[..., None, None]
        b = beta[:, t][..., None, None]
        kt = k[:, t]
        S = a * ((eye - b * _outer(kt, kt)) @ S) + b * _outer(kt, v[:, t])
        os_.append(_scaled_readout(q[:, t], S))
    return [torch.stack(os_, 1)], {"S": S}


# ---------------------------------------------------------------- input generators

def _n(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _log_decay(g, *shape):
    # log-space decays in roughly [-5, -0.01]: a typical spread of forgetting
    return F.logsigmoid(2 + 1.5 * _n(g, *shape))


def gen_linear_attn(g, T, E):
    return {"q": _n(g, B, T, *E, K), "k": _n(g, B, T, *E, K), "v": _n(g, B, T, *E, V)}


def gen_simple_gla(g, T, E):
    return {"q": _n(g, B, T, *E, K), "k": _n(g, B, T, *E, K), "v": _n(g, B, T, *E, V),
            "g": _log_decay(g, B, T, *E)}


def gen_hgrn(g, T, E):
    return {"x": _n(g, B, T, *E, D), "g": _log_decay(g, B, T, *E, D)}


def gen_rwkv6(g, T, E):
    return {"r": _n(g, B, T, *E, K), "k": _n(g, B, T, *E, K), "v": _n(g, B, T, *E, V),
            "w": _log_decay(g, B, T, *E, K)}


def gen_gated_deltanet(g, T, E):
    return {"q": _n(g, B, T, *E, K),
            "k": F.normalize(_n(g, B, T, *E, K), dim=-1),
            "v": _n(g, B, T, *E, V),
            "g": _log_decay(g, B, T, *E),
            "beta": torch.sigmoid(_n(g, B, T, *E))}


# name -> (input generator, state shapes, output shapes, reference, param names, gate inputs)
SPECS = {
    "linear_attn": (gen_linear_attn, {"S": (K, V)}, [(V,)], ref_linear_attn, (), ()),
    "simple_gla": (gen_simple_gla, {"S": (K, V)}, [(V,)], ref_simple_gla, (), ("g",)),
    "hgrn": (gen_hgrn, {"h": (D,)}, [(D,)], ref_hgrn, (), ("g",)),
    "rwkv6": (gen_rwkv6, {"S": (K, V)}, [(V,)], ref_rwkv6, ("u",), ("w",)),
    "gated_deltanet": (gen_gated_deltanet, {"S": (K, V)}, [(V,)], ref_gated_deltanet, (), ("g",)),
}
NAMES = list(SPECS)
BUILD_DIMS = {"rwkv6": dict(K=K)}  # the param u: [K] is made at build time


def _as_tuple(y):
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def _build(name, g=None):
    """The loop-backend cell, its params set to generic values (rwkv6's bonus u)."""
    cell = rnnc.build(name, backend="loop", **BUILD_DIMS.get(name, {}))
    if g is not None:
        with torch.no_grad():
            for p in cell.parameters():
                p.copy_(0.7 * _n(g, *p.shape))
    return cell


def _check_against(name, cell, inputs, init, ref, state_shapes, out_shapes, extra, T, g, tol):
    """rnnc (fp32) vs ref (float64 on the same fp32 values): values and all gradients."""
    params = dict(cell.named_parameters())
    x_rn = {k: v.float().requires_grad_() for k, v in inputs.items()}
    s_rn = {k: v.float().requires_grad_() for k, v in init.items()}
    ys, final = cell(*x_rn.values(), state=s_rn)
    ys = _as_tuple(ys)

    x_ref = {k: v.detach().double().requires_grad_() for k, v in x_rn.items()}
    s_ref = {k: v.detach().double().requires_grad_() for k, v in s_rn.items()}
    p_ref = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    ys_ref, final_ref = ref(x_ref, p_ref, s_ref)

    assert len(ys) == len(out_shapes)
    for y, y_ref, shape in zip(ys, ys_ref, out_shapes):
        assert y.shape == (B, T, *extra, *shape)
        assert y.dtype == torch.float32
        assert rel_err(y, y_ref) <= tol, (name, "output", rel_err(y, y_ref))
    assert set(final) == set(state_shapes)
    for s, shape in state_shapes.items():
        assert final[s].shape == (B, *extra, *shape)
        assert final[s].dtype == torch.float32
        assert rel_err(final[s], final_ref[s]) <= tol, (name, "state", s, rel_err(final[s], final_ref[s]))

    gys = [_n(g, *y.shape) for y in ys]
    gss = {s: _n(g, *final_ref[s].shape) for s in state_shapes}
    loss = sum((y * gy.float()).sum() for y, gy in zip(ys, gys)) + \
        sum((final[s] * gss[s].float()).sum() for s in state_shapes)
    loss_ref = sum((y * gy).sum() for y, gy in zip(ys_ref, gys)) + \
        sum((final_ref[s] * gss[s]).sum() for s in state_shapes)
    labels = [f"input {k}" for k in x_rn] + [f"param {k}" for k in params] + [f"state {k}" for k in s_rn]
    leaves = list(x_rn.values()) + list(params.values()) + list(s_rn.values())
    leaves_ref = list(x_ref.values()) + [p_ref[k] for k in params] + list(s_ref.values())
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads_ref = torch.autograd.grad(loss_ref, leaves_ref, allow_unused=True)
    for label, a, b in zip(labels, grads, grads_ref):
        assert a is not None, f"{name}: no gradient for {label}"
        assert a.shape == b.shape, label
        assert torch.isfinite(a).all(), (name, label)
        assert rel_err(a, b) <= tol, (name, label, rel_err(a, b))


# ---------------------------------------------------------------- 1. paper references

@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("extra", [(), (2,)], ids=["noheads", "heads2"])
@pytest.mark.parametrize("name", NAMES)
def test_against_paper_reference(name, extra, T):
    gen, state_shapes, out_shapes, ref, param_names, _ = SPECS[name]
    g = torch.Generator().manual_seed(10 + T + len(extra))
    cell = _build(name, g)
    assert set(dict(cell.named_parameters())) == set(param_names)
    inputs = gen(g, T, extra)
    init = {s: 0.5 * _n(g, B, *extra, *shape) for s, shape in state_shapes.items()}
    _check_against(name, cell, inputs, init, ref, state_shapes, out_shapes, extra, T, g, TOL)


@pytest.mark.parametrize("name", NAMES)
def test_default_initial_state_is_zero(name):
    gen, state_shapes, _, ref, _, _ = SPECS[name]
    g = torch.Generator().manual_seed(3)
    cell = _build(name, g)
    inputs = gen(g, 5, (2,))
    with torch.no_grad():
        y, final = cell(*[v.float() for v in inputs.values()])
        zeros = {s: torch.zeros(B, 2, *shape, dtype=torch.float64) for s, shape in state_shapes.items()}
        p = {k: v.double() for k, v in cell.named_parameters()}
        ys_ref, final_ref = ref(inputs, p, zeros)
    assert rel_err(y, ys_ref[0]) <= TOL
    for s in state_shapes:
        assert rel_err(final[s], final_ref[s]) <= TOL


def test_rwkv6_bonus_param():
    """u is the only param: shape [K], zeros at init (as fla's RWKV6Attention.bonus)."""
    cell = rnnc.build("rwkv6", K=7, backend="loop")
    params = dict(cell.named_parameters())
    assert list(params) == ["u"]
    assert params["u"].shape == (7,)
    assert torch.equal(params["u"].detach(), torch.zeros(7))
    for name in ("linear_attn", "simple_gla", "hgrn", "gated_deltanet"):
        assert len(list(rnnc.build(name, backend="loop").parameters())) == 0, name
    with pytest.raises(rnnc.RnncError, match="K"):  # u needs its size before any input is seen
        rnnc.build("rwkv6", backend="loop")


# ---------------------------------------------------------------- 2. fla's naive references

H = 2  # heads for the fla comparisons: inputs [B, T, H, ...]


def _fla_case(name, T, seed=5):
    gen, state_shapes, _, _, _, _ = SPECS[name]
    g = torch.Generator().manual_seed(seed)
    cell = _build(name, g)
    inputs = {k: v.float() for k, v in gen(g, T, (H,)).items()}
    init = {s: (0.5 * _n(g, B, H, *shape)).float() for s, shape in state_shapes.items()}
    return g, cell, inputs, init


def _compare_with_fla(cell, inputs, init, fla_fn, tol=TOL_FLA, check_state=True, g=None):
    """rnnc vs fla_fn(inputs, params, init) -> (o, final or None); values and every gradient."""
    params = dict(cell.named_parameters())
    x_a = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    s_a = {k: v.clone().requires_grad_() for k, v in init.items()}
    o_a, f_a = cell(*x_a.values(), state=s_a)
    x_b = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    s_b = {k: v.clone().requires_grad_() for k, v in init.items()}
    p_b = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    o_b, f_b = fla_fn(x_b, p_b, s_b)
    assert o_b.shape == o_a.shape
    assert rel_err(o_a, o_b) <= tol, ("output", rel_err(o_a, o_b))
    (sname,) = init
    if check_state:
        assert rel_err(f_a[sname], f_b) <= tol, ("state", rel_err(f_a[sname], f_b))
    g = g or torch.Generator().manual_seed(99)
    go = torch.randn(o_a.shape, generator=g)
    gs = torch.randn(f_a[sname].shape, generator=g)
    loss_a = (o_a * go).sum() + ((f_a[sname] * gs).sum() if check_state else 0)
    loss_b = (o_b * go).sum() + ((f_b * gs).sum() if check_state else 0)
    keys = list(x_a) + [f"param {k}" for k in params] + [f"state {k}" for k in s_a]
    la = list(x_a.values()) + list(params.values()) + list(s_a.values())
    lb = list(x_b.values()) + list(p_b.values()) + list(s_b.values())
    ga = torch.autograd.grad(loss_a, la, allow_unused=True)
    gb = torch.autograd.grad(loss_b, lb, allow_unused=True)
    for key, a, b in zip(keys, ga, gb):
        if b is None:  # the fla function does not take this leaf (no initial state)
            continue
        assert a is not None, key
        assert rel_err(a, b) <= tol, (key, rel_err(a, b))


@pytest.mark.parametrize("T", [1, 37])
def test_linear_attn_vs_fla(T):
    m = fla_naive("ops/linear_attn/naive.py")
    _, cell, inputs, init = _fla_case("linear_attn", T)

    def fla(x, p, s):
        o, S = m.naive_recurrent_linear_attn(x["q"], x["k"], x["v"],  # fla's default scale, K^-1/2
                                             initial_state=s["S"], output_final_state=True)
        return o, S
    _compare_with_fla(cell, inputs, init, fla)


def test_linear_attn_vs_fla_chunk():
    """fla's chunkwise form (chunk 64, no initial state): T = 128 crosses a chunk boundary."""
    m = fla_naive("ops/linear_attn/naive.py")
    _, cell, inputs, init = _fla_case("linear_attn", 128)
    init = {"S": torch.zeros_like(init["S"])}
    _compare_with_fla(cell, inputs, init,
                      lambda x, p, s: (m.naive_chunk_linear_attn(x["q"], x["k"], x["v"]), None),
                      check_state=False)


@pytest.mark.parametrize("T", [1, 37])
def test_simple_gla_vs_fla(T):
    m = fla_naive("ops/simple_gla/naive.py")
    _, cell, inputs, init = _fla_case("simple_gla", T)

    def recurrent(x, p, s):
        return m.naive_recurrent_simple_gla(x["q"], x["k"], x["v"], x["g"],  # default scale K^-1/2
                                            initial_state=s["S"], output_final_state=True)

    def chunk(x, p, s):  # chunk 16: T = 37 crosses two boundaries and ends ragged
        return m.naive_chunk_simple_gla(x["q"], x["k"], x["v"], x["g"], initial_state=s["S"],
                                        output_final_state=True, chunk_size=16)
    _compare_with_fla(cell, inputs, init, recurrent)
    _compare_with_fla(cell, inputs, init, chunk)


def test_simple_gla_as_retnet_vs_fla_retention():
    """RetNet = simple_gla with a constant per-head decay gamma_h = 1 - 2^(-5-h) (fla's
    naive_retention: head-first [B, H, T, K], scale K^-1/2 built in as in simple_gla, zero initial state)."""
    m = fla_naive("ops/retention/naive.py")
    _, cell, inputs, init = _fla_case("simple_gla", 37)
    T = 37
    gamma = 1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64))
    inputs["g"] = torch.log(gamma).float().expand(B, T, H).contiguous()
    with torch.no_grad():
        o, _ = cell(inputs["q"], inputs["k"], inputs["v"], inputs["g"])
        o_ret = m.naive_retention(*(inputs[n].transpose(1, 2) for n in ("q", "k", "v"))).transpose(1, 2)
    assert rel_err(o, o_ret) <= TOL_FLA


@pytest.mark.parametrize("T", [1, 37])
def test_hgrn_vs_fla(T):
    """fla's naive_recurrent_hgrn is [B, T, D] without heads: heads are folded into D."""
    m = fla_naive("ops/hgrn/naive.py")
    _, cell, inputs, init = _fla_case("hgrn", T)

    def fla(x, p, s):
        o, h = m.naive_recurrent_hgrn(x["x"].flatten(2), x["g"].flatten(2),
                                      initial_state=s["h"].flatten(1), output_final_state=True)
        return o.view(B, -1, H, D), h.view(B, H, D)
    _compare_with_fla(cell, inputs, init, fla)


@pytest.mark.parametrize("T", [1, 37])
def test_rwkv6_vs_fla(T):
    """fla's naive_recurrent_rwkv6 is head-first [B, H, T, K] with u: [H, K]; our u is shared
    by the heads, so fla gets it expanded."""
    m = fla_naive("ops/rwkv6/recurrent_naive.py")
    _, cell, inputs, init = _fla_case("rwkv6", T)

    def fla(x, p, s):
        hf = [x[n].transpose(1, 2) for n in ("r", "k", "v", "w")]
        o, S = m.naive_recurrent_rwkv6(*hf, p["u"].expand(H, K), scale=1.0,
                                       initial_state=s["S"], output_final_state=True)
        return o.transpose(1, 2), S
    _compare_with_fla(cell, inputs, init, fla)


def test_rwkv6_vs_fla_chunk():
    """fla's chunkwise rwkv6 reference (no scale, no initial state, T a multiple of the chunk)."""
    m = fla_naive("ops/rwkv6/chunk_naive.py")
    _, cell, inputs, init = _fla_case("rwkv6", 32)
    init = {"S": torch.zeros_like(init["S"])}

    # values only: that function writes its chunk states in place, so it has no autograd
    with torch.no_grad():
        hf = [inputs[n].transpose(1, 2) for n in ("r", "k", "v", "w")]
        o_fla = m.naive_chunk_rwkv6(*hf, cell.u.expand(H, K), chunk_size=8).transpose(1, 2)
        o, _ = cell(*inputs.values(), state=init)
    assert rel_err(o, o_fla) <= TOL_FLA


def _rwkv6_heads(backend, g):
    """rwkv6_heads (u: [NH, K], fla's layout) with a different bonus per head."""
    cell = rnnc.build("rwkv6", cell="rwkv6_heads", backend=backend, NH=H, K=K,
                      chunk_size=8 if backend == "chunk" else None)
    with torch.no_grad():
        cell.u.copy_(0.7 * _n(g, H, K))
    assert cell.u.shape == (H, K) and not torch.equal(cell.u[0], cell.u[1])
    return cell


@pytest.mark.parametrize("backend", ["loop", "chunk"])
@pytest.mark.parametrize("T", [1, 37])
def test_rwkv6_heads_per_head_bonus_vs_fla(T, backend):
    """fla's naive_recurrent_rwkv6 with its u: [H, K], one bonus per head (scale 1, as fla's RWKV-6
    layer): outputs, final state and the gradients of every input, u and the initial state."""
    m = fla_naive("ops/rwkv6/recurrent_naive.py")
    g = torch.Generator().manual_seed(13)
    cell = _rwkv6_heads(backend, g)
    inputs = {k: v.float() for k, v in gen_rwkv6(g, T, (H,)).items()}
    init = {"S": (0.5 * _n(g, B, H, K, V)).float()}

    def fla(x, p, s):
        hf = [x[n].transpose(1, 2) for n in ("r", "k", "v", "w")]
        o, S = m.naive_recurrent_rwkv6(*hf, p["u"], scale=1.0, initial_state=s["S"], output_final_state=True)
        return o.transpose(1, 2), S
    _compare_with_fla(cell, inputs, init, fla)


@pytest.mark.parametrize("backend", ["loop", "chunk"])
def test_rwkv6_heads_vs_fla_chunk(backend):
    """fla's chunkwise rwkv6 reference with a per-head u (values; no initial state)."""
    m = fla_naive("ops/rwkv6/chunk_naive.py")
    g = torch.Generator().manual_seed(14)
    cell = _rwkv6_heads(backend, g)
    inputs = {k: v.float() for k, v in gen_rwkv6(g, 32, (H,)).items()}
    with torch.no_grad():
        hf = [inputs[n].transpose(1, 2) for n in ("r", "k", "v", "w")]
        o_fla = m.naive_chunk_rwkv6(*hf, cell.u, chunk_size=8).transpose(1, 2)
        o, _ = cell(*inputs.values())
    assert rel_err(o, o_fla) <= TOL_FLA


@pytest.mark.parametrize("T", [1, 37])
def test_gated_deltanet_vs_fla(T):
    """fla's naive gated delta rule ("decay, then error-correct" form): recurrent and chunk 16."""
    m = fla_naive("ops/gated_delta_rule/naive.py")
    _, cell, inputs, init = _fla_case("gated_deltanet", T)

    def recurrent(x, p, s):  # note fla's argument order (..., beta, g) here
        return m.naive_recurrent_gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"],
                                                  initial_state=s["S"], output_final_state=True)

    def chunk(x, p, s):  # (..., g, beta) here
        return m.naive_chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], chunk_size=16,
                                              initial_state=s["S"], output_final_state=True)
    _compare_with_fla(cell, inputs, init, recurrent)
    _compare_with_fla(cell, inputs, init, chunk)


def _fla_inputs(g, T, **shapes):
    return {k: _n(g, B, T, *shape).float() for k, shape in shapes.items()}


@pytest.mark.parametrize("T", [1, 37])
def test_hgrn2_vs_fla_gla(T):
    """HGRN2 is GLA with the key 1 - f_t (fla runs it with its GLA ops): fla's
    naive_recurrent_gla, whose K^-1/2 query scale is undone by scaling q up."""
    m = fla_naive("ops/gla/naive.py")
    g = torch.Generator().manual_seed(7)
    cell = rnnc.build("hgrn2", backend="loop")
    inputs = _fla_inputs(g, T, q=(H, K), i=(H, V))
    inputs["g"] = _log_decay(g, B, T, H, K).float()
    init = {"S": (0.5 * _n(g, B, H, K, V)).float()}

    def fla(x, p, s):
        return m.naive_recurrent_gla(x["q"] * K ** 0.5, 1 - torch.exp(x["g"]), x["i"], x["g"],
                                     initial_state=s["S"], output_final_state=True)
    _compare_with_fla(cell, inputs, init, fla)


@pytest.mark.parametrize("backend", ["loop", "chunk"])
def test_retnet_vs_fla_retention(backend):
    """retnet's heads against fla's naive_retention (parallel form, head-first, gamma_h and the
    K^-1/2 scale built in, zero initial state); the chunk form runs the heads as batch rows."""
    m = fla_naive("ops/retention/naive.py")
    g = torch.Generator().manual_seed(8)
    cell = rnnc.build("retnet", backend=backend, chunk_size=16 if backend == "chunk" else None)
    inputs = _fla_inputs(g, 37, q=(3, K), k=(3, K), v=(3, V))
    init = {"S": torch.zeros(B, 3, K, V)}

    def fla(x, p, s):
        return m.naive_retention(*(x[n].transpose(1, 2) for n in ("q", "k", "v"))).transpose(1, 2), None
    _compare_with_fla(cell, inputs, init, fla, check_state=False)


@pytest.mark.parametrize("backend", ["loop", "chunk"])
@pytest.mark.parametrize("T", [1, 37])
def test_mamba2_vs_fla_simple_gla(T, backend):
    """Mamba-2's SSD per head is simple GLA with q = C, k = B, v = dt x and g = dt A, plus D x:
    fla's naive_recurrent_simple_gla (scale 1; its state is [N, P], ours [P, N], which the chunk
    form runs transposed)."""
    m = fla_naive("ops/simple_gla/naive.py")
    g = torch.Generator().manual_seed(9)
    NH, P, N = 3, 5, 4
    cell = rnnc.build("mamba2", backend=backend, NH=NH, chunk_size=16 if backend == "chunk" else None)
    with torch.no_grad():
        for p in cell.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    inputs = _fla_inputs(g, T, x=(NH, P))
    inputs["dt"] = F.softplus(_n(g, B, T, NH) - 1).float()
    inputs.update(_fla_inputs(g, T, B=(N,), C=(N,)))
    init = {"h": (0.5 * _n(g, B, NH, P, N)).float()}

    def fla(x, p, s):
        A = -torch.exp(p["A_log"])
        per_head = {n: x[n][:, :, None].expand(-1, -1, NH, -1) for n in ("B", "C")}  # one group for all heads
        o, S = m.naive_recurrent_simple_gla(per_head["C"], per_head["B"], x["dt"][..., None] * x["x"], x["dt"] * A,
                                            scale=1.0, initial_state=s["h"].transpose(-1, -2), output_final_state=True)
        return o + p["D"][:, None] * x["x"], S.transpose(-1, -2)
    _compare_with_fla(cell, inputs, init, fla)


@pytest.mark.parametrize("T", [1, 37])
def test_gsa_vs_fla(T):
    """Gated slot attention against fla's naive_recurrent_gsa (g given, default K^-1/2 scale,
    states (K~ [K, M], V~ [M, V])): outputs, both final states and every gradient."""
    m = fla_naive("ops/gsa/naive.py")
    g = torch.Generator().manual_seed(10)
    M = 3
    cell = rnnc.build("gsa", backend="loop")
    inputs = _fla_inputs(g, T, q=(H, K), k=(H, K), v=(H, V), s=(H, M))
    inputs["g"] = _log_decay(g, B, T, H, M).float()
    init = {"hk": (0.5 * _n(g, B, H, K, M)).float(), "hv": (0.5 * _n(g, B, H, M, V)).float()}
    leaves = [{k: v.clone().requires_grad_() for k, v in d.items()} for d in (inputs, init, inputs, init)]
    o_a, f_a = cell(*leaves[0].values(), state=leaves[1])
    x, s0 = leaves[2], leaves[3]
    o_b, (hk, hv) = m.naive_recurrent_gsa(x["q"], x["k"], x["v"], x["s"], x["g"],
                                          initial_state=(s0["hk"], s0["hv"]), output_final_state=True)
    for a, b in ((o_a, o_b), (f_a["hk"], hk), (f_a["hv"], hv)):
        assert rel_err(a, b) <= TOL_FLA
    go, gk, gv = (torch.randn(t.shape, generator=g) for t in (o_a, hk, hv))
    grads_a = torch.autograd.grad((o_a * go).sum() + (f_a["hk"] * gk).sum() + (f_a["hv"] * gv).sum(),
                                  [*leaves[0].values(), *leaves[1].values()])
    grads_b = torch.autograd.grad((o_b * go).sum() + (hk * gk).sum() + (hv * gv).sum(),
                                  [*leaves[2].values(), *leaves[3].values()])
    for name, a, b in zip([*inputs, *init], grads_a, grads_b):
        assert rel_err(a, b) <= TOL_FLA, name


# ---------------------------------------------------------------- 3. extreme gates

GATED = [n for n in NAMES if SPECS[n][5]]


def _extreme(inputs, gates, g, mode):
    out = dict(inputs)
    for name in gates:
        shape = inputs[name].shape
        if mode == "mixed":  # every step either forgets everything or nothing, or anything between
            u = torch.rand(shape, generator=g, dtype=torch.float64)
            val = torch.where(u < 0.3, -20.0, torch.where(u < 0.6, 0.0, -20 * torch.rand(shape, generator=g, dtype=torch.float64)))
        else:
            val = torch.full(shape, {"min": -20.0, "zero": 0.0}[mode], dtype=torch.float64)
        out[name] = val
    return out


@pytest.mark.parametrize("mode", ["mixed", "min", "zero"])
@pytest.mark.parametrize("name", GATED)
def test_extreme_gates_finite_and_exact(name, mode):
    gen, state_shapes, out_shapes, ref, _, gates = SPECS[name]
    T, extra = 37, (2,)
    g = torch.Generator().manual_seed(7)
    cell = _build(name, g)
    inputs = _extreme(gen(g, T, extra), gates, g, mode)
    if name == "gated_deltanet" and mode != "min":
        inputs["beta"][:, ::3] = 1.0  # beta = 1 with g = 0: an exact projection, no decay at all
    init = {s: 0.5 * _n(g, B, *extra, *shape) for s, shape in state_shapes.items()}

    x = {k: v.float().requires_grad_() for k, v in inputs.items()}
    s0 = {k: v.float().requires_grad_() for k, v in init.items()}
    y, final = cell(*x.values(), state=s0)
    assert torch.isfinite(y).all()
    for s in state_shapes:
        assert torch.isfinite(final[s]).all()
    loss = y.square().sum() + sum(final[s].square().sum() for s in state_shapes)
    leaves = list(x.values()) + list(cell.parameters()) + list(s0.values())
    for leaf, gr in zip(leaves, torch.autograd.grad(loss, leaves)):
        assert gr is not None and torch.isfinite(gr).all()
    # and still the paper's values, gradients included
    _check_against(name, cell, inputs, init, ref, state_shapes, out_shapes, extra, T, g, TOL)


def test_extreme_gates_limits():
    """g = 0 removes the gate; g = -20 forgets the past (exp(-20) ~ 2e-9)."""
    g = torch.Generator().manual_seed(8)
    T, E = 37, (2,)
    f = lambda t: t.float()  # noqa: E731
    qkv = {k: f(v) for k, v in gen_linear_attn(g, T, E).items()}
    zero_s = torch.zeros(B, T, *E)
    with torch.no_grad():
        la, la_f = rnnc.build("linear_attn", backend="loop")(**qkv)
        sg, sg_f = rnnc.build("simple_gla", backend="loop")(**qkv, g=zero_s)
        torch.testing.assert_close(sg, la, rtol=0, atol=0)
        torch.testing.assert_close(sg_f["S"], la_f["S"], rtol=0, atol=0)
        # g = -20 everywhere: o_t = (k_t . q_t) v_t / sqrt(K) up to ~1e-8 relative
        sg20, sg20_f = rnnc.build("simple_gla", backend="loop")(**qkv, g=zero_s - 20)
        local = (qkv["q"] * qkv["k"]).sum(-1, keepdim=True) * qkv["v"] / K ** 0.5
        assert rel_err(sg20, local) <= 1e-6
        # hgrn: g = -20 gives h_t = x_t; g = 0 a running sum
        x = f(_n(g, B, T, *E, D))
        hg = rnnc.build("hgrn", backend="loop")
        o20, _ = hg(x, torch.full_like(x, -20.0))
        assert rel_err(o20, x) <= 1e-6
        o0, _ = hg(x, torch.zeros_like(x))
        assert rel_err(o0, x.cumsum(1)) <= 1e-5


# ---------------------------------------------------------------- 4. identities, streaming, step

def test_identities_between_library_cells():
    g = torch.Generator().manual_seed(11)
    T, E = 23, (2,)
    f = {k: v.float() for k, v in gen_gated_deltanet(g, T, E).items()}
    q, k, v, gs, beta = f["q"], f["k"], f["v"], f["g"], f["beta"]
    gk = f["g"].unsqueeze(-1).expand(*gs.shape, K).contiguous()
    build = lambda n: rnnc.build(n, backend="loop", **BUILD_DIMS.get(n, {}))  # noqa: E731
    with torch.no_grad():
        # gla with the same decay on every key is simple_gla
        o1, f1 = build("gla")(q, k, v, gk)
        o2, f2 = build("simple_gla")(q, k, v, gs)
        assert rel_err(o1, o2) <= 1e-6 and rel_err(f1["S"], f2["S"]) <= 1e-6
        # gated_deltanet with g = 0 is deltanet
        o1, f1 = build("gated_deltanet")(q, k, v, torch.zeros_like(gs), beta)
        o2, f2 = build("deltanet")(q, k, v, beta)
        assert rel_err(o1, o2) <= 1e-6 and rel_err(f1["S"], f2["S"]) <= 1e-6
        # rwkv6 with u = 0 reads S_{t-1}: its o_t is gla's o_{t-1} with q_{t-1} := r_t (rwkv6 has
        # no query scale, gla fla's K^-1/2: r carries it)
        rw = build("rwkv6")
        r = q * K ** -0.5
        o_rw, f_rw = rw(r, k, v, gk)
        o_gla, f_gla = build("gla")(q[:, 1:], k[:, :-1], v[:, :-1], gk[:, :-1])
        assert o_rw[:, 0].abs().max() == 0
        assert rel_err(o_rw[:, 1:], o_gla) <= 1e-6
        # rwkv6 with u = 1 and no decay is linear attention
        with torch.no_grad():
            rw.u.fill_(1.0)
        o1, f1 = rw(r, k, v, torch.zeros_like(gk))
        o2, f2 = build("linear_attn")(q, k, v)
        assert rel_err(o1, o2) <= 1e-6 and rel_err(f1["S"], f2["S"]) <= 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_streaming_and_step(name):
    gen, state_shapes, _, _, _, _ = SPECS[name]
    g = torch.Generator().manual_seed(12)
    cell = _build(name, g)
    xs = [v.float() for v in gen(g, 37, (2,)).values()]
    with torch.no_grad():
        y, final = cell(*xs)
        y1, st = cell(*[x[:, :20] for x in xs])
        y2, st2 = cell(*[x[:, 20:] for x in xs], state=st)
        assert rel_err(torch.cat([y1, y2], 1), y) <= 1e-6
        st = cell(*[x[:, :0] for x in xs])[1]  # the initial state, shaped [B, heads, ...]: step() reads the heads from it
        for t in range(5):
            yt, st = cell.step(*[x[:, t] for x in xs], state=st)
            assert rel_err(yt, y[:, t]) <= 1e-6
    for s in state_shapes:
        assert rel_err(st2[s], final[s]) <= 1e-6


# ---------------------------------------------------------------- the specs themselves

@pytest.mark.parametrize("name", NAMES)
def test_spec_loads_and_cites_its_source(name):
    from rnnc.resources import specs_dir

    assert name in rnnc.library()
    prog = rnnc.load(name)
    assert prog.cell().name == name
    text = (specs_dir() / f"{name}.rnn").read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert re.search(r"\b20\d\d\b", header)
    assert re.search(r"arXiv \d{4}\.\d{4,5}", header)
    assert "o_t" in header  # the equations are written out
