"""Several states in one chunk pass (issue 10, item 3). mLSTM's matrix memory C and normaliser n share
their decay and run as one chunk form ([C | n], n as an extra value column); its max-stabiliser m is
recognised in the IR as a max-plus state (m' = max(m + a, b)) and scanned first, so every exponential
of the chunk form is of a quantity <= 0 however large the input gate. Checked against the loop
(values, final states, gradients of every input and initial state) at lengths around the chunk size
with mild, extreme and -inf gates, in float64, float32 and with bf16 inputs; against the paper's
equations in float64 (tests/test_library_reference.ref_mlstm); and on another cell of this shape (a
normalised linear attention, no stabiliser), so the joining is read off the IR, not the cell's name.
Packed batches (cu_seqlens) and the library-wide differential tests cover mlstm's chunk form too
(tests/test_varlen.py, tests/test_backends_agree.py)."""
from __future__ import annotations

import pytest
import torch

import rnnc
from rnnc.analysis import analyze_cell
from rnnc.api import _program
from rnnc.maxplus import maxplus_form
from rnnc.optimize import optimize
from rnnc.plans import chunk_plan
from rnnc.runtime.scan import _maxplus_scan

from helpers import count_calls
from test_library_reference import ref_mlstm

K, V = 4, 3
NLA = """
cell nla(q: [K], k: [K], v: [V], g: []) -> (o: [V]) {
    state S: [K, V] = 0
    state z: [K] = 0
    S = exp(g) * S + outer(k, v)
    z = exp(g) * z + k
    o = (q @ S) / (1 + abs(q @ z))
}
"""


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _gates(shape, kind: str, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """(igate, fgate) pre-activations: mild; extreme (input gates up to +50, forget gates from -1e3,
    saturated at +30); or extreme with some forget gates -inf (logsigmoid -inf: a hard reset)."""
    i = torch.randn(shape, generator=gen, dtype=torch.float64)
    f = torch.randn(shape, generator=gen, dtype=torch.float64) + 2
    if kind == "big_input":  # input gates up to +50, mild forget gates
        return 60 * torch.rand(shape, generator=gen, dtype=torch.float64) - 10, f
    if kind != "mild":
        i = 60 * torch.rand(shape, generator=gen, dtype=torch.float64) - 10
        f = torch.where(torch.rand(shape, generator=gen) < 0.2, torch.full_like(f, -1e3), 10 * f)
    if kind == "inf":
        f = torch.where(torch.rand(shape, generator=gen) < 0.1, torch.full_like(f, -torch.inf), f)
    return i, f


def _inputs(B, T, H, kind, gen):
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    return [q, k, v, *_gates((B, T, H), kind, gen)]


def _state(B, H, gen):
    return {"C": 0.5 * torch.randn(B, H, K, V, generator=gen, dtype=torch.float64),
            "n": torch.randn(B, H, K, generator=gen, dtype=torch.float64).abs() + 0.5,
            "m": torch.randn(B, H, generator=gen, dtype=torch.float64)}


def _nla_inputs(T, gen, gate):
    """NLA's inputs q, k, v, g (g = gate(shape)) and initial states S, z, float64, batch 2."""
    q, k = (torch.randn(2, T, K, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, T, V, generator=gen, dtype=torch.float64)
    g = gate((2, T))
    state = {"S": torch.randn(2, K, V, generator=gen, dtype=torch.float64),
             "z": torch.randn(2, K, generator=gen, dtype=torch.float64)}
    return [q, k, v, g], state


def _run(cell, inputs, state, dtype=torch.float64):
    """(outputs, final states, gradients of a weighted loss w.r.t. every input and initial state)."""
    xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
    s0 = {k: v.detach().to(dtype).requires_grad_() for k, v in state.items()}
    y, final = cell(*xs, state=s0)
    w = torch.cos(torch.arange(y.numel(), dtype=torch.float64)).view_as(y)
    loss = (y.double() * w).sum() + sum((f.double() * (1 + i)).sum() for i, f in enumerate(final.values()))
    grads = torch.autograd.grad(loss, xs + list(s0.values()))
    return y, final, grads


def _close(a, b, tol):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    assert (a - b).abs().max().item() <= tol * (b.abs().max().item() + 1e-30)


def _all_close(got, want, tol):
    """Every part of two (output, final states, gradients) results within `tol` of each other."""
    assert got[1].keys() == want[1].keys() and len(got[2]) == len(want[2])
    for a, b in [(got[0], want[0])] + [(got[1][s], want[1][s]) for s in want[1]] + list(zip(got[2], want[2])):
        _close(a, b, tol)


def test_the_stabiliser_is_max_plus_and_the_states_share_one_pass():
    cell = optimize(_program("mlstm").cell(None))
    report = analyze_cell(cell)
    assert report.classes["m"].get("maxplus") and report.classes["C"]["after"] == ["m"]
    plan = chunk_plan(cell.derived(), report)
    assert plan.staged and [m.state for m in plan.maxplus] == ["m"] and [n for n, _ in plan.columns] == ["n"]
    assert {name for _, name, _, _ in plan.reads} == {"C", "n"} and not plan.before
    assert rnnc.analyze("mlstm").backend == "chunk"
    assert rnnc.backends_for("mlstm") == ["loop", "chunk"] + (["triton"] if _has_triton() else [])


@pytest.mark.parametrize("text,form", [
    ("m = maximum(log_f + m, igate)", ("a", 1)),
    ("m = maximum(igate, m + log_f)", ("a", 1)),
    ("m = maximum(maximum(m + log_f, igate), fgate)", ("a", 2)),
    ("m = maximum(m, igate)", (None, 1)),
    ("m = maximum(log_f * m, igate)", None),
    ("m = maximum(m + m, igate)", None),
    ("m = maximum(log_f + m, igate + m)", None),
])
def test_max_plus_writings(text, form):
    src = ("cell c(igate: [], fgate: []) -> (y: []) {\n    state m: [] = 0\n    let log_f = logsigmoid(fgate)\n"
           f"    {text}\n    y = m\n}}\n")
    cell = optimize(rnnc.parse(src).cell())
    found = maxplus_form(cell, analyze_cell(cell).stages, cell.states[0])
    if form is None:
        assert found is None
    else:
        assert (found.a is not None, len(found.b)) == (form[0] is not None, form[1])


def test_maxplus_scan_is_the_recurrence():
    gen = torch.Generator().manual_seed(0)
    for T in (1, 2, 7, 64, 65):
        a = -5 * torch.rand(T, 3, generator=gen, dtype=torch.float64)
        a[torch.rand(T, 3, generator=gen) < 0.2] = -torch.inf
        b = 10 * torch.randn(T, 3, generator=gen, dtype=torch.float64)
        h0 = torch.randn(3, generator=gen, dtype=torch.float64)
        h, want = h0, []
        for t in range(T):
            h = torch.maximum(h + a[t], b[t])
            want.append(h)
        torch.testing.assert_close(_maxplus_scan(a, b, h0), torch.stack(want), rtol=1e-12, atol=1e-12)  # sums regrouped


@pytest.mark.parametrize("kind", ["mild", "extreme", "inf"])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 130])
def test_chunk_matches_loop(T, kind):
    gen = torch.Generator().manual_seed(T)
    inputs, state = _inputs(2, T, 2, kind, gen), _state(2, 2, gen)
    want = _run(rnnc.build("mlstm", backend="loop", dtype=torch.float64), inputs, state)
    got = _run(rnnc.build("mlstm", backend="chunk", dtype=torch.float64), inputs, state)
    _close(got[0], want[0], 1e-10)
    for k in want[1]:
        _close(got[1][k], want[1][k], 1e-10)
    for a, b in zip(got[2], want[2]):
        _close(a, b, 1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_chunk_in_low_precision_with_extreme_gates(dtype, tol):
    """Input gates up to +50 and -inf forget gates: the float32 chunk form (bf16 inputs, float32
    compute) stays finite and agrees with the loop in float64 on the same rounded inputs."""
    gen = torch.Generator().manual_seed(7)
    inputs, state = [x.to(dtype).double() for x in _inputs(2, 130, 2, "inf", gen)], _state(2, 2, gen)
    want = _run(rnnc.build("mlstm", backend="loop", dtype=torch.float64), inputs, state)
    got = _run(rnnc.build("mlstm", backend="chunk", chunk_size=32), inputs, state, dtype)
    _close(got[0], want[0], tol)
    for k in want[1]:
        _close(got[1][k], want[1][k], tol)
    for a, b in zip(got[2], want[2]):
        _close(a, b, tol)


@pytest.mark.parametrize("kind", ["mild", "big_input"])
def test_chunk_matches_the_papers_equations(kind):
    """Against the paper's parallel form, unstabilised, in float64 (test_library_reference.ref_mlstm):
    values, final states and every gradient; input gates up to +50 (e^50 fits in float64). (Its
    masked exp(F_t - F_j) overflows above the diagonal for strong forgetting, which makes its own
    gradients NaN: the forget gates stay mild here; the loop comparisons above take the extreme ones.)"""
    gen = torch.Generator().manual_seed(3)
    inputs, state = _inputs(2, 130, 1, kind, gen), _state(2, 1, gen)
    got = _run(rnnc.build("mlstm", backend="chunk", dtype=torch.float64), inputs, state)
    xs = [x.squeeze(2).requires_grad_() for x in inputs]
    s0 = {k: v.squeeze(1).requires_grad_() for k, v in state.items()}
    (y,), final = ref_mlstm(dict(zip(["q", "k", "v", "igate", "fgate"], xs)), {}, s0)
    w = torch.cos(torch.arange(y.numel(), dtype=torch.float64)).view_as(y)
    loss = (y * w).sum() + sum((final[k] * (1 + i)).sum() for i, k in enumerate(["C", "n", "m"]))
    grads = torch.autograd.grad(loss, xs + list(s0.values()))
    _close(got[0].squeeze(2), y, 1e-9)
    for k in final:
        _close(got[1][k].squeeze(1), final[k], 1e-9)
    for i, (a, b) in enumerate(zip(got[2], grads)):  # five inputs (heads at dim 2), then three states (dim 1)
        _close(a.squeeze(2 if i < 5 else 1), b, 1e-8)


#: NLA reading the states before the step's update (RWKV-style), and with a state-free term added to a read.
BEFORE = NLA.replace("    S = exp(g) * S + outer(k, v)\n    z = exp(g) * z + k\n    o = (q @ S) / (1 + abs(q @ z))",
                     "    o = (q @ S) / (1 + abs(q @ z + sum(k)))\n    S = exp(g) * S + outer(k, v)\n    z = exp(g) * z + k")


@pytest.mark.parametrize("text", [NLA, BEFORE], ids=["after", "before"])
def test_another_cell_with_a_normaliser_joins_the_same_way(text):
    """A normalised linear attention (no stabiliser): S and z share exp(g) and k, one pass."""
    cell = optimize(rnnc.parse(text).cell())
    report = analyze_cell(cell)
    plan = chunk_plan(cell.derived(), report)
    assert plan.staged and not plan.maxplus and [n for n, _ in plan.columns] == ["z"]
    assert plan.before == (text is BEFORE)
    assert rnnc.analyze(text).backend == "chunk"
    gen = torch.Generator().manual_seed(5)
    xs, state = _nla_inputs(70, gen, lambda shape: torch.nn.functional.logsigmoid(
        torch.randn(shape, generator=gen, dtype=torch.float64) + 2))
    want = _run(rnnc.build(text, backend="loop", dtype=torch.float64), xs, state)
    got = _run(rnnc.build(text, backend="chunk", chunk_size=16, dtype=torch.float64), xs, state)
    _all_close(got, want, 1e-10)


def test_states_that_do_not_share_the_decay_are_refused():
    text = NLA.replace("z = exp(g) * z + k", "z = z + k")
    assert "does not share the decay" in str(rnnc.backends_for(text)) or "chunk" not in rnnc.backends_for(text)
    with pytest.raises(rnnc.BuildError, match="does not share the decay of state 'S'"):
        rnnc.build(text, backend="chunk")


# ---- the triton backend: the joined pass by the Triton chunk kernels --------------------------------

def _err(a, b) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("T,kind", [(65, "inf"), pytest.param(130, "extreme", marks=pytest.mark.slow),
                                    pytest.param(64, "mild", marks=pytest.mark.slow)])
def test_triton_joined_pass_matches_loop(monkeypatch, T, kind):
    """mLSTM on the triton backend: the max-plus scan in PyTorch, then C and n as one [K, V + 1] pass
    by `_triton_chunk_linear` (forward and backward kernels; float32 compute) against the loop in
    float64 on the same inputs: values, final states and every gradient, with input gates up to +50
    and -inf forget gates, T not a multiple of the chunk. The readout divides by max(|n . q|, e^-m),
    which can be near 0: the float32 loop itself is off by up to ~3e-3 there, so each error may be at
    most 3x the float32 loop's (plus 1e-5)."""
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(11)
    inputs, state = _inputs(2, T, 2, kind, gen), _state(2, 2, gen)
    want = _run(rnnc.build("mlstm", backend="loop", dtype=torch.float64), inputs, state)
    base = _run(rnnc.build("mlstm", backend="loop"), inputs, state, torch.float32)
    cell = rnnc.build("mlstm", backend="triton", chunk_size=32)
    calls = count_calls(monkeypatch, cell, "_triton_chunk_linear")
    import rnnc.runtime.triton_chunk as tc
    recomputed = []
    monkeypatch.setattr(tc, "_chunk_recompute_backward", lambda *a: recomputed.append(1))
    got = _run(cell, inputs, state, torch.float32)
    assert calls == ["_triton_chunk_linear"] and not recomputed  # one joined pass, its backward in Triton
    flat = lambda r: [r[0], *(r[1][k] for k in want[1]), *r[2]]  # noqa: E731
    for a, f32, b in zip(flat(got), flat(base), flat(want)):
        assert _err(a, b) <= 3 * _err(f32, b) + 1e-5, (_err(a, b), _err(f32, b))


def test_triton_joined_pass_with_bf16_inputs():
    """bf16 inputs (the interpreter's bf16 rule: upcast on load), extreme and -inf gates: bf16 results,
    finite, as close to the float64 loop (on the same rounded inputs) as the PyTorch chunk form with
    bf16 inputs is (both round their results to bf16), within 2x + 1e-3."""
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(12)
    inputs, state = [x.to(torch.bfloat16).double() for x in _inputs(1, 40, 2, "inf", gen)], _state(1, 2, gen)
    want = _run(rnnc.build("mlstm", backend="loop", dtype=torch.float64), inputs, state)
    base = _run(rnnc.build("mlstm", backend="chunk", chunk_size=16), inputs, state, torch.bfloat16)
    got = _run(rnnc.build("mlstm", backend="triton", chunk_size=16), inputs, state, torch.bfloat16)
    assert got[0].dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in got[2])
    flat = lambda r: [r[0], *(r[1][k] for k in want[1]), *r[2]]  # noqa: E731
    for a, bf, b in zip(flat(got), flat(base), flat(want)):
        assert _err(a, b) <= 2 * _err(bf, b) + 1e-3, (_err(a, b), _err(bf, b))


