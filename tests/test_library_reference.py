"""Every non-torch.nn library spec against a plain-PyTorch reference written here from the paper.

Each reference is a simple per-step loop in float64, written from the equations in the paper (see
the spec file's comment), independently of rnnc. The rnnc cell (loop backend) must agree on the
outputs, the final states and the gradients of every input, param and initial state; with and
without extra (head) dims between time and the declared shape.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import rnnc

B, T = 2, 9
TOL = {torch.float32: 1e-4, torch.float64: 1e-9}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- references (float64 loops)

def ref_mingru(inp, p, s0):
    x, h = inp["x"], s0["h"]
    ys = []
    for t in range(x.shape[1]):
        xt = x[:, t]
        z = torch.sigmoid(xt @ p["weight_z"].T + p["bias_z"])
        h_tilde = xt @ p["weight_h"].T + p["bias_h"]
        h = (1 - z) * h + z * h_tilde
        ys.append(h)
    return [torch.stack(ys, 1)], {"h": h}


def ref_minlstm(inp, p, s0):
    x, h = inp["x"], s0["h"]
    ys = []
    for t in range(x.shape[1]):
        xt = x[:, t]
        f = torch.sigmoid(xt @ p["weight_f"].T + p["bias_f"])
        i = torch.sigmoid(xt @ p["weight_i"].T + p["bias_i"])
        h_tilde = xt @ p["weight_h"].T + p["bias_h"]
        h = f / (f + i) * h + i / (f + i) * h_tilde
        ys.append(h)
    return [torch.stack(ys, 1)], {"h": h}


def ref_gla(inp, p, s0):
    q, k, v, g = inp["q"], inp["k"], inp["v"], inp["g"]
    S = s0["S"]
    os = []
    for t in range(q.shape[1]):
        # S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T ; o_t = S_t^T q_t / sqrt(K)
        S = torch.exp(g[:, t]).unsqueeze(-1) * S + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        os.append(torch.einsum("...k,...kv->...v", q[:, t], S) / math.sqrt(q.shape[-1]))
    return [torch.stack(os, 1)], {"S": S}


def ref_deltanet(inp, p, s0):
    q, k, v, beta = inp["q"], inp["k"], inp["v"], inp["beta"]
    S = s0["S"]
    os = []
    for t in range(q.shape[1]):
        # delta rule: S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T ; o_t = S_t^T q_t / sqrt(K)
        kt, vt, bt = k[:, t], v[:, t], beta[:, t]
        v_old = torch.einsum("...k,...kv->...v", kt, S)
        S = S + bt[..., None, None] * kt.unsqueeze(-1) * (vt - v_old).unsqueeze(-2)
        os.append(torch.einsum("...k,...kv->...v", q[:, t], S) / math.sqrt(q.shape[-1]))
    return [torch.stack(os, 1)], {"S": S}


def ref_mamba(inp, p, s0):
    u, delta, Bm, Cm = inp["u"], inp["delta"], inp["B"], inp["C"]
    A = -torch.exp(p["A_log"])  # [D, N]
    h = s0["h"]
    ys = []
    for t in range(u.shape[1]):
        dt = delta[:, t].unsqueeze(-1)  # [..., D, 1]
        h = torch.exp(dt * A) * h + (dt * u[:, t].unsqueeze(-1)) * Bm[:, t].unsqueeze(-2)
        y = (h * Cm[:, t].unsqueeze(-2)).sum(-1) + p["D_skip"] * u[:, t]
        ys.append(y)
    return [torch.stack(ys, 1)], {"h": h}


def ref_hgrn2(inp, p, s0):
    q, i, g = inp["q"], inp["i"], inp["g"]
    S = s0["S"]
    os = []
    for t in range(q.shape[1]):
        # S_t = diag(f_t) S_{t-1} + (1 - f_t) i_t^T, f_t = exp(g_t); o_t = S_t^T q_t
        f = torch.exp(g[:, t])
        S = f.unsqueeze(-1) * S + (1 - f).unsqueeze(-1) * i[:, t].unsqueeze(-2)
        os.append(torch.einsum("...k,...kv->...v", q[:, t], S))
    return [torch.stack(os, 1)], {"S": S}


def ref_retnet(inp, p, s0):
    q, k, v = inp["q"], inp["k"], inp["v"]
    S = s0["S"]  # [B, ..., NH, K, V]
    NH, K = q.shape[-2], q.shape[-1]
    gamma = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(NH)], dtype=q.dtype)
    os = []
    for t in range(q.shape[1]):
        # S_{t,h} = gamma_h S_{t-1,h} + k_{t,h} v_{t,h}^T ; o_{t,h} = S_{t,h}^T q_{t,h} / sqrt(K)
        S = gamma[:, None, None] * S + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        os.append(torch.einsum("...k,...kv->...v", q[:, t], S) / math.sqrt(K))
    return [torch.stack(os, 1)], {"S": S}


def ref_mamba2(inp, p, s0):
    x, dt, Bm, Cm = inp["x"], inp["dt"], inp["B"], inp["C"]
    A = -torch.exp(p["A_log"])  # [NH]
    h = s0["h"]  # [B, ..., NH, P, N]
    ys = []
    for t in range(x.shape[1]):
        # h_t = exp(dt A) h_{t-1} + dt x_t B_t^T ; y_t = h_t C_t + D x_t   (per head)
        a = torch.exp(dt[:, t] * A)[..., None, None]
        h = a * h + (dt[:, t, ..., None] * x[:, t])[..., None] * Bm[:, t, ..., None, None, :]
        ys.append(torch.einsum("...hpn,...n->...hp", h, Cm[:, t]) + p["D"][:, None] * x[:, t])
    return [torch.stack(ys, 1)], {"h": h}


def ref_rglru(inp, p, s0):
    x, h = inp["x"], s0["h"]
    a = torch.sigmoid(p["Lambda"])
    ys = []
    for t in range(x.shape[1]):
        xt = x[:, t]
        r = torch.sigmoid(xt @ p["weight_a"].T + p["bias_a"])
        i = torch.sigmoid(xt @ p["weight_x"].T + p["bias_x"])
        a_t = a ** (8 * r)  # a^(c r_t), c = 8
        h = a_t * h + torch.sqrt(1 - a_t ** 2) * (i * xt)
        ys.append(h)
    return [torch.stack(ys, 1)], {"h": h}


def ref_sru(inp, p, s0):
    x, c = inp["x"], s0["c"]
    D = x.shape[-1]
    W, Wf, Wr = p["weight"][:D], p["weight"][D:2 * D], p["weight"][2 * D:]
    hs = []
    for t in range(x.shape[1]):
        xt = x[:, t]
        f = torch.sigmoid(xt @ Wf.T + p["v_f"] * c + p["b_f"])
        r = torch.sigmoid(xt @ Wr.T + p["v_r"] * c + p["b_r"])
        c = f * c + (1 - f) * (xt @ W.T)
        hs.append(r * c + (1 - r) * xt)
    return [torch.stack(hs, 1)], {"c": c}


def ref_qrnn(inp, p, s0):
    x = inp["x"]  # [B, T, *E, I]
    I, H3 = x.shape[-1], p["weight"].shape[0]
    H = H3 // 3
    # the masked width-2 convolution over time, all steps at once, as torch's conv1d; the initial
    # x_prev is the left padding
    lead = x.shape[2:-1]
    seq = torch.cat([s0["x_prev"].unsqueeze(1), x], 1).movedim(1, -2)  # [B, *E, T+1, I]
    seq = seq.reshape(-1, x.shape[1] + 1, I).transpose(1, 2)  # [N, I, T+1]
    kernel = torch.stack([p["weight"][:, :I], p["weight"][:, I:]], -1)  # [3H, I, 2]: taps t-1, t
    gates = torch.nn.functional.conv1d(seq, kernel, p["bias"]).transpose(1, 2)  # [N, T, 3H]
    gates = gates.reshape(x.shape[0], *lead, x.shape[1], H3).movedim(-2, 1)
    z, f, o = torch.tanh(gates[..., :H]), torch.sigmoid(gates[..., H:2 * H]), torch.sigmoid(gates[..., 2 * H:])
    c, hs = s0["c"], []
    for t in range(x.shape[1]):  # fo-pooling
        c = f[:, t] * c + (1 - f[:, t]) * z[:, t]
        hs.append(o[:, t] * c)
    return [torch.stack(hs, 1)], {"c": c, "x_prev": x[:, -1]}


def _rows(ref, ranks):
    """`ref` written for inputs [N, T, ...] and states [N, ...], applied to inputs [B, T, *E, ...]
    and states [B, *E, ...] by folding the extra dims E into N; `ranks` gives each input's and
    state's declared rank."""
    def wrapped(inp, p, s0):
        name, state = next(iter(s0.items()))
        E = state.shape[1:state.dim() - ranks[name]]
        N = state.shape[0] * math.prod(E)

        def fold(v, k):  # [B, T, *E, ...] -> [N, T, ...]
            own = v.shape[v.dim() - ranks[k]:]
            return v.reshape(v.shape[0], v.shape[1], -1, *own).transpose(1, 2).reshape(N, v.shape[1], *own)

        ys, fin = ref({k: fold(v, k) for k, v in inp.items()}, p,
                      {k: v.reshape(N, *v.shape[v.dim() - ranks[k]:]) for k, v in s0.items()})
        ys = [y.reshape(state.shape[0], -1, *y.shape[1:]).transpose(1, 2).reshape(state.shape[0], y.shape[1], *E,
                                                                                 *y.shape[2:]) for y in ys]
        return ys, {k: v.reshape(*state.shape[:1], *E, *v.shape[1:]) for k, v in fin.items()}
    return wrapped


