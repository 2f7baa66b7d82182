"""Newton's diagonal linear step in Triton (rnnc/runtime/triton_newton.py), in Triton's CPU interpreter:
the kernel against the PyTorch solve it replaces and a plain sequential reference (forward and reverse,
float32 and float64, one chunk and many, zero and large negative factors), and a newton cell solving
through it against the loop, values and gradients. Small sizes: the interpreter is slow."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from rnnc.errors import InputError  # noqa: E402
from rnnc.runtime.newton import _newton_solve, _newton_use_triton  # noqa: E402
from rnnc.runtime.triton_newton import _triton_newton_diagonal  # noqa: E402
from test_newton import _inputs_and_state, _pair, _run  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton needs a GPU or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


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
    got = _newton_solve((a.to(DEV),), (b.clone().to(DEV),), (("diagonal", (0,)),), reverse=reverse, triton=True)[0]
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


def test_a_strided_right_hand_side_is_solved_too():
    a, b = _factors(9, (4, 6), torch.float64, seed=1)
    got = _triton_newton_diagonal(a[:, :, :3].to(DEV), b.clone()[:, :, :3].to(DEV))
    assert torch.allclose(got.cpu(), _sequential(a[:, :, :3], b[:, :, :3], False), rtol=1e-12, atol=1e-12)


def test_the_pytorch_solve_stays_the_default_on_cpu():
    x = torch.zeros(3)
    assert not _newton_use_triton(None, x)
    assert not _newton_use_triton(False, x)
    assert _newton_use_triton(True, x)  # TRITON_INTERPRET=1 here


def test_asking_for_triton_on_cpu_without_the_interpreter_says_how(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(InputError, match="TRITON_INTERPRET=1"):
        _newton_use_triton(True, torch.zeros(3))


@pytest.mark.parametrize("dtype,T", [(torch.float64, 1), (torch.float64, 7), (torch.float32, 65)])
def test_newton_through_the_kernel_matches_the_loop(dtype, T, monkeypatch):
    """paragru (a diagonal Jacobian) with NEWTON_TRITON = True: values and gradients equal the loop's, and
    both the iterations' solves and the backward's reverse one went through the kernel."""
    from rnnc.runtime import triton_newton

    calls = []
    kernel = triton_newton._triton_newton_diagonal

    def counted(a, b, reverse=False, steps=None):
        calls.append(reverse)
        return kernel(a, b, reverse, steps)

    monkeypatch.setattr(triton_newton, "_triton_newton_diagonal", counted)
    loop, newton = _pair("paragru", dtype)
    newton.NEWTON_TRITON = True
    inputs, state = _inputs_and_state("paragru", 2, T, dtype)
    want, got = _run(loop, inputs, state), _run(newton, inputs, state)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for w, g in zip(want, got):
        assert torch.allclose(w, g, rtol=tol, atol=tol), (w - g).abs().max()
    assert newton.newton_info["converged"]
    iterations = newton.newton_info["iterations"]
    assert calls.count(False) == iterations and calls.count(True) == (1 if T > 1 else 0)
    assert iterations > 0 or T == 1
