"""Newton's method over time for nonlinear cells (DEER, Lim et al. 2023; ParaRNN, Danieli et al. 2025).

The whole trajectory h_1..h_T solves h_t = f(h_{t-1}, x_t). Around an iterate H, with F_t = f(H_{t-1}, x_t)
and J_t = ∂f/∂h at H_{t-1}, the Newton update δ solves the linear recurrence δ_t = J_t δ_{t-1} + (F_t - H_t),
a parallel scan: elementwise for a diagonal J, of small matrices for m×m blocks, of full matrices for a
dense one (the structure comes from the IR: rnnc/jacobian.py). Causality makes step t exact after t
iterations, so the steps before the first one still moving are final and the next iteration only
works on the rest. When the iteration cap is reached first, the remaining steps run one after another
(with a warning): the result is never a half-converged trajectory.

The gradient needs no iterations (implicit function theorem): with λ the adjoint of the trajectory,
λ_t = g_t + J_{t+1}ᵀ λ_{t+1} is one reverse linear scan with the transposed Jacobians, and the gradients
of everything f reads (inputs, params, the initial state) are one vector-Jacobian product of f over all
steps at once, which autograd takes through one more evaluation of f on the converged trajectory.

`step(prev, lo, hi)` is the generated cell's step for steps lo..hi-1 at once: prev is a tuple of
[(hi-lo)*N, *shape] states before those steps, the result a tuple of their next values.
`step_jac(prev, lo, hi)` returns those and each group's Jacobian blocks (see _newton_linearize), both
from one generated pass: the step's jvp, derived from the IR (backends/emit_newton.py), not autograd.

A diagonal group's or 2x2 block's linear solves (every iteration's, and the backward's reverse one) run
in Triton (rnnc/runtime/triton_newton.py, handed over by a module built with triton installed) on CUDA
tensors: see _newton_use_triton and the cell's NEWTON_TRITON.
"""
import math
import os
import warnings

import torch

from rnnc.errors import InputError

from .calling import _gather_inputs
from .scan import _matrix_scan

#: The most numbers a dense group's Jacobians may hold (for all steps at once): 2^28, 1 GiB in float32.
_NEWTON_DENSE_MAX = 1 << 28


class NewtonWarning(RuntimeWarning):
    """Newton's iterations did not converge within the cap: the rest of the sequence ran step by step."""


def _newton_tolerance(dtype):
    """The convergence threshold on |δ| / (1 + |h|): √ε of the compute dtype (3.5e-4 for float32,
    1.5e-8 for float64). Newton converges quadratically, so an update that small leaves an error of
    order ε, and a stricter test would chase rounding noise."""
    return math.sqrt(torch.finfo(dtype).eps)


