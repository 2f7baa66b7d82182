"""Newton's method over time (backend "newton"): the Jacobian structure found from the IR, and the
solver against the loop (rnnc's semantics) on every nonlinear library cell: outputs, final states and
gradients of inputs, params and initial states; the sequential finish when it does not converge;
iteration counts; packed batches; the ParaRNN and IndRNN specs against their papers' equations."""
from __future__ import annotations

import warnings

import pytest
import torch

import rnnc
from helpers import DIMS, library_inputs, sizes
from rnnc import schedule
from rnnc.runtime.newton import NewtonWarning

REPORTS = {n: rnnc.analyze(n) for n in rnnc.library()}
APPLIES = [n for n, r in REPORTS.items() if schedule.why_not("newton", r) is None]
NONLINEAR = [n for n in APPLIES if any(info["class"] == "nonlinear" for info in REPORTS[n].classes.values())]


def _dims(name: str) -> dict[str, int]:
    return {d: DIMS[d] for d in rnnc.load(name).cell().dims if d in DIMS}


def _pair(name, dtype=torch.float64, scale=None, **dims):
    """The loop and newton modules of a cell with the same params (recurrent ones scaled by `scale`)."""
    dims = dims or _dims(name)
    torch.manual_seed(0)
    loop = rnnc.build(name, backend="loop", dtype=dtype, **dims)
    if scale:
        with torch.no_grad():
            for p_name, p in loop.named_parameters():
                if p_name in scale:
                    p.mul_(scale[p_name])
    newton = rnnc.build(name, backend="newton", dtype=dtype, **dims)
    newton.load_state_dict(loop.state_dict())
    return loop, newton


def _run(cell, inputs, state):
    """Outputs, final states, and gradients of a weighted loss w.r.t. inputs, params, initial states."""
    y, final = cell(*inputs, state=state)
    ys = y if isinstance(y, tuple) else (y,)
    w = [torch.cos(torch.arange(v.numel(), dtype=v.dtype)).view_as(v) for v in ys]
    loss = sum((v * wi).sum() for v, wi in zip(ys, w)) + sum((f * f).sum() for f in final.values())
    leaves = list(inputs) + [p for _, p in sorted(cell.named_parameters())] + [state[k] for k in sorted(state)]
    return [*ys, *final.values(), *torch.autograd.grad(loss, leaves)]


def _inputs_and_state(name, B, T, dtype, seed=0):
    inputs = library_inputs(name, B, T, 1, False, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    cell = rnnc.load(name).cell()
    state = {s.name: (0.5 * torch.randn(B, 1, *sizes(cell, s.shape), generator=g,
                                         dtype=dtype))
             .requires_grad_() for s in cell.states}
    return inputs, state


def _compare(name, T, dtype=torch.float64, tol=1e-9, scale=None, B=2):
    loop, newton = _pair(name, dtype, scale)
    inputs, state = _inputs_and_state(name, B, T, dtype)
    want = _run(loop, inputs, state)
    got = _run(newton, inputs, state)
    assert len(want) == len(got)
    for a, b in zip(want, got):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=tol, atol=tol), (a - b).abs().max()
    return newton


# ---- the Jacobian's structure ----------------------------------------------------------------

STRUCTURE = {  # cell -> [(kind, states, size)] per group of coupled states
    "paragru": [("diagonal", ("h",), "1")],
    "indrnn": [("diagonal", ("h",), "1")],
    "paralstm": [("block", ("c", "h"), "2")],
    "gru": [("dense", ("h",), "H")],
    "elman": [("dense", ("h",), "H")],
    "lstm": [("dense", ("h", "c"), "2*H")],
    "mingru": [("diagonal", ("h",), "1")],
}


@pytest.mark.parametrize("name", sorted(STRUCTURE))
def test_jacobian_structure_from_the_ir(name):
    groups = rnnc.analyze(name).jacobian
    assert [(g.kind, g.states, g.size) for g in groups] == STRUCTURE[name]


