"""Chunkwise-parallel algorithms for linear recurrences, in plain PyTorch (no Triton).

Built chunk-backend cells import these functions; `rnnc compile` vendors the ones a cell uses.

Layout: time-major with one flattened batch axis, q, k: [T, N, K], v: [T, N, V], state S: [N, K, V];
float32 or float64 (the caller upcasts). The readout follows the update, o_t = S_t^T q_t, unscaled; with
before=True it precedes it, o_t = S_{t-1}^T q_t (RWKV), computed as the readout after step t-1 with the
next step's query (so the same chunkwise algorithm and numerics serve both).
Each entry point returns (o [T, N, V], S_T [N, K, V]) and is differentiable by autograd.

Numerics follow flash-linear-attention (GLA / simple GLA / gated delta rule): gates are log-space
(g <= 0), summed inside each chunk only (G_r = sum_{s <= r} g_s, reset per chunk), and every
exponential is of a quantity <= 0: exp(G_r), exp(G_last - G_r), and exp(G_i - G_j) for j <= i only,
masked to -inf BEFORE exponentiating. One refinement over fla: the exponents G_i - G_j and
G_last - G_j are formed as direct sums of the gates in between (masked cumsums, suffix sums), never
as differences of two cumulative sums, so there is no cancellation (with gates near -20 per step the
difference form loses ~|G| * eps, about 5e-5 relative in float32; the direct sums keep ~1e-6), and
-inf gates (hard resets) give no NaN. Per-channel (vector) decays use the secondary-chunking trick:
the chunk is cut into sub-chunks, off-diagonal sub-blocks are factored through the first row of the
row's sub-chunk (both factors have exponent <= 0), and diagonal sub-blocks are formed element-wise.
A per-key decay alone (GLA, RWKV-6: _chunk_linear_key) builds no [C, C, K] tensor at all: the pairs
inside a sub-chunk go diagonal by diagonal, and every exponent it needs is one row of M @ g for a 0/1
matrix M (matmuls and exps, each row a direct sum of gates; no masking needed since no row is
positive); gates are clamped at -1e4 first, where exp is exactly 0 in float32 and float64 anyway, so
that a -inf gate never meets a 0 of M (0 * -inf is NaN).
The ragged tail is padded with zeros (zero inputs, zero log-decay), which leaves the state
unchanged, and sliced off.
"""
import math

import torch
import torch.nn.functional as F


from rnnc.errors import InputError


def _chunk_split(x, chunk, nt):
    """[T, N, D] -> [NT, N, C, D], zero-padding the time axis up to NT * C."""
    pad = nt * chunk - x.shape[0]
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    return x.reshape(nt, chunk, x.shape[1], x.shape[2]).transpose(1, 2)


def _chunk_merge(x, t):
    """[NT, N, C, D] -> [T, N, D] (drops the padded tail)."""
    nt, n, c, d = x.shape
    return x.transpose(1, 2).reshape(nt * c, n, d)[:t]


def _chunk_sub_size(chunk):
    """Sub-chunk size for the secondary chunking: the divisor of C nearest below sqrt(C)."""
    best = 1
    for b in range(1, int(math.isqrt(chunk)) + 1):
        if chunk % b == 0:
            best = b
    return best


def _chunk_fold_scalar(gk, gv):
    """A scalar decay ([..., 1]) commutes with everything: fold it into the other side's gate."""
    if gv is not None and gv.shape[-1] == 1:
        gk = gv if gk is None else gk + gv
        gv = None
    if gk is not None and gk.shape[-1] == 1 and gv is not None:
        gv = gv + gk
        gk = None
    return gk, gv


def _chunk_masked_exp(d, mask):
    """exp(d) where mask, 0 elsewhere; masked entries are never exponentiated (no exp(+large), no NaN grads)."""
    return torch.exp(torch.where(mask, d, -math.inf))


def _chunk_pair_sums(g):
    """X[..., i, j, :] = sum_{j < s <= i} g_s (0 where i <= j).  g: [..., C, D] -> [..., C, C, D].

    Equal to G_i - G_j for the cumulative sum G, but summed directly: the terms share a sign, so there is
    no cancellation between two large cumulative sums (which costs ~|G| * eps of accuracy in float32).
    """
    C = g.shape[-2]
    strict = torch.ones(C, C, dtype=torch.bool, device=g.device).tril(-1).unsqueeze(-1)
    return torch.where(strict, g.unsqueeze(-2), 0.0).cumsum(-3)