def _newton(cell, step, step_jac, s0, T, groups, solvers=None):
    """The states after each of T steps, each [T, N, *shape], from initial states s0 (a tuple of
    [N, *shape]); `groups` is the Jacobian's structure: (kind, state indices) per coupled group, kind
    "diagonal", "block" or "dense". Differentiable with respect to s0 and whatever `step` reads.
    `solvers`: the Triton solves (diagonal, 2x2 block) from triton_newton.py, which a module built where
    triton is installed hands over (None otherwise: this module never imports triton itself).

    The cell's NEWTON_MAX_ITERS and NEWTON_TOL (None: by dtype) control the iterations; what happened is
    left in `cell.newton_info` (iterations, whether they converged, where the sequential finish began,
    how the initial guess was made)."""
    if torch.compiler.is_exporting():  # the iterations stop on the data: no graph holds them
        raise InputError("the newton backend cannot be exported: its number of iterations depends on the "
                         "data; export the cell built with backend='loop' (one op for every length)")
    for kind, idx in groups:
        width = sum(s0[i][0].numel() for i in idx)
        if kind == "dense" and T * s0[0].shape[0] * width * width > _NEWTON_DENSE_MAX:
            raise InputError(f"newton: a dense {width}x{width} Jacobian for each of {T} steps x {s0[0].shape[0]} "
                             f"rows is {T * s0[0].shape[0] * width * width:,} numbers, over the limit of "
                             f"{_NEWTON_DENSE_MAX:,}; use backend='loop' for this size (dense Newton pays only "
                             "for small states)")
    max_its = cell.NEWTON_MAX_ITERS
    kernels = solvers if _newton_use_triton(getattr(cell, "NEWTON_TRITON", None), s0[0], solvers) else None
    tol = cell.NEWTON_TOL if cell.NEWTON_TOL is not None else _newton_tolerance(s0[0].dtype)
    with torch.no_grad():
        H, done, guess = _newton_guess(step, s0, T, tol)  # the steps before `done` are final
        its, bufs = 0, None
        while done < T and its < max_its:
            its += 1
            prev = tuple(h[done - 1:T - 1] for h in H)
            bufs = _newton_linearize(step_jac, prev, done, T, minus=tuple(h[done:] for h in H), out=bufs)
            R, J = bufs
            delta = _newton_solve(J, R, groups, triton=kernels)  # over R (the residuals F - H, then δ)
            worst = _newton_update(H, delta, done, tol)
            still = torch.nonzero(~(worst <= tol))  # NaN compares False: never converged
            done = T if still.numel() == 0 else done + max(1, int(still[0]))
        sequential_from = done if done < T else None
        if sequential_from is not None:
            warnings.warn(f"newton: {its} iterations did not converge on steps {done}..{T - 1} of {T}; "
                          "those steps ran one after another (exact, but sequential). Raise NEWTON_MAX_ITERS or "
                          "use backend='loop' for this cell", NewtonWarning, stacklevel=3)
            for t in range(done, T):
                nxt = _newton_call(step, tuple(h[t - 1:t] for h in H), t, t + 1)
                for h, v in zip(H, nxt):
                    h[t] = v[0]
    cell.newton_info = {"iterations": its, "converged": sequential_from is None, "sequential_from": sequential_from,
                        "steps": T, "tolerance": tol, "guess": guess}
    if getattr(cell, "NEWTON_DEBUG", False):
        print(f"rnnc newton: {cell.newton_info}")
    if not torch.is_grad_enabled():
        return tuple(H)
    prev = tuple(torch.cat([s.unsqueeze(0), h[:-1]]) for s, h in zip(s0, H))
    F = _newton_call(step, prev, 0, T)  # one more step on the solution: the path gradients take
    if not any(f.requires_grad for f in F):
        return tuple(H)
    return _NewtonAdjoint.apply((step_jac, tuple(p.detach() for p in prev), groups, kernels), *F)


