"""Chunkwise linear attention in Triton: rnnc/runtime/chunk.py's _chunk_linear as kernels.

`_triton_chunk_linear(q, k, v, gk, gv, h0, chunk, before=False)` has the arguments, semantics and
return value of `_chunk_linear` (read its docstring):
S_t = diag(exp(gk_t)) S_{t-1} diag(exp(gv_t)) + k_t v_t^T, o_t = S_t^T q_t (before=True: S_{t-1}^T q_t),
time-major q, k: [T, N, K], v: [T, N, V], gk: [T, N, K] or [T, N, 1] (scalar) or None, gv: [T, N, V] or
[T, N, 1] or None, h0: [N, K, V] or None; returns (o [T, N, V], S_T [N, K, V]). The forward runs the
kernels below. The backward runs in Triton for no decay, a scalar decay (simple GLA, RetNet, linear
attention), per-key decays (GLA, RWKV-6) or per-value decays: the forward saves the state entering each
chunk, `_triton_chunk_bwd_dh` carries the state's adjoint back through the chunks, then
`_triton_chunk_bwd_scalar`, `_bwd_key` or `_bwd_value` forms dq, dk, dv and dg per chunk in parallel,
dg summed term by term (never fla's q·dq − k·dk, which cancels: ~1e-6 absolute error where the exact
gradient is ~1e-8 at g = -20 or 0 at g = -inf).
Per-key and per-value decays together recompute the outputs with the PyTorch `_chunk_linear` under
autograd and return its gradients.

Kernels: one program per (block of BV value columns, batch row n) loops over the chunks, carrying the
state S [K, BV] in registers in float32 (all of K in one program). Per chunk it adds the inter-chunk
readout (q e^G) S, the intra-chunk part, and updates S <- e^{G_last} S + (k e^{G_last - G})^T v.
  _triton_chunk_fwd_scalar  no decay or a scalar decay (gk [T, N, 1]): the whole chunk at once,
                            A = (Q K^T) * exp(X), X_ij = sum_{j < s <= i} g_s masked to -inf above the
                            diagonal before exp.
  _triton_chunk_fwd_vector  per-key decay gk [T, N, K] and/or per-value decay gv [T, N, V]: fla's GLA
                            secondary chunking. The chunk is cut into sub-chunks of BC = 16 rows;
                            blocks i in sub-chunk a, j in sub-chunk b < a are one tl.dot through the
                            first row n_a of a: (q_i e^{G_i - G_na}) . (k_j e^{G_na - G_j}); diagonal
                            blocks go row by row (an explicit loop over the sub-chunk's valid rows, element-wise,
                            the exponents sum_{j < s <= i} g_s carried incrementally, masked to -inf
                            for j > i before exp). The value-side decay is the same construction on v.
Numerics follow chunk.py: every exponent is <= 0 and is a direct sum of gates (cumsums inside a
chunk or sub-chunk, masked sums, shifted loads for exclusive suffix sums), never a difference of two
cumulative sums; gates are clamped at -1e4 on load (exp is exactly 0 in float32 there either way), so
-inf gates (hard resets) give no NaN. Masked/padded rows (the ragged tail, and rows of a power-of-two
block beyond the chunk length) load zeros: zero inputs and zero log-decay leave the state unchanged.
Every load is upcast to float32 before any arithmetic (the CPU interpreter's bf16 rule), tl.dot runs
with input_precision="ieee" (float32 accuracy on a GPU too; tf32 would be faster at ~1e-3 relative),
outputs are cast to the input dtype. Blocks: BK = next_pow2(max(K, 16)) (all of K), BV =
next_pow2(max(V, 16)) up to 64 (grid over V blocks), BT = next_pow2(max(C, 16)); any T, K, V, C work
(masks). Without a GPU set TRITON_INTERPRET=1 (CPU tensors then run in Triton's interpreter).

Not done in Triton: float64 inputs fall back to the PyTorch `_chunk_linear` (Triton float64 dot is
not worth it), as does T == 0; the backward of per-key and per-value decays together (above). float16/bfloat16
inputs run the kernels (upcast on load), gradients in float32 cast back to the input dtypes.
"""
import torch
import triton
import triton.language as tl

from .chunk import _chunk_empty_or_before, _chunk_fold_scalar, _chunk_linear, _chunk_recompute_backward
from .triton_launch import _kernel_op


def _triton_chunk_blocks(C, K, V):
    """(BT, BK, BV) block sizes: powers of two, at least 16 (tl.dot's minimum); BV at most 64."""
    BT = triton.next_power_of_2(max(int(C), 16))
    BK = triton.next_power_of_2(max(int(K), 16))
    BV = min(triton.next_power_of_2(max(int(V), 16)), 64)
    return BT, BK, BV


@triton.jit
def _triton_chunk_steps(ic, rt, C, T, N, i_n):
    """Chunk ic's steps t, their mask (inside the chunk and the sequence) and their rows in a
    time-major [T, N, ...] tensor (row n), int64 so that large T * N cannot overflow."""
    t = ic * C + rt
    m = (rt < C) & (t < T)
    return t, m, t.to(tl.int64) * N + i_n


