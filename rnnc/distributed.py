"""Sequence (context) parallelism over torch.distributed: each rank runs a time slice of the sequences.

`SequenceParallel(cell)` wraps a cell built with a scan or chunk form. Every rank of the process group
calls it with its own slice of the same batch (rank 0 the first steps, rank 1 the next, ...; slices may
differ in length, none may be empty) and gets that slice's outputs; the results, and the gradients of
the inputs, params and initial state, are those of one process running the whole sequence.

How: the generated code is left as it is. Its recurrence calls a few runtime primitives (rnnc/runtime/
scan.py, chunk.py, chunk_dplr.py), and each of them maps the state entering the slice to the states
over the slice by an affine map, over (+, ×) or, for the max-plus scan, over (max, +):

    S_t = Φ_t S_in + L_t        (L_t: the states from a zero start; Φ_t: the transitions' product)

While the wrapper runs the cell, those calls go to the versions here: each computes L (and Φ_T), the
ranks all-gather (Φ_T, L_T) with autograd (a few [N, state] tensors per primitive, never anything of
length T), each rank composes the maps of the ranks before it onto rank 0's initial state (P is small:
sequentially, on every rank) and adds Φ_t S_in:
- elementwise scans: Φ_t is the cumulative product of the gates (cumulative sum for max-plus), so the
  correction is one elementwise op; a running sum needs none; an associative fold combines the
  entering value with every local prefix (one more combine per step);
- dense and block matrix scans: Φ_T by a product tree over the slice, then the scan runs again from
  S_in (about twice the local work);
- chunk forms with key/value decays: Φ_t = exp(cumulative log-decay), diagonal, so the readout's share
  of S_in is one [T, K] x [K, V] product per row;
- the delta rule and the generalized delta rule (KDA, RWKV-7, DeltaProduct): Φ_t is a K x K matrix.
  The primitive runs once with K more value columns holding the identity as their initial state and
  zero values: those columns carry Φ_t, their readout is Φ_t^T q_t and their final state Φ_T, so no
  second pass is needed; the value-width work grows from V to V + K.
The state before each step (`_state_before`, what a cell that reads its old state sees) starts from the
previous rank's last state. `sequence_parallel(model)` does this for every cell of a model, and gives
rnnc.layers' short convolutions the inputs before the slice from the ranks before (_conv_halo).

Why at the primitives: every generated module of the scan and chunk backends works unchanged, and
layered cells (LSRL programs, mLSTM's max-plus stabiliser read by its chunk pass) are right by
construction: a later state's coefficients are computed from the earlier states' corrected sequences
before its own primitive exchanges its map. The dispatchers go into the generated module's globals (not
into rnnc.runtime), so standalone files from `rnnc compile` carry no hook and other instances of the class
run as before. The identity columns for the delta rules replace a second pass from S_in (which would
double the local work, as for matrix scans) by one wider pass.

Semantics: only rank 0's initial state is used (`state=` on the other ranks is ignored and gets zero
gradient); each rank's final states are those at the end of its slice, so the last rank's are the
sequence's. Every rank must run the forward and the backward together, in the same order, with the same
tensors requiring grad, and a loss that reads its outputs (as with DistributedDataParallel): each
primitive's gather is a collective, in the forward and again in the backward. A call where some ranks
record gradients and others do not is refused on every rank; a rank whose loss ignores its outputs would
leave the others waiting in the backward.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import InputError, UnsupportedError
from .runtime import chunk as _ck
from .runtime import chunk_dplr as _dplr
from .runtime import scan as _sc
from .runtime.calling import _gather_inputs

__all__ = ["SequenceParallel", "sequence_parallel"]


@dataclass(frozen=True)
class _Ranks:
    group: object
    rank: int
    world: int


#: The process group inside `sequence_parallel` (None: the primitives run as usual).
_ACTIVE: contextvars.ContextVar[_Ranks | None] = contextvars.ContextVar("rnnc_sequence_parallel", default=None)


class _AllGather(torch.autograd.Function):
    """x from every rank of the group, in rank order. Backward: the sum over the ranks of the gradient
    each computed for this rank's x (an all-reduce of the stacked gradients: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, group, x):
        ctx.group = group
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, x, group=group)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        g = torch.stack(grads)
        dist.all_reduce(g, group=ctx.group)
        return None, g[dist.get_rank(ctx.group)]