def test_triton_note_says_what_runs_in_pytorch():
    pytest.importorskip("triton")
    notes = rnnc.analyze("mlstm", backend="triton").notes
    assert "triton: chunkwise kernels" in notes
    assert any("max-plus scan" in n and "PyTorch" in n for n in notes)


# Mamba-2 (one head; heads as a leading axis of the call) with a second state sharing h's decay
# exp(dt * A) and its keys B, read as h @ C: the pass runs on the transposes, u's values z as more
# columns of [hᵀ | uᵀ] (and a normaliser n' = a n + B, read as n · C, as one more column).
P, N = 3, 4
MAMBA2_TWO = """
cell mamba2_two(x: [P], z: [P], dt: [], B: [N], C: [N]) -> (y: [P]) {
    param A_log: [] = 0.5
    param D: [] = 1
    state h: [P, N] = 0
    state u: [P, N] = 0
    let a = exp(-dt * exp(A_log))
    h = a * h + (dt * x)[:, None] * B[None, :]
    u = a * u + outer(z, B)
    y = h @ C - 0.5 * (u @ C) + D * x
}
"""
MAMBA2_NORM = MAMBA2_TWO.replace("    let a", "    state n: [N] = 0\n    let a").replace(
    "    y = h @ C", "    n = a * n + B\n    y = (h @ C) / (1 + abs(n @ C))")
