"""Dense and block transitions as a matrix-valued parallel scan (rnnc/matrix_scan.py, runtime
_matrix_scan): the runtime against a loop, the library cells (lru, s4d, lsrl_modcounter) on the scan
against the loop and against their papers' equations in plain PyTorch (complex128), equivalent
writings, varlen, and the size limits."""
from __future__ import annotations

import pytest
import torch

import rnnc
from rnnc import plans, schedule
from rnnc.analysis import analyze_cell
from rnnc.optimize import optimize
from rnnc.runtime.scan import _block_scan, _matrix_scan

LENGTHS = (1, 7, 64, 65, 300)
CELLS = {"lru": dict(H=3, N=5), "s4d": dict(H=3, N=4), "lsrl_modcounter": {}}


def _loop_reference(A, b, h0):
    h, out = h0, []
    for t in range(b.shape[0]):
        h = (A[t if A.shape[0] > 1 else 0] @ h.unsqueeze(-1)).squeeze(-1) + b[t]
        out.append(h)
    return torch.stack(out)


@pytest.mark.parametrize("m", [2, 8])
@pytest.mark.parametrize("const", [True, False], ids=["time_invariant", "per_step"])
@pytest.mark.parametrize("T", LENGTHS)
def test_runtime_matrix_scan_equals_the_loop(m, const, T):
    """Values and gradients (A, b, h0) of _matrix_scan equal a step-by-step loop, float64 (a
    time-invariant A takes the one-GEMM product)."""
    g = torch.Generator().manual_seed(T * 10 + m)
    A = (torch.randn(1 if const else T, 3, 2, m, m, generator=g, dtype=torch.float64) / m ** 0.5).requires_grad_()
    b = torch.randn(T, 3, 2, m, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 2, m, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(T, 3, 2, m, generator=g, dtype=torch.float64)
    got, want = _matrix_scan(A, b, h0), _loop_reference(A, b, h0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    g1 = torch.autograd.grad((got * w).sum(), (A, b, h0))
    g2 = torch.autograd.grad((want * w).sum(), (A, b, h0))
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("const", [True, False], ids=["time_invariant", "per_step"])
@pytest.mark.parametrize("T", LENGTHS)
def test_runtime_block_scan_equals_the_loop(const, T):
    """_block_scan (a 3×3 matrix per element as nested lists, one entry zero: None) equals the
    dense loop on the same per-element matrices, values and gradients, float64."""
    g = torch.Generator().manual_seed(T)
    A = [[None if (i, j) == (0, 2) else
          (torch.randn(1 if const else T, 2, 4, generator=g, dtype=torch.float64) / 2).requires_grad_()
          for j in range(3)] for i in range(3)]
    b = [torch.randn(T, 2, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    h0 = [torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    zero = torch.zeros(1 if const else T, 2, 4, dtype=torch.float64)
    dense = torch.stack([torch.stack([zero if x is None else x for x in row], -1)
                         for row in A], -2)
    got = torch.stack(_block_scan(A, b, h0), -1)
    want = _loop_reference(dense, torch.stack(b, -1), torch.stack(h0, -1))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    w = torch.randn(got.shape, generator=g, dtype=torch.float64)
    leaves = [x for row in A for x in row if x is not None] + b + h0
    for x, y in zip(torch.autograd.grad((got * w).sum(), leaves), torch.autograd.grad((want * w).sum(), leaves)):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)


def _pair(name: str, T: int, dtype=torch.float64, seed: int = 0):
    """The cell built on the loop and on the scan with the same parameters, and inputs for T steps."""
    dims = CELLS[name]
    torch.manual_seed(seed)
    loop = rnnc.build(name, backend="loop", dtype=dtype, **dims)
    scan = rnnc.build(name, backend="scan", dtype=dtype, **dims)
    scan.load_state_dict(loop.state_dict())
    width = dims.get("H", 1)
    g = torch.Generator().manual_seed(seed + T)
    u = torch.randn(2, T, width, generator=g, dtype=dtype)
    return loop, scan, u


def _run(cell, u, state):
    u = u.detach().requires_grad_()
    state = {k: v.detach().requires_grad_() for k, v in state.items()}
    y, final = cell(u, state=state)
    w = torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y)
    loss = (y * w).sum() + sum((f * 0.3).sum() for f in final.values())
    params = [p for _, p in sorted(cell.named_parameters())]
    grads = torch.autograd.grad(loss, [u, *state.values(), *params])
    return y, final, grads


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("name", sorted(CELLS))
def test_library_cell_scan_equals_loop(name, T):
    """Outputs, final states and gradients of the inputs, the initial states and every param: the
    matrix scan equals the loop (float64)."""
    loop, scan, u = _pair(name, T)
    g = torch.Generator().manual_seed(T)
    state = {s: torch.randn(2, *shape, generator=g, dtype=torch.float64) * 0.5
             for s, shape in _state_shapes(name).items()}
    y1, f1, g1 = _run(loop, u, state)
    y2, f2, g2 = _run(scan, u, state)
    torch.testing.assert_close(y2, y1, rtol=1e-9, atol=1e-9)
    for k in f1:
        torch.testing.assert_close(f2[k], f1[k], rtol=1e-9, atol=1e-9)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def _state_shapes(name: str) -> dict[str, tuple[int, ...]]:
    if name == "lsrl_modcounter":
        return {"s": (8,)}
    d = CELLS[name]
    shape = (d["N"],) if name == "lru" else (d["H"], d["N"])
    return {"re": shape, "im": shape}


@pytest.mark.parametrize("backend", ["loop", "scan"])
def test_lru_against_the_papers_equations(backend):
    """LRU (Orvieto et al. 2023, eq. 6-8) in complex128: λ = exp(-exp(ν) + i exp(θ)),
    x_t = λ x_{t-1} + γ (B u_t), y_t = Re(C x_t) + D u_t, γ = sqrt(1 - |λ|²)."""
    torch.manual_seed(1)
    cell = rnnc.build("lru", backend=backend, dtype=torch.float64, H=3, N=6)
    u = torch.randn(2, 130, 3, dtype=torch.float64)
    y, final = cell(u)
    p = dict(cell.named_parameters())
    lam = torch.exp(-torch.exp(p["nu_log"]) + 1j * torch.exp(p["theta_log"]))
    gamma = torch.sqrt(1 - lam.abs() ** 2)
    Bc = p["B_re"] + 1j * p["B_im"]
    Cc = p["C_re"] + 1j * p["C_im"]
    x = torch.zeros(2, 6, dtype=torch.complex128)
    ys = []
    for t in range(u.shape[1]):
        x = lam * x + gamma * (u[:, t].to(torch.complex128) @ Bc.T)
        ys.append((x @ Cc.T).real + p["D"] * u[:, t])
    torch.testing.assert_close(y, torch.stack(ys, 1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final["re"] + 1j * final["im"], x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["loop", "scan"])
def test_s4d_against_its_convolution_kernel(backend):
    """S4D (Gu et al. 2022) as s4d.py computes it: the kernel K_l = 2 Re(Σ_n C_n (exp(dt A)-1)/A
    exp(dt A)^l) in complex128, y = causal_conv(u, K) + D u, against the recurrence's outputs."""
    torch.manual_seed(2)
    cell = rnnc.build("s4d", backend=backend, dtype=torch.float64, H=3, N=4)
    L = 90
    u = torch.randn(2, L, 3, dtype=torch.float64)
    y, _ = cell(u)
    p = dict(cell.named_parameters())
    A = -torch.exp(p["A_log_re"]) + 1j * p["A_im"]  # [H, N]
    dtA = torch.exp(p["log_dt"])[:, None] * A
    C = (p["C_re"] + 1j * p["C_im"]) * (torch.exp(dtA) - 1) / A
    K = 2 * torch.einsum("hn,hnl->hl", C, torch.exp(dtA[..., None] * torch.arange(L))).real  # [H, L]
    want = torch.stack([sum(K[:, l] * u[:, t - l] for l in range(t + 1)) for t in range(L)], 1) + p["D"] * u
    torch.testing.assert_close(y, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["loop", "scan"])
def test_lsrl_modcounter_counts(backend, dtype):
    """LSRL's modulo counters (f_modulo_counter, merged into one width-8 LinState) output
    t mod 2, 3, 4, 6 for 0-based t, exactly, over 300 steps in float32 as in float64."""
    cell = rnnc.build("lsrl_modcounter", backend=backend, dtype=dtype)
    y, _ = cell(torch.randn(3, 300, 1, dtype=dtype))
    t = torch.arange(300)
    want = torch.stack([t % d for d in (2, 3, 4, 6)], -1).to(dtype).expand(3, 300, 4)
    assert torch.equal(y, want)


def test_analysis_and_plan():
    """analyze reports a block 2×2 group for a real/imaginary pair and a dense 8×8 transition for
    the LinState; the scan plan holds one MatrixScan per group with its coefficients."""
    lru = rnnc.analyze("lru").to_dict()["states"]
    assert lru["re"]["matrix"] == lru["im"]["matrix"] == {"kind": "block", "size": "2", "states": ["re", "im"],
                                                       "per_step": False}
    assert lru["re"]["transition"] == "block" and "block-diagonal 2×2" in lru["re"]["why"]
    lsrl = rnnc.analyze("lsrl_modcounter").to_dict()["states"]["s"]
    assert lsrl["matrix"] == {"kind": "dense", "size": "8", "states": ["s"], "per_step": False}
    for name, kind, m in (("lru", "block", 2), ("s4d", "block", 2), ("lsrl_modcounter", "dense", 1)):
        assert rnnc.analyze(name).backend == "scan"
        cell = optimize(rnnc.load(name).cell())
        plan = plans.scan_plan(cell, analyze_cell(cell))
        (group,) = plan.matrix.values()
        assert group.kind == kind and len(group.a) == m and all(len(row) == m for row in group.a)
        assert all(x is not None for row in group.a for x in row) and not plan.linear


WRITINGS = {
    "as_the_spec": """
        let re0 = re
        re = lr * re - li * im + bu
        im = li * re0 + lr * im + bv""",
    "imaginary_first": """
        let im0 = im
        im = im * lr + re * li + bv
        re = bu - im0 * li + re * lr""",
    "factored_decay": """
        let re0 = re
        re = mag * (c * re - s * im) + bu
        im = mag * (s * re0 + c * im) + bv""",
}


def _writing(body: str) -> str:
    return f"""cell pair(u: [H], th: [N]) -> (y: [N]) {{
        param nu: [N] = 0.1
        param B_re: [N, H] ~ normal(0, 1)
        param B_im: [N, H] ~ normal(0, 1)
        state re: [N] = 0
        state im: [N] = 0
        let mag = exp(-exp(nu))
        let c = cos(th)
        let s = sin(th)
        let lr = mag * c
        let li = mag * s
        let bu = B_re @ u
        let bv = B_im @ u
        {body}
        y = re - 2 * im
    }}"""


def test_equivalent_writings_get_the_same_lowering():
    """The complex pair written three ways (updates reordered, terms reordered, the decay factored
    out): the same verdict, plan and backend, and the same numbers (per-step phases: A_t per step)."""
    verdicts, outs = set(), []
    g = torch.Generator().manual_seed(0)
    u, th = torch.randn(2, 70, 3, generator=g, dtype=torch.float64), torch.randn(2, 70, 4, generator=g, dtype=torch.float64)
    for body in WRITINGS.values():
        text = _writing(body)
        info = rnnc.analyze(text).to_dict()["states"]
        verdicts.add(tuple((s, info[s]["class"], info[s]["transition"], str(info[s]["matrix"])) for s in ("re", "im")))
        assert rnnc.analyze(text).backend == "scan"
        torch.manual_seed(3)
        cell = rnnc.build(text, backend="scan", dtype=torch.float64, H=3, N=4)
        outs.append(cell(u, th)[0])
    assert len(verdicts) == 1
    for y in outs[1:]:
        torch.testing.assert_close(y, outs[0], rtol=1e-12, atol=1e-12)


def test_dense_linstate_writings():
    """A LinState written A @ s or s @ transpose(A) (a per-step A here) is the same dense
    transition; both scan and equal the loop."""
    outs = []
    g = torch.Generator().manual_seed(4)
    x, A = torch.randn(2, 40, 5, generator=g, dtype=torch.float64), torch.randn(2, 40, 5, 5, generator=g, dtype=torch.float64) / 3
    for update in ("A @ s + x", "s @ transpose(A) + x", "x + 0.5 * (A @ s) + 0.5 * (A @ s)"):
        text = f"cell c(x: [K], A: [K, K]) -> (y: [K]) {{\n state s: [K] = 1\n s = {update}\n y = s }}"
        assert rnnc.analyze(text).to_dict()["states"]["s"]["matrix"] == {"kind": "dense", "size": "K", "states": ["s"],
                                                                         "per_step": True}
        for backend in ("loop", "scan"):
            outs.append(rnnc.build(text, backend=backend, dtype=torch.float64)(x, A)[0])
    for y in outs[1:]:
        torch.testing.assert_close(y, outs[0], rtol=1e-10, atol=1e-10)


def test_varlen_packed_equals_separate():
    """cu_seqlens on the matrix scan: each packed sequence as if run alone (on the loop)."""
    loop, scan, _ = _pair("lru", 1)
    u = torch.randn(1, 75, 3, dtype=torch.float64)
    cu = torch.tensor([0, 7, 72, 75])
    y, final = scan(u, cu_seqlens=cu)
    for i in range(3):
        lo, hi = int(cu[i]), int(cu[i + 1])
        y1, f1 = loop(u[:, lo:hi])
        torch.testing.assert_close(y[:, lo:hi], y1, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(final["re"][i], f1["re"][0], rtol=1e-10, atol=1e-10)


def test_dense_size_limits():
    """Above MATRIX_SCAN_MAX the scan backend refuses a dense state with the reason. auto scans a
    constant dense transition up to MATRIX_AUTO_CONSTANT and a per-step one up to
    MATRIX_AUTO_PER_STEP, and neither when its size is a symbolic dim."""
    def per_step(n):
        return f"cell c(x: [{n}], A: [{n}, {n}]) -> (y: [{n}]) {{\n state s: [{n}] = 0\n s = A @ s + x\n y = s }}"

    def constant(n):
        return (f"cell c(x: [{n}]) -> (y: [{n}]) {{\n param A: [{n}, {n}] = 0.5\n state s: [{n}] = 0\n"
                f" s = A @ s + x\n y = s }}")
    big = schedule.MATRIX_SCAN_MAX + 1
    for text in (per_step(big), constant(big)):
        with pytest.raises(rnnc.BuildError, match=f"{big}×{big}.*limit"):
            rnnc.build(text, backend="scan")
        assert rnnc.analyze(text).backend == "loop"
    for make, limit, per in ((per_step, schedule.MATRIX_AUTO_PER_STEP, True),
                             (constant, schedule.MATRIX_AUTO_CONSTANT, False)):
        assert rnnc.analyze(make(limit)).to_dict()["states"]["s"]["matrix"]["per_step"] is per
        assert rnnc.analyze(make(limit)).backend == "scan"
        assert rnnc.analyze(make(limit + 1)).backend == "loop"
        assert "scan" in rnnc.backends_for(make(limit + 1))
        assert rnnc.analyze(make("K")).backend == "loop"


def test_layered_block_group():
    """A block group in a stage after an elementwise state (its diagonal reads sigmoid(n)), and a
    state after the group (gated by re): analyzed in order, scanned, values and gradients equal
    the loop."""
    text = """cell c(x: [H]) -> (y: [H]) {
        state n: [H] = 0
        state re: [H] = 0
        state im: [H] = 0
        state z: [H] = 0
        n = 0.9 * n + x
        let g = sigmoid(n)
        let re0 = re
        re = g * re - 0.5 * im + x
        im = 0.5 * re0 + g * im
        z = exp(-abs(re)) * z + im
        y = z + re
    }"""
    info = rnnc.analyze(text).to_dict()["states"]
    assert info["re"]["matrix"]["kind"] == "block" and info["re"]["after"] == ["n"]
    assert info["z"]["class"] == "elementwise_affine" and info["z"]["after"] == ["im", "n", "re"]
    assert rnnc.analyze(text).backend == "scan"
    torch.manual_seed(0)
    loop = rnnc.build(text, backend="loop", dtype=torch.float64, H=3)
    scan = rnnc.build(text, backend="scan", dtype=torch.float64, H=3)
    x = torch.randn(2, 67, 3, dtype=torch.float64)
    state = {s: torch.randn(2, 3, dtype=torch.float64) for s in ("n", "re", "im", "z")}
    y1, f1, g1 = _run(loop, x, state)
    y2, f2, g2 = _run(scan, x, state)
    torch.testing.assert_close(y2, y1, rtol=1e-10, atol=1e-10)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