def _newton_guess(step, s0, T, tol):
    """The first iterate, [T, N, *shape] per state, how many of its first steps are exact, and how it
    was made ({"segment": steps per segment (None: every step from s0), "passes": how many}).

    The steps run one after another within segments of _newton_segment steps, all segments at once as
    one batch: segment 0 from s0 (so it is exact), every later one from the state reached by running
    the _NEWTON_WARMUP steps before it from s0 (a batch of its own). A contracting cell forgets a wrong
    start geometrically, so those starts are already close to the truth. Then up to _NEWTON_SWEEPS more
    such passes (block Jacobi), each segment from the state the previous pass ended the segment before
    it on (and one more segment exact each time), while a segment's last state still moves by more
    than `tol` (as Newton's test) from the estimate the segment after it started from, and moves less
    than in the pass before (dynamics that do not forget their start stop there: Newton does better).
    Newton's iterations then have little left to do (B=4, float32: ParaGRU 1 iteration instead of 4;
    IndRNN, whose relu makes Newton an active-set iteration, 1 at H=64 and 2-23 at H=256 instead of
    15-32). Sequences shorter than two segments get every step from s0 instead (step 0 exact)."""
    n = s0[0].shape[0]
    width = sum(s[0].numel() for s in s0)
    length = _newton_segment(T, n * width)
    if T < 2 * length:
        return _newton_guess_from_start(step, s0, T), 1, {"segment": None, "passes": 1}
    H = [s.new_empty((T, *s.shape)) for s in s0]
    segments = -(-T // length)
    group = max(1, _NEWTON_CHUNK // max(1, n * width))  # segments per batch
    warmup = min(_NEWTON_WARMUP, length)
    for g0 in range(1, segments, group):  # the starts of segments 1.. (in the tails of the ones before)
        g1 = min(segments, g0 + group)
        cur = tuple(s.detach().repeat(g1 - g0, *[1] * (s.dim() - 1)) for s in s0)
        for i in range(warmup):
            lo = g0 * length - warmup + i
            cur = step(cur, lo, (g1 - 1) * length + 1 - warmup + i, length)
            for h, c in zip(H, cur):
                h[lo::length][:g1 - g0] = c.expand((g1 - g0) * n, *c.shape[1:]).reshape(g1 - g0, n, *c.shape[1:])
    moved = math.inf
    for sweep in range(min(_NEWTON_SWEEPS + 1, segments)):  # the segments before `sweep` are exact already
        # the last states of the segments a later one starts from (views), and before this pass
        ends = [h[(sweep + 1) * length - 1:(segments - 1) * length:length] for h in H]
        before = [e.clone() for e in ends]
        for g0 in range(sweep, segments, group):
            g1 = min(segments, g0 + group)
            cur = tuple(h[max(1, g0) * length - 1:g1 * length - 1:length].flatten(0, 1) for h in H)
            if g0 == 0:
                cur = tuple(torch.cat([s.detach(), c]) for s, c in zip(s0, cur))
            for i in range(length):
                lo, hi = g0 * length + i, min(T, g1 * length)
                if lo >= hi:
                    break
                rows = len(range(lo, hi, length)) * n  # the last segment may be shorter
                cur = step(tuple(c[:rows] for c in cur), lo, hi, length)
                for h, c in zip(H, cur):
                    h[lo:hi:length] = c.expand(rows, *c.shape[1:]).reshape(rows // n, n, *c.shape[1:])
        last, moved = moved, max((float(((e - b).abs() / (1 + b.abs())).max()) if e.numel() else 0.0)
                                 for e, b in zip(ends, before))
        if not moved > tol or moved >= last:  # converged, or not forgetting (NaN: stop too)
            break
    return H, min(T, (sweep + 1) * length), {"segment": length, "passes": sweep + 1}


def _newton_segment(T, entries):
    """The guess's segment length for T steps of `entries` state entries (all rows) each: the longest
    whose batched steps (one per segment) still hold _NEWTON_SEGMENT_ENTRIES entries, so per-op
    overhead stays small, within _NEWTON_SEGMENT (64 steps: long enough for a contracting cell to
    forget a wrong start) and 4x that (a cell with a long memory, e.g. IndRNN's u near 1, needs fewer
    passes over longer segments)."""
    return min(4 * _NEWTON_SEGMENT, max(_NEWTON_SEGMENT, T * entries // _NEWTON_SEGMENT_ENTRIES))


def _newton_guess_from_start(step, s0, T):
    """Every step from s0 (step 0 is then exact), a chunk of steps at a time (see _NEWTON_CHUNK)."""
    n = s0[0].shape[0]
    chunk = max(1, _NEWTON_CHUNK // max(1, n * sum(s[0].numel() for s in s0)))
    H = [s.new_empty((T, *s.shape)) for s in s0]
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        first = tuple(s.detach().unsqueeze(0).expand(c1 - c0, *s.shape) for s in s0)
        for h, f in zip(H, _newton_call(step, first, c0, c1)):
            h[c0:c1] = f
    return H


def _step_rows(lo, hi, every, n, device):
    """The rows of time-major [T*n, ...] values that steps lo, lo + every, ... below hi read: a slice
    for consecutive steps, else the index of each step's n rows (the guess's segments, _newton_guess)."""
    if every == 1:
        return slice(lo * n, hi * n)
    return (torch.arange(lo * n, hi * n, every * n, device=device)[:, None] + torch.arange(n, device=device)).flatten()


def _newton_update(H, delta, done, tol):
    """H[done:] += δ, and per step the largest |δ| - tol |h| (|δ| <= tol (1 + |h|) is converged; NaN stays
    NaN), a chunk of steps at a time; δ is overwritten."""
    t, n = delta[0].shape[:2]
    chunk = max(1, _NEWTON_CHUNK // max(1, n * sum(d[0, 0].numel() for d in delta)))
    worst = delta[0].new_empty(t)
    for c0 in range(0, t, chunk):
        c1 = min(t, c0 + chunk)
        part = None
        for h, d in zip(H, delta):
            h, d = h[done + c0:done + c1], d[c0:c1]
            h += d
            excess = d.abs_().sub_(h.abs().mul_(tol)).reshape(c1 - c0, -1).amax(1)
            part = excess if part is None else torch.maximum(part, excess)
        worst[c0:c1] = part
    return worst


def _newton_pays(cell, args, kwargs, rank, dims, entries):
    """Whether a module built with backend "auto" runs this call by Newton's method (rnnc/schedule.py,
    NEWTON_FROM): the sequences have NEWTON_FROM steps or more, and all of them together hold at most
    NEWTON_MAX_ENTRIES state entries per step (`entries` of the built `dims`' sizes, per sequence). Never
    when compiling or exporting (the iterations stop on the data), nor when the dims are not known yet
    (the loop reports what is missing)."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    inputs = _gather_inputs(cell.INPUTS, args, kwargs)
    x = inputs[0] if inputs else None
    if not isinstance(x, torch.Tensor) or x.dim() < 2 + rank or x.shape[1] < cell.NEWTON_FROM:
        return False
    if any(d not in cell.dims for d in dims):
        return False
    rows = x.shape[0] * math.prod(x.shape[2:x.dim() - rank])
    return rows * entries(*(cell.dims[d] for d in dims)) <= cell.NEWTON_MAX_ENTRIES


def _newton_call(step, prev, lo, hi):
    """step over time-major [t, N, *shape] states (t = hi - lo), flattened to rows and back."""
    t, n = prev[0].shape[:2]
    out = step(tuple(p.reshape(t * n, *p.shape[2:]) for p in prev), lo, hi)
    return tuple(o.expand(t * n, *o.shape[1:]).reshape(t, n, *o.shape[1:]) for o in out)


#: Steps x rows x entries per chunk of the linearization: each chunk's temporaries (~1 MiB) stay in cache
#: and are reused by the allocator, instead of page-faulting in fresh T*N-sized tensors for every op.
_NEWTON_CHUNK = 1 << 18

#: The initial guess (_newton_guess, _newton_segment): segments of at least _NEWTON_SEGMENT steps, longer
#: (up to 4x) where each batched step still holds _NEWTON_SEGMENT_ENTRIES entries, each started from
#: _NEWTON_WARMUP steps run from s0 before it, and at most _NEWTON_SWEEPS passes after the first.
#: Measured (CPU, 1 thread, B=4, forward; before the warm-up, segments started from s0 and took 2 passes):
#: ParaGRU converges in 1 iteration after 2 passes from 32-step segments on (H=64, T=16384: 202-216 ms for
#: 32-256 steps; T=1024: 14, 17, 24, 38 ms for 32, 64, 128, 256: short sequences want short segments);
#: IndRNN (H=256, T=16384) needs long ones: 64 steps 24 iterations, 3.3 s; 256 steps 12 (4 passes) or 3
#: (8 passes), 1.2 or 0.8 s. Warm-up (ParaGRU H=64, T=16384 / 4096): 16 steps 209 / 47 ms (2 passes), 32
#: steps 172 / 38 ms (1 pass), 64 steps 167 / 45, 256 steps 218 / 44.
_NEWTON_SEGMENT = 64
_NEWTON_SEGMENT_ENTRIES = 1 << 14
_NEWTON_SWEEPS = 8
_NEWTON_WARMUP = 32


def _newton_linearize(step_jac, prev, lo, hi, minus=None, out=None):
    """f at prev (each [t, N, *shape]) minus `minus` (the residuals, when given) and each group's Jacobian
    there, from the generated `step_jac` (the step and its jvp, rendered from the IR: one pass over the
    rows): a diagonal group's [t, N, *shape]; an m-state block's [t, N, *shape, m, m] (row: output state);
    a dense group's [t, N, n, n] over its states' entries flattened in order. Computed a chunk of steps
    at a time into `out` (the buffers an earlier call returned, at least t steps long; new when None)."""
    t, n = prev[0].shape[:2]
    width = sum(p[0, 0].numel() for p in prev)
    chunk = max(1, _NEWTON_CHUNK // max(1, n * width))
    for c0 in range(0, t, chunk):
        c1 = min(t, c0 + chunk)
        F, J = step_jac(tuple(p[c0:c1].reshape((c1 - c0) * n, *p.shape[2:]) for p in prev), lo + c0, lo + c1)
        if c0 == 0:
            if out is None or out[0][0].shape[0] < t:
                out = ([f.new_empty((t, n, *f.shape[1:])) for f in F], [j.new_empty((t, n, *j.shape[1:])) for j in J])
            out = ([o[:t] for o in out[0]], [o[:t] for o in out[1]])
        for i, f in enumerate(F):
            f = f.expand((c1 - c0) * n, *f.shape[1:]).reshape(c1 - c0, n, *f.shape[1:])
            if minus is None:
                out[0][i][c0:c1] = f
            else:
                torch.sub(f, minus[i][c0:c1], out=out[0][i][c0:c1])
        for o, j in zip(out[1], J):
            o[c0:c1] = j.reshape(c1 - c0, n, *j.shape[1:])
    return out


def _newton_dense_jacobian(tangent, prev):
    """A dense group's [rows, n, n] Jacobian from `tangent` (the generated jvp of its states' next values,
    linear in its arguments, one per state, each [rows, *shape]) applied to every basis vector of the
    states' n flattened entries, vmapped in chunks that keep each batch of columns near 2^24 numbers."""
    rows = prev[0].shape[0]
    sizes = [p[0].numel() for p in prev]
    width = sum(sizes)

    def column(e):
        tangents = [part.reshape(p.shape[1:]).expand(p.shape) for part, p in zip(e.split(sizes), prev)]
        return torch.cat([o.reshape(rows, -1) for o in tangent(*tangents)], -1)

    chunk = max(1, (1 << 24) // max(1, rows * width))
    eye = torch.eye(width, dtype=prev[0].dtype, device=prev[0].device)
    cols = torch.func.vmap(column, chunk_size=chunk)(eye)  # [cols, rows, rows of J]
    return cols.permute(1, 2, 0)


def _newton_use_triton(setting, like, solvers):
    """Whether diagonal groups' and 2x2 blocks' solves run in Triton (the `solvers` from triton_newton.py;
    None when the module was built without triton) for states like `like`: with the cell's NEWTON_TRITON
    None (the default), on CUDA tensors; True also asks for it on CPU tensors, which then need Triton's
    interpreter (TRITON_INTERPRET=1: tests); False never. On CPU the PyTorch solve is the default: the
    interpreter is orders of magnitude slower."""
    if setting is False or (setting is None and like.device.type != "cuda"):
        return False
    if solvers is None:
        if setting:
            raise InputError("NEWTON_TRITON = True needs a module built where triton is installed "
                             "(pip install 'rnnc[triton]', then build or compile the cell again)")
        return False
    if like.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise InputError("NEWTON_TRITON = True on CPU tensors needs Triton's interpreter (TRITON_INTERPRET=1 "
                         "before the cell is built); leave NEWTON_TRITON = None to solve in PyTorch on CPU")
    return True


def _newton_solve(J, rhs, groups, reverse=False, triton=None):
    """Per group, x_t = J_t x_{t-1} + rhs_t from x = 0 (rhs: a tuple of [t, N, *shape] per state, which a
    diagonal group's solve overwrites). With `reverse`, the adjoint x_t = J_{t+1}ᵀ x_{t+1} + rhs_t instead
    (J then holds J_1..J_{t-1}). With `triton` (the Triton solves for diagonal groups and 2x2 blocks from
    triton_newton.py, where _newton_use_triton says so), those groups run them (overwriting rhs too);
    larger blocks and dense groups the PyTorch matrix scan either way."""
    out = list(rhs)
    for (kind, idx), a in zip(groups, J):
        if kind == "diagonal" and triton is not None:
            out[idx[0]] = triton[0](a, rhs[idx[0]], reverse)
            continue
        if kind == "block" and len(idx) == 2 and triton is not None:
            out[idx[0]], out[idx[1]] = triton[1](a, rhs[idx[0]], rhs[idx[1]], reverse)
            continue
        if kind == "diagonal":  # in place, without the copies and stacks of the autograd-friendly scans
            i = idx[0]
            out[i] = (_diagonal_scan_(a.flip(0), rhs[i].flip(0)).flip(0) if reverse
                      else _diagonal_scan_(a[1:], rhs[i]))
            continue
        if kind == "block":
            b = torch.stack([rhs[i] for i in idx], -1)
        else:
            b = torch.cat([rhs[i].reshape(*rhs[i].shape[:2], -1) for i in idx], -1)
        if reverse:
            a = torch.cat([a.new_zeros((1, *a.shape[1:])), a.transpose(-1, -2).flip(0)])  # (T = 1: no J)
            b = b.flip(0)
        x = _matrix_scan(a, b, torch.zeros_like(b[0]))
        x = x.flip(0) if reverse else x
        if kind == "block":
            for j, i in enumerate(idx):
                out[i] = x[..., j]
        else:
            for i, part in zip(idx, x.split([rhs[i][0, 0].numel() for i in idx], -1)):
                out[i] = part.reshape(rhs[i].shape)
    return tuple(out)


def _diagonal_scan_(a, b):
    """x_0 = b_0, x_t = a_{t-1} x_{t-1} + b_t (a: [T-1, ...], the factors of steps 1..T-1), written over
    b (returned); a is only read. O(T) work in O(log T) rounds, as rnnc/runtime/scan.py's _linear_scan,
    but on strided views of b in place: each pair's second step absorbs the first, the odd steps are
    scanned recursively (their factors, the pairs' products, the only new tensor), then the even steps
    are filled in from them. No autograd (Newton's solves run without it)."""
    T = b.shape[0]
    if T < 2:
        return b
    n = T // 2
    odd = b[1::2]
    odd.addcmul_(a[0::2][:n], b[0::2][:n])  # x_{2k+1} given x_{2k-1}: the pair (2k, 2k+1) combined
    _diagonal_scan_(a[2::2][:n - 1] * a[1::2][:n - 1], odd)
    even = b[2::2]
    even.addcmul_(a[1::2][:even.shape[0]], odd[:even.shape[0]])
    return b


class _NewtonAdjoint(torch.autograd.Function):
    """Identity on the trajectory's values; its backward solves the adjoint recurrence
    λ_t = g_t + J_{t+1}ᵀ λ_{t+1} (J at the solution), handing λ to the step that produced them."""

    @staticmethod
    def forward(ctx, solved, *F):
        ctx.solved = solved
        return tuple(f.clone() for f in F)

    @staticmethod
    def backward(ctx, *grads):
        step_jac, prev, groups, kernels = ctx.solved
        grads = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, prev))
        T = prev[0].shape[0]
        if T == 1:
            return (None, *grads)
        with torch.no_grad():
            _, J = _newton_linearize(step_jac, tuple(p[1:] for p in prev), 1, T)
            lam = _newton_solve(J, grads, groups, reverse=True, triton=kernels)
        return (None, *lam)
