"""The generalized delta rule in Triton: rnnc/runtime/chunk_dplr.py's chunk form as kernels, forward and backward.

`_triton_chunk_dplr(q, ks, vs, as_, bs, gs, h0, chunk, before=False)` has the arguments, semantics and
return value of `_chunk_dplr` (read its docstring): per token M micro-steps
    S <- diag(e^{g_m}) S + a_m (b_m^T S) + k_m v_m^T,   then o_t = S^T q_t,
which covers KDA (a = -beta k, b = e^g k), RWKV-7 (a != b, per-key decay) and DeltaProduct (M = n_h
Householder steps, the scalar decay in the first). `_chunk_dplr` interleaves the micro-steps into rows
(PyTorch glue, differentiated by autograd) and hands the rows to `_triton_dplr_rows`, this module's
drop-in for `_chunk_dplr_rows`: one row r is S_r = D_r S_{r-1} + a_r b_r^T S_{r-1} + k_r v_r^T with
D_r = diag(e^{g_r}), o_r = S_r^T q_r; g is per key [L, N, K], scalar [L, N, 1], or None.

The chunk algorithm (fla's DPLR derivation, as chunk_dplr.py). Inside a chunk entered with S, let G_i
be the chunk-local cumulative log-decay (per key) and u_i = S_{i-1}^T b_i the pseudo-values. Unrolled,
    S_i = e^{G_i} S + sum_{j <= i} e^{G_i - G_j} (a_j u_j^T + k_j v_j^T)            (per key, row-wise)
so u_i = S^T (b_i e^{G_{i-1}}) + sum_{j < i} [b_i e^{G_{i-1} - G_j} . a_j] u_j + [.. . k_j] v_j, i.e.
    (I - A_ba) U = B~ S + A_bk V,   A_by[i, j] = sum_c b_ic y_jc e^{G_{i-1,c} - G_jc}   (j < i),
with B~ = b e^{G_{i-1}}. With Ti = (I - A_ba)^{-1} (unit lower-triangular, forward substitution):
    W = Ti B~,  U = Ti (A_bk V) + W S,
    O = (Q e^G) S + A_qa U + A_qk V,   A_qy[i, j] = sum_c q_ic y_jc e^{G_ic - G_jc}   (j <= i),
    S <- diag(e^{G_last}) S + (A e^{G_last - G})^T U + (K e^{G_last - G})^T V.
With a per-key decay the four pair matrices are formed row by row, element-wise over the keys (fla's
diagonal sub-chunk blocks; the dplr chunk is 16 rows by default, one such block): for row i the
exponents X_j = sum_{j < s <= i} g_s are carried from the previous row (X_j += g_i for j < i) and masked
to -inf for j > i before exp; row i of A_b. uses the previous row's exponentials (G_{i-1} - G_j). With a
scalar or no decay they are matmuls times the masked pair factors e^{G_i - G_j}, e^{G_{i-1} - G_j}
(DeltaProduct, 32 rows a chunk by default: tensor-core work). Numerics as chunk.py: every exponent is
a direct sum of gates <= 0 (cumsums of the gates, of the gates one row up for G_{i-1}, reverse cumsums
of the gates one row down for G_last - G_j), never a difference of two cumulative sums; gates clamped
at -1e4 on load (exp is exactly 0 in float32 there either way), so -inf gates (hard resets) give no
NaN; masked rows (ragged tail, rows of the power-of-two block past the chunk) load zeros and change
nothing.

Backward: the forward saves the state entering each chunk; `_triton_dplr_bwd_dh` carries the state's
adjoint back over the chunks (per V block),
    dU = A_qa^T dO + (A e^{G_last - G}) dS,   dS_prev = e^{G_last} dS + (Q e^G)^T dO + W^T dU;
`_triton_dplr_bwd` then differentiates every chunk in parallel (one program per chunk and row, all of
K and V), recomputing the pair matrices, Ti, W and U from the saved state, and runs the chain above in
reverse: dTi = dU (A_bk V)^T + dW B~^T and dA_ba = Ti^T dTi Ti^T (strictly lower), dA_bk = (Ti^T dU)
V^T, dA_q. = dO U^T, dO V^T (lower). The pair matrices' gradients reach q, k, a, b by the same row
loop (per-key decays) or matmuls, and the log-decays term by term (each exponent's gates get the
gradient of the terms whose exponent contains them: pairs j < s <= i, rows i >= s of Q e^G, i > s of
B~, j < s of the tails, and the entering state's e^{G_last} at every row; a scalar decay sums them over
the keys), so nothing cancels: a gate behind a -inf gate gets exactly 0.

Every load is upcast to float32 before any arithmetic (the CPU interpreter's bf16 rule), tl.dot runs
with input_precision="ieee", outputs are cast to the input dtype, gradients returned in the inputs'
dtypes. Blocks as triton_delta.py: all of K in one program (BK = next_pow2(max(K, 16))), BV up to 64
per forward program (all of V in the per-chunk backward), BT = next_pow2(max(C, 16)); any L, K, V, C
(masks). Per-key decays make the intra-chunk pairs O(C^2 K) element-wise (fine at their default of
16 rows); every chunk also takes C sequential substitution steps. Speed on a GPU is unmeasured (no GPU
here; the kernels compile for sm_90, tests/test_triton_compile.py); tested in Triton's CPU interpreter
(TRITON_INTERPRET=1). float64 inputs (and T == 0) run the PyTorch `_chunk_dplr`.
"""
import torch
import triton
import triton.language as tl

