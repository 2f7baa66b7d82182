"""Heads declared as a dim (retnet, mamba2: a state [NH, K, V]) run on the chunk form.

Each head is an ordinary one-head matrix state (rnnc/heads.py slices the step to one head, the chunk
plan is found there and written back with the head axis in front); the runtime runs the heads as more
batch rows, and Mamba-2's state, read as h @ C, transposed. Checked against the loop (values, final
states, gradients of inputs, params and the initial state) at lengths around the chunk size, with and
without extra head axes; cells whose heads mix, or whose constant decay is negative, are refused with
a reason. fla's references for both cells are in test_library_linear.py.
"""
import pytest
import torch

import rnnc
from rnnc.analysis import analyze_cell
from rnnc.optimize import optimize
from rnnc.plans import chunk_plan

from helpers import DIMS, library_inputs, outputs_and_grads

RETNET_HEAD = "cell r(q: [NH, K], k: [NH, K], v: [NH, V]) -> (o: [NH, V]) {\n    state S: [NH, K, V] = 0\n"


def _plan(spec):
    cell = optimize((rnnc.parse(spec) if "{" in spec else rnnc.load(spec)).cell())
    return cell, chunk_plan(cell, analyze_cell(cell))


@pytest.mark.parametrize("name,transposed", [("retnet", False), ("mamba2", True)])
def test_plan_runs_the_heads_as_rows(name, transposed):
    cell, plan = _plan(name)
    assert plan.kind == "linear" and str(plan.heads) == "NH" and plan.transposed == transposed
    g = cell.graph
    for key in ("q", "k", "v"):  # every value the chunk form reads has the heads in front
        assert str(g[getattr(plan, key)].shape[0]) == "NH", key
    assert plan.g is not None and plan.gk is None and plan.gv is None  # one decay per head and step
    assert rnnc.analyze(name).to_dict()["backend"] == "chunk"


ONE_HEAD = {  # the same cells written for one head: the verdict a per-head state must get
    "retnet": "cell r(q: [K], k: [K], v: [V]) -> (o: [V]) {\n    state S: [K, V] = 0\n"
              "    S = 0.9 * S + k[:, None] * v[None, :]\n    o = q @ S\n}\n",
    "mamba2": "cell m(x: [P], dt: [], B: [N], C: [N]) -> (y: [P]) {\n    param A_log: [] = 0\n"
              "    state h: [P, N] = 0\n    h = exp(-dt * exp(A_log)) * h + (dt * x)[:, None] * B[None, :]\n"
              "    y = h @ C\n}\n",
}
VERDICT = ("class", "transition", "decay", "readout", "readout_of")


@pytest.mark.parametrize("name", ["retnet", "mamba2"])
def test_analysis_describes_each_head(name):
    """`rnnc analyze` reads a per-head state as NH one-head states: the decay one scalar per head and
    step, the readout q @ S per head, as the same cell written for one head is described."""
    (state,) = rnnc.analyze(name).to_dict()["states"].values()
    (one,) = rnnc.analyze(ONE_HEAD[name]).to_dict()["states"].values()
    assert {k: state[k] for k in VERDICT} == {k: one[k] for k in VERDICT}
    assert (state["decay"], state["readout"], state["heads"]) == ("scalar", "contraction", "NH")
    assert state["why"].startswith("per head (NH heads that never mix)")


def test_analysis_of_heads_that_mix_is_of_the_whole_state():
    text = RETNET_HEAD + ("    S = S + sum(k, axis=0)[None, :, None] * v[:, None, :]\n"
                          "    o = sum(q[:, :, None] * S, axis=1)\n}\n")
    (state,) = rnnc.analyze(text).to_dict()["states"].values()
    assert "heads" not in state and state["readout"] == "other"


