"""Chunkwise-parallel algorithms for linear recurrences, in plain PyTorch (no Triton).

These functions are pasted verbatim into generated standalone modules, so this file imports only
math, torch and torch.nn.functional, holds no other globals and no classes, and every function
name starts with `_chunk`.

Layout: time-major with one flattened batch axis, q, k: [T, N, K], v: [T, N, V], state S: [N, K, V];
float32 or float64 (the caller upcasts). The readout follows the update, o_t = S_t^T q_t, unscaled.
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
The ragged tail is padded with zeros (zero inputs, zero log-decay), which leaves the state
unchanged, and sliced off.
"""
import math

import torch
import torch.nn.functional as F


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


def _chunk_linear(q, k, v, gk, gv, h0, chunk):
    """S_t = diag(exp(gk_t)) S_{t-1} diag(exp(gv_t)) + k_t v_t^T ;  o_t = S_t^T q_t.

    q, k: [T, N, K]; v: [T, N, V]; gk: [T, N, K] or [T, N, 1] (scalar) or None; gv: [T, N, V] or
    [T, N, 1] or None; h0: [N, K, V] or None (zeros); chunk: chunk length C.
    Returns (o [T, N, V], S_T [N, K, V]).
    """
    T, N, K = q.shape
    V = v.shape[-1]
    C = int(chunk)
    nt = (T + C - 1) // C
    dev, dt = q.device, q.dtype
    if T == 0:
        return q.new_zeros(0, N, V), (torch.zeros(N, K, V, dtype=dt, device=dev) if h0 is None else h0)
    # a scalar decay commutes with everything: fold it into the other side's gate
    if gv is not None and gv.shape[-1] == 1:
        gk = gv if gk is None else gk + gv
        gv = None
    if gk is not None and gk.shape[-1] == 1 and gv is not None:
        gv = gv + gk
        gk = None
    qc, kc, vc = _chunk_split(q, C, nt), _chunk_split(k, C, nt), _chunk_split(v, C, nt)
    gkc = None if gk is None else _chunk_split(gk, C, nt)                              # [NT, N, C, K or 1]
    gvc = None if gv is None else _chunk_split(gv, C, nt)                              # [NT, N, C, V]
    bc = _chunk_sub_size(C)
    tri = torch.ones(C, C, dtype=torch.bool, device=dev).tril()

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


def _chunk_delta(q, k, v, beta, g, h0, chunk):
    """(Gated) delta rule: S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T ;  o_t = S_t^T q_t.

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
    if T == 0:
        return q.new_zeros(0, N, V), (torch.zeros(N, K, V, dtype=dt, device=dev) if h0 is None else h0)
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
