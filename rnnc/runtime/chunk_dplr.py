"""The generalized delta rule in chunkwise form, in plain PyTorch (no Triton).

One token may apply several micro-steps to the state, each a diagonal-plus-low-rank map plus outer
products (layout [K, V], readout o = S^T q as in rnnc/runtime/chunk.py):

    S <- diag(exp(g_m)) S + a_m (b_m^T S) + k_m v_m^T        for m = 1 .. M, then o_t = S^T q_t

This covers RWKV-7 (M = 1, a != b, per-key decay), Kimi Delta Attention (M = 1, a = -beta k,
b = exp(g) k: the decay applied before the correction), the delta rule with any decay, and
DeltaProduct (M = n_h Householder steps a token, the decay in the first). Micro-steps are run as
T * M rows of one sequence (as fla's gated_delta_product does), read out at each token's last row.

The chunk algorithm is fla's DPLR derivation (generalized_delta_rule/dplr): with G the chunk-local
cumulative log-decay, u_t = S_{t-1}^T b_t the pseudo-values satisfy, inside a chunk entered with S,
    (I - A_ba) U = B~ S + A_bk V,    A_xy[i, j] = sum_c x_ic y_jc exp(G_{i-1,c} - G_jc)  (j < i)
(B~ = b exp(G_{i-1})), so U = W S + U0 with the unit lower-triangular inverse (blockwise forward
substitution, as fla's solve_tril); then
    O = (Q exp(G)) S + A_qa U + A_qk V,   A_qy[i, j] = sum_c q_ic y_jc exp(G_ic - G_jc)  (j <= i)
    S <- diag(exp(G_C)) S + A~^T U + K~^T V   (A~, K~: a, k times exp(G_C - G_j)).
The pass over chunks is two small matmuls a chunk (U from S, then S). Numerics as in
rnnc/runtime/chunk.py: every exponent is a direct sum of gates <= 0 (pair sums, suffix sums,
cumulative sums from the chunk start), masked to -inf (scalar gates) or clamped at -1e4 (per-key
gates, as _chunk_linear_key) before exponentiating; per-key pairs factor through recursive halving
of the chunk (_dplr_key_parts), so there is no exp of a positive number, no 0 * inf, and -inf gates
(hard resets) give no NaN. When every chunk's gates sum to more than -log(max)/2 of the dtype (the
common case; _dplr_gates_bounded), the pairs are one matmul of x exp(G) and y exp(-G) instead
(_dplr_key_direct): both factors stay normal numbers there, so it is exact to rounding and faster.
Backward: autograd through these ops (the inverse is matmuls).
"""
import math

import torch
import torch.nn.functional as F

from .chunk import (_chunk_empty_or_before, _chunk_masked_exp, _chunk_merge, _chunk_pair_sums, _chunk_split,
                    _chunk_suffix_sums)


def _dplr_rows(parts, T, N, width, like):
    """Per-micro-step tensors [T, N, width] (None: zeros) -> the rows [T * M, N, width], steps interleaved."""
    if len(parts) == 1 and parts[0] is not None:
        return parts[0]
    zeros = like.new_zeros(T, N, width)
    return torch.stack([zeros if x is None else x for x in parts], 1).reshape(T * len(parts), N, width)


def _dplr_gates(gs, T, N, K, like):
    """Per-micro-step log-gates ([T, N, K] per key, [T, N] scalar, None: no decay) -> rows [T * M, N, K]
    when one is per key, [T * M, N, 1] when all are scalars, None when there is no decay."""
    if all(x is None for x in gs):
        return None
    width = K if any(x is not None and x.dim() == 3 for x in gs) else 1
    parts = [None if x is None else (x.unsqueeze(-1).expand(T, N, width) if x.dim() == 2 else x) for x in gs]
    return _dplr_rows(parts, T, N, width, like)


