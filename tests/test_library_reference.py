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
        # S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T ; o_t = S_t^T q_t
        S = torch.exp(g[:, t]).unsqueeze(-1) * S + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        os.append(torch.einsum("...k,...kv->...v", q[:, t], S))
    return [torch.stack(os, 1)], {"S": S}


def ref_deltanet(inp, p, s0):
    q, k, v, beta = inp["q"], inp["k"], inp["v"], inp["beta"]
    S = s0["S"]
    os = []
    for t in range(q.shape[1]):
        # delta rule: S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T ; o_t = S_t^T q_t
        kt, vt, bt = k[:, t], v[:, t], beta[:, t]
        v_old = torch.einsum("...k,...kv->...v", kt, S)
        S = S + bt[..., None, None] * kt.unsqueeze(-1) * (vt - v_old).unsqueeze(-2)
        os.append(torch.einsum("...k,...kv->...v", q[:, t], S))
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


# name -> (build dims, input generator, state shapes, output shapes, reference, param names)
SPECS = {
    "mingru": (dict(I=5, H=6), gen_min(5), {"h": (6,)}, [(6,)], ref_mingru,
               ("weight_z", "bias_z", "weight_h", "bias_h")),
    "minlstm": (dict(I=5, H=6), gen_min(5), {"h": (6,)}, [(6,)], ref_minlstm,
                ("weight_f", "bias_f", "weight_i", "bias_i", "weight_h", "bias_h")),
    "gla": ({}, gen_gla(4, 6), {"S": (4, 6)}, [(6,)], ref_gla, ()),
    "deltanet": ({}, gen_deltanet(4, 6), {"S": (4, 6)}, [(6,)], ref_deltanet, ()),
    "mamba": (dict(D=5, N=3), gen_mamba(5, 3), {"h": (5, 3)}, [(5,)], ref_mamba, ("A_log", "D_skip")),
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
    if name == "mamba":
        # perturb the deterministic init so the gradients are generic
        with torch.no_grad():
            for p in params.values():
                p.add_(0.1 * torch.randn_like(p))

    g = torch.Generator().manual_seed(1)
    inputs = gen(g, extra)
    init = {s: 0.5 * _normal(g, B, *extra, *shape) for s, shape in state_shapes.items()}

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

LIBRARY = ["elman", "lstm", "gru", "mingru", "minlstm", "gla", "deltanet", "mamba", "lsrl_majority"]


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