def _chunk_suffix_sums(g):
    """X[..., j, :] = sum_{s > j} g_s along the chunk axis (-2): G_last - G_j, summed directly."""
    x = F.pad(g[..., 1:, :], (0, 0, 0, 1))
    return x.flip(-2).cumsum(-2).flip(-2)


def _chunk_sub_factors(g, bc):
    """Factors of the secondary chunking for per-channel log-gates g: [..., C, D] (raw, per step).

    Sub-chunks of bc rows, n_a the first row of sub-chunk a, nc = C / bc:
    rows [..., nc, bc, D]:     exp(G_i - G_{n_a}) for row i of sub-chunk a;
    cols [..., nc, bc, D]:     exp(G_end(b) - G_j) for row j of sub-chunk b (end(b) its last row);
    link [..., nc, nc, D]:     exp(G_{n_a} - G_end(b)) for b < a, 0 for b >= a;
    diag [..., nc, bc, bc, D]: exp(G_i - G_j) for j <= i inside a sub-chunk, 0 above the diagonal.
    So exp(G_i - G_j) = rows_i * link_ab * cols_j for i in a, j in b < a. Every exponent is <= 0 and
    is a direct sum of same-sign gates (no differences of cumulative sums).
    """
    C, D = g.shape[-2], g.shape[-1]
    lead = g.shape[:-2]
    nc = C // bc
    dev = g.device
    gb = g.reshape(*lead, nc, bc, D)
    tri = torch.ones(bc, bc, dtype=torch.bool, device=dev).tril().unsqueeze(-1)
    diag = _chunk_masked_exp(_chunk_pair_sums(gb), tri)
    rows = torch.exp(torch.cat([torch.zeros_like(gb[..., :1, :]), gb[..., 1:, :]], -2).cumsum(-2))
    cols = torch.exp(_chunk_suffix_sums(gb))
    # G_{n_a} - G_end(b) = sum of the whole sub-chunks strictly between b and a, plus g_{n_a}
    between = F.pad(_chunk_pair_sums(gb.sum(-2))[..., :-1, :, :], (0, 0, 0, 0, 1, 0))  # [..., a, b, D]
    strict = torch.ones(nc, nc, dtype=torch.bool, device=dev).tril(-1).unsqueeze(-1)
    link = _chunk_masked_exp(between + gb[..., :, 0, :].unsqueeze(-2), strict)
    return rows, cols, link, diag


def _chunk_intra_key(q, k, g, bc):
    """A_ij = sum_c q_ic k_jc exp(G_ic - G_jc) for j <= i, else 0.  q, k, g: [..., C, K] -> A: [..., C, C].

    g holds the raw per-step log-gates of the chunk (G their chunk-local cumulative sum). Secondary
    chunking with sub-chunks of bc rows: off-diagonal blocks (i in sub-chunk a, j in sub-chunk b < a) as
    the matmul (q_i exp(G_i - G_na)) . (k_j exp(G_na - G_j)), n_a the first row of sub-chunk a; diagonal
    blocks element-wise with the [bc, bc, K] tensor exp(G_i - G_j) (masked).
    """
    C, K = q.shape[-2], q.shape[-1]
    lead = q.shape[:-2]
    nc = C // bc
    rows, cols, link, diag = _chunk_sub_factors(g, bc)
    qb = q.reshape(*lead, nc, bc, K)
    kb = k.reshape(*lead, nc, bc, K)
    Ad = (qb.unsqueeze(-2) * kb.unsqueeze(-3) * diag).sum(-1)                          # [..., nc, bc, bc]
    eye = torch.eye(nc, dtype=q.dtype, device=q.device)
    A = (Ad.unsqueeze(-2) * eye.unsqueeze(-2).unsqueeze(-1)).reshape(*lead, C, C)     # block diagonal
    if nc > 1:
        ks = ((kb * cols).unsqueeze(-4) * link.unsqueeze(-2)).reshape(*lead, nc, C, K)  # [..., a, j, K]
        A = A + ((qb * rows) @ ks.transpose(-1, -2)).reshape(*lead, C, C)
    return A


