"""Chunkwise (gated) delta rule in Triton: the forward of backends/chunk_ops.py's _chunk_delta as a kernel.

Forward in Triton, backward by the PyTorch chunk form: `_triton_delta_chunk(q, k, v, beta, g, h0, chunk,
before=False)` has the arguments, semantics and return value of `_chunk_delta` (read its docstring):
S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, o_t = S_t^T q_t (before=True: S_{t-1}^T q_t),
time-major q, k: [T, N, K], v: [T, N, V], beta: [T, N], g: [T, N] (scalar log-decay) or None, h0:
[N, K, V] or None; returns (o [T, N, V], S_T [N, K, V]). The forward runs the kernel below; the backward
(a torch.autograd.Function) recomputes the outputs with the PyTorch `_chunk_delta` under autograd and
returns its gradients, so gradients are exactly chunk_ops's.

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
Numerics follow chunk_ops.py: every exponent is <= 0 and a direct sum of gates (a cumsum inside the
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

Not done in Triton: float64 inputs fall back to the PyTorch `_chunk_delta`, as does T == 0; the
backward is PyTorch (above). float16/bfloat16 inputs run the kernel (upcast on load) and are recomputed
in float32 by the backward, gradients cast back to the input dtypes.

Paste contract (like chunk_ops.py and triton_chunk.py): generated standalone modules paste this file's
source from its first top-level `def` on (the first definition is a plain function, not a kernel, so
no decorator is cut off), right after chunk_ops.py's body. Every name starts with `_triton_delta`; there
are no other globals. The pasted body refers to `_chunk_delta` and `_chunk_readout_before` by name,
which the pasted chunk_ops body defines; in this file the header's relative import provides them (and
the extraction drops the header, so the pasted code needs only torch, triton and tl).
"""
import torch
import triton
import triton.language as tl

from .chunk_ops import _chunk_delta, _chunk_readout_before, _chunk_recompute_backward


def _triton_delta_blocks(C, K, V):
    """(BT, BK, BV) block sizes: powers of two, at least 16 (tl.dot's minimum); BV at most 64."""
    BT = triton.next_power_of_2(max(int(C), 16))
    BK = triton.next_power_of_2(max(int(K), 16))
    BV = min(triton.next_power_of_2(max(int(V), 16)), 64)
    return BT, BK, BV