from .chunk_dplr import _chunk_dplr
from .triton_chunk import _triton_chunk_block, _triton_chunk_blocks, _triton_chunk_gate, _triton_chunk_steps, \
    _triton_chunk_saved, _triton_chunk_tile
from .triton_delta import _triton_unit_tril_inverse


@triton.jit
def _triton_dplr_load(q_ptr, k_ptr, a_ptr, b_ptr, g_ptr, row, m, rt, t, C, T, N, ck, mk, K, GATE: tl.constexpr):
    """One chunk's q, k, a, b [BT, BK] (zeros where masked) and its log-decays g with the same gates one
    row up (gx: g_{i-1}, 0 on the first row) and one row down (g1: g_{j+1}, 0 past the chunk's end):
    [BT, BK] per key (GATE 2), [BT, 1] scalar (GATE 1, g [L, N]), zeros [BT, 1] without a decay (GATE
    0); float32, gates clamped at -1e4."""
    q = _triton_chunk_tile(q_ptr, row, m, ck, mk, K)
    k = _triton_chunk_tile(k_ptr, row, m, ck, mk, K)
    a = _triton_chunk_tile(a_ptr, row, m, ck, mk, K)
    b = _triton_chunk_tile(b_ptr, row, m, ck, mk, K)
    mx = m & (rt > 0)
    m1 = (rt + 1 < C) & (t + 1 < T)
    if GATE == 2:
        g = _triton_chunk_gate(g_ptr, row, m, ck, mk, K)
        gx = _triton_chunk_gate(g_ptr, row - N, mx, ck, mk, K)
        g1 = _triton_chunk_gate(g_ptr, row + N, m1, ck, mk, K)
    elif GATE == 1:
        g = tl.maximum(tl.load(g_ptr + row, mask=m, other=0.0).to(tl.float32), -1e4)[:, None]
        gx = tl.maximum(tl.load(g_ptr + row - N, mask=mx, other=0.0).to(tl.float32), -1e4)[:, None]
        g1 = tl.maximum(tl.load(g_ptr + row + N, mask=m1, other=0.0).to(tl.float32), -1e4)[:, None]
    else:
        g = tl.sum(q, 1)[:, None] * 0.0
        gx = g
        g1 = g
    return q, k, a, b, g, gx, g1


@triton.jit
def _triton_dplr_cumsum(x, REVERSE: tl.constexpr, GATE: tl.constexpr):
    """Cumulative sum down the rows of a gate tile: [BT, BK] per key (GATE 2), else [BT, 1] summed as a
    vector and widened again. Triton's GPU lowering of a scan over a [BT, 1] tile whose result meets a
    wider tile fails an assertion in ScanOpToLLVM (triton-lang/triton#7817, seen with Triton 3.6 on an
    H200; the CPU interpreter has no such limit)."""
    if GATE == 2:
        return tl.cumsum(x, 0, reverse=REVERSE)
    else:
        return tl.cumsum(tl.sum(x, 1), 0, reverse=REVERSE)[:, None]