def _chunk_dplr(q, ks, vs, as_, bs, gs, h0, chunk, before=False, rows_fn=None):
    """The generalized delta rule (see the module docstring), M = len(ks) micro-steps a token.

    q: [T, N, K]; ks, as_, bs: M tensors [T, N, K] or None (absent); vs: M tensors [T, N, V] or None;
    gs: M log-gates [T, N, K] or [T, N] or None; h0: [N, K, V] or None (zeros); chunk: tokens a chunk.
    before=True reads the state before the token's update, o_t = S_{t-1}^T q_t. rows_fn: what runs
    the rows (`_chunk_dplr_rows`'s arguments and returns; None: that one, the Triton kernels pass
    theirs). Returns (o [T, N, V], S_T [N, K, V]).
    """
    T, N, K = q.shape
    V = next(v for v in vs if v is not None).shape[-1]
    M = len(ks)
    if T == 0 or before:
        return _chunk_empty_or_before(_chunk_dplr, q, h0, V, ks, vs, as_, bs, gs, h0, chunk, False, rows_fn)
    rows = [_dplr_rows(x, T, N, w, q) for x, w in ((ks, K), (vs, V), (as_, K), (bs, K))]
    g = _dplr_gates(gs, T, N, K, q)
    rows_fn = rows_fn or _chunk_dplr_rows
    if M == 1 or g is None or g.shape[-1] == 1:  # read out at every M-th row only
        return rows_fn(q, *rows, g, h0, int(chunk) * M, M)
    # per-key decays and several micro-steps: the query on each token's last row, zeros before
    q = torch.stack([q.new_zeros(T, N, K)] * (M - 1) + [q], 1).reshape(T * M, N, K)
    o, S = rows_fn(q, *rows, g, h0, int(chunk) * M)
    return o.reshape(T, M, N, V)[:, -1], S


