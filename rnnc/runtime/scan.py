"""Parallel prefix scans over time in plain PyTorch: `_linear_scan` for h_t = a_t h_{t-1} + b_t (the scan
backend, and the fused Triton scans' pass over chunk summaries), `_fold_scan` for a declared associative
combine, `_maxplus_scan` for h_t = max(h_{t-1} + a_t, b_t). O(T) work in O(log T) rounds; autograd differentiates them.
"""
import torch


def _linear_scan(a, b, h0):
    """h_t = a_t * h_{t-1} + b_t for every t along dim 0, with O(T) work in O(log T) rounds.

    Pairs of steps are combined ((a1, b1) then (a2, b2) is (a2 a1, a2 b1 + b2)), the half-length
    sequence is scanned recursively, and the other half of the states is filled in from it. Only
    products and sums of the gates: nothing overflows or divides, and an extreme gate (a -> 0)
    just makes the products underflow to 0."""
    full = (max(a.shape[0], 1 if b is None else b.shape[0]),) + tuple(h0.shape)  # a or b may be constant
    a = a.expand(full)
    b = torch.zeros(full, dtype=h0.dtype, device=h0.device) if b is None else b.expand(full)
    b = torch.cat([(a[0] * h0 + b[0]).unsqueeze(0), b[1:]])
    return _scan_from_zero(a, b)


def _sum_scan(b, h0, T):
    """h_t = h_{t-1} + b_t (a = 1: a running sum, LSRL's counters and accumulators) as one cumsum."""
    full = (T,) + tuple(h0.shape)
    if b is None:
        return h0.expand(full).clone()
    return h0 + torch.cumsum(b.expand(full), 0)


def _state_before(h0, h):
    """The state before each step, [h0, h_0, ..., h_{T-2}], from the states after them h: [T, ...]
    (what a step that reads the old state sees; rnnc.distributed swaps in the entering state)."""
    return torch.cat([h0.unsqueeze(0), h[:-1]])


def _scan_from_zero(a, b):
    T = b.shape[0]
    if T == 1:
        return b
    if T % 2:  # an odd tail step is finished after the even-length scan
        head = _scan_from_zero(a[:-1], b[:-1])
        return torch.cat([head, (a[-1] * head[-1] + b[-1]).unsqueeze(0)])
    a0, a1, b0, b1 = a[0::2], a[1::2], b[0::2], b[1::2]
    odd = _scan_from_zero(a1 * a0, a1 * b0 + b1)  # the states after steps 1, 3, 5, ...
    even = torch.cat([b0[:1], a0[1:] * odd[:-1] + b0[1:]])  # after steps 0, 2, 4, ...
    return torch.stack([even, odd], 1).reshape(b.shape)


def _maxplus_scan(a, b, h0):
    """h_t = max(h_{t-1} + a_t, b_t) for every t along dim 0 (a max-plus linear recurrence, xLSTM's
    max-stabiliser), with O(T) work in O(log T) rounds, as _linear_scan over the (max, +) semiring:
    (a1, b1) then (a2, b2) is (a1 + a2, max(b1 + a2, b2)). a: [T, N, ...] or None (0); b: [T, N, ...];
    h0: [N, ...]. Only sums and maxima: exact to rounding, and -inf shifts (a hard reset) give no NaN."""
    if b.shape[0] == 0:
        return b
    a = torch.zeros_like(b) if a is None else a.expand(b.shape)
    b = torch.cat([torch.maximum(h0 + a[0], b[0]).unsqueeze(0), b[1:]])
    return _maxplus_from_zero(a, b)


def _maxplus_from_zero(a, b):
    T = b.shape[0]
    if T == 1:
        return b
    if T % 2:
        head = _maxplus_from_zero(a[:-1], b[:-1])
        return torch.cat([head, torch.maximum(head[-1] + a[-1], b[-1]).unsqueeze(0)])
    a0, a1, b0, b1 = a[0::2], a[1::2], b[0::2], b[1::2]
    odd = _maxplus_from_zero(a0 + a1, torch.maximum(b0 + a1, b1))
    even = torch.cat([b0[:1], torch.maximum(odd[:-1] + a0[1:], b0[1:])])
    return torch.stack([even, odd], 1).reshape(b.shape)