@pytest.mark.parametrize("name", ["paragru", "paralstm", "indrnn", "gru"])
def test_the_structure_holds_numerically(name):
    """The step's actual Jacobian (autograd, float64) is zero wherever the structure says it is."""
    cell = rnnc.build(name, backend="loop", dtype=torch.float64, H=4, I=3)
    states = rnnc.load(name).cell().states
    x = torch.randn(1, 3, dtype=torch.float64)
    h0 = [torch.randn(1, 4, dtype=torch.float64) for _ in states]

    def step(*prev):
        return tuple(cell.step(x, state={s.name: p for s, p in zip(states, prev)})[1][s.name][0] for s in states)

    jac = torch.autograd.functional.jacobian(step, tuple(h0))
    (group,) = rnnc.analyze(name).jacobian
    for i, _ in enumerate(states):
        for j, _ in enumerate(states):
            block = jac[i][j][..., 0, :]  # [4 outputs, 4 inputs]
            off = block - torch.diag(torch.diagonal(block))
            if group.kind == "dense":
                assert off.abs().max() > 1e-6  # really dense: the structure is not too coarse
            else:
                assert off.abs().max() == 0


@pytest.mark.parametrize("name", APPLIES)
def test_the_generated_jacobian_is_autograds(name, monkeypatch):
    """The Jacobian blocks `_step_jac` computes (rendered from the step's jvp graph, with F in one pass)
    equal torch.autograd's Jacobian of `_step` at the same states (float64), at the first iteration's
    iterate (not a solution): every block entry, and F itself."""
    import rnnc.runtime.newton as runtime

    seen = {}
    call, linearize = runtime._newton_call, runtime._newton_linearize

    def record_call(step, prev, lo, hi):
        seen.setdefault("step", step)
        return call(step, prev, lo, hi)

    def record_linearize(step_jac, prev, lo, hi, minus=None, out=None):
        before = [p.clone() for p in prev], None if minus is None else [m.clone() for m in minus]
        out = linearize(step_jac, prev, lo, hi, minus, out)
        F = [f.clone() if m is None else f + m for f, m in zip(out[0], before[1] or [None] * len(prev))]
        seen.setdefault("linearized", (before[0], lo, hi, (F, [j.clone() for j in out[1]])))  # buffers are reused
        return out

    monkeypatch.setattr(runtime, "_newton_call", record_call)
    monkeypatch.setattr(runtime, "_newton_linearize", record_linearize)
    _, newton = _pair(name)
    inputs, state = _inputs_and_state(name, 2, 5, torch.float64)
    with torch.no_grad():
        newton(*inputs, state=state)
    prev, lo, hi, (F, J) = seen["linearized"]
    t, n = prev[0].shape[:2]
    rows = t * n
    flat = tuple(p.reshape(rows, *p.shape[2:]).clone() for p in prev)
    step = seen["step"]
    want_F = step(flat, lo, hi)
    full = torch.autograd.functional.jacobian(lambda *p: step(p, lo, hi), flat)  # [i][j]: [rows, *s_i, rows, *s_j]
    states = [s.name for s in rnnc.load(name).cell().states]
    for f, w in zip(F, want_F):
        assert torch.allclose(f.reshape(w.shape), w.expand(w.shape), rtol=1e-12, atol=1e-12)

    def block(i, j):  # [rows, entries of state i, entries of state j]: each row's own Jacobian
        a = full[i][j].reshape(rows, -1, rows, flat[j][0].numel())
        return torch.stack([a[r, :, r] for r in range(rows)])

    for group, got in zip(REPORTS[name].jacobian, J):
        idx = [states.index(s) for s in group.states]
        if group.kind == "dense":
            want = torch.cat([torch.cat([block(i, j) for j in idx], 2) for i in idx], 1)
            assert torch.allclose(got.reshape(want.shape), want, rtol=1e-12, atol=1e-12), group
            continue
        for a, i in enumerate(idx):
            for b, j in enumerate(idx):
                entry = got if group.kind == "diagonal" else got[..., a, b]
                want = torch.diagonal(block(i, j), dim1=1, dim2=2)
                assert torch.allclose(entry.reshape(want.shape), want, rtol=1e-12, atol=1e-12), (group, a, b)