def _dplr_key_spans(C):
    """The spans lo < s <= hi of the chunk whose gate sums _dplr_key_parts exponentiates, grouped, and
    the halving levels and base block size they serve. Per group, one span a row of the chunk (or
    of the base blocks):

    start    s <= i               exp(G_i): the read of the entering state
    prev     s < i                exp(G_{i-1}): the low-rank read of it
    tail     j < s                exp(G_last - G_j): a row's part in the state leaving the chunk
    all      every s              exp(G_last): the decay across the chunk (one row)
    level h  for each block of h rows halved at u (h = C, C/2, ... while even and > 2): rows i >= u
             span u - 1 < s <= i, rows j < u span j < s <= u - 1, so pairs across the halves factor
             as exp(G_i - G_j) = exp(G_i - G_{u-1}) exp(G_{u-1} - G_j)
    offset d inside each base block (the blocks left, b rows), rows i >= d of it: i - d < s <= i
    """
    spans = [(-1, i) for i in range(C)] + [(-1, i - 1) for i in range(C)] + [(j, C - 1) for j in range(C)]
    spans.append((-1, C - 1))
    levels, h = [], C
    while h % 2 == 0 and h > 2:
        u = [p - p % h + h // 2 for p in range(C)]
        spans += [(u[p] - 1, p) if p >= u[p] else (p, u[p] - 1) for p in range(C)]
        levels.append(h)
        h //= 2
    spans += [(blk + i - d, blk + i) for d in range(1, h) for blk in range(0, C, h) for i in range(d, h)]
    return spans, levels, h


def _dplr_key_parts(xs, ys, g):
    """Pair matrices A_xy[i, j] = sum_c x_ic y_jc exp(G_ic - G_jc) for j <= i (else 0), for every x of xs
    and y of ys, and the factors exp(G_i), exp(G_{i-1}), exp(G_last - G_j), exp(G_last); per-key log-gates
    g [..., C, K] (raw, per row; G their chunk-local cumulative sum), xs, ys: [..., C, K] each.

    Every exponent is one row of E @ g for a 0/1 matrix E (_dplr_key_spans): a direct sum of the gates
    in between, <= 0, no difference of cumulative sums; gates are clamped at -1e4 first (exp is 0 there
    in float32 and float64 alike), so a -inf gate never meets a 0 of E. The pairs go by recursive
    halving: pairs across the two halves of a block are one matmul of the factored rows and columns
    (all xs and ys stacked into one product), pairs inside a base block element-wise by offset. No
    [C, C, K] tensor, and no small op per chunk.
    Returns A [..., nx, ny, C, C] and the factors [..., C, K] each (exp(G_last): [..., 1, K]).
    """
    C, K = g.shape[-2], g.shape[-1]
    lead = g.shape[:-2]
    nx, ny = len(xs), len(ys)
    spans, levels, b = _dplr_key_spans(C)
    s = torch.arange(C, device=g.device)
    lo = torch.tensor([p[0] for p in spans], device=g.device).unsqueeze(-1)
    hi = torch.tensor([p[1] for p in spans], device=g.device).unsqueeze(-1)
    E = ((s > lo) & (s <= hi)).to(g.dtype)
    sizes = [C, C, C, 1] + [C] * len(levels) + [(C // b) * (b - d) for d in range(1, b)]
    e_start, e_prev, e_tail, e_all, *rest = (E @ g.clamp_min(-1e4)).exp_().split(sizes, -2)
    e_levels, e_offsets = rest[:len(levels)], rest[len(levels):]
    nb = C // b

    def blocks(x, n, h):
        return x.reshape(*lead, n, h, x.shape[-1])

    def combos(parts):  # parts[ix][iy]: [..., nb, r] -> [..., nb, nx, ny, r]
        return torch.stack([torch.stack(row, -2) for row in parts], -3)

    # pairs inside a base block of b rows, by offset d = i - j: D [..., nb, nx, ny, b, b]
    D = torch.diag_embed(combos([[(x * y).sum(-1).reshape(*lead, nb, b) for y in ys] for x in xs]))
    for d in range(1, b):
        ed = blocks(e_offsets[d - 1], nb, b - d)
        yd = [blocks(y, nb, b)[..., :b - d, :] * ed for y in ys]
        xd = [blocks(x, nb, b)[..., d:, :] for x in xs]  # sliced once each (a slice's backward is full-size)
        D = D + torch.diag_embed(combos([[(x * y).sum(-1) for y in yd] for x in xd]), offset=-d)
    # halving levels, smallest blocks first: a block of h rows is [[D_lo, 0], [cross, D_hi]], the cross
    # pairs of every x and y in one matmul (operands side by side: rows [nx * m], columns [ny * m])
    for h, e in zip(reversed(levels), reversed(e_levels)):
        nb, m = C // h, h // 2
        f_lo, f_hi = blocks(e, 2 * nb, m).reshape(*lead, nb, 2, m, K).unbind(-3)
        x_hi = torch.cat([blocks(x, 2 * nb, m).reshape(*lead, nb, 2, m, K).unbind(-3)[1] * f_hi for x in xs], -2)
        y_lo = torch.cat([blocks(y, 2 * nb, m).reshape(*lead, nb, 2, m, K).unbind(-3)[0] * f_lo for y in ys], -2)
        cross = (x_hi @ y_lo.transpose(-1, -2)).reshape(*lead, nb, nx, m, ny, m).transpose(-3, -2)
        d_lo, d_hi = D.reshape(*lead, nb, 2, nx, ny, m, m).unbind(-5)
        D = torch.cat([torch.cat([d_lo, torch.zeros_like(d_lo)], -1), torch.cat([cross, d_hi], -1)], -2)
    A = D.reshape(*lead, nx, ny, C, C)
    return A, e_start, e_prev, e_tail, e_all


def _dplr_gates_bounded(g):
    """Whether every chunk's per-key gates sum to at least -log(max)/2 of their dtype (-44 in float32;
    g: [..., C, K] per row): then exp(G_i) and exp(-G_j) are both normal numbers and _dplr_key_direct's
    factored products are exact to rounding. Bounded gates are the common case (RWKV-7's decay is at
    least exp(-exp(-0.5)) a step: -9.7 over 16 rows; fla's KDA clamps its gates at a lower bound for its
    fast path); -inf or strongly negative gates take _dplr_key_parts. Never under torch.compile, where a
    data-dependent branch would break the graph."""
    if torch.compiler.is_compiling():
        return False
    limit = 0.5 * math.log(torch.finfo(g.dtype).max)
    return bool(g.sum(-2).min() >= -limit)


def _dplr_key_direct(xs, ys, g):
    """_dplr_key_parts (same returns) for gates bounded as _dplr_gates_bounded checks: with G the chunk-local
    cumulative sum, x_ic y_jc exp(G_ic - G_jc) = (x_ic exp(G_ic)) (y_jc exp(-G_jc)), each term the true term's
    value up to rounding (no cancellation: the bound keeps both factors finite and normal), so all pairs of
    all xs and ys are one matmul of the scaled rows, masked to j <= i."""
    C = g.shape[-2]
    lead = g.shape[:-2]
    G = g.cumsum(-2)
    e_start, e_inv = G.exp(), (-G).exp()
    e_prev = F.pad(e_start[..., :-1, :], (0, 0, 1, 0), value=1.0)
    e_all = e_start[..., -1:, :]
    e_tail = (G[..., -1:, :] - G).exp()
    X = torch.cat([x * e_start for x in xs], -2)
    Y = torch.cat([y * e_inv for y in ys], -2)
    A = (X @ Y.transpose(-1, -2)).reshape(*lead, len(xs), C, len(ys), C).transpose(-3, -2)
    tri = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
    return torch.where(tri, A, 0.0), e_start, e_prev, e_tail, e_all


def _dplr_shift_down(A):
    """Row i of the result is row i - 1 of A (row 0 zero): a pair matrix for b_{i+1} as one for b_i."""
    return F.pad(A[..., :-1, :], (0, 0, 1, 0))


def _dplr_tril_inverse(A):
    """(I - A)^{-1} for strictly lower-triangular A [..., C, C], by matmuls: the diagonal blocks of b rows
    (C halved while even and above 2) directly, I + A for b <= 2, else by forward substitution (row i =
    e_i + A[i, :i] rows[:i]); then merged pairwise, [[I - A1, 0], [-X, I - A2]]^{-1} = [[T1, 0], [T2 X T1, T2]].
    A batched triangular solve costs about thirty matmuls of its size on CPU (one LAPACK call per
    matrix); this is a few, and its backward is matmuls too."""
    C = A.shape[-1]
    lead = A.shape[:-2]
    b = C
    while b > 2 and b % 2 == 0:
        b //= 2
    n = C // b
    blocks = A.reshape(*lead, n, b, n, b).diagonal(dim1=-4, dim2=-2).movedim(-1, -3)        # [..., n, b, b]
    eye = torch.eye(b, dtype=A.dtype, device=A.device)
    if b <= 2:
        T = eye + blocks
    else:
        rows = [eye[0].expand(*lead, n, b)]
        for i in range(1, b):
            rows.append(eye[i] + (blocks[..., i:i + 1, :i] @ torch.stack(rows, -2)).squeeze(-2))
        T = torch.stack(rows, -2)
    size = b                                                                                # T: [..., m, size, size]
    while size < C:
        m = T.shape[-3] // 2
        Ta, Tb = T.reshape(*lead, m, 2, size, size).unbind(-3)
        X = A.reshape(*lead, m, 2 * size, m, 2 * size).diagonal(dim1=-4, dim2=-2).movedim(-1, -3)[..., size:, :size]
        T = torch.cat([torch.cat([Ta, torch.zeros_like(Ta)], -1), torch.cat([Tb @ X @ Ta, Tb], -1)], -2)
        size *= 2
    return T.reshape(*lead, C, C)


class _DplrPass(torch.autograd.Function):
    """The pass over chunks, the one sequential part: with S_0 the entering state, per chunk n

        U_n = U0_n + W_n S_n,    S_{n+1} = dec_n S_n + a~_n^T U_n + inc_n

    returning H = (S_0 .. S_{NT-1}), U and S_NT. Its backward is the same pass in reverse (two small
    matmuls a chunk for the state's gradient); every other gradient is then one batched product over
    all chunks, where autograd through the loop would run three backward nodes a chunk and restack.
    U0: [NT, N, C, V]; W, ag (a~): [NT, N, C, K]; inc: [NT, N, K, V]; dec: [NT, N, K, 1] or None (1);
    S0: [N, K, V].
    """

    @staticmethod
    def forward(ctx, U0, W, ag, inc, dec, S0):
        nt = U0.shape[0]
        H, U = U0.new_empty(nt, *S0.shape), torch.empty_like(U0)
        agt, S = ag.transpose(-1, -2), S0
        for n in range(nt):
            H[n] = S
            torch.baddbmm(U0[n], W[n], S, out=U[n])
            S = torch.baddbmm(inc[n] + S if dec is None else torch.addcmul(inc[n], S, dec[n]), agt[n], U[n])
        ctx.save_for_backward(W, ag, dec, H, U)
        return H, U, S

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dH, dU, dS):
        W, ag, dec, H, U = ctx.saved_tensors
        nt = H.shape[0]
        dS = torch.zeros_like(H[0]) if dS is None else dS
        DU, DS = torch.empty_like(U), torch.empty_like(H)                                # DS[n]: dL/dS_{n+1}
        wt = W.transpose(-1, -2)
        for n in reversed(range(nt)):
            DS[n] = dS
            du = ag[n] @ dS if dU is None else torch.baddbmm(dU[n], ag[n], dS)
            DU[n] = du
            back = dS if dec is None else dS * dec[n]
            dS = torch.baddbmm(back if dH is None else back + dH[n], wt[n], du)
        ddec = None if dec is None else (H * DS).sum(-1, keepdim=True)
        return DU, DU @ H.transpose(-1, -2), U @ DS.transpose(-1, -2), DS, ddec, dS


def _chunk_dplr_rows(q, k, v, a, b, g, h0, C, read=1):
    """S_r = diag(exp(g_r)) S_{r-1} + a_r (b_r^T S_{r-1}) + k_r v_r^T ; o_r = S_r^T q_r, over rows r,
    read out at every `read`-th row (r = read - 1, 2 read - 1, ...: a token's last micro-step).

    q: [L / read, N, K]; k, a, b: [L, N, K]; v: [L, N, V]; g: [L, N, K], [L, N, 1] or None (per key:
    read = 1 only); C rows a chunk (a multiple of read). Returns (o [L / read, N, V], S_L [N, K, V]).
    """
    L, N, K = k.shape
    V = v.shape[-1]
    nt = (L + C - 1) // C
    dev, dt = q.device, q.dtype
    # contiguous once: every one of them is a matmul operand, which would copy a strided view each time
    kc, vc, ac, bc = (_chunk_split(x, C, nt).contiguous() for x in (k, v, a, b))     # [NT, N, C, D]
    qc = _chunk_split(q, C // read, nt).contiguous()                                 # [NT, N, C / read, K]

    def reads(x):  # [..., C, D] -> the rows read out, [..., C / read, D]
        return x if read == 1 else x.reshape(*x.shape[:-2], C // read, read, x.shape[-1]).unbind(-2)[-1]
    tri = torch.ones(C, C, dtype=torch.bool, device=dev).tril()
    strict = torch.ones(C, C, dtype=torch.bool, device=dev).tril(-1)
    if g is None:
        Aqk, Aqa = (torch.where(reads(tri), qc @ y.transpose(-1, -2), 0.0) for y in (kc, ac))
        Abk, Aba = (torch.where(strict, bc @ y.transpose(-1, -2), 0.0) for y in (kc, ac))
        qg, bg, kg, ag, dec = qc, bc, kc, ac, None
    else:
        gc = _chunk_split(g, C, nt)                                                     # [NT, N, C, K or 1]
        if gc.shape[-1] == 1:
            G = gc.cumsum(-2)                                                           # G_i
            Gx = F.pad(gc[..., :-1, :], (0, 0, 1, 0)).cumsum(-2)                        # G_{i-1}
            P = _chunk_pair_sums(gc).squeeze(-1)                                        # sum_{j < s <= i} g_s
            Gam, Gamb = _chunk_masked_exp(reads(P), reads(tri)), _chunk_masked_exp(_dplr_shift_down(P), strict)
            Aqk, Aqa = (qc @ kc.transpose(-1, -2)) * Gam, (qc @ ac.transpose(-1, -2)) * Gam
            Abk, Aba = (bc @ kc.transpose(-1, -2)) * Gamb, (bc @ ac.transpose(-1, -2)) * Gamb
            qg, bg = qc * torch.exp(reads(G)), bc * torch.exp(Gx)
            tail = torch.exp(_chunk_suffix_sums(gc))                                   # exp(G_last - G_j)
            kg, ag = kc * tail, ac * tail
            dec = torch.exp(G[..., -1, :])                                              # [NT, N, 1]
        else:
            bnext = F.pad(bc[..., 1:, :], (0, 0, 0, 1))                                 # row i holds b_{i+1}
            key_parts = _dplr_key_direct if _dplr_gates_bounded(gc) else _dplr_key_parts
            A, eG, eGx, tail, dec = key_parts([qc, bnext], [kc, ac], gc)
            (Aqk, Aqa), (Ynk, Yna) = (x.unbind(-3) for x in A.unbind(-4))
            Abk, Aba = _dplr_shift_down(Ynk), _dplr_shift_down(Yna)
            qg, bg, kg, ag, dec = qc * eG, bc * eGx, kc * tail, ac * tail, dec.squeeze(-2)
    Tinv = _dplr_tril_inverse(Aba)
    U0, W = Tinv @ (Abk @ vc), Tinv @ bg                                                # U = U0 + W S
    inc = kg.transpose(-1, -2) @ vc                                                     # [NT, N, K, V]
    S0 = torch.zeros(N, K, V, dtype=dt, device=dev) if h0 is None else h0
    H, U, S = _DplrPass.apply(U0, W, ag, inc, None if dec is None else dec.unsqueeze(-1), S0)
    o = qg @ H + Aqa @ U + Aqk @ vc
    return _chunk_merge(o, L // read), S

