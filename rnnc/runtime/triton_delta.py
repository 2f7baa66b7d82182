"""Chunkwise (gated) delta rule in Triton: rnnc/runtime/chunk.py's _chunk_delta as kernels, forward and backward.

`_triton_delta_chunk(q, k, v, beta, g, h0, chunk, before=False)` has the arguments, semantics and
return value of `_chunk_delta` (read its docstring):
S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, o_t = S_t^T q_t (before=True: S_{t-1}^T q_t),
time-major q, k: [T, N, K], v: [T, N, V], beta: [T, N], g: [T, N] (scalar log-decay) or None, h0:
[N, K, V] or None; returns (o [T, N, V], S_T [N, K, V]).

Backward: the forward saves the state entering each chunk; `_triton_delta_bwd_dh` carries the state's
adjoint back over the chunks (per V block, like the forward); `_triton_delta_bwd` then differentiates
every chunk in parallel (one program per chunk and row, all of K and V), recomputing Ti, W and the
pseudo-values D from the saved state, and runs the forward's chain in reverse (its docstring).

Kernel `_triton_delta_fwd`: one program per (block of BV value columns, batch row n) loops over the
chunks, carrying the state S [K, BV] in registers in float32 (all of K in one program). Per chunk (rows
i, j; G_i = sum_{s <= i} g_s inside the chunk; Gam_ij = exp(sum_{j < s <= i} g_s) for j <= i, else 0):
  A   = strict_tril(diag(b) K K^T * Gam)
  Ti  = (I + A)^{-1}, unit lower-triangular, by forward substitution row by row (as fla's solve_tril):
        Ti_i = e_i - sum_{j < i} A_ij Ti_j, an explicit loop over the chunk's valid rows
  W   = Ti diag(b e^G) K,  U = Ti diag(b) V          (the WY factors; U only for this V block)
  D   = U - W S                                      (pseudo-values, with the entering state S)
  O   = (Q e^G) S + (tril(Q K^T) * Gam) D
  S  <- e^{G_last} S + (K e^{G_last - G})^T D
Numerics follow chunk.py: every exponent is <= 0 and a direct sum of gates (a cumsum inside the
chunk, masked sums for sum_{j < s <= i} and sum_{s > j}), never a difference of two cumulative sums;
the pair exponents are masked to -inf above the diagonal before exp; gates are clamped at -1e4 on load
(exp is exactly 0 in float32 there either way), so -inf gates (hard resets) give no NaN. Masked/padded
rows (the ragged tail, and rows of a power-of-two block beyond the chunk length) load zeros (zero k, v,
beta and log-decay): their rows of A, W, U and D are zero and the state is unchanged. Every load is
upcast to float32 before any arithmetic (the CPU interpreter's bf16 rule), tl.dot runs with
input_precision="ieee", outputs are cast to the input dtype. Blocks: BK = next_pow2(max(K, 16)) (all of
K), BV = next_pow2(max(V, 16)) up to 64 (grid over V blocks; each program rebuilds Ti and W), BT =
next_pow2(max(C, 16)); any T, K, V, C work (masks). The substitution is C sequential row steps per
chunk, so long chunks cost O(C) serial steps (fla does the same per 16-row block, then merges blocks).
Without a GPU set TRITON_INTERPRET=1 (CPU tensors then run in Triton's interpreter).

Not done in Triton: float64 inputs fall back to the PyTorch `_chunk_delta`, as does T == 0.
float16/bfloat16 inputs run the kernels (upcast on load), gradients in float32 cast back to the input
dtypes. The shared chunk factors (`_triton_delta_factors`) and loads (`_triton_delta_load`) are
@triton.jit helpers the three kernels call.
"""
import torch
import triton
import triton.language as tl

from .chunk import _chunk_delta, _chunk_empty_or_before
from .triton_chunk import _triton_chunk_block, _triton_chunk_blocks, _triton_chunk_forward_fake, _triton_chunk_steps
from .triton_launch import _kernel_op