def _entering(h0, summary, step):
    """The states entering this rank's slice: rank 0's initial states `h0` (a tuple) carried through the
    slices of ranks 0 .. r-1 by `step(h, summary_j) -> h`, where `summary` is what this rank's slice
    contributes (tensors of the same shapes on every rank; None: absent, the same on every rank).

    One all-gather of [h0 | summary]. Every rank uses what it gathered (rank 0 its own h0), so every
    rank's backward reaches the gather's; a rank's own h0 counts only on rank 0."""
    ranks = _ACTIVE.get()
    parts = [*h0, *(s for s in summary if s is not None)]
    dt = parts[0].dtype
    for x in parts[1:]:
        dt = torch.promote_types(dt, x.dtype)
    gathered = _AllGather.apply(ranks.group, torch.cat([x.reshape(-1).to(dt) for x in parts]))

    def unpack(flat):
        out = []
        for x in parts:
            out.append(flat[:x.numel()].reshape(x.shape).to(x.dtype))
            flat = flat[x.numel():]
        return out

    h = tuple(unpack(gathered[0])[:len(h0)])
    for j in range(ranks.rank):
        given = iter(unpack(gathered[j])[len(h0):])
        h = step(h, tuple(None if s is None else next(given) for s in summary))
    return h


# ---- the runtime primitives, one slice of a sequence parallel run each (same signatures) ----


def _linear_scan(a, b, h0):
    """h_t = a_t h_{t-1} + b_t: from zero, plus (a_1 ... a_t) h_in."""
    full = (max(a.shape[0], 1 if b is None else b.shape[0]),) + tuple(h0.shape)
    local = _sc._linear_scan(a, b, torch.zeros_like(h0))
    reach = torch.cumprod(a.expand(full), 0)
    (h,) = _entering((h0,), (reach[-1], local[-1]), lambda h, s: (s[0] * h[0] + s[1],))
    return local + reach * h


def _sum_scan(b, h0, T):
    """h_t = h_{t-1} + b_t: the running sum from zero, plus h_in."""
    local = _sc._sum_scan(b, torch.zeros_like(h0), T)
    (h,) = _entering((h0,), (local[-1],), lambda h, s: (h[0] + s[0],))
    return local + h


def _maxplus_scan(a, b, h0):
    """h_t = max(h_{t-1} + a_t, b_t): from -inf (the identity of max), then max(h_in + a_1 + ... + a_t, .)."""
    a = torch.zeros_like(b) if a is None else a.expand(b.shape)
    shift = torch.cumsum(a, 0)
    local = _sc._maxplus_scan(a, b, torch.full_like(h0, -math.inf))
    (h,) = _entering((h0,), (shift[-1], local[-1]), lambda h, s: (torch.maximum(h[0] + s[0], s[1]),))
    return torch.maximum(h + shift, local)


def _fold_scan(combine, h0, xs):
    """s_t = combine(s_{t-1}, x_t), associative: the local prefixes x_1 ... x_t, each combined once more
    with the entering value."""
    local = _sc._fold_from_first(combine, tuple(xs))
    h = _entering(tuple(h0), tuple(x[-1] for x in local), lambda h, s: tuple(combine(*h, *s)))
    T = local[0].shape[0]
    return _sc._fold_rows(combine, tuple(x.expand(T, *x.shape) for x in h), local)


def _steps_product(A, T, mm, cut):
    """A_T ... A_1 over T steps (entries with a step axis of T, or 1: the same each step) by a product
    tree, O(log T) rounds; the result keeps a step axis of length 1. mm(later, earlier) multiplies,
    cut(A, slice) takes steps."""
    tail = None  # the product of the odd last steps set aside, latest first
    while T > 1:
        if T % 2:
            last = cut(A, slice(T - 1, T))
            tail = last if tail is None else mm(tail, last)
            A, T = cut(A, slice(0, T - 1)), T - 1
        A, T = mm(cut(A, slice(1, None, 2)), cut(A, slice(0, None, 2))), T // 2
    A = cut(A, slice(0, 1))
    return A if tail is None else mm(tail, A)


def _steps(A, sl):
    return A if A.shape[0] == 1 else A[sl]


def _group_scan(T, a, b, h0, dense):
    """States scanned together with matrices: from zero for the slice's map, then again from h_in."""
    local = _sc._group_scan(T, a, b, tuple(torch.zeros_like(h) for h in h0), dense)
    last = tuple(x[-1] for x in local)
    if dense:
        sizes = [h.shape[-1] for h in h0]
        phi = _steps_product(_sc._group_matrix(a, h0), T, torch.matmul, _steps)[0]

        def step(h, s):
            moved = _sc._matvec(s[0], torch.cat(h, -1)).split(sizes, -1)
            return tuple(x + y for x, y in zip(moved, s[1:]))
        h = _entering(tuple(h0), (phi, *last), step)
    else:
        m = len(h0)
        phi = _steps_product(a, T, _sc._block_mm, _sc._block_slice)
        flat = [None if x is None else x[0] for row in phi for x in row]

        def step(h, s):
            rows = [list(s[i * m:(i + 1) * m]) for i in range(m)]
            moved = _sc._block_mv(rows, list(h))
            return tuple(y if x is None else x + y for x, y in zip(moved, s[m * m:]))
        h = _entering(tuple(h0), (*flat, *last), step)
    return _sc._group_scan(T, a, b, h, dense)