def test_analyze_reports_the_structure():
    assert "jacobian diagonal" in rnnc.analyze("paragru").summary()
    assert rnnc.analyze("paralstm").to_dict()["states"]["c"]["jacobian"].startswith("block-diagonal, 2×2")
    assert "jacobian" not in rnnc.analyze("mingru").to_dict()["states"]["h"]  # linear: no Newton needed


def test_newton_refuses_dense_matrix_states_and_stateless_cells():
    with pytest.raises(rnnc.RnncError, match="dense"):
        rnnc.build("deltanet", backend="newton", K=4, V=3)
    stateless = "cell f(x: [H]) -> (y: [H]) {\n    y = tanh(x)\n}\n"
    assert "newton" not in rnnc.backends_for(stateless)


# ---- newton against the loop -----------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 7, 64, 65, 300])
@pytest.mark.parametrize("name", NONLINEAR)
def test_newton_matches_the_loop(name, T):
    """Values and gradients (inputs, params, initial states) equal the loop's in float64."""
    _compare(name, T)


@pytest.mark.parametrize("name", sorted(set(APPLIES) - set(NONLINEAR)))
def test_newton_solves_linear_cells_too(name):
    """The loop's results; a linear cell's Newton step is exact: one or two iterations, one more per
    layer of states that read earlier layers nonlinearly (LSRL's programs); the folds by an associative
    combine, e.g. a running max, are not linear and take a few more."""
    newton = _compare(name, 33)
    linear = all(info["class"] != "associative" for info in REPORTS[name].classes.values())
    after = {s: info.get("after") or [] for s, info in REPORTS[name].to_dict()["states"].items()}

    def depth(s):
        return 1 + max((depth(a) for a in after[s]), default=0)
    layers = max(map(depth, after), default=1)
    assert newton.newton_info["converged"] and newton.newton_info["iterations"] <= (layers + 1 if linear else 12)


@pytest.mark.parametrize("name", ["paragru", "paralstm", "gru", "indrnn"])
def test_newton_in_chunks_of_steps_matches_the_loop(name, monkeypatch):
    """The guess, the linearization and the update run a chunk of steps at a time (at library sizes one
    chunk holds every step): with chunks of 1-3 steps, the same values and gradients."""
    import rnnc.runtime.newton as runtime

    monkeypatch.setattr(runtime, "_NEWTON_CHUNK", 24)
    _compare(name, 65)


@pytest.mark.slow
@pytest.mark.parametrize("name", NONLINEAR)
def test_newton_matches_the_loop_long(name):
    _compare(name, 4096, tol=1e-8, B=1)


@pytest.mark.parametrize("name", ["paragru", "paralstm", "indrnn", "lstm"])
def test_newton_in_float32(name):
    """In float32 the tolerance is √ε per step; the trajectory still matches the loop to ~1e-5."""
    _compare(name, 300, dtype=torch.float32, tol=2e-4)


def test_the_initial_guess_is_already_exact_for_one_step():
    newton = _compare("paragru", 1)
    assert newton.newton_info["iterations"] == 0 and newton.newton_info["converged"]


@pytest.mark.parametrize("name", ["paragru", "paralstm", "indrnn", "gru"])
def test_iterations_are_few_on_contracting_cells(name, capsys):
    """Contracting cells converge in a handful of iterations, independent of T (ParaRNN uses 3,
    DEER reports the same); NEWTON_DEBUG prints what newton_info records."""
    for T in (64, 700):
        loop, newton = _pair(name)
        newton.NEWTON_DEBUG = True
        inputs, state = _inputs_and_state(name, 2, T, torch.float64)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error", NewtonWarning)
            newton(*inputs, state=state)
        info = newton.newton_info
        assert info["converged"] and info["sequential_from"] is None and info["steps"] == T
        assert 1 <= info["iterations"] <= 8, info
        assert f"'iterations': {info['iterations']}" in capsys.readouterr().out


