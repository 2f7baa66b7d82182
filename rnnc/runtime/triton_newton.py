"""Newton's linear step for a diagonal Jacobian as Triton kernels (rnnc/runtime/newton.py, _newton_solve).

Each Newton iteration solves δ_t = J_t δ_{t-1} + r_t over the whole remaining sequence, and the backward
solves the adjoint λ_t = J_{t+1} λ_{t+1} + g_t once; for a diagonal J both are an elementwise linear
recurrence per channel (channel: one state entry of one batch row). `_triton_newton_diagonal(a, b,
reverse)` solves it as the generated fused scans do (backends/triton_scan.py), but over tensors that
already hold the factors, so one fixed kernel serves every cell:
  forward   x_0 = b_0, x_t = a_t x_{t-1} + b_t            (a_0 is not read)
  reverse   x_{T-1} = b_{T-1}, x_t = a_t x_{t+1} + b_t    (a holds T-1 factors: a_{T-1} is not read)
a, b: [T, ...] alike but for a's length (T or T-1 steps); the result is written over b when b is
contiguous (as the PyTorch path writes over it) and returned.

Kernel `_triton_newton_diag`: one program per (block of BLOCK channels, chunk of L steps), the state in
registers, sequential over the chunk in the inputs' dtype (float32, or float64 when the module computes
in float64), loads masked (the last block's channels past M, the missing factor at the sequence's
start). When time is cut into P > 1 chunks (few channels, long T: triton_launch._scan_chunks), a first
launch with SUMMARY summarises each chunk as one step from zero (A = the product of its factors, E =
the state it reaches); the states entering the chunks follow by a scan over the P summaries in PyTorch
(scan._linear_scan), and a second launch runs every chunk from its entering state.

Unmeasured: no GPU was available when this was written, so the kernel ran only in Triton's CPU
interpreter (tests/test_triton_newton.py checks it against the PyTorch solve and the loop); BLOCK and
the chunking follow triton_scan's untuned choices. Block (2x2 and larger) and dense Jacobians still run
the PyTorch matrix scan.
"""
import torch
import triton
import triton.language as tl

from .scan import _linear_scan
from .triton_launch import _scan_chunks

#: Channels per program (as the generated fused scans' BLOCK).
_NEWTON_TRITON_BLOCK = 128


@triton.jit
def _triton_newton_diag(a_ptr, b_ptr, enter_ptr, A_ptr, E_ptr, T, M, L, BLOCK: tl.constexpr,
                        REVERSE: tl.constexpr, SUMMARY: tl.constexpr):
    """x_t = a_t x_(t-1) + b_t (REVERSE: x_t = a_t x_(t+1) + b_t) for one block of channels over one chunk
    of steps, from the state entering the chunk (enter [P, M]), written over b. With SUMMARY, nothing is
    written over b: the chunk's factor product (A [P, M]) and its state from zero (E [P, M]) instead."""
    c = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    t0 = c * L
    n = tl.minimum(L, T - t0)
    if REVERSE:  # the step with no factor: the recurrence starts there
        edge = T - 1
    else:
        edge = 0
    if SUMMARY:
        x = tl.zeros([BLOCK], dtype=b_ptr.dtype.element_ty)
        A = x + 1.0
    else:
        x = tl.load(enter_ptr + c * M + offs, mask=mask, other=0.0)
    for i in range(n):
        if REVERSE:
            t = t0 + n - 1 - i
        else:
            t = t0 + i
        keep = (offs * 0 + t) != edge
        row = tl.cast(t, tl.int64) * M  # (int64: T * M may pass 2^31)
        a = tl.load(a_ptr + row + offs, mask=mask & keep, other=0.0)
        x = a * x + tl.load(b_ptr + row + offs, mask=mask, other=0.0)
        if SUMMARY:
            A = A * a
        else:
            tl.store(b_ptr + row + offs, x, mask=mask)
    if SUMMARY:
        tl.store(A_ptr + c * M + offs, A, mask=mask)
        tl.store(E_ptr + c * M + offs, x, mask=mask)


def _triton_newton_diagonal(a, b, reverse=False, steps=None):
    """The diagonal solve above in Triton: a [T or T-1, ...], b [T, ...] (CUDA tensors, or CPU ones under
    TRITON_INTERPRET=1); the solution, written over b when b is contiguous. `steps` forces the chunk
    length (tests; None: _scan_chunks decides)."""
    T = b.shape[0]
    if T == 0 or b.numel() == 0:
        return b
    out = b if b.is_contiguous() else b.contiguous()
    a = a.contiguous()
    M = out.numel() // T
    P, L = _scan_chunks(T, M, _NEWTON_TRITON_BLOCK, steps)
    grid = (triton.cdiv(M, _NEWTON_TRITON_BLOCK), P)
    zero = out.new_zeros(1, M)
    enter = zero
    if P > 1:
        A, E = (out.new_empty(P, M) for _ in range(2))
        _triton_newton_diag[grid](a, out, zero, A, E, T, M, L, BLOCK=_NEWTON_TRITON_BLOCK, REVERSE=reverse,
                                  SUMMARY=True)
        if reverse:  # chunk c is entered from chunk c+1: the summaries scanned from the last chunk back
            enter = torch.cat([_linear_scan(A[1:].flip(0), E[1:].flip(0), zero[0]).flip(0), zero])
        else:
            enter = torch.cat([zero, _linear_scan(A[:-1], E[:-1], zero[0])])
    _triton_newton_diag[grid](a, out, enter.contiguous(), zero, zero, T, M, L, BLOCK=_NEWTON_TRITON_BLOCK,
                              REVERSE=reverse, SUMMARY=False)
    return out
