"""Parallel prefix scans over time in plain PyTorch: `_linear_scan` for h_t = a_t h_{t-1} + b_t (the scan
backend, and the fused Triton scans' pass over chunk summaries), `_fold_scan` for a declared associative
combine. O(T) work in O(log T) rounds; autograd differentiates them.
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
    """h_t = A_t @ h_{t-1} + b_t for every t along dim 0: a dense or block transition, O(log T) rounds.

    A is [T or 1, ..., m, m], b [T, ..., m] and h0 [..., m] (the leading axes broadcast). The
    pairs (A, b) combine as in _linear_scan, with matrix products: (A1, b1) then (A2, b2) is
    (A2 A1, A2 b1 + b2), O(m³) per combine. A time-invariant A ([1, ...]) stays one matrix per
    round (its powers A², A⁴, ...: O(m³ log T) for the products, O(m²) per step for the rest)."""
    b = torch.cat([(_matvec(A[0], h0) + b[0]).unsqueeze(0), b[1:]])
    return _matrix_scan_from_zero(A, b)


def _matvec(A, x):
    """A @ x over the trailing axes, broadcasting the leading ones; small blocks elementwise (a
    batched matmul of 2×2 matrices is slower on CPU than the few products it stands for)."""
    if A.shape[-1] <= 4:
        return (A * x.unsqueeze(-2)).sum(-1)
    return (A @ x.unsqueeze(-1)).squeeze(-1)


def _matmat(A, B):
    if A.shape[-1] <= 4:
        return (A.unsqueeze(-1) * B.unsqueeze(-3)).sum(-2)
    return A @ B


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
    odd = _matrix_scan_from_zero(_matmat(A1, A0), _matvec(A1, b0) + b1)  # after steps 1, 3, 5, ...
    even = torch.cat([b0[:1], _matvec(A0 if const else A0[1:], odd[:-1]) + b0[1:]])  # after 0, 2, 4, ...
    return torch.stack([even, odd], 1).reshape(b.shape)


def _group_scan(T, a, b, h0, dense):
    """A group of states scanned as one with _matrix_scan; returns each state's [T, N, ...] sequence.

    a[i][j] is the coefficient of state j in state i's next value and b[i] state i's input, each
    [T or 1, N or 1, ...] or None for zero; h0[i] is [N, ...]. Block (dense False): states of one
    shape, a[i][j] elementwise, stacked into an m×m matrix per element. Dense: vector states
    [N, n_i], a[i][j] an [n_i, n_j] block of one matrix over the concatenated states."""
    ref = h0[0]
    if dense:
        lead = torch.broadcast_shapes(*(x.shape[:-2] for row in a for x in row if x is not None))
        A = torch.cat([torch.cat([x.expand(*lead, -1, -1) if x is not None else
                                  ref.new_zeros(*lead, hi.shape[-1], hj.shape[-1]) for x, hj in zip(row, h0)], -1)
                       for row, hi in zip(a, h0)], -2)
        B = torch.cat([x.expand(T, *h.shape) if x is not None else ref.new_zeros(T, *h.shape) for x, h in zip(b, h0)], -1)
        out = _matrix_scan(A, B, torch.cat(list(h0), -1))
        return tuple(out.split([h.shape[-1] for h in h0], -1))
    lead = torch.broadcast_shapes(*(x.shape for row in a for x in row if x is not None))
    A = torch.stack([torch.stack([x.expand(lead) if x is not None else ref.new_zeros(lead) for x in row], -1)
                     for row in a], -2)
    B = torch.stack([x.expand(T, *h.shape) if x is not None else ref.new_zeros(T, *h.shape) for x, h in zip(b, h0)], -1)
    out = _matrix_scan(A, B, torch.stack(list(h0), -1))
    return out.unbind(-1)
