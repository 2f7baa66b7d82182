"""The chunk backend's readouts beyond o = q @ S': the state before its update (RWKV-6's
o = r @ S + bonus), and state-free terms added to or subtracted from q @ S (either state). Each
cell is checked against the loop in values and gradients; outputs that are not q @ S plus
state-free terms of the output's shape are refused with a reason."""
import pytest
import torch
import torch.nn.functional as F

import rnnc

from helpers import library_inputs  # noqa: E402

K, V = 4, 3

CELLS = {
    # the state after the update, minus q @ S, plus an input
    "minus_new": """
cell minus_new(q: [K], k: [K], v: [V], g: [K]) -> (o: [V]) {
    state S: [K, V] = 0
    S = exp(g)[:, None] * S + outer(k, v)
    o = v - q @ S
}""",
    # the state before the update, a scalar decay, a param added (a constant term)
    "before_scalar": """
cell before_scalar(q: [K], k: [K], v: [V], g: []) -> (o: [V]) {
    param b: [V] = 0.5
    state S: [K, V] = 0
    o = b + q @ S
    S = exp(g) * S + outer(k, v)
}""",
    # the delta rule, read before its update, with a term subtracted
    "delta_before": """
cell delta_before(q: [K], k: [K], v: [V], beta: []) -> (o: [V]) {
    state S: [K, V] = 0
    o = q @ S - beta * v
    S = (eye(K) - beta * outer(k, k)) @ S + beta * outer(k, v)
}""",
    # no decay, read before the update, nothing else
    "attn_before": """
cell attn_before(q: [K], k: [K], v: [V]) -> (o: [V]) {
    state S: [K, V] = 0
    o = q @ S
    S = S + outer(k, v)
}""",
}


def _inputs(prog, T, extreme, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for p in prog.cell().inputs:
        shape = [2, T, 2] + [{"K": K, "V": V}[str(d)] for d in p.shape]
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        if p.name in ("g", "w"):
            x = -20 * torch.rand(*shape, generator=gen, dtype=torch.float64) if extreme else F.logsigmoid(x + 3)
        elif p.name == "beta":
            x = torch.sigmoid(x)
        elif p.name == "k":
            x = F.normalize(x, dim=-1)
        out.append(x.float().requires_grad_())
    return out


def _agree(prog, dims, T, extreme, chunk_size=None):
    loop = rnnc.build(prog, backend="loop", **dims)
    for p in loop.parameters():
        with torch.no_grad():
            p.add_(0.3 * torch.randn_like(p))
    chunk = rnnc.build(prog, backend="chunk", chunk_size=chunk_size, **dims)
    chunk.load_state_dict(loop.state_dict())
    inputs = _inputs(prog, T, extreme, seed=T)
    h0 = torch.randn(2, 2, K, V, generator=torch.Generator().manual_seed(3), requires_grad=True)
    res = []
    for cell in (loop, chunk):
        y, final = cell(*inputs, state={"S": h0})
        w = torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y)
        loss = (y * w).sum() + final["S"].sum()
        res.append([y, final["S"], *torch.autograd.grad(loss, list(inputs) + [h0] + list(cell.parameters()))])
    for a, b in zip(res[1], res[0]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item() + 1e-6)


@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("T", [1, 5, 37, 70])
def test_readout_forms_match_loop(name, T):
    prog = rnnc.parse(CELLS[name])
    assert "chunk" in rnnc.backends_for(prog)
    _agree(prog, {"K": K, "V": V} if name == "before_scalar" else {}, T, extreme=False)


@pytest.mark.parametrize("T", [1, 33, 100])
@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 8, 24])
def test_rwkv6_chunk_matches_loop(T, extreme, chunk_size):
    assert "chunk" in rnnc.backends_for("rwkv6")
    _agree(rnnc.load("rwkv6"), {"K": K}, T, extreme, chunk_size)