def _agree(spec, dims, T, heads, chunk_size=16, tol=1e-9):
    ref = rnnc.build(spec, backend="loop", dtype=torch.float64, **dims)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    cell = rnnc.build(spec, backend="chunk", dtype=torch.float64, chunk_size=chunk_size, **dims)
    cell.load_state_dict(ref.state_dict())
    inputs = [x.requires_grad_() for x in library_inputs(spec, 2, T, heads, False, torch.float64, seed=T)]
    (s,) = (rnnc.parse(spec) if "{" in spec else rnnc.load(spec)).cell().states
    shape = [2, heads] + [dims[str(d)] for d in s.shape]  # library_inputs: [B, T, heads, ...]
    h0 = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64, requires_grad=True)
    res = []
    for c in (cell, ref):
        y, final = c(*inputs, state={s.name: h0})
        w = torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y)
        loss = (y * w).sum() + (final[s.name] * 0.3).sum()
        res.append([y, final[s.name], *torch.autograd.grad(loss, [*inputs, h0, *c.parameters()])])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["retnet", "mamba2"])
@pytest.mark.parametrize("T", [1, 15, 16, 17, 70])
@pytest.mark.parametrize("heads", [1, 3])
def test_chunk_matches_loop(name, T, heads):
    dims = {k: v for k, v in DIMS.items() if k in rnnc.load(name).cell().dims}
    _agree(name, dims, T, heads)


# The delta rule with heads declared as a dim, as fla's layers hold it: per-head params (Gated
# DeltaNet's A_log and dt_bias, a per-head scale of KDA's per-key gate), every product written per head.
DELTA_HEADS = {
    "delta": """cell gated_deltanet_heads(q: [NH, K], k: [NH, K], v: [NH, V], a: [NH], beta: [NH]) -> (o: [NH, V]) {
    param A_log: [NH] = 0
    param dt_bias: [NH] = 0
    state S: [NH, K, V] = 0
    let g = -exp(A_log) * softplus(a + dt_bias)
    let kS = sum(k[:, :, None] * S, axis=1)
    S = exp(g)[:, None, None] * (S - beta[:, None, None] * k[:, :, None] * kS[:, None, :]) + beta[:, None, None] * k[:, :, None] * v[:, None, :]
    o = sum(q[:, :, None] * S, axis=1) / sqrt(K)
}
""",
    "dplr": """cell kda_heads(q: [NH, K], k: [NH, K], v: [NH, V], g: [NH, K], beta: [NH]) -> (o: [NH, V]) {
    param A_log: [NH] = 0
    state S: [NH, K, V] = 0
    let D = exp(g * exp(A_log)[:, None])[:, :, None] * S
    let kD = sum(k[:, :, None] * D, axis=1)
    S = D - beta[:, None, None] * k[:, :, None] * kD[:, None, :] + beta[:, None, None] * k[:, :, None] * v[:, None, :]
    o = sum(q[:, :, None] * S, axis=1) / sqrt(K)
}
""",
}


@pytest.mark.parametrize("kind", ["delta", "dplr"])
def test_delta_rule_heads_plan_and_auto(kind):
    """The heads of the delta rule (scalar gate: kind "delta"; per-key gate: the generalized form,
    "dplr") are batch rows of the chunk form, as the additive form's; auto takes it."""
    spec = DELTA_HEADS[kind]
    cell, plan = _plan(spec)
    assert (plan.kind, str(plan.heads)) == (kind, "NH")
    for nid in [plan.q] + ([plan.k, plan.v, plan.beta, plan.g] if kind == "delta" else
                           [n for st in plan.steps for n in st.nodes()]):
        assert str(cell.graph[nid].shape[0]) == "NH"
    report = rnnc.analyze(spec)
    (state,) = report.to_dict()["states"].values()
    assert (report.backend, state["transition"], state["heads"]) == ("chunk", "identity_minus_low_rank", "NH")


@pytest.mark.parametrize("kind", ["delta", "dplr"])
@pytest.mark.parametrize("T,heads", [(1, 1), (15, 2), (16, 1), (37, 1)])
def test_delta_rule_heads_chunk_matches_loop(kind, T, heads):
    _agree(DELTA_HEADS[kind], {"NH": 2, "K": 4, "V": 3}, T, heads, chunk_size=8)