def _fold_scan(combine, h0, xs):
    """s_t = combine(s_{t-1}, x_t) for every t, for an associative combine: O(T) work, O(log T) rounds.

    h0 is a tuple of [N, ...] initial values, xs a tuple of [T, N, ...] operands, and the result a
    tuple of [T, N, ...] states; `combine(*a, *b)` takes and returns tuples with one leading axis
    of rows. As in _linear_scan, the first step absorbs h0 (so no identity is ever combined),
    pairs of steps are combined, the half-length sequence is scanned recursively and the other
    half of the states filled in from it."""
    first = combine(*h0, *(x[0] for x in xs))
    return _fold_from_first(combine, tuple(torch.cat([f.unsqueeze(0), x[1:]]) for f, x in zip(first, xs)))


def _fold_rows(combine, a, b):
    """combine over [T', N, ...] operands, flattened to rows and back."""
    t, n = a[0].shape[:2]
    out = combine(*(x.flatten(0, 1) for x in a), *(x.flatten(0, 1) for x in b))
    return tuple(o.reshape(t, n, *o.shape[1:]) for o in out)


def _fold_from_first(combine, xs):
    T = xs[0].shape[0]
    if T == 1:
        return xs
    if T % 2:  # an odd tail step is finished after the even-length scan
        head = _fold_from_first(combine, tuple(x[:-1] for x in xs))
        tail = _fold_rows(combine, tuple(h[-1:] for h in head), tuple(x[-1:] for x in xs))
        return tuple(torch.cat([h, t]) for h, t in zip(head, tail))
    x0, x1 = tuple(x[0::2] for x in xs), tuple(x[1::2] for x in xs)
    odd = _fold_from_first(combine, _fold_rows(combine, x0, x1))  # the states after steps 1, 3, 5, ...
    if T == 2:
        return tuple(torch.cat([a, o]) for a, o in zip(x0, odd))
    rest = _fold_rows(combine, tuple(o[:-1] for o in odd), tuple(x[1:] for x in x0))  # after 2, 4, ...
    even = tuple(torch.cat([x[:1], r]) for x, r in zip(x0, rest))
    return tuple(torch.stack([e, o], 1).reshape(x.shape) for e, o, x in zip(even, odd, xs))


def _matrix_scan(A, b, h0):
    """h_t = A_t @ h_{t-1} + b_t for every t along dim 0: a dense transition, O(log T) rounds.

    A is [T or 1, ..., n, n], b [T, ..., n] and h0 [..., n] (the leading axes broadcast). The
    pairs (A, b) combine as in _linear_scan, with matrix products: (A1, b1) then (A2, b2) is
    (A2 A1, A2 b1 + b2), O(n³) per combine. A time-invariant A ([1, 1, n, n]) stays one matrix per
    round (its powers A², A⁴, ...: O(n³ log T) for the products, one GEMM per round for the rest)."""
    b = torch.cat([(_matvec(A[0], h0) + b[0]).unsqueeze(0), b[1:]])
    return _matrix_scan_from_zero(A, b)


def _matvec(A, x):
    """A @ x over the trailing axes, broadcasting the leading ones; one GEMM when A is shared."""
    if A.shape[:-2].numel() == 1:
        return x @ A.reshape(A.shape[-2:]).transpose(0, 1)
    return (A @ x.unsqueeze(-1)).squeeze(-1)


def _matrix_scan_from_zero(A, b):
    T = b.shape[0]
    if T == 1:
        return b
    const = A.shape[0] == 1  # the same A at every step
    if T % 2:  # an odd tail step is finished after the even-length scan
        head = _matrix_scan_from_zero(A if const else A[:-1], b[:-1])
        return torch.cat([head, (_matvec(A[-1], head[-1]) + b[-1]).unsqueeze(0)])
    A0, A1 = (A, A) if const else (A[0::2], A[1::2])
    b0, b1 = b[0::2], b[1::2]
    odd = _matrix_scan_from_zero(A1 @ A0, _matvec(A1, b0) + b1)  # after steps 1, 3, 5, ...
    even = torch.cat([b0[:1], _matvec(A0 if const else A0[1:], odd[:-1]) + b0[1:]])  # after 0, 2, 4, ...
    return torch.stack([even, odd], 1).reshape(b.shape)


def _free_matrix_scan(A, h0, T):
    """h_t = A^t h0 for t = 1..T: a time-invariant A [1, ..., n, n] and no input (LSRL's rotating
    counters). The powers A, A², ..., A^T by doubling (each round multiplies the powers so far by the
    last one: O(log T) batched products), then one product with h0 [..., n]."""
    P = A
    while P.shape[0] < T:
        P = torch.cat([P, P[-1:] @ P])
    return (P[:T] @ h0.unsqueeze(-1)).squeeze(-1)