def test_rwkv6_chunk_reads_the_state_before_the_update():
    source = rnnc.build("rwkv6", backend="chunk", K=K).source
    assert "before=True" in source and "_chunk_linear(" in source


@pytest.mark.parametrize("body,why", [
    ("o = q @ S + sum(v)", "another shape"),             # a scalar term broadcast over V
    ("o = q @ S + k @ S", "not read out as q @ S"),      # two readouts
    ("o = v * (q @ S)", "not read out as q @ S"),        # scaled per value (a scalar factor chunks)
])
def test_other_readouts_are_refused(body, why):
    prog = rnnc.parse(f"""
cell c(q: [K], k: [K], v: [V]) -> (o: [V]) {{
    state S: [K, V] = 0
    S = S + outer(k, v)
    {body}
}}""")
    assert "chunk" not in rnnc.backends_for(prog)
    with pytest.raises(rnnc.BuildError) as info:
        rnnc.build(prog, backend="chunk")
    assert why in str(info.value)


@pytest.mark.parametrize("readout", ["o = sum(q[:, None] * S, axis=0)", "o = -(0 * v - sum(q[:, None] * S, axis=0))",
                                     "o = transpose(S) @ q", "o = q @ transpose(transpose(S))"])
def test_other_writings_of_the_readout_chunk_like_q_at_S(readout):
    """`sum(q[:, None] * S, axis=0)` and `transpose(S) @ q` are q @ S: the same verdict, backend and numbers
    (scaled by 1/sqrt(K) as the library's gla they are compared with)."""
    scaled = readout.replace("o = ", "o = (", 1) + ") / sqrt(K)"
    text = f"""cell c(q: [K], k: [K], v: [V], g: [K]) -> (o: [V]) {{
    state S: [K, V] = 0
    S = exp(g)[:, None] * S + outer(k, v)
    {scaled}
}}"""
    info = rnnc.analyze(text).to_dict()["states"]["S"]
    assert (info["readout"], info["readout_of"]) == ("contraction", "new")
    assert rnnc.analyze(text).backend == "chunk"
    ref = rnnc.build("gla", backend="loop", dtype=torch.float64)
    cell = rnnc.build(text, backend="chunk", dtype=torch.float64)
    xs = library_inputs("gla", 2, 37, 2, False, torch.float64)
    (y, f), (yr, fr) = cell(*xs), ref(*xs)
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(f["S"], fr["S"])


@pytest.mark.parametrize("decay", ["0.9 * S", "S * 0.9", "exp(-0.1) * S", "S - 0.1 * S"])
def test_a_constant_decay_chunks(decay):
    """A fixed decay γ (RetNet's), written as a number, exp of a number or distributed, is the
    constant log-gate log γ: the chunk form applies and gives the loop's values and gradients."""
    text = f"""cell c(q: [K], k: [K], v: [V]) -> (o: [V]) {{
    state S: [K, V] = 0
    S = {decay} + outer(k, v)
    o = q @ S
}}"""
    assert rnnc.analyze(text).backend == "chunk"
    ref = rnnc.build(text, backend="loop", dtype=torch.float64, K=4, V=3)
    cell = rnnc.build(text, backend="chunk", dtype=torch.float64, K=4, V=3, chunk_size=16)
    xs = library_inputs(text, 2, 37, 2, False, torch.float64, seed=1)
    (y, f), (yr, fr) = cell(*xs), ref(*xs)
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(f["S"], fr["S"])
    grads = torch.autograd.grad(y.sum() + f["S"].sum(), xs)
    grads_ref = torch.autograd.grad(yr.sum() + fr["S"].sum(), xs)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_a_negative_constant_decay_is_refused_with_the_reason():
    text = """cell c(q: [K], k: [K], v: [V]) -> (o: [V]) {
    state S: [K, V] = 0
    S = -0.5 * S + outer(k, v)
    o = q @ S
}"""
    with pytest.raises(rnnc.BuildError, match="positive constant"):
        rnnc.build(text, backend="chunk")