def _state_before(h0, h):
    """The state before each step: the previous rank's last state, then h_0 ... h_{T-2}."""
    (prev,) = _entering((h0,), (h[-1],), lambda _, s: (s[0],))
    return torch.cat([prev.unsqueeze(0), h[:-1]])


def _chunk_linear(q, k, v, gk, gv, h0, chunk, before=False):
    """Key/value decays: S_t = diag(exp(Gk_t)) S_in diag(exp(Gv_t)) + L_t (G: the log-decays summed
    from the slice's start), so the readout's share of S_in is exp(Gv_t) * (S_in^T (exp(Gk_t) q_t))."""
    T, N, K = q.shape
    V = v.shape[-1]
    o, S = _ck._chunk_linear(q, k, v, gk, gv, None, chunk, before)
    h0 = q.new_zeros(N, K, V) if h0 is None else h0
    Gk, Gv = (None if g is None else torch.cumsum(g, 0) for g in (gk, gv))
    dk, dv = (None if G is None else torch.exp(G[-1]) for G in (Gk, Gv))

    def step(h, s):
        x = h[0] if s[0] is None else s[0].unsqueeze(-1) * h[0]
        return ((x if s[1] is None else x * s[1].unsqueeze(-2)) + s[2],)
    (S0,) = _entering((h0,), (dk, dv, S), step)
    if before:  # the readout of S_{t-1}: the decays up to the step before
        Gk, Gv = (None if G is None else torch.cat([torch.zeros_like(G[:1]), G[:-1]]) for G in (Gk, Gv))
    share = torch.einsum("tnk,nkv->tnv", q if Gk is None else q * torch.exp(Gk), S0)
    if Gv is not None:
        share = share * torch.exp(Gv)
    return o + share, step((S0,), (dk, dv, S))[0]


def _chunk_delta(q, k, v, beta, g, h0, chunk, before=False):
    """The delta rule: a K x K transition, carried by K identity columns (see _through_slices)."""
    T, N, K = q.shape
    o, S = _ck._chunk_delta(q, k, _widen(v, K), beta, g, _identity_start(q, v.shape[-1]), chunk, before)
    return _through_slices(o, S, h0, v.shape[-1])


def _chunk_dplr(q, ks, vs, as_, bs, gs, h0, chunk, before=False):
    """The generalized delta rule: as _chunk_delta, every micro-step's values widened."""
    K = q.shape[-1]
    V = next(v for v in vs if v is not None).shape[-1]
    wide = [None if v is None else _widen(v, K) for v in vs]
    o, S = _dplr._chunk_dplr(q, ks, wide, as_, bs, gs, _identity_start(q, V), chunk, before)
    return _through_slices(o, S, h0, V)


def _widen(v, K):
    """Values [T, N, V] -> [T, N, V + K], K zero columns appended."""
    return torch.cat([v, v.new_zeros(*v.shape[:-1], K)], -1)


def _identity_start(q, V):
    """The initial state [0 | I] of the widened run, [N, K, V + K]."""
    N, K = q.shape[1], q.shape[2]
    eye = torch.eye(K, dtype=q.dtype, device=q.device).expand(N, K, K)
    return torch.cat([q.new_zeros(N, K, V), eye], -1)


def _through_slices(o, S, h0, V):
    """From a run widened by the identity: its first V columns are the slice from a zero start (o, L_T),
    the other K its transition, Φ_t^T q_t in the readout and Φ_T in the final state. The state
    entering the slice is composed over the ranks, and o_t gains S_in^T (Φ_t^T q_t)."""
    N, K = S.shape[0], S.shape[1]
    h0 = S.new_zeros(N, K, V) if h0 is None else h0

    def step(h, s):
        return (s[0] @ h[0] + s[1],)
    summary = (S[..., V:], S[..., :V])
    (S0,) = _entering((h0,), summary, step)
    return o[..., :V] + torch.einsum("tnk,nkv->tnv", o[..., V:], S0), step((S0,), summary)[0]