def test_iteration_cap_finishes_sequentially_with_a_warning():
    """One iteration cannot converge 65 GRU steps: the rest runs step by step, exactly, with a warning."""
    loop, newton = _pair("gru")
    newton.NEWTON_MAX_ITERS = 1
    inputs, state = _inputs_and_state("gru", 2, 65, torch.float64)
    want = _run(loop, inputs, state)
    with pytest.warns(NewtonWarning, match="one after another"):
        got = _run(newton, inputs, state)
    info = newton.newton_info
    assert not info["converged"] and 2 <= info["sequential_from"] < 65 and info["iterations"] == 1
    for a, b in zip(want, got):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("segment", [None, 8])
def test_a_chaotic_cell_converges_or_falls_back_and_matches_the_loop(segment, monkeypatch):
    """Elman with recurrent weights ×6 (strongly expanding tanh dynamics, Newton's linearisations
    far from the truth): either the iterations converge or the sequential finish takes over with
    the warning; never a silent wrong answer. From the guess of every step run from s0 (48 steps are
    too few for segments), and from 8-step segments run side by side (each from 8 steps run from s0
    before it) and swept once from the segments' previous ends (such dynamics do not forget a wrong
    start)."""
    import rnnc.runtime.newton as runtime

    if segment:
        monkeypatch.setattr(runtime, "_NEWTON_SEGMENT", segment)
        monkeypatch.setattr(runtime, "_NEWTON_SWEEPS", 1)  # more passes would run all 48 steps in order
    loop, newton = _pair("elman", scale={"weight_hh": 6.0}, H=8, I=3)
    newton.NEWTON_MAX_ITERS = 6
    state = {"h": torch.zeros(2, 1, 8, dtype=torch.float64, requires_grad=True)}
    inputs = [torch.randn(2, 48, 1, 3, dtype=torch.float64, requires_grad=True)]
    want = _run(loop, inputs, state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _run(newton, inputs, state)
    info = newton.newton_info
    assert info["guess"] == ({"segment": 8, "passes": 2} if segment else {"segment": None, "passes": 1})
    assert info["converged"] or any(issubclass(w.category, NewtonWarning) for w in caught)
    assert not info["converged"]  # with this cap, these dynamics do need the fallback
    for a, b in zip(want, got):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-8), (a - b).abs().max()


@pytest.mark.parametrize("name", ["paragru", "paralstm", "gru", "indrnn", "lstm"])
def test_the_guess_in_segments_matches_the_loop(name, monkeypatch):
    """The initial guess runs segments of steps side by side, each from a few steps run from s0 before
    it, then passes from the segments' previous ends (rnnc/runtime/newton.py, _newton_guess): with
    5-step segments (the last one 2 steps) a few per batch, the same values and gradients; the first
    segment is exact, so the iterations start after it."""
    import rnnc.runtime.newton as runtime

    monkeypatch.setattr(runtime, "_NEWTON_SEGMENT", 5)
    monkeypatch.setattr(runtime, "_NEWTON_CHUNK", 24)
    newton = _compare(name, 67)
    info = newton.newton_info
    assert info["guess"]["segment"] == 5 and 1 <= info["guess"]["passes"] <= runtime._NEWTON_SWEEPS + 1, info
    assert info["converged"] and info["iterations"] <= 3, info


@pytest.mark.parametrize("name, before, after", [("paragru", 4, 1), ("indrnn", 15, 3)])
def test_the_guess_in_segments_leaves_one_iteration_or_few(name, before, after, monkeypatch):
    """The benchmark's case (B=4, H=64, T=2048, float32): from the segmented guess, ParaGRU's Newton
    converges in 1 iteration and IndRNN's in at most 3, where from every step started at s0 they took
    4 and 15 or more; the results are the loop's either way."""
    import rnnc.runtime.newton as runtime

    torch.manual_seed(0)
    loop = rnnc.build(name, backend="loop", H=64, I=64)
    newton = rnnc.build(name, backend="newton", H=64, I=64)
    newton.load_state_dict(loop.state_dict())
    x = torch.randn(4, 2048, 64)
    with torch.no_grad():
        want = loop(x)[0]
        got = newton(x)[0]
        info = newton.newton_info
        assert info["converged"] and info["iterations"] <= after and info["guess"]["segment"] >= 64, info
        assert torch.allclose(got, want, atol=2e-4)
        monkeypatch.setattr(runtime, "_NEWTON_SEGMENT", 2048)  # one segment: every step from s0
        got = newton(x)[0]
        info = newton.newton_info
        assert info["guess"]["segment"] is None and info["converged"] and info["iterations"] >= before, info
        assert torch.allclose(got, want, atol=2e-4)