@triton.jit
def _triton_dplr_decays(g, gx, g1, GATE: tl.constexpr):
    """(e^{G_i}, e^{G_{i-1}}, e^{G_last - G_j}) per row (and key), and e^{G_last}: cumsums of the gates, of
    the gates one row up, reverse cumsums of the gates one row down (direct sums, <= 0)."""
    return (tl.exp(_triton_dplr_cumsum(g, False, GATE)), tl.exp(_triton_dplr_cumsum(gx, False, GATE)),
            tl.exp(_triton_dplr_cumsum(g1, True, GATE)), tl.exp(tl.sum(g, 0)))


@triton.jit
def _triton_dplr_gammas(g, gx, rt, GATE: tl.constexpr):
    """A scalar (or no) decay's pair factors [BT, BT]: Gam_ij = e^{sum_{j < s <= i} g_s} for j <= i and
    Gamb_ij = e^{sum_{j < s <= i-1} g_s} for j < i, 0 elsewhere; masked cumsums down the rows (of the
    gates one row up for Gamb: g_{r-1} for j + 1 < r <= i), masked to -inf before exp."""
    tri = rt[:, None] >= rt[None, :]
    strict = rt[:, None] > rt[None, :]
    if GATE == 1:
        X = tl.cumsum(tl.where(strict, g, 0.0), 0)                                     # g [BT, 1] broadcast
        Xb = tl.cumsum(tl.where(rt[:, None] > rt[None, :] + 1, gx, 0.0), 0)
        Gam = tl.exp(tl.where(tri, X, float("-inf")))
        Gamb = tl.exp(tl.where(strict, Xb, float("-inf")))
    else:
        Gam = tl.where(tri, 1.0, 0.0)
        Gamb = tl.where(strict, 1.0, 0.0)
    return Gam, Gamb


@triton.jit
def _triton_dplr_row(x, sel):
    """Row `sel` ([BT, 1] mask of one row) of a [BT, D] tile, as a [D] vector."""
    return tl.sum(tl.where(sel, x, 0.0), 0)


@triton.jit
def _triton_dplr_pairs(q, k, a, b, g, gx, rt, nd, GATE: tl.constexpr):
    """The chunk's pair matrices [BT, BT]: (A_qk, A_qa) with A_qy[i, j] = sum_c q_ic y_jc e^{G_ic - G_jc}
    for j <= i, and (A_bk, A_ba) with A_by[i, j] = sum_c b_ic y_jc e^{G_{i-1,c} - G_jc} for j < i (0 else).
    Per-key decays: row by row over the nd valid rows, X_j = sum_{j < s <= i} g_s carried along; a
    scalar or no decay: masked matmuls times _triton_dplr_gammas."""
    if GATE == 2:
        Aqk = tl.where(rt[:, None] >= rt[None, :], 0.0, 0.0)
        Aqa = Aqk
        Abk = Aqk
        Aba = Aqk
        X = g * 0.0
        Ep = X                                                                         # row i-1's exponentials
        for i in range(nd):
            sel = rt[:, None] == i
            qi = _triton_dplr_row(q, sel)
            bi = _triton_dplr_row(b, sel)
            Abk = tl.where(sel, tl.sum(k * Ep * bi[None, :], 1)[None, :], Abk)
            Aba = tl.where(sel, tl.sum(a * Ep * bi[None, :], 1)[None, :], Aba)
            X = tl.where(rt[:, None] < i, X + _triton_dplr_row(g, sel)[None, :], 0.0)
            E = tl.exp(tl.where(rt[:, None] <= i, X, float("-inf")))                  # e^{G_i - G_j}, j <= i
            Aqk = tl.where(sel, tl.sum(k * E * qi[None, :], 1)[None, :], Aqk)
            Aqa = tl.where(sel, tl.sum(a * E * qi[None, :], 1)[None, :], Aqa)
            Ep = E
    else:
        Gam, Gamb = _triton_dplr_gammas(g, gx, rt, GATE)
        Aqk = tl.dot(q, tl.trans(k), input_precision="ieee") * Gam
        Aqa = tl.dot(q, tl.trans(a), input_precision="ieee") * Gam
        Abk = tl.dot(b, tl.trans(k), input_precision="ieee") * Gamb
        Aba = tl.dot(b, tl.trans(a), input_precision="ieee") * Gamb
    return Aqk, Aqa, Abk, Aba


