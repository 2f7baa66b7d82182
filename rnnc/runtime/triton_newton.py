"""Newton's linear step for diagonal and 2x2-block Jacobians as Triton kernels (newton.py's _newton_solve).

Why: on a GPU, the PyTorch solves (the strided in-place tree scan, the matrix scan) launch a few small
kernels per round over O(log T) rounds, every iteration; a fused kernel reads J and the residuals once
and writes the update once, the state in registers.

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

`_triton_newton_block2(J, b0, b1, reverse)` does the same for a group of two states coupled per
channel (ParaLSTM-CIFG's (c, h)): x_t = J_t x_{t-1} + b_t with J_t a 2x2 matrix per channel ([T, ...,
2, 2], row: the output state), reverse x_t = J_{t+1}^T x_{t+1} + b_t; the two states' right-hand sides
are separate [T, ...] tensors, each overwritten with its part of the solution. Kernel
`_triton_newton_blk2` keeps the two entries in registers; its chunk summaries are 2x2 products, the
entering states a matrix scan over them (scan._matrix_scan).

Unmeasured: no GPU was available when this was written, so the kernels ran only in Triton's CPU
interpreter (tests/test_triton_newton.py checks them against the PyTorch solve and the loop); BLOCK and
the chunking follow triton_scan's untuned choices. Larger blocks and dense Jacobians still run the
PyTorch matrix scan.
"""
import torch
import triton
import triton.language as tl

from .scan import _linear_scan, _matrix_scan
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


@triton.jit
def _triton_newton_blk2(j_ptr, b0_ptr, b1_ptr, enter_ptr, A_ptr, E_ptr, T, M, L, BLOCK: tl.constexpr,
                        REVERSE: tl.constexpr, SUMMARY: tl.constexpr):
    """x_t = J_t x_(t-1) + b_t per channel, x a pair (x0, x1) and J_t 2x2 (j [T, M, 2, 2], row: output;
    REVERSE: x_t = J_(t+1)^T x_(t+1) + b_t, j [T-1, M, 2, 2]) over one chunk of steps from the state
    entering it (enter [P, M, 2]), written over b0 and b1. With SUMMARY: the chunk's matrix product
    (A [P, M, 2, 2]) and its state from zero (E [P, M, 2]) instead."""
    c = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    t0 = c * L
    n = tl.minimum(L, T - t0)
    if REVERSE:
        edge = T - 1
    else:
        edge = 0
    if SUMMARY:
        x0 = tl.zeros([BLOCK], dtype=b0_ptr.dtype.element_ty)
        x1 = x0
        a00 = x0 + 1.0
        a01 = x0
        a10 = x0
        a11 = x0 + 1.0
    else:
        x0 = tl.load(enter_ptr + (c * M + offs) * 2, mask=mask, other=0.0)
        x1 = tl.load(enter_ptr + (c * M + offs) * 2 + 1, mask=mask, other=0.0)
    for i in range(n):
        if REVERSE:
            t = t0 + n - 1 - i
        else:
            t = t0 + i
        keep = mask & ((offs * 0 + t) != edge)
        row = tl.cast(t, tl.int64) * M
        jp = j_ptr + (row + offs) * 4
        j00 = tl.load(jp, mask=keep, other=0.0)
        j11 = tl.load(jp + 3, mask=keep, other=0.0)
        if REVERSE:  # the transpose
            j01 = tl.load(jp + 2, mask=keep, other=0.0)
            j10 = tl.load(jp + 1, mask=keep, other=0.0)
        else:
            j01 = tl.load(jp + 1, mask=keep, other=0.0)
            j10 = tl.load(jp + 2, mask=keep, other=0.0)
        y0 = j00 * x0 + j01 * x1 + tl.load(b0_ptr + row + offs, mask=mask, other=0.0)
        x1 = j10 * x0 + j11 * x1 + tl.load(b1_ptr + row + offs, mask=mask, other=0.0)
        x0 = y0
        if SUMMARY:  # A <- J A
            n00 = j00 * a00 + j01 * a10
            n01 = j00 * a01 + j01 * a11
            a10 = j10 * a00 + j11 * a10
            a11 = j10 * a01 + j11 * a11
            a00 = n00
            a01 = n01
        else:
            tl.store(b0_ptr + row + offs, x0, mask=mask)
            tl.store(b1_ptr + row + offs, x1, mask=mask)
    if SUMMARY:
        ap = A_ptr + (c * M + offs) * 4
        tl.store(ap, a00, mask=mask)
        tl.store(ap + 1, a01, mask=mask)
        tl.store(ap + 2, a10, mask=mask)
        tl.store(ap + 3, a11, mask=mask)
        tl.store(E_ptr + (c * M + offs) * 2, x0, mask=mask)
        tl.store(E_ptr + (c * M + offs) * 2 + 1, x1, mask=mask)


def _triton_newton_block2(J, b0, b1, reverse=False, steps=None):
    """The 2x2-block solve above in Triton: J [T or T-1, ..., 2, 2], b0, b1 [T, ...]; the two parts of the
    solution, each written over its right-hand side when that is contiguous."""
    T = b0.shape[0]
    if T == 0 or b0.numel() == 0:
        return b0, b1
    out0 = b0 if b0.is_contiguous() else b0.contiguous()
    out1 = b1 if b1.is_contiguous() else b1.contiguous()
    J = J.contiguous()
    M = out0.numel() // T
    P, L = _scan_chunks(T, M, _NEWTON_TRITON_BLOCK, steps)
    grid = (triton.cdiv(M, _NEWTON_TRITON_BLOCK), P)
    zero = out0.new_zeros(1, M, 2)
    enter = zero
    if P > 1:
        A, E = out0.new_empty(P, M, 2, 2), out0.new_empty(P, M, 2)
        _triton_newton_blk2[grid](J, out0, out1, zero, A, E, T, M, L, BLOCK=_NEWTON_TRITON_BLOCK, REVERSE=reverse,
                                  SUMMARY=True)
        if reverse:
            enter = torch.cat([_matrix_scan(A[1:].flip(0), E[1:].flip(0), zero[0]).flip(0), zero])
        else:
            enter = torch.cat([zero, _matrix_scan(A[:-1], E[:-1], zero[0])])
    _triton_newton_blk2[grid](J, out0, out1, enter.contiguous(), zero, zero, T, M, L, BLOCK=_NEWTON_TRITON_BLOCK,
                              REVERSE=reverse, SUMMARY=False)
    return out0, out1