def test_packed_batches_and_state_passing():
    """cu_seqlens: each sequence from its own initial state to its own final state, as the loop;
    and running a sequence in two halves, the state passed on, gives the whole run's results."""
    loop, newton = _pair("paralstm")
    x = torch.randn(1, 40, 1, 2, dtype=torch.float64)
    cu = torch.tensor([0, 7, 30, 40])
    state = {s: torch.randn(3, 1, 3, dtype=torch.float64) for s in ("c", "h")}
    y1, f1 = loop(x, cu_seqlens=cu, state=state)
    y2, f2 = newton(x, cu_seqlens=cu, state=state)
    assert torch.allclose(y1, y2, atol=1e-10)
    for k in f1:
        assert torch.allclose(f1[k], f2[k], atol=1e-10)
    whole, fw = newton(x)
    first, mid = newton(x[:, :17])
    second, fs = newton(x[:, 17:], state=mid)
    assert torch.allclose(torch.cat([first, second], 1), whole, atol=1e-10)
    assert all(torch.allclose(fw[k], fs[k], atol=1e-10) for k in fw)


# ---- the specs against their papers' equations (plain PyTorch, float64) ------------------------

def _reference(name, p, x, H):
    """The paper's equations step by step; x [B, T, I]; returns h [B, T, H]."""
    sig, tanh = torch.sigmoid, torch.tanh
    B, T, _ = x.shape
    h = torch.zeros(B, H, dtype=x.dtype)
    c = torch.zeros(B, H, dtype=x.dtype)
    out = []
    for t in range(T):
        xt = x[:, t]
        if name == "indrnn":  # Li et al. 2018: h_t = relu(W x_t + u ⊙ h_{t-1} + b)
            h = torch.relu(xt @ p["weight"].T + p["u"] * h + p["bias"])
        else:
            bz, br, bh = (xt @ p["weight_x"].T + p["bias"]).split(H, -1)
            if name == "paragru":  # ParaRNN's ParaGRU, gru_diag_mh.py
                z = sig(p["a_z"] * h + bz)
                r = sig(p["a_r"] * h + br)
                cand = tanh(p["a_h"] * (h * r) + bh)
                h = z * cand + (1 - z) * h
            else:  # ParaRNN's ParaLSTM-CIFG (bz, br, bh are the f, c, o rows)
                f = sig(p["a_f"] * h + bz + p["p_f"] * c)
                c = f * c + (1 - f) * tanh(p["a_c"] * h + br)
                o = sig(p["a_o"] * h + bh + p["p_o"] * c)
                h = o * tanh(c)
        out.append(h)
    return torch.stack(out, 1)


@pytest.mark.parametrize("backend", ["loop", "newton"])
@pytest.mark.parametrize("name", ["paragru", "paralstm", "indrnn"])
def test_specs_follow_their_papers(name, backend):
    torch.manual_seed(1)
    cell = rnnc.build(name, backend=backend, dtype=torch.float64, H=5, I=3)
    x = torch.randn(2, 33, 3, dtype=torch.float64)
    y, final = cell(x)
    want = _reference(name, dict(cell.named_parameters()), x, 5)
    assert torch.allclose(y, want, rtol=1e-10, atol=1e-12)
    assert torch.allclose(final["h"], want[:, -1], rtol=1e-10, atol=1e-12)


def test_a_dense_jacobian_too_large_is_refused_with_the_way_out(monkeypatch):
    import rnnc.runtime.newton as runtime

    monkeypatch.setattr(runtime, "_NEWTON_DENSE_MAX", 100)
    _, newton = _pair("gru")
    with pytest.raises(rnnc.InputError, match="backend='loop'"):
        newton(torch.randn(2, 7, 1, 2, dtype=torch.float64))
    _pair("paragru")[1](torch.randn(2, 7, 1, 2, dtype=torch.float64))  # diagonal: no such matrices