@triton.jit
def _triton_dplr_pairs_grad(q, k, a, b, g, gx, Aqk, Aqa, Abk, Aba, dAqk, dAqa, dAbk, dAba, rt, nd,
                            GATE: tl.constexpr):
    """The pair matrices' (A) gradients (dA) [BT, BT] pushed to (dq, dk, da, db) [BT, BK] and the gates (dg, [BT, BK]
    per key, [BT, 1] scalar). Per-key decays: the row loop of _triton_dplr_pairs again; row i's terms
    P_j = (dA_i.k k_j + dA_i.a a_j) q_i e^{G_i - G_j} go to the gates j < s <= i (a matmul with the
    strictly lower 0/1 matrix sums them over j < s), the b rows' to j < s <= i - 1. A scalar decay: the
    terms Z_ij = sum over keys, summed over i >= s (i > s for the b rows) by a matmul with a 0/1
    matrix, then over j < s."""
    lower = tl.where(rt[None, :] < rt[:, None], 1.0, 0.0)                             # [s, j]: j < s
    if GATE == 2:
        dq = q * 0.0
        dk = dq
        da = dq
        db = dq
        dg = dq
        X = dq
        Ep = dq
        for i in range(nd):
            sel = rt[:, None] == i
            qi = _triton_dplr_row(q, sel)
            bi = _triton_dplr_row(b, sel)
            rqk = _triton_dplr_row(dAqk, sel)
            rqa = _triton_dplr_row(dAqa, sel)
            rbk = _triton_dplr_row(dAbk, sel)
            rba = _triton_dplr_row(dAba, sel)
            Zb = (rbk[:, None] * k + rba[:, None] * a) * Ep                            # [j, c], j < i
            db = tl.where(sel, tl.sum(Zb, 0)[None, :], db)
            dk += rbk[:, None] * Ep * bi[None, :]
            da += rba[:, None] * Ep * bi[None, :]
            X = tl.where(rt[:, None] < i, X + _triton_dplr_row(g, sel)[None, :], 0.0)
            E = tl.exp(tl.where(rt[:, None] <= i, X, float("-inf")))
            Zq = (rqk[:, None] * k + rqa[:, None] * a) * E                             # [j, c], j <= i
            dq = tl.where(sel, tl.sum(Zq, 0)[None, :], dq)
            dk += rqk[:, None] * E * qi[None, :]
            da += rqa[:, None] * E * qi[None, :]
            dg += tl.where(rt[:, None] <= i, tl.dot(lower, Zq * qi[None, :], input_precision="ieee"), 0.0)
            dg += tl.where(rt[:, None] < i, tl.dot(lower, Zb * bi[None, :], input_precision="ieee"), 0.0)
            Ep = E
    else:
        Gam, Gamb = _triton_dplr_gammas(g, gx, rt, GATE)
        dQk, dQa, dBk, dBa = dAqk * Gam, dAqa * Gam, dAbk * Gamb, dAba * Gamb
        dq = tl.dot(dQk, k, input_precision="ieee") + tl.dot(dQa, a, input_precision="ieee")
        db = tl.dot(dBk, k, input_precision="ieee") + tl.dot(dBa, a, input_precision="ieee")
        dk = tl.dot(tl.trans(dQk), q, input_precision="ieee") + tl.dot(tl.trans(dBk), b, input_precision="ieee")
        da = tl.dot(tl.trans(dQa), q, input_precision="ieee") + tl.dot(tl.trans(dBa), b, input_precision="ieee")
        dg = g * 0.0
        if GATE == 1:  # Z_ij: the pair (i, j)'s term; its gates j < s <= i (q rows), j < s <= i - 1 (b rows)
            Zq = tl.where(rt[:, None] > rt[None, :], dAqk * Aqk + dAqa * Aqa, 0.0)
            Zb = dAbk * Abk + dAba * Aba
            upto = tl.where(rt[None, :] >= rt[:, None], 1.0, 0.0)                     # [s, i]: i >= s
            R = tl.dot(upto, Zq, input_precision="ieee") + tl.dot(tl.trans(lower), Zb, input_precision="ieee")
            dg += tl.sum(tl.where(rt[None, :] < rt[:, None], R, 0.0), 1)[:, None]     # [s, j]: j < s
    return dq, dk, da, db, dg


