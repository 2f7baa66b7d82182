"""Newton's linear step in Triton (rnnc/runtime/triton_newton.py: diagonal and 2x2-block Jacobians), in
Triton's CPU interpreter: the kernels against the PyTorch solves they replace and a plain sequential
reference (forward and reverse, float32 and float64, T = 1, 7, 65, one chunk of time and many, zero and
large negative factors), and paragru (diagonal) and paralstm (2x2 blocks) solving through them against
the loop, values and gradients. Small sizes: the interpreter is slow."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

import rnnc  # noqa: E402
from rnnc.errors import InputError  # noqa: E402
from rnnc.runtime import newton as newton_runtime  # noqa: E402
from rnnc.runtime.newton import _newton_solve, _newton_use_triton  # noqa: E402
from rnnc.runtime.triton_newton import _triton_newton_block2, _triton_newton_diagonal  # noqa: E402
from test_newton import _dims, _inputs_and_state, _pair, _run  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton needs a GPU or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SOLVERS = (_triton_newton_diagonal, _triton_newton_block2)


def _factors(T, shape, dtype, seed):
    """Random factors in (-1, 1), about a tenth of them 0 and a tenth -30 (a hard reset, a blow-up), and
    random right-hand sides."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(T, *shape, generator=g, dtype=torch.float64) * 2 - 1
    pick = torch.rand(T, *shape, generator=g, dtype=torch.float64)
    a = torch.where(pick < 0.1, 0.0, torch.where(pick > 0.9, -30.0, a))
    b = torch.randn(T, *shape, generator=g, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


def _sequential(a, b, reverse):
    """x_0 = b_0, x_t = a_t x_{t-1} + b_t (reverse: from the end, x_t = a_t x_{t+1} + b_t), step by step
    in float64."""
    a, b = a.double(), b.double()
    x = torch.empty_like(b)
    order = range(b.shape[0] - 1, -1, -1) if reverse else range(b.shape[0])
    prev = None
    for t in order:
        x[t] = b[t] if prev is None else a[t] * prev + b[t]
        prev = x[t]
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T", [1, 7, 65])
@pytest.mark.parametrize("reverse", [False, True])
def test_the_kernel_equals_the_pytorch_solve(T, dtype, reverse):
    shape = (2, 70)  # 140 channels: two programs, the second one masked
    a, b = _factors(T, shape, dtype, seed=T)
    if reverse:
        a = a[:T - 1]  # the backward holds J_1..J_{T-1}
    want = _newton_solve((a,), (b.clone(),), (("diagonal", (0,)),), reverse=reverse)[0]
    got = _newton_solve((a.to(DEV),), (b.clone().to(DEV),), (("diagonal", (0,)),), reverse=reverse, triton=SOLVERS)[0]
    ref = _sequential(torch.cat([a, a[:1]]) if reverse else a, b, reverse)
    scale = ref.abs().amax(0).clamp_min(1)  # a channel's -30 factors make its later values large
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert got.dtype == dtype and got.shape == b.shape
    assert ((got.cpu().double() - ref).abs() / scale).max() < tol
    assert ((want.double() - ref).abs() / scale).max() < tol


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("steps", [1, 3, 16])
def test_chunks_of_time_give_the_same_solution(reverse, steps):
    """Time cut into chunks (summaries, a scan over them, the chunks from their entering states) equals
    the sequential solve, for chunks of one step, ragged ones (65 = 21 x 3 + 2) and a few long ones."""
    T = 65
    a, b = _factors(T, (3, 5), torch.float64, seed=steps)
    if reverse:
        a = a[:T - 1]
    got = _triton_newton_diagonal(a.to(DEV), b.clone().to(DEV), reverse, steps=steps)
    ref = _sequential(torch.cat([a, a[:1]]) if reverse else a, b, reverse)
    scale = ref.abs().amax(0).clamp_min(1)
    assert ((got.cpu() - ref).abs() / scale).max() < 1e-12


def _blocks(T, shape, dtype, seed):
    """2x2 factors per channel from _factors' entries (zeros and -30 among them), the coupling (off the
    diagonal) a tenth as large, and every fourth channel's block scaled by 1/8 (some channels contract);
    two right-hand sides."""
    a, b = _factors(T, (*shape, 2, 2), dtype, seed)
    a = a * torch.tensor([[1.0, 0.1], [0.1, 1.0]], dtype=dtype)
    a[..., ::4, :, :] /= 8
    return a, b[..., 0, 0].contiguous(), b[..., 1, 1].contiguous()


def _sequential_blocks(J, b0, b1, reverse):
    """The 2x2-block recurrence step by step in float64 (reverse: with the transposed blocks)."""
    J = J.double().transpose(-1, -2) if reverse else J.double()
    b = torch.stack([b0, b1], -1).double()
    x = torch.empty_like(b)
    order = range(b.shape[0] - 1, -1, -1) if reverse else range(b.shape[0])
    prev = None
    for t in order:
        x[t] = b[t] if prev is None else (J[t] @ prev.unsqueeze(-1)).squeeze(-1) + b[t]
        prev = x[t]
    return x[..., 0], x[..., 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T", [1, 7, 65])
@pytest.mark.parametrize("reverse", [False, True])
def test_the_block_kernel_equals_the_pytorch_solve(T, dtype, reverse):
    J, b0, b1 = _blocks(T, (2, 70), dtype, seed=T)
    if reverse:
        J = J[:T - 1]
    groups = (("block", (0, 1)),)
    want = _newton_solve((J,), (b0.clone(), b1.clone()), groups, reverse=reverse)
    got = _newton_solve((J.to(DEV),), (b0.clone().to(DEV), b1.clone().to(DEV)), groups, reverse=reverse,
                        triton=SOLVERS)
    ref = _sequential_blocks(torch.cat([J, J[:1]]) if reverse else J, b0, b1, reverse)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for g, w, r in zip(got, want, ref):
        scale = r.abs().amax(0).clamp_min(1)
        assert g.dtype == dtype and g.shape == r.shape
        assert ((g.cpu().double() - r).abs() / scale).max() < tol
        assert ((w.double() - r).abs() / scale).max() < tol


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("steps", [1, 3, 16])
def test_chunks_of_time_give_the_same_block_solution(reverse, steps):
    T = 65
    J, b0, b1 = _blocks(T, (3, 5), torch.float64, seed=steps)
    if reverse:
        J = J[:T - 1]
    got = _triton_newton_block2(J.to(DEV), b0.clone().to(DEV), b1.clone().to(DEV), reverse, steps=steps)
    ref = _sequential_blocks(torch.cat([J, J[:1]]) if reverse else J, b0, b1, reverse)
    for g, r in zip(got, ref):
        assert ((g.cpu() - r).abs() / r.abs().amax(0).clamp_min(1)).max() < 1e-12


def test_a_strided_right_hand_side_is_solved_too():
    a, b = _factors(9, (4, 6), torch.float64, seed=1)
    got = _triton_newton_diagonal(a[:, :, :3].to(DEV), b.clone()[:, :, :3].to(DEV))
    assert torch.allclose(got.cpu(), _sequential(a[:, :, :3], b[:, :, :3], False), rtol=1e-12, atol=1e-12)


def test_the_pytorch_solve_stays_the_default_on_cpu():
    x = torch.zeros(3)
    assert not _newton_use_triton(None, x, SOLVERS)
    assert not _newton_use_triton(False, x, SOLVERS)
    assert _newton_use_triton(True, x, SOLVERS)  # TRITON_INTERPRET=1 here
    assert rnnc.build("paragru", backend="newton", **_dims("paragru")).NEWTON_TRITON is None


def test_asking_for_triton_without_it_says_how(monkeypatch):
    with pytest.raises(InputError, match="built where triton is installed"):
        _newton_use_triton(True, torch.zeros(3), None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(InputError, match="TRITON_INTERPRET=1"):
        _newton_use_triton(True, torch.zeros(3), SOLVERS)


@pytest.mark.parametrize("name", ["paragru", "paralstm"])
@pytest.mark.parametrize("dtype,T", [(torch.float64, 1), (torch.float64, 7), (torch.float32, 65)])
def test_newton_through_the_kernels_matches_the_loop(name, dtype, T, monkeypatch):
    """paragru (a diagonal Jacobian) and paralstm (2x2 blocks) with NEWTON_TRITON = True: values and
    gradients equal the loop's, and both the iterations' solves and the backward's reverse one were
    handed the Triton kernels."""
    calls = []
    solve = newton_runtime._newton_solve

    def recorded(J, rhs, groups, reverse=False, triton=None):
        calls.append((reverse, triton))
        return solve(J, rhs, groups, reverse, triton)

    monkeypatch.setattr(newton_runtime, "_newton_solve", recorded)
    loop, newton = _pair(name, dtype)
    newton.NEWTON_TRITON = True
    inputs, state = _inputs_and_state(name, 2, T, dtype)
    want, got = _run(loop, inputs, state), _run(newton, inputs, state)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for w, g in zip(want, got):
        assert torch.allclose(w, g, rtol=tol, atol=tol), (w - g).abs().max()
    assert newton.newton_info["converged"]
    iterations = newton.newton_info["iterations"]
    assert [r for r, _ in calls] == [False] * iterations + ([True] if T > 1 else [])
    assert all(s == SOLVERS for _, s in calls)
    assert iterations > 0 or T == 1