SHARED_KEYS = """
cell two(q: [K], k: [K], v: [V], w: [V], g: [K]) -> (o: [V]) {
    state S: [K, V] = 0
    state R: [K, V] = 0
    S = exp(g)[:, None] * S + outer(k, v)
    R = exp(g)[:, None] * R + 2 * outer(k, w)
    o = q @ S + (q @ R) / sqrt(K)
}
"""


def _run_all(cell, inputs, state):
    """(output, final states, gradients of a weighted loss w.r.t. inputs, initial states and params)."""
    xs = [x.detach().requires_grad_() for x in inputs]
    s0 = {k: v.detach().requires_grad_() for k, v in state.items()}
    y, final = cell(*xs, state=s0)
    w = torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y)
    loss = (y * w).sum() + sum((f * (1 + i)).sum() for i, f in enumerate(final.values()))
    return y, final, torch.autograd.grad(loss, xs + list(s0.values()) + list(cell.parameters()))


def _loop_and_chunk(text, gen, **dims):
    """The cell on the loop (params moved off their initial values) and on chunks of 8 with its params."""
    loop = rnnc.build(text, backend="loop", dtype=torch.float64, **dims)
    with torch.no_grad():
        for p in loop.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    chunk = rnnc.build(text, backend="chunk", chunk_size=8, dtype=torch.float64, **dims)
    chunk.load_state_dict(loop.state_dict())
    return loop, chunk