def _block_scan(A, b, h0):
    """h_t = A_t h_{t-1} + b_t with A an m×m matrix per element, held as m×m nested lists of
    tensors [T or 1, ...] (None: zero) and b, h0 as lists of m tensors ([T, ...], [...]); returns
    the m sequences. The products are written out elementwise (m² multiply-adds on whole
    tensors), which on CPU beats both a batched matmul of tiny matrices and a small reduction
    axis; zero entries are skipped. Otherwise as _matrix_scan."""
    first = _block_mv([[x if x is None else x[0] for x in row] for row in A], h0)
    b = [torch.cat([(bi[0] if f is None else f + bi[0]).unsqueeze(0), bi[1:]]) for f, bi in zip(first, b)]
    return _block_from_zero(A, b)


def _block_mv(A, x):
    """Σ_j A[i][j] x[j] per i, skipping zeros (None); None when every product is zero."""
    out = []
    for row in A:
        acc = None
        for a, xj in zip(row, x):
            if a is not None and xj is not None:
                acc = a * xj if acc is None else torch.addcmul(acc, a, xj)
        out.append(acc)
    return out


def _block_mm(A, B):
    return [[_block_mv([row], [Bj[k] for Bj in B])[0] for k in range(len(B[0]))] for row in A]


def _block_slice(A, sl):
    return [[None if x is None else x if x.shape[0] == 1 else x[sl] for x in row] for row in A]


def _plus(x, y):
    return y if x is None else x + y


def _block_from_zero(A, b):
    T = b[0].shape[0]
    if T == 1:
        return b
    if T % 2:  # an odd tail step is finished after the even-length scan
        head = _block_from_zero(_block_slice(A, slice(0, -1)), [x[:-1] for x in b])
        tail = _block_mv(_block_slice(A, slice(-1, None)), [h[-1:] for h in head])
        return [torch.cat([h, _plus(t, x[-1:])]) for h, t, x in zip(head, tail, b)]
    A0, A1 = _block_slice(A, slice(0, None, 2)), _block_slice(A, slice(1, None, 2))
    b0, b1 = [x[0::2] for x in b], [x[1::2] for x in b]
    odd = _block_from_zero(_block_mm(A1, A0), [_plus(p, x) for p, x in zip(_block_mv(A1, b0), b1)])
    carried = _block_mv(_block_slice(A0, slice(1, None)), [o[:-1] for o in odd])
    even = [torch.cat([x[:1], _plus(c, x[1:])]) for c, x in zip(carried, b0)]
    return [torch.stack([e, o], 1).reshape(x.shape) for e, o, x in zip(even, odd, b)]


def _group_scan(T, a, b, h0, dense):
    """A group of states scanned as one; returns each state's [T, N, ...] sequence.

    a[i][j] is the coefficient of state j in state i's next value and b[i] state i's input, each
    [T or 1, N or 1, ...] or None for zero; h0[i] is [N, ...]. Block (dense False): states of one
    shape, a[i][j] elementwise (_block_scan). Dense: vector states [N, n_i], a[i][j] an
    [n_i, n_j] block of one matrix over the concatenated states (_matrix_scan)."""
    ref = h0[0]
    if dense and len(h0) == 1 and b[0] is None and a[0][0].shape[0] == 1:  # h_t = A^t h0
        return (_free_matrix_scan(a[0][0], ref, T),)
    B = [x.expand(T, *h.shape) if x is not None else ref.new_zeros(T, *h.shape) for x, h in zip(b, h0)]
    if not dense:
        return tuple(_block_scan(a, B, list(h0)))
    out = _matrix_scan(_group_matrix(a, h0), torch.cat(B, -1), torch.cat(list(h0), -1))
    return tuple(out.split([h.shape[-1] for h in h0], -1))


def _group_matrix(a, h0):
    """A dense group's blocks a[i][j] (None: zero) as one matrix [T or 1, ..., n, n] over the
    concatenated states h0 (vector states [N, n_i])."""
    lead = torch.broadcast_shapes(*(x.shape[:-2] for row in a for x in row if x is not None))
    return torch.cat([torch.cat([x.expand(*lead, -1, -1) if x is not None else
                                 h0[0].new_zeros(*lead, hi.shape[-1], hj.shape[-1]) for x, hj in zip(row, h0)], -1)
                      for row, hi in zip(a, h0)], -2)