@triton.jit
def _triton_dplr_factors(q, k, a, b, g, gx, g1, rt, nd, GATE: tl.constexpr):
    """What every kernel needs of one chunk (nd valid rows): the pair matrices, the decays, the inverse
    Ti = (I - A_ba)^{-1} and W = Ti (b e^{G_{i-1}})."""
    Aqk, Aqa, Abk, Aba = _triton_dplr_pairs(q, k, a, b, g, gx, rt, nd, GATE)
    eG, eGx, eL, eC = _triton_dplr_decays(g, gx, g1, GATE)
    Ti = _triton_unit_tril_inverse(-Aba, rt, nd)
    W = tl.dot(Ti, b * eGx, input_precision="ieee")
    return Aqk, Aqa, Abk, Aba, eG, eGx, eL, eC, Ti, W


@triton.jit
def _triton_dplr_fwd(q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, g_ptr, h0_ptr, o_ptr, s_ptr, h_ptr, T, N, K, V, C,
                     GATE: tl.constexpr, HAS_H0: tl.constexpr, SAVE_H: tl.constexpr,
                     BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """One program per (V block, row n) carries the state [K, BV] over the chunks (module docstring).
    With SAVE_H, the state entering each chunk goes to h [nt, N, K, V] (for the backward)."""
    i_n = tl.program_id(1)
    ck, cv, mk, mv, s_off, s_msk, S = _triton_chunk_block(h0_ptr, i_n, tl.program_id(0), K, V, HAS_H0, BK, BV)
    rt = tl.arange(0, BT)
    nt = tl.cdiv(T, C)
    for ic in range(nt):
        if SAVE_H:
            tl.store(h_ptr + tl.cast(ic * N, tl.int64) * K * V + s_off, S, mask=s_msk)
        t, m, row = _triton_chunk_steps(ic, rt, C, T, N, i_n)
        q, k, a, b, g, gx, g1 = _triton_dplr_load(q_ptr, k_ptr, a_ptr, b_ptr, g_ptr, row, m, rt, t, C, T, N,
                                                  ck, mk, K, GATE)
        v = _triton_chunk_tile(v_ptr, row, m, cv, mv, V)
        Aqk, Aqa, Abk, Aba, eG, eGx, eL, eC, Ti, W = _triton_dplr_factors(q, k, a, b, g, gx, g1, rt,
                                                                          tl.minimum(C, T - ic * C), GATE)
        U = (tl.dot(Ti, tl.dot(Abk, v, input_precision="ieee"), input_precision="ieee")
             + tl.dot(W, S, input_precision="ieee"))
        o = (tl.dot(q * eG, S, input_precision="ieee") + tl.dot(Aqa, U, input_precision="ieee")
             + tl.dot(Aqk, v, input_precision="ieee"))
        S = (S * eC[:, None] + tl.dot(tl.trans(a * eL), U, input_precision="ieee")
             + tl.dot(tl.trans(k * eL), v, input_precision="ieee"))
        tl.store(o_ptr + row[:, None] * V + cv[None, :], o.to(o_ptr.dtype.element_ty), mask=m[:, None] & mv[None, :])
    tl.store(s_ptr + s_off, S.to(s_ptr.dtype.element_ty), mask=s_msk)


@triton.jit
def _triton_dplr_bwd_dh(q_ptr, k_ptr, a_ptr, b_ptr, g_ptr, do_ptr, ds_ptr, dh_ptr, dh0_ptr, T, N, K, V, C,
                        GATE: tl.constexpr, HAS_DS: tl.constexpr,
                        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The state's adjoint, chunk by chunk in reverse: dh[ic] is the gradient of the state leaving chunk
    ic; dU = A_qa^T dO + (A e^{G_last - G}) dS, dS_prev = e^{G_last} dS + (Q e^G)^T dO + W^T dU. One
    program per (V block, row)."""
    i_n = tl.program_id(1)
    ck, cv, mk, mv, s_off, s_msk, dS = _triton_chunk_block(ds_ptr, i_n, tl.program_id(0), K, V, HAS_DS, BK, BV)
    rt = tl.arange(0, BT)
    nt = tl.cdiv(T, C)
    for i in range(nt):
        ic = nt - 1 - i
        tl.store(dh_ptr + tl.cast(ic * N, tl.int64) * K * V + s_off, dS, mask=s_msk)
        t, m, row = _triton_chunk_steps(ic, rt, C, T, N, i_n)
        q, k, a, b, g, gx, g1 = _triton_dplr_load(q_ptr, k_ptr, a_ptr, b_ptr, g_ptr, row, m, rt, t, C, T, N,
                                                  ck, mk, K, GATE)
        do = _triton_chunk_tile(do_ptr, row, m, cv, mv, V)
        Aqk, Aqa, Abk, Aba, eG, eGx, eL, eC, Ti, W = _triton_dplr_factors(q, k, a, b, g, gx, g1, rt,
                                                                          tl.minimum(C, T - ic * C), GATE)
        dU = tl.dot(tl.trans(Aqa), do, input_precision="ieee") + tl.dot(a * eL, dS, input_precision="ieee")
        dS = (dS * eC[:, None] + tl.dot(tl.trans(q * eG), do, input_precision="ieee")
              + tl.dot(tl.trans(W), dU, input_precision="ieee"))
    tl.store(dh0_ptr + s_off, dS, mask=s_msk)


@triton.jit
def _triton_dplr_bwd(q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, g_ptr, h_ptr, dh_ptr, do_ptr,
                     dq_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr, dg_ptr, T, N, K, V, C, GATE: tl.constexpr,
                     BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """dq, dk, dv, da, db (and dg) of one chunk from the state entering it (h) and the adjoint leaving it
    (dh); one program per (chunk, row), all of K and V (module docstring)."""
    ic = tl.program_id(0)
    i_n = tl.program_id(1)
    ck, cv, mk, mv, S, dS = _triton_chunk_saved(h_ptr, dh_ptr, ic * N + i_n, K, V, BK, BV)
    rt = tl.arange(0, BT)
    tri = rt[:, None] >= rt[None, :]
    strict = rt[:, None] > rt[None, :]
    t, m, row = _triton_chunk_steps(ic, rt, C, T, N, i_n)
    nd = tl.minimum(C, T - ic * C)
    q, k, a, b, g, gx, g1 = _triton_dplr_load(q_ptr, k_ptr, a_ptr, b_ptr, g_ptr, row, m, rt, t, C, T, N,
                                              ck, mk, K, GATE)
    v = _triton_chunk_tile(v_ptr, row, m, cv, mv, V)
    do = _triton_chunk_tile(do_ptr, row, m, cv, mv, V)
    Aqk, Aqa, Abk, Aba, eG, eGx, eL, eC, Ti, W = _triton_dplr_factors(q, k, a, b, g, gx, g1, rt, nd, GATE)
    bg = b * eGx
    Y = tl.dot(Abk, v, input_precision="ieee")
    U = tl.dot(Ti, Y, input_precision="ieee") + tl.dot(W, S, input_precision="ieee")
    # the chain of the forward, in reverse
    dU = tl.dot(tl.trans(Aqa), do, input_precision="ieee") + tl.dot(a * eL, dS, input_precision="ieee")
    dAqa = tl.where(tri, tl.dot(do, tl.trans(U), input_precision="ieee"), 0.0)
    dAqk = tl.where(tri, tl.dot(do, tl.trans(v), input_precision="ieee"), 0.0)
    dY = tl.dot(tl.trans(Ti), dU, input_precision="ieee")
    dW = tl.dot(dU, tl.trans(S), input_precision="ieee")
    dTi = tl.dot(dU, tl.trans(Y), input_precision="ieee") + tl.dot(dW, tl.trans(bg), input_precision="ieee")
    dAbk = tl.where(strict, tl.dot(dY, tl.trans(v), input_precision="ieee"), 0.0)
    dAba = tl.where(strict, tl.dot(tl.dot(tl.trans(Ti), dTi, input_precision="ieee"), tl.trans(Ti),
                                   input_precision="ieee"), 0.0)
    dbg = tl.dot(tl.trans(Ti), dW, input_precision="ieee")
    dv = (tl.dot(tl.trans(Aqk), do, input_precision="ieee") + tl.dot(k * eL, dS, input_precision="ieee")
          + tl.dot(tl.trans(Abk), dY, input_precision="ieee"))
    dqg = tl.dot(do, tl.trans(S), input_precision="ieee")                             # of Q e^G
    dag = tl.dot(U, tl.trans(dS), input_precision="ieee")                             # of A e^{G_last - G}
    dkg = tl.dot(v, tl.trans(dS), input_precision="ieee")                             # of K e^{G_last - G}
    dq, dk, da, db, dg = _triton_dplr_pairs_grad(q, k, a, b, g, gx, Aqk, Aqa, Abk, Aba, dAqk, dAqa, dAbk, dAba, rt,
                                                 nd, GATE)
    mqk = m[:, None] & mk[None, :]
    tl.store(dq_ptr + row[:, None] * K + ck[None, :], dq + dqg * eG, mask=mqk)
    tl.store(dk_ptr + row[:, None] * K + ck[None, :], dk + dkg * eL, mask=mqk)
    tl.store(da_ptr + row[:, None] * K + ck[None, :], da + dag * eL, mask=mqk)
    tl.store(db_ptr + row[:, None] * K + ck[None, :], db + dbg * eGx, mask=mqk)
    tl.store(dv_ptr + row[:, None] * V + cv[None, :], dv, mask=m[:, None] & mv[None, :])
    if GATE == 2:
        lower = tl.where(rt[None, :] < rt[:, None], 1.0, 0.0)                         # [s, j]: j < s
        dg += tl.cumsum(q * dqg * eG, 0, reverse=True)                                 # e^{G_i}: rows i >= s
        dg += tl.dot(tl.trans(lower), bg * dbg, input_precision="ieee")                # e^{G_{i-1}}: rows i > s
        dg += tl.dot(lower, (a * dag + k * dkg) * eL, input_precision="ieee")          # e^{G_last - G_j}: j < s
        dg += (eC * tl.sum(S * dS, 1))[None, :]                                        # the entering state's decay
        tl.store(dg_ptr + row[:, None] * K + ck[None, :], dg, mask=mqk)
    if GATE == 1:  # the same terms summed over the keys
        later = rt[None, :] > rt[:, None]                                              # [s, i]: i > s
        dgs = tl.sum(dg, 1) + tl.cumsum(tl.sum(q * dqg * eG, 1), 0, reverse=True)
        dgs += tl.sum(tl.where(later, tl.sum(bg * dbg, 1)[None, :], 0.0), 1)
        dgs += tl.sum(tl.where(rt[None, :] < rt[:, None], tl.sum((a * dag + k * dkg) * eL, 1)[None, :], 0.0), 1)
        dgs += tl.sum(eC, 0) * tl.sum(tl.sum(S * dS, 1), 0)
        tl.store(dg_ptr + row, dgs, mask=m)


def _triton_dplr_forward(q, k, v, a, b, g, h0, C, save_h=False):
    """Launch the forward kernel (no autograd); with save_h also the state entering each chunk,
    [nt, N, K, V] float32."""
    L, N, K = q.shape
    V = v.shape[-1]
    BT, BK, BV = _triton_chunk_blocks(C, K, V)
    o = torch.empty(L, N, V, dtype=q.dtype, device=q.device)
    S = torch.empty(N, K, V, dtype=q.dtype, device=q.device)
    h = torch.empty(triton.cdiv(L, C), N, K, V, dtype=torch.float32, device=q.device) if save_h else None
    h0c = q if h0 is None else h0.contiguous()                                         # a dummy pointer when absent
    _triton_dplr_fwd[(triton.cdiv(V, BV), N)](q, k, v, a, b, q if g is None else g, h0c, o, S, q if h is None else h,
                                             L, N, K, V, C, GATE=_triton_dplr_gate(g, K), HAS_H0=h0 is not None,
                                             SAVE_H=save_h, BT=BT, BK=BK, BV=BV)
    return o, S, h


def _triton_dplr_backward(q, k, v, a, b, g, h, do, dS, C):
    """Launch the backward kernels: (dq, dk, dv, da, db, dg, dh0) in float32 (dg None without a decay)."""
    L, N, K = q.shape
    V = v.shape[-1]
    BT, BK, BV = _triton_chunk_blocks(C, K, V)
    nt = triton.cdiv(L, C)
    gc = q if g is None else g
    do = do.contiguous()
    f32 = dict(dtype=torch.float32, device=q.device)
    dh, dh0 = torch.empty(nt, N, K, V, **f32), torch.empty(N, K, V, **f32)
    _triton_dplr_bwd_dh[(triton.cdiv(V, BV), N)](q, k, a, b, gc, do, do if dS is None else dS.contiguous(), dh, dh0,
                                                 L, N, K, V, C, GATE=_triton_dplr_gate(g, K), HAS_DS=dS is not None,
                                                 BT=BT, BK=BK, BV=BV)
    dq, dk, da, db = (torch.empty(L, N, K, **f32) for _ in range(4))
    dv, dg = torch.empty(L, N, V, **f32), torch.empty(gc.shape, **f32)
    _triton_dplr_bwd[(nt, N)](q, k, v, a, b, gc, h, dh, do, dq, dk, dv, da, db, dg, L, N, K, V, C,
                              GATE=_triton_dplr_gate(g, K), BT=BT, BK=BK, BV=triton.next_power_of_2(max(int(V), 16)))
    return dq, dk, dv, da, db, None if g is None else dg, dh0


def _triton_dplr_gate(g, K):
    """The kernels' GATE: 0 no decay, 1 a scalar one ([L, N, 1]), 2 per key ([L, N, K])."""
    return 0 if g is None else 1 if g.shape[-1] == 1 and K > 1 else 2


class _triton_dplr_function(torch.autograd.Function):
    """Forward and backward of the rows in Triton: the forward saves the state entering each chunk, the
    backward carries the state's adjoint back over the chunks, then differentiates every chunk in parallel."""

    @staticmethod
    def forward(ctx, q, k, v, a, b, g, h0, C):
        q, k, v, a, b = (x.contiguous() for x in (q, k, v, a, b))
        g = None if g is None else g.contiguous()
        o, S, h = _triton_dplr_forward(q, k, v, a, b, g, h0, C, save_h=any(ctx.needs_input_grad))
        ctx.save_for_backward(q, k, v, a, b, g, h0, h)
        ctx.chunk = C
        return o, S

    @staticmethod
    def backward(ctx, do, dS):
        q, k, v, a, b, g, h0, h = ctx.saved_tensors
        dq, dk, dv, da, db, dg, dh0 = _triton_dplr_backward(q, k, v, a, b, g, h, do, dS, ctx.chunk)
        grads = (dq, dk, dv, da, db, dg, None if h0 is None else dh0)
        return (*[None if d is None or not n else d.to(x.dtype)
                  for d, n, x in zip(grads, ctx.needs_input_grad, (q, k, v, a, b, g, h0))], None)


def _triton_dplr_rows(q, k, v, a, b, g, h0, C, read=1):
    """Drop-in for `_chunk_dplr_rows` (same arguments and returns), forward and backward in Triton; read
    out at every `read`-th row as a query on each such row, zeros on the others."""
    L, N, K = k.shape
    if read > 1:
        q = torch.stack([q.new_zeros(q.shape)] * (read - 1) + [q], 1).reshape(L, N, K)
    o, S = _triton_dplr_function.apply(q, k, v, a, b, g, h0, int(C))
    return (o.reshape(L // read, read, N, -1)[:, -1] if read > 1 else o), S


def _triton_chunk_dplr(q, ks, vs, as_, bs, gs, h0, chunk, before=False):
    """Drop-in for `_chunk_dplr` (same arguments, semantics, returns): the rows by the Triton kernels.
    float64 go to `_chunk_dplr` itself (as does T == 0 there)."""
    if q.dtype == torch.float64:
        return _chunk_dplr(q, ks, vs, as_, bs, gs, h0, chunk, before)
    return _chunk_dplr(q, ks, vs, as_, bs, gs, h0, chunk, before, _triton_dplr_rows)