def ref_mlstm(inp, p, s0):
    """The paper's parallel form, unstabilised (float64 holds these exponents), per row n with
    F_t = sum_{l<=t} log f_l and D_tj = exp(F_t - F_j + i~_j) for j <= t:
      h~_t = (sum_j D_tj (q_t . k_j / sqrt(K)) v_j + exp(F_t + m_0) C_0^T q_t) / max(|n_t . q_t|, 1),
      n_t  = sum_j D_tj k_j / sqrt(K) + exp(F_t + m_0) n_0
    (the initial states are stored times exp(-m_0)); the final stored states are the true ones
    times exp(-m_T), m_T the stabiliser's recurrence."""
    q, k, v, i_pre, f_pre = inp["q"], inp["k"], inp["v"], inp["igate"], inp["fgate"]  # [N, T, ...]
    N, T, K = q.shape[0], q.shape[1], q.shape[-1]
    C0, n0, m0 = s0["C"], s0["n"], s0["m"]
    log_f = torch.nn.functional.logsigmoid(f_pre)
    F = torch.cumsum(log_f, 1)  # [N, T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    Dm = torch.where(causal, torch.exp(F[:, :, None] - F[:, None, :] + i_pre[:, None, :]), torch.zeros((), dtype=q.dtype))
    ks = k / math.sqrt(K)
    carry = torch.exp(F + m0[:, None])  # [N, T]
    num = (Dm * (q @ ks.transpose(1, 2))) @ v + carry[..., None] * (q @ C0)
    n = Dm @ ks + carry[..., None] * n0[:, None]
    h = num / torch.maximum((n * q).sum(-1).abs(), torch.ones((), dtype=q.dtype))[..., None]
    m = m0
    for t in range(T):  # m_t = max(log f_t + m_{t-1}, i~_t)
        m = torch.maximum(log_f[:, t] + m, i_pre[:, t])
    C_true = (Dm[:, -1, :, None] * ks).transpose(1, 2) @ v + carry[:, -1, None, None] * C0
    return [h], {"C": C_true * torch.exp(-m)[:, None, None], "n": n[:, -1] * torch.exp(-m)[:, None], "m": m}