def _joined_inputs(text, T, gen):
    cell = rnnc.parse(text).cell()
    sizes = {"K": K, "V": V, "P": P, "N": N, "NH": 2}
    xs = []
    for p in cell.inputs:
        x = torch.randn(2, T, 2, *[sizes[str(d)] for d in p.shape], generator=gen, dtype=torch.float64)
        xs.append(torch.nn.functional.softplus(x) if p.name == "dt" else
                  torch.nn.functional.logsigmoid(x + 2) if p.name == "g" else x)
    state = {s.name: torch.randn(2, 2, *[sizes[str(d)] for d in s.shape], generator=gen, dtype=torch.float64)
             for s in cell.states}
    return xs, state


@pytest.mark.parametrize("text,columns,transposed", [(MAMBA2_TWO, ["u"], True), (MAMBA2_NORM, ["u", "n"], True),
                                                     (SHARED_KEYS, ["R"], False)], ids=["mamba2", "mamba2_norm", "gla"])
def test_matrix_states_sharing_decay_and_keys_join(text, columns, transposed):
    cell = optimize(rnnc.parse(text).cell())
    plan = chunk_plan(cell.derived(), analyze_cell(cell))
    assert plan.staged and [n for n, _ in plan.columns] == columns and plan.transposed == transposed
    assert rnnc.analyze(text).backend == "chunk"