@triton.jit
def _triton_chunk_block(ptr, i_n, i_v, K, V, LOAD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """A (V block i_v, row i_n) program's [BK, BV] block of a [N, K, V] state: its columns, masks and
    offsets, and the block read from `ptr` in float32 (zeros without LOAD)."""
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    mk = ck < K
    mv = cv < V
    s_off = (i_n * K + ck[:, None]).to(tl.int64) * V + cv[None, :]
    s_msk = mk[:, None] & mv[None, :]
    if LOAD:
        S = tl.load(ptr + s_off, mask=s_msk, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    return ck, cv, mk, mv, s_off, s_msk, S


@triton.jit
def _triton_chunk_fwd_scalar(q_ptr, k_ptr, v_ptr, g_ptr, h0_ptr, o_ptr, s_ptr, h_ptr, T, N, K, V, C,
                             HAS_G: tl.constexpr, HAS_H0: tl.constexpr, SAVE_H: tl.constexpr,
                             BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """No decay (HAS_G False) or a scalar log-decay g [T, N] per step; one program per (V block, row n).
    With SAVE_H, the state entering each chunk goes to h [nt, N, K, V] (for the backward)."""
    i_n = tl.program_id(1)
    ck, cv, mk, mv, s_off, s_msk, S = _triton_chunk_block(h0_ptr, i_n, tl.program_id(0), K, V, HAS_H0, BK, BV)
    rt = tl.arange(0, BT)
    tri = rt[:, None] >= rt[None, :]
    nt = tl.cdiv(T, C)
    for ic in range(nt):
        if SAVE_H:
            tl.store(h_ptr + tl.cast(ic * N, tl.int64) * K * V + s_off, S, mask=s_msk)
        t, m, row = _triton_chunk_steps(ic, rt, C, T, N, i_n)
        q = tl.load(q_ptr + row[:, None] * K + ck[None, :], mask=m[:, None] & mk[None, :], other=0.0).to(tl.float32)
        k = tl.load(k_ptr + row[:, None] * K + ck[None, :], mask=m[:, None] & mk[None, :], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + row[:, None] * V + cv[None, :], mask=m[:, None] & mv[None, :], other=0.0).to(tl.float32)
        A = tl.dot(q, tl.trans(k), input_precision="ieee")                            # [BT, BT]
        if HAS_G:
            g = tl.maximum(tl.load(g_ptr + row, mask=m, other=0.0).to(tl.float32), -1e4)
            # g shifted one row up (0 past the chunk's end): its reverse cumsum is sum_{s > j} g_s
            m1 = (rt + 1 < C) & (t + 1 < T)
            g1 = tl.maximum(tl.load(g_ptr + row + N, mask=m1, other=0.0).to(tl.float32), -1e4)
            G = tl.cumsum(g, 0)                                                        # sum_{s <= i}
            sfx = tl.cumsum(g1, 0, reverse=True)                                       # sum_{s > j}
            # X_ij = sum_{j < s <= i} g_s: a masked cumsum down the rows
            X = tl.cumsum(tl.where(rt[:, None] > rt[None, :], g[:, None], 0.0), 0)
            A = A * tl.exp(tl.where(tri, X, float("-inf")))
            o = tl.dot(A, v, input_precision="ieee")
            o += tl.dot(q * tl.exp(G)[:, None], S, input_precision="ieee")
            S = S * tl.exp(tl.sum(g, 0))
            S += tl.dot(tl.trans(k * tl.exp(sfx)[:, None]), v, input_precision="ieee")
        else:
            A = tl.where(tri, A, 0.0)
            o = tl.dot(A, v, input_precision="ieee")
            o += tl.dot(q, S, input_precision="ieee")
            S += tl.dot(tl.trans(k), v, input_precision="ieee")
        tl.store(o_ptr + row[:, None] * V + cv[None, :], o.to(o_ptr.dtype.element_ty), mask=m[:, None] & mv[None, :])
    tl.store(s_ptr + s_off, S.to(s_ptr.dtype.element_ty), mask=s_msk)


@triton.jit
def _triton_chunk_sub_decays(gf, ga, ga1, rt, rc, a, BC: tl.constexpr):
    """Sub-chunk a's decays from the chunk's gates gf [BT, D] and a's own, ga (its rows) and ga1 (the rows
    below, 0 past a's end), every exponent a direct sum of gates (<= 0): for rows i, j of a,
    (e^{G_i}, e^{G_i - G_na}, sum_{j < s <= e_a} g_s, e^{G_last - G_j}), n_a and e_a a's first and last rows."""
    before = tl.sum(tl.where(rt[:, None] < a * BC, gf, 0.0), 0)                       # sum_{s < n_a}
    after = tl.sum(tl.where(rt[:, None] >= (a + 1) * BC, gf, 0.0), 0)                 # sum_{s > e_a}
    sfx = tl.cumsum(ga1, 0, reverse=True)
    ein = tl.exp(tl.cumsum(ga, 0) + before[None, :])
    erel = tl.exp(tl.cumsum(tl.where(rc[:, None] > 0, ga, 0.0), 0))
    return ein, erel, sfx, tl.exp(sfx + after[None, :])


@triton.jit
def _triton_chunk_link(gf, rt, b, a, BC: tl.constexpr):
    """sum_{e_b < s <= n_a} g_s of the chunk's gates gf: what links sub-chunk b's last row to a later a's first."""
    return tl.sum(tl.where((rt[:, None] > (b + 1) * BC - 1) & (rt[:, None] <= a * BC), gf, 0.0), 0)


@triton.jit
def _triton_chunk_fwd_vector(q_ptr, k_ptr, v_ptr, gk_ptr, gv_ptr, h0_ptr, o_ptr, s_ptr, h_ptr, T, N, K, V, C,
                             GK: tl.constexpr, GV: tl.constexpr, HAS_H0: tl.constexpr, SAVE_H: tl.constexpr,
                             BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Per-key log-decay gk [T, N, K] (GK) and/or per-value log-decay gv [T, N, V] (GV), secondary chunking.
    With SAVE_H, the state entering each chunk goes to h [nt, N, K, V] (for the backward)."""
    i_n = tl.program_id(1)
    ck, cv, mk, mv, s_off, s_msk, S = _triton_chunk_block(h0_ptr, i_n, tl.program_id(0), K, V, HAS_H0, BK, BV)
    rt = tl.arange(0, BT)
    rc = tl.arange(0, BC)
    nt = tl.cdiv(T, C)
    for ic in range(nt):
        if SAVE_H:
            tl.store(h_ptr + tl.cast(ic * N, tl.int64) * K * V + s_off, S, mask=s_msk)
        t0 = ic * C
        # the whole chunk's gates, for the sums over whole sub-chunks (links, before, after, total)
        tf = t0 + rt
        mf = (rt < C) & (tf < T)
        rowf = tf.to(tl.int64) * N + i_n
        if GK:
            gkf = tl.load(gk_ptr + rowf[:, None] * K + ck[None, :], mask=mf[:, None] & mk[None, :], other=0.0)
            gkf = tl.maximum(gkf.to(tl.float32), -1e4)
        if GV:
            gvf = tl.load(gv_ptr + rowf[:, None] * V + cv[None, :], mask=mf[:, None] & mv[None, :], other=0.0)
            gvf = tl.maximum(gvf.to(tl.float32), -1e4)
        U = tl.zeros([BK, BV], dtype=tl.float32)
        for a in tl.static_range(BT // BC):
            rowa, ma, ma1 = _triton_chunk_rows(t0, a, rc, C, T, N, i_n, BC)
            qa = _triton_chunk_tile(q_ptr, rowa, ma, ck, mk, K)
            ka = _triton_chunk_tile(k_ptr, rowa, ma, ck, mk, K)
            va = _triton_chunk_tile(v_ptr, rowa, ma, cv, mv, V)
            qin = qa                                                                   # q_i e^{G_i}
            qrel = qa                                                                  # q_i e^{G_i - G_na}
            kout = ka                                                                  # k_j e^{G_last - G_j}
            vout = va                                                                  # v_j e^{Gv_last - Gv_j}
            if GK:
                ga = _triton_chunk_gate(gk_ptr, rowa, ma, ck, mk, K)
                ga1 = _triton_chunk_gate(gk_ptr, rowa + N, ma1, ck, mk, K)
                ein, erel, sfx, eout = _triton_chunk_sub_decays(gkf, ga, ga1, rt, rc, a, BC)
                qin = qa * ein
                qrel = qa * erel
                kout = ka * eout
            if GV:
                gva = _triton_chunk_gate(gv_ptr, rowa, ma, cv, mv, V)
                gva1 = _triton_chunk_gate(gv_ptr, rowa + N, ma1, cv, mv, V)
                einv, erelv, sfxv, eoutv = _triton_chunk_sub_decays(gvf, gva, gva1, rt, rc, a, BC)
                vout = va * eoutv

            # pairs in sub-chunks b < a, through the first row n_a of sub-chunk a
            off = tl.zeros([BC, BV], dtype=tl.float32)
            for b in tl.static_range(a):
                rowb, mb, mb1 = _triton_chunk_rows(t0, b, rc, C, T, N, i_n, BC)
                kb = _triton_chunk_tile(k_ptr, rowb, mb, ck, mk, K)
                vb = _triton_chunk_tile(v_ptr, rowb, mb, cv, mv, V)
                if GK:
                    gb1 = _triton_chunk_gate(gk_ptr, rowb + N, mb1, ck, mk, K)
                    lk = _triton_chunk_link(gkf, rt, b, a, BC)
                    kb = kb * tl.exp(tl.cumsum(gb1, 0, reverse=True) + lk[None, :])  # k_j e^{G_na - G_j}
                if GV:
                    gvb1 = _triton_chunk_gate(gv_ptr, rowb + N, mb1, cv, mv, V)
                    lv = _triton_chunk_link(gvf, rt, b, a, BC)
                    vb = vb * tl.exp(tl.cumsum(gvb1, 0, reverse=True) + lv[None, :])
                A = tl.dot(qrel, tl.trans(kb), input_precision="ieee")                 # [BC, BC]
                off += tl.dot(A, vb, input_precision="ieee")
            if GV:
                off = off * erelv

            # pairs inside sub-chunk a, row by row; X_j = sum_{j < s <= i} g_s carried from row to row.
            # Only the sub-chunk's valid rows (nd of them): the rest are zero steps, never stored
            nd = tl.minimum(tl.minimum(C - a * BC, T - (t0 + a * BC)), BC)
            if GV:
                diag = tl.zeros([BC, BV], dtype=tl.float32)
                Xv = tl.zeros([BC, BV], dtype=tl.float32)
                if GK:
                    X = tl.zeros([BC, BK], dtype=tl.float32)
                for i in range(nd):
                    ri = (t0 + a * BC + i) * N + i_n
                    mi = (a * BC + i < C) & (t0 + a * BC + i < T)
                    qi = tl.load(q_ptr + tl.cast(ri, tl.int64) * K + ck, mask=mk & mi, other=0.0).to(tl.float32)
                    if GK:
                        gi = tl.load(gk_ptr + tl.cast(ri, tl.int64) * K + ck, mask=mk & mi, other=0.0)
                        X = tl.where(rc[:, None] < i, X + tl.maximum(gi.to(tl.float32), -1e4)[None, :], 0.0)
                        ai = tl.sum(ka * tl.exp(tl.where(rc[:, None] <= i, X, float("-inf"))) * qi[None, :], 1)
                    else:
                        ai = tl.where(rc <= i, tl.sum(ka * qi[None, :], 1), 0.0)
                    gvi = tl.load(gv_ptr + tl.cast(ri, tl.int64) * V + cv, mask=mv & mi, other=0.0)
                    Xv = tl.where(rc[:, None] < i, Xv + tl.maximum(gvi.to(tl.float32), -1e4)[None, :], 0.0)
                    oi = tl.sum(ai[:, None] * tl.exp(tl.where(rc[:, None] <= i, Xv, float("-inf"))) * va, 0)
                    diag = tl.where(rc[:, None] == i, oi[None, :], diag)
            else:
                Ad = tl.zeros([BC, BC], dtype=tl.float32)
                X = tl.zeros([BC, BK], dtype=tl.float32)
                for i in range(nd):
                    ri = (t0 + a * BC + i) * N + i_n
                    mi = (a * BC + i < C) & (t0 + a * BC + i < T)
                    qi = tl.load(q_ptr + tl.cast(ri, tl.int64) * K + ck, mask=mk & mi, other=0.0).to(tl.float32)
                    gi = tl.load(gk_ptr + tl.cast(ri, tl.int64) * K + ck, mask=mk & mi, other=0.0)
                    X = tl.where(rc[:, None] < i, X + tl.maximum(gi.to(tl.float32), -1e4)[None, :], 0.0)
                    ai = tl.sum(ka * tl.exp(tl.where(rc[:, None] <= i, X, float("-inf"))) * qi[None, :], 1)
                    Ad = tl.where(rc[:, None] == i, ai[None, :], Ad)
                diag = tl.dot(Ad, va, input_precision="ieee")

            # the state entering the chunk
            inter = tl.dot(qin, S, input_precision="ieee")
            if GV:
                inter = inter * einv
            tl.store(o_ptr + rowa[:, None] * V + cv[None, :], (diag + off + inter).to(o_ptr.dtype.element_ty),
                     mask=ma[:, None] & mv[None, :])
            U += tl.dot(tl.trans(kout), vout, input_precision="ieee")
        if GK:
            S = S * tl.exp(tl.sum(gkf, 0))[:, None]
        if GV:
            S = S * tl.exp(tl.sum(gvf, 0))[None, :]
        S += U
    tl.store(s_ptr + s_off, S.to(s_ptr.dtype.element_ty), mask=s_msk)


@triton.jit
def _triton_chunk_saved(h_ptr, dh_ptr, block, K, V, BK: tl.constexpr, BV: tl.constexpr):
    """For a (chunk, row) backward program: all of K and V, and the [K, V] state entering the chunk (h)
    and the adjoint leaving it (dh) at `block` = chunk * N + row, float32 as the forward saved them."""
    ck = tl.arange(0, BK)
    cv = tl.arange(0, BV)
    mk = ck < K
    mv = cv < V
    s_off = tl.cast(block, tl.int64) * K * V + ck[:, None] * V + cv[None, :]
    s_msk = mk[:, None] & mv[None, :]
    return ck, cv, mk, mv, tl.load(h_ptr + s_off, mask=s_msk, other=0.0), tl.load(dh_ptr + s_off, mask=s_msk, other=0.0)


@triton.jit
def _triton_chunk_rows(t0, a, rc, C, T, N, i_n, BC: tl.constexpr):
    """Sub-chunk a of the chunk starting at t0: its rows' offsets, their mask, and the mask of the row
    below each (inside the sub-chunk) for the shifted gate loads."""
    ra = a * BC + rc
    ta = t0 + ra
    m = (ra < C) & (ta < T)
    m1 = (rc + 1 < BC) & (ra + 1 < C) & (ta + 1 < T)
    return ta.to(tl.int64) * N + i_n, m, m1


@triton.jit
def _triton_chunk_tile(ptr, row, m, cols, mcols, D):
    """Rows `row` (masked by m) of a [T, N, D] tensor, columns `cols` (masked by mcols), as float32."""
    return tl.load(ptr + row[:, None] * D + cols[None, :], mask=m[:, None] & mcols[None, :], other=0.0).to(tl.float32)


@triton.jit
def _triton_chunk_whole(q_ptr, k_ptr, v_ptr, do_ptr, row, m, ck, mk, cv, mv, K, V):
    """The chunk's q, k (K columns), v and do (V columns) tiles, for the log-decays' gradient."""
    return (_triton_chunk_tile(q_ptr, row, m, ck, mk, K), _triton_chunk_tile(k_ptr, row, m, ck, mk, K),
            _triton_chunk_tile(v_ptr, row, m, cv, mv, V), _triton_chunk_tile(do_ptr, row, m, cv, mv, V))


@triton.jit
def _triton_chunk_gate(ptr, row, m, cols, mcols, D):
    """A tile of log-decays, clamped at -1e4 (exp is 0 there in float32; -inf gates give no NaN)."""
    return tl.maximum(_triton_chunk_tile(ptr, row, m, cols, mcols, D), -1e4)


@triton.jit
def _triton_chunk_decay_grad(qs, ks, P, R, U, g1, kept, nd, rt):
    """One chunk's per-channel log-decay gradient [BT, BD], summed term by term (so nothing cancels: a
    gate whose every term passes a -inf gate or a zero state gets exactly 0). With the decayed state
    before step s, e^{g_s} S_{s-1}, and the adjoint of S_s:
      dg_s = sum_{i >= s} qs_i R_i  +  sum_{j < s} (ks_j U_j  +  ks_j sum_{i >= s} P_ij qs_i e^{G_i - G_j})  +  kept
    (the entering state read at rows i >= s; the update's rows j < s, kept to the chunk's end; pairs
    j < s <= i; the entering state kept through the chunk). Per-key decays: qs = q, ks = k, P_ij = do_i . v_j,
    R = (do S^T) e^G, U = (v dS^T) e^{G_last - G}; per-value decays swap the sides (qs = do, ks = v,
    P_ij = q_i . k_j, R = (q S) e^G, U = (k dS) e^{G_last - G}). g1: the gates one row down (g_{j+1}, 0
    past the chunk's end), clamped; nd: the chunk's valid rows. The pair sums go row by row, s from the
    last row up: F_j = sum_{i >= s} P_ij qs_i e^{G_i - G_j} gains row s, each exponent a direct sum
    sum_{j < r <= s} g_r masked to -inf for j >= s."""
    dg = tl.cumsum(qs * R, 0, reverse=True) + kept[None, :]
    w = ks * U
    F = tl.zeros_like(qs)
    for r in range(nd):
        s = nd - 1 - r
        early = rt[:, None] < s
        E = tl.exp(tl.where(early, tl.cumsum(tl.where(early, g1, 0.0), 0, reverse=True), float("-inf")))
        row = rt[:, None] == s
        p = tl.sum(tl.where(row, P, 0.0), 0)                                           # P_sj over j
        F += p[:, None] * tl.sum(tl.where(row, qs, 0.0), 0)[None, :] * E
        dg += tl.where(row, tl.sum(tl.where(early, ks * F + w, 0.0), 0)[None, :], 0.0)
    return dg


@triton.jit
def _triton_chunk_bwd_dh(q_ptr, g_ptr, do_ptr, ds_ptr, dh_ptr, dh0_ptr, T, N, K, V, C,
                         HAS_G: tl.constexpr, GK: tl.constexpr, GV: tl.constexpr, HAS_DS: tl.constexpr,
                         BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The state's adjoint, chunk by chunk in reverse: dh[ic] is the gradient of the state leaving
    chunk ic, dS_prev = e^{G_last} dS + (q e^G)^T do (a scalar g [T, N]; with GK per-key gk [T, N, K],
    with GV per-value gv [T, N, V] on the other side); dh0 the initial state's. One program per (V block, row)."""
    i_n = tl.program_id(1)
    ck, cv, mk, mv, s_off, s_msk, dS = _triton_chunk_block(ds_ptr, i_n, tl.program_id(0), K, V, HAS_DS, BK, BV)
    rt = tl.arange(0, BT)
    nt = tl.cdiv(T, C)
    for i in range(nt):
        ic = nt - 1 - i
        tl.store(dh_ptr + tl.cast(ic * N, tl.int64) * K * V + s_off, dS, mask=s_msk)
        t, m, row = _triton_chunk_steps(ic, rt, C, T, N, i_n)
        q = tl.load(q_ptr + row[:, None] * K + ck[None, :], mask=m[:, None] & mk[None, :], other=0.0).to(tl.float32)
        do = tl.load(do_ptr + row[:, None] * V + cv[None, :], mask=m[:, None] & mv[None, :], other=0.0).to(tl.float32)
        if GK:
            g = tl.load(g_ptr + row[:, None] * K + ck[None, :], mask=m[:, None] & mk[None, :], other=0.0)
            g = tl.maximum(g.to(tl.float32), -1e4)
            q = q * tl.exp(tl.cumsum(g, 0))
            dS = dS * tl.exp(tl.sum(g, 0))[:, None]
        elif GV:
            g = tl.load(g_ptr + row[:, None] * V + cv[None, :], mask=m[:, None] & mv[None, :], other=0.0)
            g = tl.maximum(g.to(tl.float32), -1e4)
            do = do * tl.exp(tl.cumsum(g, 0))
            dS = dS * tl.exp(tl.sum(g, 0))[None, :]
        elif HAS_G:
            g = tl.maximum(tl.load(g_ptr + row, mask=m, other=0.0).to(tl.float32), -1e4)
            q = q * tl.exp(tl.cumsum(g, 0))[:, None]
            dS = dS * tl.exp(tl.sum(g, 0))
        dS += tl.dot(tl.trans(q), do, input_precision="ieee")
    tl.store(dh0_ptr + s_off, dS, mask=s_msk)


@triton.jit
def _triton_chunk_bwd_scalar(q_ptr, k_ptr, v_ptr, g_ptr, h_ptr, dh_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, dg_ptr,
                             T, N, K, V, C, HAS_G: tl.constexpr,
                             BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """dq, dk, dv (and dg) of one chunk, from the states entering (h) and the adjoints leaving it (dh).
    One program per (chunk, row), all of K and V. With P = q k^T masked by the decays D_ij = e^{G_i - G_j}:
      dq = (do v^T * D) k + (do S^T) e^G          dk = (do v^T * D)^T q + (v dS^T) e^{G_last - G}
      dv = (P * D)^T do + (k e^{G_last - G}) dS
    and the log-decays' gradient dg (below; G_i = sum_{s <= i} g_s within the chunk)."""
    ic = tl.program_id(0)
    i_n = tl.program_id(1)
    ck, cv, mk, mv, S, dS = _triton_chunk_saved(h_ptr, dh_ptr, ic * N + i_n, K, V, BK, BV)
    rt = tl.arange(0, BT)
    tri = rt[:, None] >= rt[None, :]
    t, m, row = _triton_chunk_steps(ic, rt, C, T, N, i_n)
    mqk = m[:, None] & mk[None, :]
    mvv = m[:, None] & mv[None, :]
    q = tl.load(q_ptr + row[:, None] * K + ck[None, :], mask=mqk, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + row[:, None] * K + ck[None, :], mask=mqk, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + row[:, None] * V + cv[None, :], mask=mvv, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + row[:, None] * V + cv[None, :], mask=mvv, other=0.0).to(tl.float32)
    P = tl.dot(q, tl.trans(k), input_precision="ieee")                                # [BT, BT]
    dP = tl.dot(do, tl.trans(v), input_precision="ieee")                              # do_i . v_j
    if HAS_G:
        g = tl.maximum(tl.load(g_ptr + row, mask=m, other=0.0).to(tl.float32), -1e4)
        m1 = (rt + 1 < C) & (t + 1 < T)
        g1 = tl.maximum(tl.load(g_ptr + row + N, mask=m1, other=0.0).to(tl.float32), -1e4)
        eG = tl.exp(tl.cumsum(g, 0))                                                   # e^{G_i}
        eL = tl.exp(tl.cumsum(g1, 0, reverse=True))                                    # e^{G_last - G_j}
        X = tl.cumsum(tl.where(rt[:, None] > rt[None, :], g[:, None], 0.0), 0)
        D = tl.exp(tl.where(tri, X, float("-inf")))
    else:
        eG = tl.full([BT], 1.0, tl.float32)
        eL = eG
        D = tl.where(tri, 1.0, 0.0)
    A = P * D
    dA = dP * D
    qS = tl.dot(do, tl.trans(S), input_precision="ieee") * eG[:, None]               # the inter-chunk readout's part
    vS = tl.dot(v, tl.trans(dS), input_precision="ieee") * eL[:, None]               # the state update's part
    dq = tl.dot(dA, k, input_precision="ieee") + qS
    dk = tl.dot(tl.trans(dA), q, input_precision="ieee") + vS
    dv = tl.dot(tl.trans(A), do, input_precision="ieee") + tl.dot(k * eL[:, None], dS, input_precision="ieee")
    tl.store(dq_ptr + row[:, None] * K + ck[None, :], dq, mask=mqk)
    tl.store(dk_ptr + row[:, None] * K + ck[None, :], dk, mask=mqk)
    tl.store(dv_ptr + row[:, None] * V + cv[None, :], dv, mask=mvv)
    if HAS_G:
        # dg_s = sum_{i >= s} dG_i, summed term by term so nothing cancels (a step with no effect gets exactly 0):
        # pairs (i >= s > j) of the intra-chunk part, the readouts of the entering state at rows i >= s, the
        # update's terms of rows j < s, and the decay of the entering state over the whole chunk
        before = rt[None, :] < rt[:, None]                                             # [s, j]: j < s
        M = tl.where(rt[:, None] > rt[None, :], dP * A, 0.0)
        intra = tl.sum(tl.where(before, tl.cumsum(M, 0, reverse=True), 0.0), 1)
        inter = tl.cumsum(tl.sum(q * qS, 1), 0, reverse=True)
        w = tl.sum(k * vS, 1)
        early = tl.sum(tl.where(before, w[None, :], 0.0), 1)
        kept = tl.exp(tl.sum(g, 0)) * tl.sum(tl.sum(S * dS, 1), 0)
        tl.store(dg_ptr + row, intra + inter + early + kept, mask=m)


@triton.jit
def _triton_chunk_bwd_key(q_ptr, k_ptr, v_ptr, g_ptr, h_ptr, dh_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, dg_ptr,
                          T, N, K, V, C, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """dq, dk, dv and dgk of one chunk under per-key log-decays gk [T, N, K], one program per (chunk, row),
    all of K and V, with the forward's secondary chunking: for rows i in sub-chunk a and j in sub-chunk b < a,
    e^{G_i - G_j} = e^{G_i - G_na} e^{G_na - G_j} through a's first row n_a (both exponents <= 0), so
      dq_a += ((do_a v_b^T) (k_b e^{G_na - G_b})) e^{G_a - G_na}
      dk_b += ((do_a v_b^T)^T (q_a e^{G_a - G_na})) e^{G_na - G_b},   dv_b += A_ab^T do_a;
    pairs inside a sub-chunk go row by row (exponents sum_{j < s <= i} g_s carried, masked to -inf for
    j > i before exp), and the entering state S and leaving adjoint dS add
      dq += (do S^T) e^G,  dk += (v dS^T) e^{G_last - G},  dv += (k e^{G_last - G}) dS."""
    ic = tl.program_id(0)
    i_n = tl.program_id(1)
    ck, cv, mk, mv, S, dS = _triton_chunk_saved(h_ptr, dh_ptr, ic * N + i_n, K, V, BK, BV)
    rt = tl.arange(0, BT)
    rc = tl.arange(0, BC)
    t0 = ic * C
    tf = t0 + rt
    gkf = _triton_chunk_gate(g_ptr, tf.to(tl.int64) * N + i_n, (rt < C) & (tf < T), ck, mk, K)
    for a in tl.static_range(BT // BC):
        rowa, ma, ma1 = _triton_chunk_rows(t0, a, rc, C, T, N, i_n, BC)
        ka = _triton_chunk_tile(k_ptr, rowa, ma, ck, mk, K)
        va = _triton_chunk_tile(v_ptr, rowa, ma, cv, mv, V)
        doa = _triton_chunk_tile(do_ptr, rowa, ma, cv, mv, V)
        ga = _triton_chunk_gate(g_ptr, rowa, ma, ck, mk, K)
        ga1 = _triton_chunk_gate(g_ptr, rowa + N, ma1, ck, mk, K)
        ein, erel, sfx, eout = _triton_chunk_sub_decays(gkf, ga, ga1, rt, rc, a, BC)
        dqa = tl.dot(doa, tl.trans(S), input_precision="ieee") * ein
        dka = tl.dot(va, tl.trans(dS), input_precision="ieee") * eout
        dva = tl.dot(ka * eout, dS, input_precision="ieee")
        for b in tl.static_range(BT // BC):
            rowb, mb, mb1 = _triton_chunk_rows(t0, b, rc, C, T, N, i_n, BC)
            if b < a:  # a is the query side: k_b e^{G_na - G_j}, with e_b < s <= n_a linking them
                kb = _triton_chunk_tile(k_ptr, rowb, mb, ck, mk, K)
                vb = _triton_chunk_tile(v_ptr, rowb, mb, cv, mv, V)
                gb1 = _triton_chunk_gate(g_ptr, rowb + N, mb1, ck, mk, K)
                kb = kb * tl.exp(tl.cumsum(gb1, 0, reverse=True) + _triton_chunk_link(gkf, rt, b, a, BC)[None, :])
                dP = tl.dot(doa, tl.trans(vb), input_precision="ieee")                # [BC_a, BC_b]
                dqa += tl.dot(dP, kb, input_precision="ieee") * erel
            if b > a:  # a is the key side: q_b e^{G_i - G_nb} and k_a e^{G_nb - G_j}
                qb = _triton_chunk_tile(q_ptr, rowb, mb, ck, mk, K)
                dob = _triton_chunk_tile(do_ptr, rowb, mb, cv, mv, V)
                gb = _triton_chunk_gate(g_ptr, rowb, mb, ck, mk, K)
                qb = qb * tl.exp(tl.cumsum(tl.where(rc[:, None] > 0, gb, 0.0), 0))
                ea = tl.exp(sfx + _triton_chunk_link(gkf, rt, a, b, BC)[None, :])     # e^{G_nb - G_j}
                dP = tl.dot(dob, tl.trans(va), input_precision="ieee")                # [BC_b, BC_a]
                dka += tl.dot(tl.trans(dP), qb, input_precision="ieee") * ea
                A = tl.dot(qb, tl.trans(ka * ea), input_precision="ieee")
                dva += tl.dot(tl.trans(A), dob, input_precision="ieee")
        # pairs inside sub-chunk a, row by row over its valid rows
        nd = tl.minimum(tl.minimum(C - a * BC, T - (t0 + a * BC)), BC)
        X = tl.zeros([BC, BK], dtype=tl.float32)
        for i in range(nd):
            ri = tl.cast((t0 + a * BC + i) * N + i_n, tl.int64)
            qi = tl.load(q_ptr + ri * K + ck, mask=mk, other=0.0).to(tl.float32)
            doi = tl.load(do_ptr + ri * V + cv, mask=mv, other=0.0).to(tl.float32)
            gi = tl.maximum(tl.load(g_ptr + ri * K + ck, mask=mk, other=0.0).to(tl.float32), -1e4)
            X = tl.where(rc[:, None] < i, X + gi[None, :], 0.0)
            E = tl.exp(tl.where(rc[:, None] <= i, X, float("-inf")))                  # e^{G_i - G_j}, j <= i
            dp = tl.sum(va * doi[None, :], 1)                                          # do_i . v_j
            dqa += tl.where(rc[:, None] == i, tl.sum(dp[:, None] * ka * E, 0)[None, :], 0.0)
            dka += dp[:, None] * qi[None, :] * E
            dva += tl.sum(ka * E * qi[None, :], 1)[:, None] * doi[None, :]
        tl.store(dq_ptr + rowa[:, None] * K + ck[None, :], dqa, mask=ma[:, None] & mk[None, :])
        tl.store(dk_ptr + rowa[:, None] * K + ck[None, :], dka, mask=ma[:, None] & mk[None, :])
        tl.store(dv_ptr + rowa[:, None] * V + cv[None, :], dva, mask=ma[:, None] & mv[None, :])
    # the log-decays' gradient over the whole chunk (_triton_chunk_decay_grad)
    rowf, mf = tf.to(tl.int64) * N + i_n, (rt < C) & (tf < T)
    qf, kf, vf, dof = _triton_chunk_whole(q_ptr, k_ptr, v_ptr, do_ptr, rowf, mf, ck, mk, cv, mv, K, V)
    g1f = _triton_chunk_gate(g_ptr, rowf + N, (rt + 1 < C) & (tf + 1 < T), ck, mk, K)
    R = tl.dot(dof, tl.trans(S), input_precision="ieee") * tl.exp(tl.cumsum(gkf, 0))
    U = tl.dot(vf, tl.trans(dS), input_precision="ieee") * tl.exp(tl.cumsum(g1f, 0, reverse=True))
    kept = tl.exp(tl.sum(gkf, 0)) * tl.sum(S * dS, 1)
    dg = _triton_chunk_decay_grad(qf, kf, tl.dot(dof, tl.trans(vf), input_precision="ieee"), R, U, g1f, kept,
                                  tl.minimum(C, T - t0), rt)
    tl.store(dg_ptr + rowf[:, None] * K + ck[None, :], dg, mask=mf[:, None] & mk[None, :])


@triton.jit
def _triton_chunk_bwd_value(q_ptr, k_ptr, v_ptr, g_ptr, h_ptr, dh_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, dg_ptr,
                            T, N, K, V, C, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """dq, dk, dv and dgv of one chunk under per-value log-decays gv [T, N, V]: `_triton_chunk_bwd_key` with the
    decay on the value side. With M_ij = (do_i e^{Gv_i - Gv_j}) . v_j and P_ij = q_i . k_j (j <= i):
      dq_i = sum_j M_ij k_j + S (do_i e^{Gv_i}),   dk_j = sum_i M_ij q_i + dS (v_j e^{Gv_last - Gv_j}),
      dv_j = sum_i P_ij do_i e^{Gv_i - Gv_j} + (dS^T k_j) e^{Gv_last - Gv_j},
    pairs across sub-chunks through the later sub-chunk's first row (exponents <= 0), pairs inside one
    row by row."""
    ic = tl.program_id(0)
    i_n = tl.program_id(1)
    ck, cv, mk, mv, S, dS = _triton_chunk_saved(h_ptr, dh_ptr, ic * N + i_n, K, V, BK, BV)
    rt = tl.arange(0, BT)
    rc = tl.arange(0, BC)
    t0 = ic * C
    tf = t0 + rt
    gvf = _triton_chunk_gate(g_ptr, tf.to(tl.int64) * N + i_n, (rt < C) & (tf < T), cv, mv, V)
    for a in tl.static_range(BT // BC):
        rowa, ma, ma1 = _triton_chunk_rows(t0, a, rc, C, T, N, i_n, BC)
        ka = _triton_chunk_tile(k_ptr, rowa, ma, ck, mk, K)
        va = _triton_chunk_tile(v_ptr, rowa, ma, cv, mv, V)
        doa = _triton_chunk_tile(do_ptr, rowa, ma, cv, mv, V)
        ga = _triton_chunk_gate(g_ptr, rowa, ma, cv, mv, V)
        ga1 = _triton_chunk_gate(g_ptr, rowa + N, ma1, cv, mv, V)
        ein, erel, sfx, eout = _triton_chunk_sub_decays(gvf, ga, ga1, rt, rc, a, BC)
        dqa = tl.dot(doa * ein, tl.trans(S), input_precision="ieee")
        dka = tl.dot(va * eout, tl.trans(dS), input_precision="ieee")
        dva = tl.dot(ka, dS, input_precision="ieee") * eout
        dor = doa * erel                                                               # do_i e^{Gv_i - Gv_na}
        for b in tl.static_range(BT // BC):
            rowb, mb, mb1 = _triton_chunk_rows(t0, b, rc, C, T, N, i_n, BC)
            if b < a:  # a is the query side: v_b e^{Gv_na - Gv_j}, with e_b < s <= n_a linking them
                kb = _triton_chunk_tile(k_ptr, rowb, mb, ck, mk, K)
                vb = _triton_chunk_tile(v_ptr, rowb, mb, cv, mv, V)
                gb1 = _triton_chunk_gate(g_ptr, rowb + N, mb1, cv, mv, V)
                vb = vb * tl.exp(tl.cumsum(gb1, 0, reverse=True) + _triton_chunk_link(gvf, rt, b, a, BC)[None, :])
                dqa += tl.dot(tl.dot(dor, tl.trans(vb), input_precision="ieee"), kb, input_precision="ieee")
            if b > a:  # a is the key side: do_b e^{Gv_i - Gv_nb} and v_a e^{Gv_nb - Gv_j}
                qb = _triton_chunk_tile(q_ptr, rowb, mb, ck, mk, K)
                dob = _triton_chunk_tile(do_ptr, rowb, mb, cv, mv, V)
                gb = _triton_chunk_gate(g_ptr, rowb, mb, cv, mv, V)
                dorb = dob * tl.exp(tl.cumsum(tl.where(rc[:, None] > 0, gb, 0.0), 0))
                ea = tl.exp(sfx + _triton_chunk_link(gvf, rt, a, b, BC)[None, :])     # e^{Gv_nb - Gv_j}
                Mba = tl.dot(dorb, tl.trans(va * ea), input_precision="ieee")         # [BC_b, BC_a]
                dka += tl.dot(tl.trans(Mba), qb, input_precision="ieee")
                Pba = tl.dot(qb, tl.trans(ka), input_precision="ieee")
                dva += tl.dot(tl.trans(Pba), dorb, input_precision="ieee") * ea
        # pairs inside sub-chunk a, row by row over its valid rows
        nd = tl.minimum(tl.minimum(C - a * BC, T - (t0 + a * BC)), BC)
        X = tl.zeros([BC, BV], dtype=tl.float32)
        for i in range(nd):
            ri = tl.cast((t0 + a * BC + i) * N + i_n, tl.int64)
            qi = tl.load(q_ptr + ri * K + ck, mask=mk, other=0.0).to(tl.float32)
            doi = tl.load(do_ptr + ri * V + cv, mask=mv, other=0.0).to(tl.float32)
            gi = tl.maximum(tl.load(g_ptr + ri * V + cv, mask=mv, other=0.0).to(tl.float32), -1e4)
            X = tl.where(rc[:, None] < i, X + gi[None, :], 0.0)
            E = tl.exp(tl.where(rc[:, None] <= i, X, float("-inf")))                  # e^{Gv_i - Gv_j}, j <= i
            mij = tl.sum(va * E * doi[None, :], 1)                                     # M_ij over j
            dqa += tl.where(rc[:, None] == i, tl.sum(mij[:, None] * ka, 0)[None, :], 0.0)
            dka += mij[:, None] * qi[None, :]
            dva += tl.sum(ka * qi[None, :], 1)[:, None] * doi[None, :] * E
        tl.store(dq_ptr + rowa[:, None] * K + ck[None, :], dqa, mask=ma[:, None] & mk[None, :])
        tl.store(dk_ptr + rowa[:, None] * K + ck[None, :], dka, mask=ma[:, None] & mk[None, :])
        tl.store(dv_ptr + rowa[:, None] * V + cv[None, :], dva, mask=ma[:, None] & mv[None, :])
    # the log-decays' gradient over the whole chunk (_triton_chunk_decay_grad, the sides swapped)
    rowf, mf = tf.to(tl.int64) * N + i_n, (rt < C) & (tf < T)
    qf, kf, vf, dof = _triton_chunk_whole(q_ptr, k_ptr, v_ptr, do_ptr, rowf, mf, ck, mk, cv, mv, K, V)
    g1f = _triton_chunk_gate(g_ptr, rowf + N, (rt + 1 < C) & (tf + 1 < T), cv, mv, V)
    R = tl.dot(qf, S, input_precision="ieee") * tl.exp(tl.cumsum(gvf, 0))
    U = tl.dot(kf, dS, input_precision="ieee") * tl.exp(tl.cumsum(g1f, 0, reverse=True))
    kept = tl.exp(tl.sum(gvf, 0)) * tl.sum(S * dS, 0)
    dg = _triton_chunk_decay_grad(dof, vf, tl.dot(qf, tl.trans(kf), input_precision="ieee"), R, U, g1f, kept,
                                  tl.minimum(C, T - t0), rt)
    tl.store(dg_ptr + rowf[:, None] * V + cv[None, :], dg, mask=mf[:, None] & mv[None, :])


def _triton_chunk_channel_backward(q, k, v, g, h, do, dS, C, key):
    """Launch the backward of per-key (key=True, g = gk [T, N, K]) or per-value (g = gv [T, N, V]) decays:
    (dq, dk, dv, dg, dh0) in float32, dg summed term by term in the kernel (_triton_chunk_decay_grad)."""
    T, N, K = q.shape
    V = v.shape[-1]
    BT, BK, BV = _triton_chunk_blocks(C, K, V)
    nt = triton.cdiv(T, C)
    do = do.contiguous()
    f32 = dict(dtype=torch.float32, device=q.device)
    dh, dh0 = torch.empty(nt, N, K, V, **f32), torch.empty(N, K, V, **f32)
    torch.library.wrap_triton(_triton_chunk_bwd_dh)[(triton.cdiv(V, BV), N)](
        q, g, do, do if dS is None else dS.contiguous(), dh, dh0, T, N, K, V, C,
        HAS_G=True, GK=key, GV=not key, HAS_DS=dS is not None, BT=BT, BK=BK, BV=BV)
    dq, dk, dv = torch.empty(T, N, K, **f32), torch.empty(T, N, K, **f32), torch.empty(T, N, V, **f32)
    dg = torch.empty(g.shape, **f32)
    kernel = _triton_chunk_bwd_key if key else _triton_chunk_bwd_value
    torch.library.wrap_triton(kernel)[(nt, N)](q, k, v, g, h, dh, do, dq, dk, dv, dg, T, N, K, V, C, BT=BT, BC=16,
                                               BK=BK, BV=triton.next_power_of_2(max(int(V), 16)))   # all of V
    return dq, dk, dv, dg, dh0


def _triton_chunk_scalar_backward(q, k, v, g, h, do, dS, C):
    """Launch the backward kernels of the no-decay / scalar-decay form: (dq, dk, dv, dg, dh0) in float32."""
    T, N, K = q.shape
    V = v.shape[-1]
    BT, BK, BV = _triton_chunk_blocks(C, K, V)
    nt = triton.cdiv(T, C)
    do = do.contiguous()
    dh = torch.empty(nt, N, K, V, dtype=torch.float32, device=q.device)
    dh0 = torch.empty(N, K, V, dtype=torch.float32, device=q.device)
    gc = q if g is None else g
    torch.library.wrap_triton(_triton_chunk_bwd_dh)[(triton.cdiv(V, BV), N)](
        q, gc, do, do if dS is None else dS.contiguous(), dh, dh0, T, N, K, V, C,
        HAS_G=g is not None, GK=False, GV=False, HAS_DS=dS is not None, BT=BT, BK=BK, BV=BV)
    dq, dk = (torch.empty(T, N, K, dtype=torch.float32, device=q.device) for _ in range(2))
    dv = torch.empty(T, N, V, dtype=torch.float32, device=q.device)
    dg = torch.empty(T, N, dtype=torch.float32, device=q.device)
    BVF = triton.next_power_of_2(max(int(V), 16))                                      # all of V in one program
    torch.library.wrap_triton(_triton_chunk_bwd_scalar)[(nt, N)](q, k, v, gc, h, dh, do, dq, dk, dv, dg, T, N, K, V, C,
                                                             HAS_G=g is not None, BT=BT, BK=BK, BV=BVF)
    return dq, dk, dv, dg, dh0


def _triton_chunk_forward(q, k, v, gk, gv, h0, C, save_h=False):
    """Launch the kernels (no autograd). Folded gates only: gk [T, N, K] or [T, N, 1] or None, gv [T, N, V] or
    None. With save_h, also the state entering each chunk, [nt, N, K, V] float32."""
    T, N, K = q.shape
    V = v.shape[-1]
    BT, BK, BV = _triton_chunk_blocks(C, K, V)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty(T, N, V, dtype=q.dtype, device=q.device)
    S = torch.empty(N, K, V, dtype=q.dtype, device=q.device)
    h = torch.empty(triton.cdiv(T, C), N, K, V, dtype=torch.float32, device=q.device) if save_h else None
    h0c = q if h0 is None else h0.contiguous()                                         # a dummy pointer when absent
    grid = (triton.cdiv(V, BV), N)
    if _triton_chunk_is_scalar(gk, gv):
        g = q if gk is None else gk.contiguous()
        torch.library.wrap_triton(_triton_chunk_fwd_scalar)[grid](
            q, k, v, g, h0c, o, S, q if h is None else h, T, N, K, V, C,
            HAS_G=gk is not None, HAS_H0=h0 is not None, SAVE_H=save_h, BT=BT, BK=BK, BV=BV)
    else:
        gkc = q if gk is None else gk.contiguous()
        gvc = q if gv is None else gv.contiguous()
        torch.library.wrap_triton(_triton_chunk_fwd_vector)[grid](
            q, k, v, gkc, gvc, h0c, o, S, q if h is None else h, T, N, K, V, C,
            GK=gk is not None, GV=gv is not None, HAS_H0=h0 is not None, SAVE_H=save_h, BT=BT, BC=16, BK=BK, BV=BV)
    return o, S, h


def _triton_chunk_is_scalar(gk, gv):
    """No decay or one scalar decay per step."""
    return gv is None and (gk is None or gk.shape[-1] == 1)


def _triton_chunk_kind(gk, gv):
    """Which Triton backward a forward's decays take: "scalar" (none or scalar), "key", "value", or None
    (per-key and per-value together: recomputed with the PyTorch `_chunk_linear`)."""
    if gk is not None and gv is not None:
        return None
    return "value" if gv is not None else "scalar" if _triton_chunk_is_scalar(gk, gv) else "key"


def _triton_chunk_forward_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor | None,
                                 gv: torch.Tensor | None, h0: torch.Tensor | None, C: int,
                                 save_h: bool) -> list[torch.Tensor]:
    """The op rnnc::triton_chunk_forward: [o, S_T, the state entering each chunk, flat (empty unless
    save_h): a [ceil(T / C), ...] shape would make a compiler specialise T to one chunk when it traces
    a short sequence (its size-1 guard); the backward kernels read it by pointer]."""
    o, S, h = _triton_chunk_forward(q, k, v, gk, gv, h0, C, save_h)
    return [o, S, q.new_empty(0, dtype=torch.float32) if h is None else h.view(-1)]


def _triton_chunk_forward_fake(q, k, v, gk, gv, h0, C, save_h):
    T, N, K = q.shape
    V = v.shape[-1]
    h = q.new_empty((((T + C - 1) // C) * N * K * V,) if save_h else (0,), dtype=torch.float32)
    return [q.new_empty(T, N, V), q.new_empty(N, K, V), h]


def _triton_chunk_backward_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                                  h: torch.Tensor, do: torch.Tensor, dS: torch.Tensor | None, C: int,
                                  kind: str) -> list[torch.Tensor]:
    """The op rnnc::triton_chunk_backward: [dq, dk, dv, dg, dh0] in float32 for `kind` "scalar" (g [T, N]
    or None), "key" (g = gk) or "value" (g = gv)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g = None if g is None else g.contiguous()
    if kind == "scalar":
        return list(_triton_chunk_scalar_backward(q, k, v, g, h, do, dS, C))
    return list(_triton_chunk_channel_backward(q, k, v, g, h, do, dS, C, kind == "key"))


def _triton_chunk_backward_fake(q, k, v, g, h, do, dS, C, kind):
    T, N, K = q.shape
    V = v.shape[-1]
    f32 = dict(dtype=torch.float32)
    dg = q.new_empty((T, N) if kind == "scalar" else g.shape, **f32)
    return [q.new_empty(T, N, K, **f32), q.new_empty(T, N, K, **f32), q.new_empty(T, N, V, **f32), dg,
            q.new_empty(N, K, V, **f32)]


def _triton_chunk_setup(ctx, inputs, output):
    q, k, v, gk, gv, h0, C, _ = inputs
    ctx.chunk, ctx.kind = C, _triton_chunk_kind(gk, gv)
    ctx.save_for_backward(q, k, v, gk, gv, h0, *([] if ctx.kind is None else [output[2]]))


def _triton_chunk_gradient(ctx, grads):
    """The forward op's backward: the Triton backward kernels (through rnnc::triton_chunk_backward), or
    for per-key and per-value decays together the PyTorch chunk form recomputed under autograd."""
    do, dS, _ = grads
    if ctx.kind is None:
        return (*_chunk_recompute_backward(_chunk_linear, ctx, do, dS), None)
    q, k, v, gk, gv, h0, h = ctx.saved_tensors
    g = gv if ctx.kind == "value" else None if gk is None else gk.reshape(gk.shape[0], -1) \
        if ctx.kind == "scalar" else gk
    dq, dk, dv, dg, dh0 = _TRITON_CHUNK_BACKWARD(q, k, v, g, h, do.contiguous(), dS, ctx.chunk, ctx.kind)
    dgk = dgv = None
    if ctx.kind == "value":
        dgv = dg
    elif gk is not None:
        dgk = dg.view_as(gk)
    grads = (dq, dk, dv, dgk, dgv, None if h0 is None else dh0)
    return (*[None if d is None or not n else d.to(x.dtype)
              for d, n, x in zip(grads, ctx.needs_input_grad, (q, k, v, gk, gv, h0))], None, None)


#: The launchers as ops (rnnc/runtime/triton_launch.py, _kernel_op): torch.compile records one node each.
_TRITON_CHUNK_BACKWARD = _kernel_op("triton_chunk_backward", _triton_chunk_backward_launch, _triton_chunk_backward_fake)
_TRITON_CHUNK_FORWARD = _kernel_op("triton_chunk_forward", _triton_chunk_forward_launch, _triton_chunk_forward_fake,
                                   _triton_chunk_gradient, _triton_chunk_setup)


def _triton_chunk_linear(q, k, v, gk, gv, h0, chunk, before=False):
    """Drop-in for `_chunk_linear` (same arguments, semantics, returns): forward in Triton, backward by the
    PyTorch chunk form. float64 (and T == 0) go to `_chunk_linear` itself."""
    T, N, K = q.shape
    C = int(chunk)
    if T == 0 or q.dtype == torch.float64:
        return _chunk_linear(q, k, v, gk, gv, h0, C, before)
    if before:
        return _chunk_empty_or_before(_triton_chunk_linear, q, h0, v.shape[-1], k, v, gk, gv, h0, C)
    gk, gv = _chunk_fold_scalar(gk, gv)
    save = torch.is_grad_enabled() and _triton_chunk_kind(gk, gv) is not None and any(
        x is not None and x.requires_grad for x in (q, k, v, gk, gv, h0))
    o, S, _ = _TRITON_CHUNK_FORWARD(q, k, v, gk, gv, h0, C, save)
    return o, S