def ref_slstm(inp, p, s0):
    """Unstabilised in float64: c_t = f_t c_{t-1} + exp(i~_t) z_t, n_t = f_t n_{t-1} + exp(i~_t),
    h_t = o_t c_t / n_t; the stored c, n are the true ones times exp(-m_t), m_t the stabiliser."""
    x, h, m = inp["x"], s0["h"], s0["m"]
    c, n = s0["c"] * torch.exp(m), s0["n"] * torch.exp(m)  # the true initial cell and normaliser
    H = h.shape[-1]
    hs = []
    for t in range(x.shape[1]):
        pre = x[:, t] @ p["weight_ih"].T + h @ p["weight_hh"].T + p["bias"]
        i_pre, f_pre, z_pre, o_pre = pre[..., :H], pre[..., H:2 * H], pre[..., 2 * H:3 * H], pre[..., 3 * H:]
        f = torch.sigmoid(f_pre)
        c = f * c + torch.exp(i_pre) * torch.tanh(z_pre)
        n = f * n + torch.exp(i_pre)
        m = torch.maximum(torch.log(f) + m, i_pre)
        h = torch.sigmoid(o_pre) * c / n
        hs.append(h)
    return [torch.stack(hs, 1)], {"h": h, "c": c * torch.exp(-m), "n": n * torch.exp(-m), "m": m}