#: The runtime entry points generated scan and chunk code calls, and their sequence parallel versions.
_PARALLEL = {f.__name__: f for f in (_linear_scan, _sum_scan, _maxplus_scan, _fold_scan, _group_scan, _state_before,
                                     _chunk_linear, _chunk_delta, _chunk_dplr)}


def _install(module) -> None:
    """Point a generated module's names of the runtime primitives at dispatchers (once per module): the
    sequence parallel version inside `sequence_parallel` (in this context), the module's own
    function otherwise (other cells of the same class are unaffected)."""
    names = vars(module)
    if names.get("_RNNC_SEQUENCE_PARALLEL"):
        return
    for name, parallel in _PARALLEL.items():
        if name in names:
            names[name] = _dispatcher(names[name], parallel)
    names["_RNNC_SEQUENCE_PARALLEL"] = True


def _dispatcher(own, parallel):
    @functools.wraps(own)
    def call(*args, **kwargs):
        return (own if _ACTIVE.get() is None else parallel)(*args, **kwargs)
    return call


def _conv_halo(x, cache, pad):
    """The `pad` inputs before this rank's slice x [N, T, C] for a causal convolution (rnnc.layers'
    ShortConvolution): the last ones of the ranks before, rank 0's from `cache` (zeros without one).
    A slice shorter than `pad` passes on what it received, shifted (so any lengths work)."""
    N, T, C = x.shape
    start = x.new_zeros(N, pad, C) if cache is None else cache.to(x.dtype)
    n = min(T, pad)
    tail = torch.cat([x.new_zeros(N, pad - n, C), x[:, T - n:]], 1)

    def step(h, s):
        k = int(s[1].item())
        return (torch.cat([h[0], s[0][:, pad - k:]], 1)[:, -pad:],)
    (halo,) = _entering((start,), (tail, x.new_full((1,), float(n))), step)
    return halo


@contextlib.contextmanager
def sequence_parallel(model: torch.nn.Module, group=None):
    """Inside the block, `model` runs sequence parallel: each rank calls it with its time slice.

    `model` is an rnnc cell or any module holding them (e.g. an `rnnc.layers.LM`): every cell in it must
    have a scan or chunk form (else UnsupportedError, before anything runs), and runs as under
    `SequenceParallel`; the short convolutions of `rnnc.layers` take their first inputs from the ranks
    before. Everything else in a model must work token by token (projections, norms, MLPs), as in
    rnnc.layers. Padding masks and packed sequences (`cu_seqlens`) are refused.

    Args:
        model: the module to run sequence parallel.
        group: the process group (None: the default group, which must be initialised).
    """
    cells = [m for m in model.modules() if hasattr(type(m), "INPUTS") and hasattr(m, "backend")]
    if not cells:
        raise UnsupportedError(f"sequence_parallel found no rnnc cell in {type(model).__name__}",
                               hint="pass a cell from rnnc.build or a module holding such cells")
    forms = [_parallel_form(c) for c in cells]
    if not dist.is_available() or not dist.is_initialized():
        raise UnsupportedError("sequence parallelism needs torch.distributed initialised",
                               hint="call torch.distributed.init_process_group(...) on every rank first")
    group = group if group is not None else dist.group.WORLD
    ranks = _Ranks(group, dist.get_rank(group), dist.get_world_size(group))
    hooks, shadowed = [], []
    try:
        for cell, form in zip(cells, forms):
            _install(sys.modules[type(cell).__module__])
            hooks.append(cell.register_forward_pre_hook(functools.partial(_check_call, ranks), with_kwargs=True))
            if form != "forward" and "LOOP_BELOW" not in vars(cell):  # auto: no loop for short slices
                object.__setattr__(cell, "LOOP_BELOW", 0)
                shadowed.append(cell)
        token = _ACTIVE.set(ranks)
        try:
            yield model
        finally:
            _ACTIVE.reset(token)
    finally:
        for h in hooks:
            h.remove()
        for cell in shadowed:
            del vars(cell)["LOOP_BELOW"]


def _check_call(ranks: _Ranks, cell, args, kwargs):
    """A cell's forward pre-hook under sequence_parallel: refuse what cannot run, on every rank alike."""
    if kwargs.get("cu_seqlens") is not None:
        raise UnsupportedError("sequence parallelism does not take cu_seqlens (packed sequences or padding masks)",
                               hint="split the sequences along time across ranks as a padded batch [B, T, ...]")
    if torch.compiler.is_compiling():
        raise UnsupportedError("sequence parallelism does not run under torch.compile or torch.export",
                               hint="compile the modules around the cells, or run eagerly")
    inputs = _gather_inputs(cell.INPUTS, args, {k: v for k, v in kwargs.items() if k not in ("state", "cu_seqlens")})
    tracked = [*inputs, *cell.parameters(), *(kwargs.get("state") or {}).values()]
    grad = torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in tracked)
    _check_slices(ranks, inputs, grad)