@triton.jit
def _triton_delta_factors(q, k, b, g, nd, rt, HAS_G: tl.constexpr):
    """One chunk's factors from its q, k [BT, BK], b [BT] and log-decays g [BT] (a dummy without HAS_G):
    (Ti, Gam, eG, eL, KK, QK) with KK = diag(b) K K^T, QK = Q K^T, Gam_ij = e^{sum_{j < s <= i} g_s} (0 above
    the diagonal), eG = e^G, eL = e^{G_last - G}, and Ti = (I + strict_tril(KK * Gam))^{-1} by forward
    substitution over the chunk's nd valid rows: Ti_i = e_i - sum_{j < i} A_ij Ti_j."""
    tri = rt[:, None] >= rt[None, :]
    strict = rt[:, None] > rt[None, :]
    KK = tl.dot(k * b[:, None], tl.trans(k), input_precision="ieee")                 # b_i k_i . k_j
    QK = tl.dot(q, tl.trans(k), input_precision="ieee")
    if HAS_G:
        eG = tl.exp(tl.cumsum(g, 0))                                                   # e^{sum_{s <= i}}
        eL = tl.exp(tl.sum(tl.where(rt[None, :] > rt[:, None], g[None, :], 0.0), 1))  # e^{sum_{s > j}}
        # X_ij = sum_{j < s <= i} g_s: a masked cumsum down the rows, -inf above the diagonal
        X = tl.cumsum(tl.where(strict, g[:, None], 0.0), 0)
        Gam = tl.exp(tl.where(tri, X, float("-inf")))
    else:
        eG = tl.where(rt >= 0, 1.0, 0.0)                                                # ones
        eL = eG
        Gam = tl.where(tri, 1.0, 0.0)
    Ti = _triton_unit_tril_inverse(tl.where(strict, KK * Gam, 0.0), rt, nd)
    return Ti, Gam, eG, eL, KK, QK


@triton.jit
def _triton_unit_tril_inverse(A, rt, nd):
    """(I + A)^{-1} for a strictly lower-triangular A [BT, BT] whose rows past nd are zero, by forward
    substitution row by row (as fla's solve_tril): Ti_i = e_i - sum_{j < i} A_ij Ti_j."""
    Ti = tl.where(rt[:, None] == rt[None, :], 1.0, 0.0)
    for i in range(1, nd):
        sel = rt[:, None] == i
        a = tl.sum(tl.where(sel, A, 0.0), 0)                                           # A_i. (zero for j >= i)
        ti = tl.where(rt == i, 1.0, 0.0) - tl.sum(a[:, None] * Ti, 0)
        Ti = tl.where(sel, ti[None, :], Ti)
    return Ti


@triton.jit
def _triton_delta_load(q_ptr, k_ptr, v_ptr, b_ptr, g_ptr, row, m, ck, mk, cv, mv, K, V, HAS_G: tl.constexpr):
    """One chunk's rows (zeros where masked), upcast to float32; gates clamped at -1e4 (b is the dummy g)."""
    mqk = m[:, None] & mk[None, :]
    q = tl.load(q_ptr + row[:, None] * K + ck[None, :], mask=mqk, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + row[:, None] * K + ck[None, :], mask=mqk, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + row[:, None] * V + cv[None, :], mask=m[:, None] & mv[None, :], other=0.0).to(tl.float32)
    b = tl.load(b_ptr + row, mask=m, other=0.0).to(tl.float32)
    if HAS_G:
        g = tl.maximum(tl.load(g_ptr + row, mask=m, other=0.0).to(tl.float32), -1e4)
    else:
        g = b
    return q, k, v, b, g