def ref_gsa(inp, p, s0):
    q, k, v, sl, g = inp["q"], inp["k"], inp["v"], inp["s"], inp["g"]
    hk, hv = s0["hk"], s0["hv"]
    K = q.shape[-1]
    os = []
    for t in range(q.shape[1]):
        # K~_t = K~_{t-1} diag(a_t) + k_t s_t^T ; V~_t = diag(a_t) V~_{t-1} + s_t v_t^T, a_t = exp(g_t)
        a = torch.exp(g[:, t])
        hk = hk * a.unsqueeze(-2) + k[:, t].unsqueeze(-1) * sl[:, t].unsqueeze(-2)
        hv = a.unsqueeze(-1) * hv + sl[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        # o_t = V~_t^T softmax(K~_t^T q_t / sqrt(K))
        att = torch.softmax(torch.einsum("...k,...km->...m", q[:, t], hk) / math.sqrt(K), -1)
        os.append(torch.einsum("...m,...mv->...v", att, hv))
    return [torch.stack(os, 1)], {"hk": hk, "hv": hv}

# ---------------------------------------------------------------- input generators

def _normal(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def gen_min(I):
    return lambda g, E: {"x": _normal(g, B, T, *E, I)}


def gen_gla(K, V):
    def gen(g, E):
        return {
            "q": _normal(g, B, T, *E, K),
            "k": _normal(g, B, T, *E, K),
            "v": _normal(g, B, T, *E, V),
            # log-space decay: g <= 0
            "g": torch.nn.functional.logsigmoid(2 + _normal(g, B, T, *E, K)),
        }
    return gen


def gen_deltanet(K, V):
    def gen(g, E):
        return {
            "q": _normal(g, B, T, *E, K),
            "k": torch.nn.functional.normalize(_normal(g, B, T, *E, K), dim=-1),
            "v": _normal(g, B, T, *E, V),
            "beta": torch.sigmoid(_normal(g, B, T, *E)),
        }
    return gen


def gen_mamba(D, N):
    def gen(g, E):
        return {
            "u": _normal(g, B, T, *E, D),
            "delta": torch.nn.functional.softplus(_normal(g, B, T, *E, D) - 1),
            "B": _normal(g, B, T, *E, N),
            "C": _normal(g, B, T, *E, N),
        }
    return gen


def gen_fields(**fields):
    """Inputs named like the cell's, each [B, T, *E, *shape] from `draw(g, shape)`."""
    def gen(g, E):
        return {name: draw(g, (B, T, *E, *shape)) for name, (shape, draw) in fields.items()}
    return gen


def _n(g, shape):
    return _normal(g, *shape)


def _log_decay(g, shape):
    return torch.nn.functional.logsigmoid(2 + _normal(g, *shape))


def _positive(g, shape):
    return torch.nn.functional.softplus(_normal(g, *shape) - 1)


# name -> (build dims, input generator, state shapes, output shapes, reference, param names)
SPECS = {
    "mingru": (dict(I=5, H=6), gen_min(5), {"h": (6,)}, [(6,)], ref_mingru,
               ("weight_z", "bias_z", "weight_h", "bias_h")),
    "minlstm": (dict(I=5, H=6), gen_min(5), {"h": (6,)}, [(6,)], ref_minlstm,
                ("weight_f", "bias_f", "weight_i", "bias_i", "weight_h", "bias_h")),
    "gla": ({}, gen_gla(4, 6), {"S": (4, 6)}, [(6,)], ref_gla, ()),
    "deltanet": ({}, gen_deltanet(4, 6), {"S": (4, 6)}, [(6,)], ref_deltanet, ()),
    "mamba": (dict(D=5, N=3), gen_mamba(5, 3), {"h": (5, 3)}, [(5,)], ref_mamba, ("A_log", "D_skip")),
    "hgrn2": ({}, gen_fields(q=((4,), _n), i=((6,), _n), g=((4,), _log_decay)), {"S": (4, 6)}, [(6,)], ref_hgrn2, ()),
    "retnet": ({}, gen_fields(q=((3, 4), _n), k=((3, 4), _n), v=((3, 5), _n)), {"S": (3, 4, 5)}, [(3, 5)],
               ref_retnet, ()),
    "mamba2": (dict(NH=3), gen_fields(x=((3, 4), _n), dt=((3,), _positive), B=((2,), _n), C=((2,), _n)), {"h": (3, 4, 2)},
               [(3, 4)], ref_mamba2, ("A_log", "D")),
    "rglru": (dict(D=5), gen_fields(x=((5,), _n)), {"h": (5,)}, [(5,)], ref_rglru,
              ("weight_a", "bias_a", "weight_x", "bias_x", "Lambda")),
    "sru": (dict(D=5), gen_fields(x=((5,), _n)), {"c": (5,)}, [(5,)], ref_sru, ("weight", "v_f", "v_r", "b_f", "b_r")),
    "qrnn": (dict(I=4, H=5), gen_fields(x=((4,), _n)), {"c": (5,), "x_prev": (4,)}, [(5,)], ref_qrnn,
             ("weight", "bias")),
    "mlstm": ({}, gen_fields(q=((4,), _n), k=((4,), _n), v=((5,), _n), igate=((), _n), fgate=((), _n)),
              {"C": (4, 5), "n": (4,), "m": ()}, [(5,)],
              _rows(ref_mlstm, {"q": 1, "k": 1, "v": 1, "igate": 0, "fgate": 0, "C": 2, "n": 1, "m": 0}), ()),
    "gsa": ({}, gen_fields(q=((4,), _n), k=((4,), _n), v=((6,), _n), s=((3,), _n), g=((3,), _log_decay)),
            {"hk": (4, 3), "hv": (3, 6)}, [(6,)], ref_gsa, ()),
    "slstm": (dict(I=4, H=5), gen_fields(x=((4,), _n)), {"h": (5,), "c": (5,), "n": (5,), "m": (5,)}, [(5,)],
              ref_slstm, ("weight_ih", "weight_hh", "bias")),
}


def _as_tuple(y):
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("extra", [(), (3,)], ids=["noheads", "heads3"])
@pytest.mark.parametrize("name", list(SPECS))
def test_against_reference(name, extra, dtype):
    dims, gen, state_shapes, out_shapes, ref, param_names = SPECS[name]
    torch.manual_seed(0)
    cell = rnnc.build(name, backend="loop", dtype=dtype, **dims)
    params = dict(cell.named_parameters())
    assert set(params) == set(param_names)
    for p in params.values():
        assert p.dtype == dtype
    if name in ("mamba", "mamba2", "rglru", "sru", "qrnn", "slstm"):
        # perturb the deterministic (or zero-bias) init so the gradients are generic
        with torch.no_grad():
            for p in params.values():
                p.add_(0.1 * torch.randn_like(p))

    g = torch.Generator().manual_seed(1)
    inputs = gen(g, extra)
    init = {s: 0.5 * _normal(g, B, *extra, *shape) for s, shape in state_shapes.items()}
    if "n" in init:  # xLSTM's normalisers are positive
        init["n"] = init["n"].abs() + 0.5

    # rnnc in `dtype`
    x_rn = {k: v.to(dtype).requires_grad_() for k, v in inputs.items()}
    s_rn = {k: v.to(torch.float32 if dtype == torch.float32 else dtype).requires_grad_()
            for k, v in init.items()}
    ys, final = cell(*x_rn.values(), state=s_rn)
    ys = _as_tuple(ys)

    # reference in float64, from the same (rounded) values
    x_ref = {k: v.detach().double().requires_grad_() for k, v in x_rn.items()}
    s_ref = {k: v.detach().double().requires_grad_() for k, v in s_rn.items()}
    p_ref = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    ys_ref, final_ref = ref(x_ref, p_ref, s_ref)

    tol = TOL[dtype]
    assert len(ys) == len(out_shapes)
    for y, y_ref, shape in zip(ys, ys_ref, out_shapes):
        assert y.shape == (B, T, *extra, *shape)
        assert y.dtype == dtype
        assert rel_err(y, y_ref) <= tol
    assert set(final) == set(state_shapes)
    for s, shape in state_shapes.items():
        assert final[s].shape == (B, *extra, *shape)
        assert rel_err(final[s], final_ref[s]) <= tol, s

    # gradients of every input, param and initial state
    gys = [_normal(g, *y.shape) for y in ys]
    gss = {s: _normal(g, *final_ref[s].shape) for s in state_shapes}
    loss = sum((y * gy.to(y.dtype)).sum() for y, gy in zip(ys, gys)) + \
        sum((final[s] * gss[s].to(final[s].dtype)).sum() for s in state_shapes)
    loss_ref = sum((y * gy).sum() for y, gy in zip(ys_ref, gys)) + \
        sum((final_ref[s] * gss[s]).sum() for s in state_shapes)
    labels = [f"input {k}" for k in x_rn] + [f"param {k}" for k in params] + [f"state {k}" for k in s_rn]
    leaves = list(x_rn.values()) + list(params.values()) + list(s_rn.values())
    leaves_ref = list(x_ref.values()) + [p_ref[k] for k in params] + list(s_ref.values())
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads_ref = torch.autograd.grad(loss_ref, leaves_ref, allow_unused=True)
    for label, a, b in zip(labels, grads, grads_ref):
        assert a is not None, f"no gradient for {label}"
        assert a.shape == b.shape, label
        assert rel_err(a, b) <= tol, (label, rel_err(a, b))


def test_inputs_by_name_equal_positional():
    torch.manual_seed(0)
    cell = rnnc.build("gla", backend="loop")
    inputs = gen_gla(4, 6)(torch.Generator().manual_seed(2), (2,))
    inputs = {k: v.float() for k, v in inputs.items()}
    o1, f1 = cell(*inputs.values())
    o2, f2 = cell(**{k: inputs[k] for k in ("v", "g", "q", "k")})
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    torch.testing.assert_close(f1["S"], f2["S"], rtol=0, atol=0)


def test_mamba_param_init():
    """A_log = log(1..N) on every channel (S4D-real), D_skip = 1."""
    D, N = 4, 6
    cell = rnnc.build("mamba", D=D, N=N, backend="loop")
    p = dict(cell.named_parameters())
    assert p["A_log"].shape == (D, N)
    assert p["D_skip"].shape == (D,)
    expected = torch.log(torch.arange(1, N + 1, dtype=torch.float32)).expand(D, N)
    torch.testing.assert_close(p["A_log"].detach(), expected)
    torch.testing.assert_close(p["D_skip"].detach(), torch.ones(D))


def test_mamba_a_is_per_channel():
    """Each channel has its own A (a row of A_log [D, N], as mamba_ssm's [d_inner, d_state]):
    changing one channel's A_log changes that channel's output only, and A_log's gradient differs
    per channel."""
    D, N = 4, 3
    torch.manual_seed(0)
    cell = rnnc.build("mamba", D=D, N=N, backend="loop", dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    u, delta, Bm, Cm = (v.requires_grad_() for v in gen_mamba(D, N)(g, ()).values())
    y, _ = cell(u, delta, Bm, Cm)
    (grad,) = torch.autograd.grad((y * torch.cos(torch.arange(y.numel())).view_as(y)).sum(), [cell.A_log])
    assert all((grad[c] - grad[0]).abs().max() > 1e-6 for c in range(1, D))
    with torch.no_grad():
        cell.A_log[2] += 1.0
        y2, _ = cell(u, delta, Bm, Cm)
    changed = (y2 - y).abs().amax(dim=(0, 1))
    assert changed[2] > 1e-3 and (changed[[0, 1, 3]] == 0).all()


@pytest.mark.parametrize("name", ["mingru", "minlstm"])
def test_min_rnn_param_shapes_and_init(name):
    I, H = 9, 4
    torch.manual_seed(0)
    cell = rnnc.build(name, I=I, H=H, backend="loop")
    for pname, p in cell.named_parameters():
        assert p.shape == ((H, I) if pname.startswith("weight") else (H,)), pname
        assert p.abs().max() <= 1 / math.sqrt(I) + 1e-7, pname
        assert p.std() > 0, pname


# ---------------------------------------------------------------- LSRL majority

def majority_reference(x: torch.Tensor) -> torch.Tensor:
    ones = torch.cumsum(x, dim=1)
    zeros = torch.cumsum(1 - x, dim=1)
    return (ones > zeros).to(x.dtype)


@pytest.mark.parametrize("extra", [(), (2,)], ids=["noheads", "heads2"])
def test_lsrl_majority_exact(extra):
    cell = rnnc.build("lsrl_majority", backend="loop")
    assert len(list(cell.parameters())) == 0
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 2, (3, 40, *extra, 1), generator=g).float()
    # include the all-ones / all-zeros / alternating edge cases
    x[0] = 1.0
    x[1] = torch.arange(40).remainder(2).float().view(40, *([1] * len(extra)), 1).expand_as(x[1])
    with torch.no_grad():
        y, final = cell(x)
    assert y.shape == x.shape
    assert torch.equal(y, majority_reference(x)), (y.squeeze(-1), majority_reference(x).squeeze(-1))


def test_lsrl_majority_long_and_streaming():
    """Exact over a long sequence, and when fed in two chunks with the state passed on."""
    cell = rnnc.build("lsrl_majority", backend="loop")
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 2, (2, 300, 1), generator=g).float()
    # a biased stream so the answer flips several times
    x[:, 100:160] = 1.0
    with torch.no_grad():
        y, final = cell(x)
        y1, st = cell(x[:, :123])
        y2, _ = cell(x[:, 123:], state=st)
    expected = majority_reference(x)
    assert torch.equal(y, expected)
    assert torch.equal(torch.cat([y1, y2], 1), expected)


# ---------------------------------------------------------------- the library itself

LIBRARY = ["elman", "lstm", "gru", "mingru", "minlstm", "gla", "deltanet", "mamba", "lsrl_majority",
           "hgrn2", "retnet", "mamba2", "rglru", "sru", "qrnn", "mlstm", "slstm", "gsa"]


def test_readme_table_lists_exactly_the_library():
    """The README's spec-library table has one row per spec in specs/, no more, no fewer."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## The spec library", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \|", section, flags=re.M)
    assert len(rows) == len(set(rows)), "a cell listed twice"
    assert sorted(rows) == sorted(rnnc.library())


def test_library_lists_every_spec():
    assert set(LIBRARY) <= set(rnnc.library())


@pytest.mark.parametrize("name", LIBRARY)
def test_library_spec_loads_and_cites_its_source(name):
    from rnnc.resources import specs_dir

    prog = rnnc.load(name)
    assert prog.cell().name == name  # cell name = file stem
    text = (specs_dir() / f"{name}.rnn").read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert re.search(r"\b(19|20)\d\d\b", header), "the citation comment names a year"
    if name not in ("elman",):
        assert re.search(r"arXiv \d{4}\.\d{4,5}", header), "the citation comment names an arXiv id"