class SequenceParallel(torch.nn.Module):
    """A cell run sequence (context) parallel over a torch.distributed process group.

    Every rank calls it with its time slice of the same batch, `[B, T_r, *extra, ...]` (rank order is time
    order; the T_r may differ, none may be 0), and gets the outputs for its slice and the states at the
    end of its slice; only rank 0's `state=` counts. Values and gradients equal one process running the
    concatenated sequence (tests/test_sequence_parallel.py). The cell must be built with a scan or chunk
    form (`backend="auto"` where it picks one, or `"scan"`/`"chunk"`); short slices still run it (the
    auto backend's loop for short sequences is skipped here). For a whole model (layers, short
    convolutions), use `sequence_parallel(model)`. See the module docstring for how.

    Args:
        cell: a module from `rnnc.build` (its parameters are this module's, under `cell.`).
        group: the process group (None: the default group, which must be initialised).
    """

    def __init__(self, cell: torch.nn.Module, group=None) -> None:
        super().__init__()
        self.cell = cell
        self.group = group
        _parallel_form(cell)

    def forward(self, *args, state=None, cu_seqlens=None, **kwargs):
        """The cell's forward on this rank's slice: (outputs of the slice, states at its end)."""
        if cu_seqlens is not None:  # before any collective: the hook would refuse it on every rank
            raise UnsupportedError("SequenceParallel does not take cu_seqlens (packed sequences)",
                                   hint="split the sequences along time across ranks as a padded batch [B, T, ...]")
        with sequence_parallel(self.cell, self.group):
            return self.cell(*args, state=state, **kwargs)


def _parallel_form(cell) -> str:
    """The method of `cell` that runs its scan or chunk form (UnsupportedError when it has none)."""
    backend = getattr(cell, "backend", None)
    if backend is None or not hasattr(type(cell), "INPUTS"):
        raise UnsupportedError(f"SequenceParallel takes a cell from rnnc.build, got {type(cell).__name__}")
    if backend in ("chunk", "scan"):
        own = f"_forward_{backend}"  # auto's parallel form, without its loop for short sequences
        return own if callable(getattr(type(cell), own, None)) else "forward"
    what = {"triton": "its Triton kernels", "newton": "Newton's iterations"}.get(backend, f"the {backend} backend")
    raise UnsupportedError(
        f"sequence parallelism runs cells on their scan or chunk form; {type(cell).__name__} was built for {what}",
        hint="build it with backend='chunk' or backend='scan' (rnnc.backends_for(spec) lists its lowerings; "
             "a cell with neither, e.g. an LSTM, has no sequence parallel form)")


def _check_slices(ranks: _Ranks, inputs, grad: bool) -> None:
    """Every rank's slice is [B, T_r >= 1, *extra, ...] with the same B and extra (the gathers need equal
    shapes; an empty slice would skip the collectives), and every rank records gradients or none does
    (else some would wait in the backward's collectives for ranks that never run them): checked on every
    rank alike, so all raise together."""
    x = inputs[0] if inputs else None
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise InputError("sequence parallelism needs inputs shaped [B, T, ...]")
    shape = [x.dim(), *x.shape][:16]
    mine = torch.tensor([int(grad)] + shape + [-1] * (17 - len(shape)), dtype=torch.int64)
    every = [torch.empty_like(mine) for _ in range(ranks.world)]
    dist.all_gather(every, mine, group=ranks.group)
    if len({int(e[0]) for e in every}) > 1:
        raise InputError("sequence parallelism: some ranks record gradients and others do not "
                         f"(per rank: {[bool(e[0]) for e in every]}); every rank must run the same backward, so "
                         "the same tensors must require grad on every rank")
    every = [e[1:] for e in every]
    lengths = [int(e[2]) for e in every]
    if min(lengths) < 1:
        raise InputError(f"sequence parallelism: every rank needs at least one step; the slices have {lengths} steps")
    other = [torch.cat([e[:2], e[3:]]) for e in every]
    if any(not torch.equal(o, other[0]) for o in other):
        shapes = [[int(d) for d in e[1:int(e[0]) + 1]] for e in every]
        raise InputError(f"sequence parallelism: the ranks' slices must agree on every axis but time; "
                         f"they are {shapes}")