def _chunk_intra_value(A, v, g, bc):
    """o_i[c] = sum_{j <= i} A_ij exp(G_ic - G_jc) v_jc.  A: [..., C, C] (lower), v, g: [..., C, V] -> [..., C, V].

    The value-side twin of _chunk_intra_key (same secondary chunking and factors).
    """
    C, V = v.shape[-2], v.shape[-1]
    lead = v.shape[:-2]
    nc = C // bc
    rows, cols, link, diag = _chunk_sub_factors(g, bc)
    vb = v.reshape(*lead, nc, bc, V)
    Ad = torch.diagonal(A.reshape(*lead, nc, bc, nc, bc), dim1=-4, dim2=-2).movedim(-1, -3)  # [..., nc, bc, bc]
    o = (Ad.unsqueeze(-1) * diag * vb.unsqueeze(-3)).sum(-2)                           # [..., nc, bc, V]
    if nc > 1:
        vs = ((vb * cols).unsqueeze(-4) * link.unsqueeze(-2)).reshape(*lead, nc, C, V)  # [..., a, j, V]
        o = o + (A.reshape(*lead, nc, bc, C) @ vs) * rows
    return o.reshape(*lead, C, V)


def _chunk_key_exponents(C, bc, dev, dt):
    """The 0/1 matrix M [R, C] such that the rows of M @ g are every exponent _chunk_linear_key uses.

    Each row sums the gates of one span lo < s <= hi of the chunk: a direct sum of same-sign gates
    (never a difference of two cumulative sums), so every exponent is <= 0 and exact to rounding. With
    sub-chunks of bc steps (a, b their index, n_a the first step of sub-chunk a, e_b the last, nc = C / bc):
    [0, C)       n_a < s <= i            step i (in sub-chunk a): since its sub-chunk's first step
    [C, 2C)      j < s <= e_b            step j (in sub-chunk b): to the end of its sub-chunk
    nc rows      s <= n_a                the chunk start to n_a
    nc rows      e_b < s                 the end of sub-chunk b to the chunk end
    1 row        all s                   the whole chunk
    a rows for a = 1 .. nc-1:  e_b < s <= n_a for b < a (the link from sub-chunk b to sub-chunk a)
    nc*(bc-d) rows for d = 1 .. bc-1:  i-d < s <= i for i = n_a + d .. n_a + bc-1 (pairs d apart inside a)
    """
    nc = C // bc
    s = torch.arange(C, device=dev)
    spans = [((i // bc) * bc, i) for i in range(C)]
    spans += [(j, (j // bc) * bc + bc - 1) for j in range(C)]
    spans += [(-1, a * bc) for a in range(nc)]
    spans += [(b * bc + bc - 1, C - 1) for b in range(nc)]
    spans += [(-1, C - 1)]
    spans += [(b * bc + bc - 1, a * bc) for a in range(1, nc) for b in range(a)]
    spans += [(a * bc + i - d, a * bc + i) for d in range(1, bc) for a in range(nc) for i in range(d, bc)]
    lo = torch.tensor([p[0] for p in spans], device=dev).unsqueeze(-1)
    hi = torch.tensor([p[1] for p in spans], device=dev).unsqueeze(-1)
    return ((s > lo) & (s <= hi)).to(dt)


def _chunk_linear_key(qc, kc, vc, gkc, h0, bc):
    """_chunk_linear's per-key decay (no value decay) on chunked inputs [NT, N, C, K], sub-chunks of bc steps.

    Returns (o [NT, N, C, V], S_T [N, K, V]). A_ij = sum_c q_ic k_jc exp(G_ic - G_jc) (G: chunk-local cumsum)
    in three parts: pairs inside one sub-chunk, by offset d = i - j, element-wise with exp(sum of the d gates
    between); pairs in sub-chunks b < a as the matmul (q_i exp(G_i - G_na)) . (k_j exp(G_na - G_j)); and
    the state entering the chunk. All exponents are rows of M @ g for one 0/1 matrix M (_chunk_key_exponents).
    """
    nt, N, C, K = qc.shape
    V = vc.shape[-1]
    nc = C // bc
    dev, dt = qc.device, qc.dtype
    M = _chunk_key_exponents(C, bc, dev, dt)
    # gates below -1e4 decay to exactly 0 in float32 and float64 either way; clamping keeps -inf (0 * -inf)
    # out. Three matmuls, each split once (slices of one big tensor would each allocate and zero a
    # full-size gradient; one split's backward concatenates one); exp in place: a matmul's backward
    # does not need its output
    g = gkc.clamp_min(-1e4)
    n1, n2 = 2 * C, 2 * nc + 1 + nc * (nc - 1) // 2
    M1, M2, M3 = M.split([n1, n2, M.shape[0] - n1 - n2])
    e_row, e_col = (M1 @ g).exp_().split([C, C], -2)                                   # [NT, N, C, K] each
    e_start, e_end, e_all, *links = (M2 @ g).exp_().split([nc, nc, 1] + list(range(1, nc)), -2)
    offsets = (M3 @ g).exp_().split([nc * (bc - d) for d in range(1, bc)], -2) if bc > 1 else ()
    qs, ks = qc.reshape(nt, N, nc, bc, K), kc.reshape(nt, N, nc, bc, K)
    qr = (qc * e_row).reshape(nt, N, nc, bc, K)                                        # q_i exp(G_i - G_na)
    kr = (kc * e_col).reshape(nt, N, nc, bc, K)                                        # k_j exp(G_eb - G_j)
    # pairs inside a sub-chunk: Ad[.., a, i, j], diagonal by diagonal
    Ad = torch.diag_embed((qs * ks).sum(-1))
    for d in range(1, bc):
        e = offsets[d - 1].reshape(nt, N, nc, bc - d, K)
        Ad = Ad + torch.diag_embed((qs[..., d:, :] * ks[..., :bc - d, :] * e).sum(-1), offset=-d)
    vb = vc.reshape(nt, N, nc, bc, V)
    ob = (Ad @ vb).unbind(2)                                                           # nc x [NT, N, bc, V]
    # pairs in sub-chunks b < a. unbind, not indexing or slicing: their backward would allocate (and
    # zero) a full-size gradient per use
    qrs, krs, vbs = qr.unbind(2), kr.unbind(2), vb.unbind(2)
    outs = [ob[0]]
    for a in range(1, nc):
        link = links[a - 1].unbind(2)                                                  # a x [NT, N, K]
        kk = torch.cat([krs[b] * link[b].unsqueeze(-2) for b in range(a)], -2)        # k_j exp(G_na - G_j)
        outs.append(ob[a] + (qrs[a] @ kk.transpose(-1, -2)) @ torch.cat(vbs[:a], -2))
    o = torch.stack(outs, 2).reshape(nt, N, C, V)
    # the state entering each chunk: a sequential pass over chunks, reading out as it goes
    qg = (qr * e_start.unsqueeze(-2)).reshape(nt, N, C, K)                             # q_i exp(G_i)
    kg = (kr * e_end.unsqueeze(-2)).reshape(nt, N, C, K)                               # k_j exp(G_last - G_j)
    U = kg.transpose(-1, -2) @ vc                                                      # [NT, N, K, V]
    S = torch.zeros(N, K, V, dtype=dt, device=dev) if h0 is None else h0
    # unbind (not U[n]): the backward of per-step indexing would add a full-size zero tensor per chunk
    Us, qgs, dks = U.unbind(0), qg.unbind(0), e_all.transpose(-1, -2).unbind(0)
    inter = []
    for n in range(nt):
        inter.append(qgs[n] @ S)
        S = torch.addcmul(Us[n], S, dks[n])
    return o + torch.stack(inter), S


def _chunk_readout_before(q, h0, o):
    """o_t = S_{t-1}^T q_t from o'_t = S_t^T q_{t+1} (the outputs for queries shifted one step back)."""
    first = torch.zeros_like(o[:1]) if h0 is None else (q[:1].transpose(0, 1) @ h0).transpose(0, 1)
    return torch.cat([first, o[:-1]])


def _chunk_empty_or_before(fn, q, h0, V, *args):
    """The two cases every chunkwise entry point (`fn`, called as fn(q, *args)) hands on first: T == 0
    gives empty outputs and the initial state (zeros without h0); otherwise the readout before the
    update, o_t = S_{t-1}^T q_t, is fn's readout after the update with the queries shifted one step up."""
    T, N, K = q.shape
    if T == 0:
        return q.new_zeros(0, N, V), (q.new_zeros(N, K, V) if h0 is None else h0)
    o, S = fn(torch.cat([q[1:], torch.zeros_like(q[:1])]), *args)
    return _chunk_readout_before(q, h0, o), S


def _chunk_linear(q, k, v, gk, gv, h0, chunk, before=False):
    """S_t = diag(exp(gk_t)) S_{t-1} diag(exp(gv_t)) + k_t v_t^T ;  o_t = S_t^T q_t (before: S_{t-1}^T q_t).

    q, k: [T, N, K]; v: [T, N, V]; gk: [T, N, K] or [T, N, 1] (scalar) or None; gv: [T, N, V] or
    [T, N, 1] or None; h0: [N, K, V] or None (zeros); chunk: chunk length C.
    Returns (o [T, N, V], S_T [N, K, V]).
    """
    T, N, K = q.shape
    V = v.shape[-1]
    C = int(chunk)
    nt = (T + C - 1) // C
    dev, dt = q.device, q.dtype
    if T == 0 or before:
        return _chunk_empty_or_before(_chunk_linear, q, h0, V, k, v, gk, gv, h0, chunk)
    gk, gv = _chunk_fold_scalar(gk, gv)
    qc, kc, vc = _chunk_split(q, C, nt), _chunk_split(k, C, nt), _chunk_split(v, C, nt)
    gkc = None if gk is None else _chunk_split(gk, C, nt)                              # [NT, N, C, K or 1]
    gvc = None if gv is None else _chunk_split(gv, C, nt)                              # [NT, N, C, V]
    bc = _chunk_sub_size(C)
    tri = torch.ones(C, C, dtype=torch.bool, device=dev).tril()

    if gkc is not None and gkc.shape[-1] > 1 and gvc is None:
        o, S = _chunk_linear_key(qc, kc, vc, gkc, h0, bc)
        return _chunk_merge(o, T), S
    # intra-chunk part
    if gkc is None:
        A = torch.where(tri, qc @ kc.transpose(-1, -2), 0.0)
    elif gkc.shape[-1] == 1:
        A = (qc @ kc.transpose(-1, -2)) * _chunk_masked_exp(_chunk_pair_sums(gkc).squeeze(-1), tri)
    else:
        A = _chunk_intra_key(qc, kc, gkc, bc)
    o = A @ vc if gvc is None else _chunk_intra_value(A, vc, gvc, bc)

    # inter-chunk part: per-chunk decays and state increments, then a sequential pass over chunks
    qg, kg, vg, dk, dv, ev = qc, kc, vc, None, None, None
    if gkc is not None:
        Gk = gkc.cumsum(-2)                                                            # G_i
        qg = qc * torch.exp(Gk)
        kg = kc * torch.exp(_chunk_suffix_sums(gkc))                                   # exp(G_last - G_j)
        dk = torch.exp(Gk[..., -1:, :]).transpose(-1, -2)                              # [NT, N, K or 1, 1]
    if gvc is not None:
        Gv = gvc.cumsum(-2)
        ev = torch.exp(Gv)
        vg = vc * torch.exp(_chunk_suffix_sums(gvc))
        dv = torch.exp(Gv[..., -1:, :])                                                # [NT, N, 1, V]
    U = kg.transpose(-1, -2) @ vg                                                      # [NT, N, K, V]
    S = torch.zeros(N, K, V, dtype=dt, device=dev) if h0 is None else h0
    # unbind (not U[n]): the backward of per-step indexing would add a full-size zero tensor per chunk
    Us = U.unbind(0)
    dks = None if dk is None else dk.unbind(0)
    dvs = None if dv is None else dv.unbind(0)
    states = []
    for n in range(nt):
        states.append(S)
        if dks is not None:
            S = S * dks[n]
        if dvs is not None:
            S = S * dvs[n]
        S = S + Us[n]
    H = torch.stack(states)                                                            # [NT, N, K, V]
    oi = qg @ H
    if ev is not None:
        oi = oi * ev
    return _chunk_merge(o + oi, T), S


def _chunk_delta(q, k, v, beta, g, h0, chunk, before=False):
    """(Gated) delta rule: S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T ;  o_t = S_t^T q_t.

    before=True reads the state before the update instead, o_t = S_{t-1}^T q_t.

    q, k: [T, N, K]; v: [T, N, V]; beta: [T, N]; g: [T, N] (scalar log-decay) or None; h0: [N, K, V]
    or None (zeros); chunk: chunk length C. Returns (o [T, N, V], S_T [N, K, V]).

    WY / UT form per chunk (G = chunk-local cumsum of g, Gam_ij = exp(G_i - G_j) for j <= i):
    (I + strict_tril(diag(b) K K^T * Gam)) [U | W] = [diag(b) V | diag(b exp(G)) K] by a unit
    lower-triangular solve; with entering state S the pseudo-values are D = U - W S, then
    O = (Q exp(G)) S + (tril(Q K^T) * Gam) D and S <- exp(G_last) S + (K exp(G_last - G))^T D.
    """
    T, N, K = q.shape
    V = v.shape[-1]
    C = int(chunk)
    nt = (T + C - 1) // C
    dev, dt = q.device, q.dtype
    if T == 0 or before:
        return _chunk_empty_or_before(_chunk_delta, q, h0, V, k, v, beta, g, h0, chunk)
    qc, kc, vc = _chunk_split(q, C, nt), _chunk_split(k, C, nt), _chunk_split(v, C, nt)
    bc = _chunk_split(beta.unsqueeze(-1), C, nt)                                       # [NT, N, C, 1]
    tri = torch.ones(C, C, dtype=torch.bool, device=dev).tril()
    strict = torch.ones(C, C, dtype=torch.bool, device=dev).tril(-1)
    KK = (kc * bc) @ kc.transpose(-1, -2)                                              # b_i k_i . k_j
    QK = qc @ kc.transpose(-1, -2)
    if g is None:
        A = torch.where(strict, KK, 0.0)
        Aqk = torch.where(tri, QK, 0.0)
        rw = kc * bc
        qg, kg, dS = qc, kc, None
    else:
        gc = _chunk_split(g.unsqueeze(-1), C, nt)                                      # [NT, N, C, 1]
        Gam = _chunk_masked_exp(_chunk_pair_sums(gc).squeeze(-1), tri)                 # [NT, N, C, C]
        A = torch.where(strict, KK * Gam, 0.0)
        Aqk = QK * Gam
        G = gc.cumsum(-2)
        eG = torch.exp(G)
        rw = kc * (bc * eG)
        qg = qc * eG
        kg = kc * torch.exp(_chunk_suffix_sums(gc))                                    # exp(G_last - G_j)
        dS = torch.exp(G[..., -1:, :])                                                 # [NT, N, 1, 1]
    L = A + torch.eye(C, dtype=dt, device=dev)
    X = torch.linalg.solve_triangular(L, torch.cat([vc * bc, rw], -1), upper=False, unitriangular=True)
    U, W = X[..., :V], X[..., V:]
    S = torch.zeros(N, K, V, dtype=dt, device=dev) if h0 is None else h0
    Us, Ws, kgts = U.unbind(0), W.unbind(0), kg.transpose(-1, -2).unbind(0)
    dSs = None if dS is None else dS.unbind(0)
    states, deltas = [], []
    for n in range(nt):
        states.append(S)
        d = Us[n] - Ws[n] @ S                                                          # [N, C, V]
        deltas.append(d)
        if dSs is not None:
            S = S * dSs[n]
        S = S + kgts[n] @ d
    H = torch.stack(states)
    D = torch.stack(deltas)
    o = qg @ H + Aqk @ D
    return _chunk_merge(o, T), S


def _chunk_recompute_backward(fn, ctx, do, dS):
    """The backward of a chunk kernel whose forward ran elsewhere (Triton): `fn` (the PyTorch chunk
    form, taking the six saved inputs and the chunk size) recomputed under autograd and
    differentiated. float16/bfloat16 are recomputed in float32; gradients return in the inputs'
    dtypes. Returns one gradient per saved input, then None for the chunk size."""
    inputs = ctx.saved_tensors
    need = ctx.needs_input_grad[:6]
    if not any(need):
        return (None,) * 7
    with torch.enable_grad():
        leaves = []
        for x, n in zip(inputs, need):
            if x is not None:
                x = x.detach().to(torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
                x.requires_grad_(n)
            leaves.append(x)
        o, S = fn(*leaves, ctx.chunk)
        wrt = [x for x, n in zip(leaves, need) if n]
        # S_T does not depend on q (nor o on anything when T == 0): differentiate only what does
        outs = [(y, dy.to(y.dtype)) for y, dy in ((o, do), (S, dS)) if y.requires_grad]
        if not outs:
            return (None,) * 7
        grads = iter(torch.autograd.grad([y for y, _ in outs], wrt, [dy for _, dy in outs], allow_unused=True))
    out = []
    for x, n in zip(inputs, need):
        gx = next(grads) if n else None
        out.append(None if gx is None else gx.to(x.dtype))
    return (*out, None)


def _chunk_check_decay(decay, name):
    """A constant decay (RetNet's fixed γ per head) enters the chunk form as its log: it must not be
    negative (0 forgets everything, log 0 = -inf is a reset)."""
    if bool((decay < 0).any()) or bool(torch.isnan(decay).any()):
        raise InputError(f"the decay {name!r} has a negative or NaN value; the chunk form takes a constant "
                         "decay by its log: build this cell with backend='loop' for negative decays")