@pytest.mark.parametrize("text", [MAMBA2_TWO, MAMBA2_NORM, SHARED_KEYS], ids=["mamba2", "mamba2_norm", "gla"])
@pytest.mark.parametrize("T", [1, 15, 16, 17, 40])
def test_joined_matrix_states_chunk_matches_loop(text, T):
    gen = torch.Generator().manual_seed(T)
    xs, state = _joined_inputs(text, T, gen)
    loop, chunk = _loop_and_chunk(text, gen)
    got, want = _run_all(chunk, xs, state), _run_all(loop, xs, state)
    _all_close(got, want, 1e-10)


@pytest.mark.parametrize("change,why", [
    (("outer(z, B)", "outer(z, C)"), "does not share the keys of state 'h'"),
    (("u = a * u", "u = exp(-dt) * u"), "does not share the decay of state 'h'"),
    (("y = h @ C - 0.5 * (u @ C)", "y = h @ C - 0.5 * (x @ u @ C) * x"), "different queries"),
])
def test_matrix_states_that_do_not_share_are_refused(change, why):
    text = MAMBA2_TWO.replace(*change)
    assert text != MAMBA2_TWO
    assert "chunk" not in rnnc.backends_for(text)
    with pytest.raises(rnnc.BuildError, match=why):
        rnnc.build(text, backend="chunk")


def test_a_scaled_read_of_a_joined_state_keeps_its_scale():
    """`(q @ S) / sqrt(K)` in a joined pass: the read is q @ S under the scale (the scale was once
    dropped there: chunk and loop differed by 2 at T=20)."""
    text = NLA.replace("o = (q @ S)", "o = (q @ S) / sqrt(K)")
    gen = torch.Generator().manual_seed(0)
    xs, state = _nla_inputs(20, gen, lambda shape: -torch.rand(shape, generator=gen, dtype=torch.float64))
    want = _run(rnnc.build(text, backend="loop", dtype=torch.float64), xs, state)
    got = _run(rnnc.build(text, backend="chunk", chunk_size=8, dtype=torch.float64), xs, state)
    _all_close(got, want, 1e-10)