@triton.jit
def _triton_delta_fwd(q_ptr, k_ptr, v_ptr, b_ptr, g_ptr, h0_ptr, o_ptr, s_ptr, h_ptr, T, N, K, V, C,
                      HAS_G: tl.constexpr, HAS_H0: tl.constexpr, SAVE_H: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Gated (HAS_G: scalar log-decay g [T, N]) or plain delta rule; one program per (V block, row n).
    With SAVE_H, the state entering each chunk goes to h [nt, N, K, V] (for the backward)."""
    i_n = tl.program_id(1)
    ck, cv, mk, mv, s_off, s_msk, S = _triton_chunk_block(h0_ptr, i_n, tl.program_id(0), K, V, HAS_H0, BK, BV)
    rt = tl.arange(0, BT)
    nt = tl.cdiv(T, C)
    for ic in range(nt):
        if SAVE_H:
            tl.store(h_ptr + tl.cast(ic * N, tl.int64) * K * V + s_off, S, mask=s_msk)
        t, m, row = _triton_chunk_steps(ic, rt, C, T, N, i_n)
        q, k, v, b, g = _triton_delta_load(q_ptr, k_ptr, v_ptr, b_ptr, g_ptr, row, m, ck, mk, cv, mv, K, V, HAS_G)
        Ti, Gam, eG, eL, KK, QK = _triton_delta_factors(q, k, b, g, tl.minimum(C, T - ic * C), rt, HAS_G)
        W = tl.dot(Ti, k * (b * eG)[:, None], input_precision="ieee")                 # [BT, BK]
        U = tl.dot(Ti, v * b[:, None], input_precision="ieee")                         # [BT, BV]
        D = U - tl.dot(W, S, input_precision="ieee")
        o = tl.dot(q * eG[:, None], S, input_precision="ieee") + tl.dot(QK * Gam, D, input_precision="ieee")
        if HAS_G:
            S = S * tl.exp(tl.sum(g, 0))
        S += tl.dot(tl.trans(k * eL[:, None]), D, input_precision="ieee")
        tl.store(o_ptr + row[:, None] * V + cv[None, :], o.to(o_ptr.dtype.element_ty), mask=m[:, None] & mv[None, :])
    tl.store(s_ptr + s_off, S.to(s_ptr.dtype.element_ty), mask=s_msk)


@triton.jit
def _triton_delta_bwd_dh(q_ptr, k_ptr, v_ptr, b_ptr, g_ptr, do_ptr, ds_ptr, dh_ptr, dh0_ptr, T, N, K, V, C,
                         HAS_G: tl.constexpr, HAS_DS: tl.constexpr,
                         BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The state's adjoint, chunk by chunk in reverse: dh[ic] is the gradient of the state leaving chunk
    ic; with dD = (tril(Q K^T) * Gam)^T do + (K e^{G_last - G}) dS (the pseudo-values' adjoint),
    dS_prev = e^{G_last} dS + (Q e^G)^T do - W^T dD. One program per (V block, row)."""
    i_n = tl.program_id(1)
    ck, cv, mk, mv, s_off, s_msk, dS = _triton_chunk_block(ds_ptr, i_n, tl.program_id(0), K, V, HAS_DS, BK, BV)
    rt = tl.arange(0, BT)
    nt = tl.cdiv(T, C)
    for i in range(nt):
        ic = nt - 1 - i
        tl.store(dh_ptr + tl.cast(ic * N, tl.int64) * K * V + s_off, dS, mask=s_msk)
        t, m, row = _triton_chunk_steps(ic, rt, C, T, N, i_n)
        q, k, v, b, g = _triton_delta_load(q_ptr, k_ptr, v_ptr, b_ptr, g_ptr, row, m, ck, mk, cv, mv, K, V, HAS_G)
        do = tl.load(do_ptr + row[:, None] * V + cv[None, :], mask=m[:, None] & mv[None, :], other=0.0).to(tl.float32)
        Ti, Gam, eG, eL, KK, QK = _triton_delta_factors(q, k, b, g, tl.minimum(C, T - ic * C), rt, HAS_G)
        W = tl.dot(Ti, k * (b * eG)[:, None], input_precision="ieee")
        dD = tl.dot(tl.trans(QK * Gam), do, input_precision="ieee") + tl.dot(k * eL[:, None], dS, input_precision="ieee")
        if HAS_G:
            dS = dS * tl.exp(tl.sum(g, 0))
        dS += tl.dot(tl.trans(q * eG[:, None]), do, input_precision="ieee") - tl.dot(tl.trans(W), dD, input_precision="ieee")
    tl.store(dh0_ptr + s_off, dS, mask=s_msk)


@triton.jit
def _triton_delta_bwd(q_ptr, k_ptr, v_ptr, b_ptr, g_ptr, h_ptr, dh_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, db_ptr,
                      dg_ptr, T, N, K, V, C, HAS_G: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """dq, dk, dv, dbeta (and dg) of one chunk from the state entering it (h) and the adjoint leaving it
    (dh); one program per (chunk, row), all of K and V. The forward's chain run backwards: D = U - W S with
    W = Ti diag(b e^G) K, U = Ti diag(b) V, Ti = (I + A)^{-1} (so dA = -Ti^T dTi Ti^T), A = strict(KK * Gam);
    dg summed term by term (pairs across s, readouts and W rows at i >= s, the update's rows j < s, the
    entering state's decay), so nothing cancels."""
    ic = tl.program_id(0)
    i_n = tl.program_id(1)
    ck = tl.arange(0, BK)
    cv = tl.arange(0, BV)
    mk = ck < K
    mv = cv < V
    rt = tl.arange(0, BT)
    tri = rt[:, None] >= rt[None, :]
    strict = rt[:, None] > rt[None, :]
    t, m, row = _triton_chunk_steps(ic, rt, C, T, N, i_n)
    mqk = m[:, None] & mk[None, :]
    mvv = m[:, None] & mv[None, :]
    q, k, v, b, g = _triton_delta_load(q_ptr, k_ptr, v_ptr, b_ptr, g_ptr, row, m, ck, mk, cv, mv, K, V, HAS_G)
    do = tl.load(do_ptr + row[:, None] * V + cv[None, :], mask=mvv, other=0.0).to(tl.float32)
    s_off = tl.cast(ic * N + i_n, tl.int64) * K * V + ck[:, None] * V + cv[None, :]
    s_msk = mk[:, None] & mv[None, :]
    S = tl.load(h_ptr + s_off, mask=s_msk, other=0.0)
    dS = tl.load(dh_ptr + s_off, mask=s_msk, other=0.0)
    Ti, Gam, eG, eL, KK, QK = _triton_delta_factors(q, k, b, g, tl.minimum(C, T - ic * C), rt, HAS_G)
    rw = k * (b * eG)[:, None]
    vb = v * b[:, None]
    W = tl.dot(Ti, rw, input_precision="ieee")
    D = tl.dot(Ti, vb, input_precision="ieee") - tl.dot(W, S, input_precision="ieee")
    Aqk = QK * Gam
    kg = k * eL[:, None]
    dD = tl.dot(tl.trans(Aqk), do, input_precision="ieee") + tl.dot(kg, dS, input_precision="ieee")
    dAqk = tl.where(tri, tl.dot(do, tl.trans(D), input_precision="ieee"), 0.0)
    dqg = tl.dot(do, tl.trans(S), input_precision="ieee")
    dkg = tl.dot(D, tl.trans(dS), input_precision="ieee")
    dW = -tl.dot(dD, tl.trans(S), input_precision="ieee")
    dTi = tl.dot(dD, tl.trans(vb), input_precision="ieee") + tl.dot(dW, tl.trans(rw), input_precision="ieee")
    dvb = tl.dot(tl.trans(Ti), dD, input_precision="ieee")
    drw = tl.dot(tl.trans(Ti), dW, input_precision="ieee")
    dA = -tl.dot(tl.dot(tl.trans(Ti), dTi, input_precision="ieee"), tl.trans(Ti), input_precision="ieee")
    dA = tl.where(strict, dA, 0.0)
    dKK = dA * Gam
    dQK = dAqk * Gam
    dq = tl.dot(dQK, k, input_precision="ieee") + dqg * eG[:, None]
    dk = (tl.dot(dKK, k, input_precision="ieee") * b[:, None] + tl.dot(tl.trans(dKK), k * b[:, None], input_precision="ieee")
          + tl.dot(tl.trans(dQK), q, input_precision="ieee") + drw * (b * eG)[:, None] + dkg * eL[:, None])
    kk = tl.dot(k, tl.trans(k), input_precision="ieee")
    db = tl.sum(dKK * kk, 1) + tl.sum(drw * k, 1) * eG + tl.sum(dvb * v, 1)
    tl.store(dq_ptr + row[:, None] * K + ck[None, :], dq, mask=mqk)
    tl.store(dk_ptr + row[:, None] * K + ck[None, :], dk, mask=mqk)
    tl.store(dv_ptr + row[:, None] * V + cv[None, :], dvb * b[:, None], mask=mvv)
    tl.store(db_ptr + row, db, mask=m)
    if HAS_G:
        before = rt[None, :] < rt[:, None]                                             # [s, j]: j < s
        Z = tl.where(strict, (dA * KK + dAqk * QK) * Gam, 0.0)                         # d/dX_ij, X_ij = sum_{j<s<=i} g_s
        intra = tl.sum(tl.where(before, tl.cumsum(Z, 0, reverse=True), 0.0), 1)
        late = tl.cumsum(tl.sum(q * eG[:, None] * dqg, 1) + tl.sum(rw * drw, 1), 0, reverse=True)
        early = tl.sum(tl.where(before, tl.sum(kg * dkg, 1)[None, :], 0.0), 1)
        kept = tl.exp(tl.sum(g, 0)) * tl.sum(tl.sum(S * dS, 1), 0)
        tl.store(dg_ptr + row, intra + late + early + kept, mask=m)


def _triton_delta_forward(q, k, v, beta, g, h0, C, save_h=False):
    """Launch the kernel (no autograd); with save_h also the state entering each chunk, [nt, N, K, V] float32."""
    T, N, K = q.shape
    V = v.shape[-1]
    BT, BK, BV = _triton_chunk_blocks(C, K, V)
    q, k, v, beta = q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous()
    o = torch.empty(T, N, V, dtype=q.dtype, device=q.device)
    S = torch.empty(N, K, V, dtype=q.dtype, device=q.device)
    h = torch.empty(triton.cdiv(T, C), N, K, V, dtype=torch.float32, device=q.device) if save_h else None
    h0c = q if h0 is None else h0.contiguous()                                         # a dummy pointer when absent
    gc = q if g is None else g.contiguous()
    grid = (triton.cdiv(V, BV), N)
    torch.library.wrap_triton(_triton_delta_fwd)[grid](
        q, k, v, beta, gc, h0c, o, S, q if h is None else h, T, N, K, V, C,
        HAS_G=g is not None, HAS_H0=h0 is not None, SAVE_H=save_h, BT=BT, BK=BK, BV=BV)
    return o, S, h


def _triton_delta_backward(q, k, v, beta, g, h, do, dS, C):
    """Launch the backward kernels: (dq, dk, dv, dbeta, dg, dh0) in float32 (dg None without a decay)."""
    T, N, K = q.shape
    V = v.shape[-1]
    BT, BK, BV = _triton_chunk_blocks(C, K, V)
    nt = triton.cdiv(T, C)
    q, k, v, beta, do = q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous(), do.contiguous()
    gc = q if g is None else g.contiguous()
    f32 = dict(dtype=torch.float32, device=q.device)
    dh, dh0 = torch.empty(nt, N, K, V, **f32), torch.empty(N, K, V, **f32)
    torch.library.wrap_triton(_triton_delta_bwd_dh)[(triton.cdiv(V, BV), N)](
        q, k, v, beta, gc, do, do if dS is None else dS.contiguous(), dh, dh0, T, N, K, V, C,
        HAS_G=g is not None, HAS_DS=dS is not None, BT=BT, BK=BK, BV=BV)
    dq, dk, dv = torch.empty(T, N, K, **f32), torch.empty(T, N, K, **f32), torch.empty(T, N, V, **f32)
    db, dg = torch.empty(T, N, **f32), torch.empty(T, N, **f32)
    torch.library.wrap_triton(_triton_delta_bwd)[(nt, N)](
        q, k, v, beta, gc, h, dh, do, dq, dk, dv, db, dg, T, N, K, V, C,
        HAS_G=g is not None, BT=BT, BK=BK, BV=triton.next_power_of_2(max(int(V), 16)))
    return dq, dk, dv, db, None if g is None else dg, dh0


def _triton_delta_forward_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                                 g: torch.Tensor | None, h0: torch.Tensor | None, C: int,
                                 save_h: bool) -> list[torch.Tensor]:
    """The op rnnc::triton_delta_forward: [o, S_T, the state entering each chunk, flat (empty unless
    save_h; as rnnc::triton_chunk_forward's)]."""
    o, S, h = _triton_delta_forward(q, k, v, beta, g, h0, C, save_h)
    return [o, S, q.new_empty(0, dtype=torch.float32) if h is None else h.view(-1)]


def _triton_delta_backward_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                                  g: torch.Tensor | None, h: torch.Tensor, do: torch.Tensor,
                                  dS: torch.Tensor | None, C: int) -> list[torch.Tensor]:
    """The op rnnc::triton_delta_backward: [dq, dk, dv, dbeta, dg (empty without a decay), dh0], float32."""
    dq, dk, dv, db, dg, dh0 = _triton_delta_backward(q, k, v, beta, g, h, do, dS, C)
    return [dq, dk, dv, db, q.new_empty(0, dtype=torch.float32) if dg is None else dg, dh0]