def test_delta_rule_heads_triton_chunk_matches_loop():
    """On the triton backend the heads are batch rows of the chunkwise delta-rule kernels (the
    interpreter on CPU), values and gradients as the loop's."""
    pytest.importorskip("triton")
    spec, dims = DELTA_HEADS["delta"], {"NH": 2, "K": 4, "V": 3}
    assert "triton: chunkwise kernels" in rnnc.analyze(spec, backend="triton").notes
    ref = rnnc.build(spec, backend="loop", **dims)
    cell = rnnc.build(spec, backend="triton", chunk_size=16, **dims)
    cell.load_state_dict(ref.state_dict())
    inputs = [x.float().detach().requires_grad_() for x in library_inputs(spec, 2, 70, 1, False, torch.float64, seed=3)]
    res = [outputs_and_grads(c, inputs) for c in (cell, ref)]
    for a, b in zip(*[[*ys, final["S"], *grads] for ys, final, grads in res]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _rwkv6_heads() -> str:
    """rwkv6.rnn's per-head cell (u: [NH, K]) as its own source."""
    from rnnc.resources import specs_dir

    text = (specs_dir() / "rwkv6.rnn").read_text()
    return text[text.index("cell rwkv6_heads"):]


@pytest.mark.parametrize("T", [1, 8, 9, 37])
@pytest.mark.parametrize("heads", [1, 2])
def test_rwkv6_per_head_bonus_chunk_matches_loop(T, heads):
    """RWKV-6 read before the update, a per-key decay and a per-head bonus u [NH, K]."""
    spec = _rwkv6_heads()
    _, plan = _plan(spec)
    assert plan.before and plan.gk is not None and len(plan.extra) == 1 and str(plan.heads) == "NH"
    _agree(spec, {"NH": 2, "K": 4, "V": 3}, T, heads, chunk_size=8)


def test_retnet_decay_written_in_log_space_chunks_alike():
    """The same decay as exp(log γ) (a log-gate) and as γ (a constant taken by its log)."""
    text = RETNET_HEAD + ("    let lg = log(1 - 2 ** (-5 - arange(NH)))\n"
                          "    S = exp(lg)[:, None, None] * S + k[:, :, None] * v[:, None, :]\n"
                          "    o = sum(q[:, :, None] * S, axis=1) / sqrt(K)\n}\n")
    _, plan = _plan(text)
    _, ref = _plan("retnet")
    assert (plan.kind, plan.transposed, len(plan.positive), len(ref.positive)) == ("linear", False, 0, 1)
    _agree(text, {"NH": 2, "K": 4, "V": 3}, 37, 1)


def test_negative_constant_decay_is_refused_at_call_time():
    text = RETNET_HEAD + ("    param gamma: [NH] = 0.5\n    S = gamma[:, None, None] * S + k[:, :, None] * v[:, None, :]\n"
                          "    o = sum(q[:, :, None] * S, axis=1)\n}\n")
    cell = rnnc.build(text, backend="chunk", NH=2, K=4, V=3)
    x = [torch.randn(1, 5, 2, d) for d in (4, 4, 3)]
    cell(*x)  # positive: fine
    with torch.no_grad():
        cell.gamma.fill_(-0.5)
    with pytest.raises(rnnc.InputError, match="gamma.*backend='loop'"):
        cell(*x)
    loop = rnnc.build(text, backend="loop", NH=2, K=4, V=3)
    loop.load_state_dict(cell.state_dict())
    assert torch.isfinite(loop(*x)[0]).all()  # the loop runs it


@pytest.mark.parametrize("body,why", [
    ("S = S + sum(k, axis=0)[None, :, None] * v[:, None, :]\n    o = sum(q[:, :, None] * S, axis=1)", "heads"),
    ("S = S + k[:, :, None] * v[:, None, :]\n    o = sum(q[:, :, None] * S, axis=1) + sum(v, axis=0)", "heads"),
])
def test_heads_that_mix_are_refused(body, why):
    text = RETNET_HEAD + f"    {body}\n}}\n"
    assert "chunk" not in rnnc.backends_for(text)
    with pytest.raises(rnnc.BuildError, match=why):
        rnnc.build(text, backend="chunk")