def test_joined_matrix_states_on_the_triton_chunk_kernels():
    """Mamba-2 with a second state on the triton backend: [hᵀ | uᵀ] by the Triton chunk kernels
    (interpreter), float32, against the loop: values, final states and every gradient."""
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(3)
    xs, state = _joined_inputs(MAMBA2_TWO, 70, gen)
    xs, state = [x.float() for x in xs], {k: v.float() for k, v in state.items()}
    assert "triton: chunkwise kernels" in rnnc.analyze(MAMBA2_TWO, backend="triton").notes
    got = _run_all(rnnc.build(MAMBA2_TWO, backend="triton", chunk_size=32), xs, state)
    want = _run_all(rnnc.build(MAMBA2_TWO, backend="loop"), xs, state)
    _all_close(got, want, 1e-5)


# The same cells with heads declared as a dim (the library's mamba2 writing; mLSTM with a stabiliser per
# head): one head's plan (rnnc/heads.py), the heads as more rows of the joined pass.
MAMBA2_TWO_HEADS = """
cell mamba2_two_heads(x: [NH, P], z: [NH, P], dt: [NH], B: [N], C: [N]) -> (y: [NH, P]) {
    param A_log: [NH] = log(arange(1, NH + 1))
    param D:     [NH] = 1
    state h: [NH, P, N] = 0
    state u: [NH, P, N] = 0
    let a = exp(dt * -exp(A_log))[:, None, None]
    h = a * h + (dt[:, None] * x)[:, :, None] * B
    u = a * u + z[:, :, None] * B
    y = sum(h * C, axis=2) - 0.5 * sum(u * C, axis=2) + D[:, None] * x
}
"""
MLSTM_HEADS = """
cell mlstm_heads(q: [NH, K], k: [NH, K], v: [NH, V], igate: [NH], fgate: [NH]) -> (h: [NH, V]) {
    state C: [NH, K, V] = 0
    state n: [NH, K] = 0
    state m: [NH] = 0
    let log_f = logsigmoid(fgate)
    let m_new = maximum(log_f + m, igate)
    let i_s = exp(igate - m_new)
    let f_s = exp(log_f + m - m_new)
    let k_s = k / sqrt(K)
    C = f_s[:, None, None] * C + i_s[:, None, None] * k_s[:, :, None] * v[:, None, :]
    n = f_s[:, None] * n + i_s[:, None] * k_s
    m = m_new
    h = sum(q[:, :, None] * C, axis=1) / maximum(abs(sum(n * q, axis=1)), exp(-m))[:, None]
}
"""


@pytest.mark.parametrize("text,columns,maxplus", [(MAMBA2_TWO_HEADS, ["u"], []), (MLSTM_HEADS, ["n"], ["m"])],
                         ids=["mamba2", "mlstm"])
def test_heads_declared_as_a_dim_join_per_head(text, columns, maxplus):
    cell = optimize(rnnc.parse(text).cell())
    plan = chunk_plan(cell.derived(), analyze_cell(cell))
    assert str(plan.heads) == "NH" and [n for n, _ in plan.columns] == columns
    assert [m.state for m in plan.maxplus] == maxplus
    report = rnnc.analyze(text)
    assert report.backend == "chunk" and all(s["heads"] == "NH" for s in report.to_dict()["states"].values())


@pytest.mark.parametrize("text", [MAMBA2_TWO_HEADS, MLSTM_HEADS], ids=["mamba2", "mlstm"])
@pytest.mark.parametrize("T", [1, 15, 17, 40])
def test_heads_declared_as_a_dim_joined_chunk_matches_loop(text, T):
    gen = torch.Generator().manual_seed(T)
    xs, state = _joined_inputs(text, T, gen)
    if "igate" in text:  # input gates up to ~+30 (the stabiliser's case), forget gates down to -1e3
        xs[3], xs[4] = 10 * xs[3], torch.where(xs[4] < -1, torch.full_like(xs[4], -1e3), xs[4] + 2)
        state["n"] = state["n"].abs() + 0.5
    loop, chunk = _loop_and_chunk(text, gen, NH=2)
    got, want = _run_all(chunk, xs, state), _run_all(loop, xs, state)
    _all_close(got, want, 1e-10)