def _triton_delta_forward_fake(q, k, v, beta, g, h0, C, save_h):
    return _triton_chunk_forward_fake(q, k, v, None, None, h0, C, save_h)


def _triton_delta_backward_fake(q, k, v, beta, g, h, do, dS, C):
    T, N, K = q.shape
    V = v.shape[-1]
    f32 = dict(dtype=torch.float32)
    return [q.new_empty(T, N, K, **f32), q.new_empty(T, N, K, **f32), q.new_empty(T, N, V, **f32),
            q.new_empty(T, N, **f32), q.new_empty((T, N) if g is not None else (0,), **f32), q.new_empty(N, K, V, **f32)]


def _triton_delta_setup(ctx, inputs, output):
    q, k, v, beta, g, h0, C, _ = inputs
    ctx.chunk = C
    ctx.save_for_backward(q, k, v, beta, g, h0, output[2])


def _triton_delta_gradient(ctx, grads):
    """The forward op's backward: the Triton backward kernels (through rnnc::triton_delta_backward)."""
    do, dS, _ = grads
    q, k, v, beta, g, h0, h = ctx.saved_tensors
    dq, dk, dv, db, dg, dh0 = _TRITON_DELTA_BACKWARD(q, k, v, beta, g, h, do, dS, ctx.chunk)
    grads = (dq, dk, dv, db, None if g is None else dg, None if h0 is None else dh0)
    return (*[None if d is None or not n else d.to(x.dtype)
              for d, n, x in zip(grads, ctx.needs_input_grad, (q, k, v, beta, g, h0))], None, None)


#: The launchers as ops (rnnc/runtime/triton_launch.py, _kernel_op): torch.compile records one node each.
_TRITON_DELTA_BACKWARD = _kernel_op("triton_delta_backward", _triton_delta_backward_launch, _triton_delta_backward_fake)
_TRITON_DELTA_FORWARD = _kernel_op("triton_delta_forward", _triton_delta_forward_launch, _triton_delta_forward_fake,
                                   _triton_delta_gradient, _triton_delta_setup)


def _triton_delta_chunk(q, k, v, beta, g, h0, chunk, before=False):
    """Drop-in for `_chunk_delta` (same arguments, semantics, returns), forward and backward in Triton.
    float64 (and T == 0) go to `_chunk_delta` itself."""
    T = q.shape[0]
    C = int(chunk)
    if T == 0 or q.dtype == torch.float64:
        return _chunk_delta(q, k, v, beta, g, h0, C, before)
    if before:
        return _chunk_empty_or_before(_triton_delta_chunk, q, h0, v.shape[-1], k, v, beta, g, h0, C)
    save = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, beta, g, h0))
    o, S, _ = _TRITON_DELTA_FORWARD(q, k, v, beta, g, h0, C, save)
    return o, S
