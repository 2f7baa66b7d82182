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