@triton.jit
def _triton_delta_fwd(q_ptr, k_ptr, v_ptr, b_ptr, g_ptr, h0_ptr, o_ptr, s_ptr, T, N, K, V, C,
                      HAS_G: tl.constexpr, HAS_H0: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Gated (HAS_G: scalar log-decay g [T, N]) or plain delta rule; one program per (V block, row n)."""
    i_v = tl.program_id(0)
    i_n = tl.program_id(1)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    mk = ck < K
    mv = cv < V
    rt = tl.arange(0, BT)
    tri = rt[:, None] >= rt[None, :]
    strict = rt[:, None] > rt[None, :]
    eye = tl.where(rt[:, None] == rt[None, :], 1.0, 0.0)
    s_off = (i_n * K + ck[:, None]).to(tl.int64) * V + cv[None, :]
    s_msk = mk[:, None] & mv[None, :]
    if HAS_H0:
        S = tl.load(h0_ptr + s_off, mask=s_msk, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    nt = tl.cdiv(T, C)
    for ic in range(nt):
        t = ic * C + rt
        m = (rt < C) & (t < T)
        row = t.to(tl.int64) * N + i_n
        mqk = m[:, None] & mk[None, :]
        q = tl.load(q_ptr + row[:, None] * K + ck[None, :], mask=mqk, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + row[:, None] * K + ck[None, :], mask=mqk, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + row[:, None] * V + cv[None, :], mask=m[:, None] & mv[None, :], other=0.0).to(tl.float32)
        b = tl.load(b_ptr + row, mask=m, other=0.0).to(tl.float32)
        KK = tl.dot(k * b[:, None], tl.trans(k), input_precision="ieee")             # b_i k_i . k_j
        QK = tl.dot(q, tl.trans(k), input_precision="ieee")
        if HAS_G:
            g = tl.maximum(tl.load(g_ptr + row, mask=m, other=0.0).to(tl.float32), -1e4)
            G = tl.cumsum(g, 0)                                                        # sum_{s <= i}
            sfx = tl.sum(tl.where(rt[None, :] > rt[:, None], g[None, :], 0.0), 1)      # sum_{s > j}
            # X_ij = sum_{j < s <= i} g_s: a masked cumsum down the rows, -inf above the diagonal
            X = tl.cumsum(tl.where(strict, g[:, None], 0.0), 0)
            Gam = tl.exp(tl.where(tri, X, float("-inf")))
            eG = tl.exp(G)
            A = tl.where(strict, KK * Gam, 0.0)
            Aqk = QK * Gam
            rw = k * (b * eG)[:, None]
            qg = q * eG[:, None]
            kg = k * tl.exp(sfx)[:, None]
        else:
            A = tl.where(strict, KK, 0.0)
            Aqk = tl.where(tri, QK, 0.0)
            rw = k * b[:, None]
            qg = q
            kg = k
        # Ti = (I + A)^{-1} by forward substitution: row i <- e_i - sum_{j < i} A_ij Ti_j (rows j < i done)
        Ti = eye
        nd = tl.minimum(C, T - ic * C)
        for i in range(1, nd):
            sel = rt[:, None] == i
            a = tl.sum(tl.where(sel, A, 0.0), 0)                                       # A_i. (zero for j >= i)
            ti = tl.where(rt == i, 1.0, 0.0) - tl.sum(a[:, None] * Ti, 0)
            Ti = tl.where(sel, ti[None, :], Ti)
        W = tl.dot(Ti, rw, input_precision="ieee")                                    # [BT, BK]
        U = tl.dot(Ti, v * b[:, None], input_precision="ieee")                         # [BT, BV]
        D = U - tl.dot(W, S, input_precision="ieee")
        o = tl.dot(qg, S, input_precision="ieee") + tl.dot(Aqk, D, input_precision="ieee")
        if HAS_G:
            S = S * tl.exp(tl.sum(g, 0))
        S += tl.dot(tl.trans(kg), D, input_precision="ieee")
        tl.store(o_ptr + row[:, None] * V + cv[None, :], o.to(o_ptr.dtype.element_ty), mask=m[:, None] & mv[None, :])
    tl.store(s_ptr + s_off, S.to(s_ptr.dtype.element_ty), mask=s_msk)


def _triton_delta_forward(q, k, v, beta, g, h0, C):
    """Launch the kernel (no autograd)."""
    T, N, K = q.shape
    V = v.shape[-1]
    BT, BK, BV = _triton_delta_blocks(C, K, V)
    q, k, v, beta = q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous()
    o = torch.empty(T, N, V, dtype=q.dtype, device=q.device)
    S = torch.empty(N, K, V, dtype=q.dtype, device=q.device)
    h0c = q if h0 is None else h0.contiguous()                                         # a dummy pointer when absent
    gc = q if g is None else g.contiguous()
    grid = (triton.cdiv(V, BV), N)
    _triton_delta_fwd[grid](q, k, v, beta, gc, h0c, o, S, T, N, K, V, C,
                            HAS_G=g is not None, HAS_H0=h0 is not None, BT=BT, BK=BK, BV=BV)
    return o, S


class _triton_delta_function(torch.autograd.Function):
    """Forward: the Triton kernel. Backward: recompute with the PyTorch `_chunk_delta` and differentiate it."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, h0, C):
        ctx.save_for_backward(q, k, v, beta, g, h0)
        ctx.chunk = C
        return _triton_delta_forward(q, k, v, beta, g, h0, C)

    @staticmethod
    def backward(ctx, do, dS):
        return _chunk_recompute_backward(_chunk_delta, ctx, do, dS)


def _triton_delta_chunk(q, k, v, beta, g, h0, chunk, before=False):
    """Drop-in for `_chunk_delta` (same arguments, semantics, returns): forward in Triton, backward by the
    PyTorch chunk form. float64 (and T == 0) go to `_chunk_delta` itself."""
    T = q.shape[0]
    C = int(chunk)
    if T == 0 or q.dtype == torch.float64:
        return _chunk_delta(q, k, v, beta, g, h0, C, before)
    if before:
        # the readout after step t-1 with query t (as _chunk_delta / _chunk_readout_before do)
        o, S = _triton_delta_chunk(torch.cat([q[1:], torch.zeros_like(q[:1])]), k, v, beta, g, h0, C)
        return _chunk_readout_before(q, h0, o), S
    return _triton_delta_function.apply(q, k, v, beta, g, h0, C)
