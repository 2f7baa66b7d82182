"""Run-time helpers pasted at the top of every generated module (which must not import rnnc)."""

PRELUDE = '''
# Errors about how the cell is called. rnnc.build() swaps in rnnc.errors.InputError (a ValueError).
InputError = ValueError


def _gather_inputs(names, args, kwargs):
    """Inputs passed positionally in declaration order or by name."""
    if len(args) > len(names):
        raise InputError(f"expected at most {len(names)} inputs ({', '.join(names)}), got {len(args)}")
    values = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in names:
            raise InputError(f"unknown input {key!r}; the inputs are {', '.join(names)}")
        if key in values:
            raise InputError(f"input {key!r} given twice")
        values[key] = value
    missing = [n for n in names if n not in values]
    if missing:
        raise InputError(f"missing input {missing[0]!r}; the inputs are {', '.join(names)}")
    return [values[n] for n in names]


def _batch_shape(names, inputs, declared, lead):
    """The shared leading [B, T, *extra] (lead=2) or [B, *extra] (lead=1) of all inputs."""
    common = None
    for name, x, text in zip(names, inputs, declared):
        rank = len(text)
        if not isinstance(x, torch.Tensor):
            raise InputError(f"input {name!r} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < lead + rank:
            want = ", ".join((["B", "T", "*extra"] if lead == 2 else ["B", "*extra"]) + list(text))
            raise InputError(f"input {name!r} must have shape [{want}] (rank {lead + rank} or more), "
                             f"got {list(x.shape)} (rank {x.dim()})")
        outer = tuple(x.shape[:x.dim() - rank])
        if common is None:
            common, first = outer, name
        elif outer != common:
            raise InputError(f"inputs {first!r} and {name!r} disagree on their leading axes: "
                             f"{list(common)} vs {list(outer)}")
    return common


def _bind(dims, origin, dim, size, source):
    """Bind a dim to the size an input shows, or check it against an earlier binding."""
    if dim in dims and dims[dim] != size:
        raise InputError(f"{source} has size {size} for dim {dim}, but {dim} = {dims[dim]} ({origin[dim]})")
    if dim not in dims:
        dims[dim] = size
        origin[dim] = f"from {source}"


def _check_shape(name, x, expected, text, lead):
    got = tuple(x.shape[x.dim() - len(expected):])
    if got != tuple(expected):
        head = "B, T, *extra" if lead == 2 else "B, *extra"
        raise InputError(f"input {name!r} must have shape [{head}, {text}] = [{head}, "
                         f"{', '.join(map(str, expected))}], got {list(x.shape)}")


def _check_state_keys(state, names):
    if state is None:
        return
    if not isinstance(state, dict):
        raise InputError(f"state must be a dict of tensors keyed by state name ({', '.join(names)}), got {type(state).__name__}")
    for key in state:
        if key not in names:
            raise InputError(f"unknown state {key!r}; the states are {', '.join(names) or 'none'}")


def _need_dims(dims, names, where):
    missing = [n for n in names if n not in dims]
    if missing:
        raise InputError(f"dim {missing[0]} is not bound: pass {missing[0]}=... when building the cell ({where})")


def _check_init(param, dist, a, b):
    """uniform(lo, hi) needs lo <= hi; normal(mean, std) needs std >= 0 (both finite)."""
    if not (math.isfinite(a) and math.isfinite(b)) or (dist == "uniform" and a > b) or (dist == "normal" and b < 0):
        want = "lo <= hi" if dist == "uniform" else "std >= 0"
        err = InputError(f"param {param!r}: {dist}({a}, {b}) is invalid: it needs {want}, both finite")
        err.param = param
        raise err
    return float(a), float(b)


def _compute_dtype(dtypes):
    """float32 at least (float64 stays float64): half-precision inputs are upcast."""
    out = torch.float32
    for dt in dtypes:
        if dt.is_floating_point:
            out = torch.promote_types(out, dt)
    return out


def _output_dtype(dtypes, cdt):
    """Outputs come back in the (promoted) floating dtype of the inputs."""
    floats = [dt for dt in dtypes if dt.is_floating_point]
    if not floats:
        return cdt
    out = floats[0]
    for dt in floats[1:]:
        out = torch.promote_types(out, dt)
    return out


def _time_major(x, B, T):
    """[B*T*E, *s] rows in (B, T, E) order -> one [T, B*E, *s] tensor."""
    s = x.shape[1:]
    return x.reshape(B, T, -1, *s).transpose(0, 1).reshape(T, -1, *s)


def _unsteps(xs, B, extra):
    """[T, B*E, *s] (a tensor, or a list of T tensors) -> [B, T, *extra, *s]."""
    y = xs if isinstance(xs, torch.Tensor) else torch.stack(xs, 0)
    return y.reshape(y.shape[0], B, *extra, *y.shape[2:]).movedim(0, 1)


def _initial(state, name, default, B, extra, shape, cdt):
    """The initial value of a state as [B*E, *shape]: given in `state`, or the spec's default."""
    given = None if state is None else state.get(name)
    if given is None:
        return default.expand(B * math.prod(extra), *shape)
    want = (B, *extra, *shape)
    if tuple(given.shape) != want:
        raise InputError(f"initial state {name!r} must have shape {list(want)}, got {list(given.shape)}")
    return given.reshape(-1, *shape).to(cdt)


class _DeferredWeight:
    """x @ W.t() (+ add) at every step, with W's gradient computed once for all steps.

    Plain autograd computes dW = g_t^T x_t and accumulates it at every step: two full-size ops
    per step. Here each step's backward only records (g_t, x_t); W's gradient is one matmul
    over all of them, when autograd reaches W (through _WeightSink, which every step uses).
    """

    def __init__(self, w):
        self.w = w
        self.saved = []
        self.active = torch.is_grad_enabled() and w.requires_grad
        self.sink = _WeightSink.apply(w, self) if self.active else w

    def __call__(self, x, add=None):
        if self.active:
            return _StepLinear.apply(x, self.sink, add, self)
        return F.linear(x, self.w) if add is None else torch.addmm(add, x, self.w.t())


class _WeightSink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, owner):
        ctx.owner = owner
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        saved, ctx.owner.saved = ctx.owner.saved, []
        if saved:
            g = torch.cat([s[0] for s in saved])
            x = torch.cat([s[1] for s in saved])
            grad = grad + g.t() @ x
        return grad, None


class _StepLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, add, owner):
        ctx.save_for_backward(x, w)
        ctx.owner = owner
        ctx.add_rank = None if add is None else add.dim()
        return F.linear(x, w) if add is None else torch.addmm(add, x, w.t())

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        ctx.owner.saved.append((g, x))
        gx = g @ w if ctx.needs_input_grad[0] else None
        gadd = None
        if ctx.add_rank is not None and ctx.needs_input_grad[2]:
            gadd = g if ctx.add_rank == 2 else g.sum(0)
        return gx, None, gadd, None


class _Recurrence(torch.autograd.Function):
    """The loop as one autograd node: `fwd` runs it without autograd, `bwd` is its generated
    backward through time. `inputs` are the tensors whose gradients `bwd` returns, in order."""

    @staticmethod
    def forward(ctx, fwd, bwd, *inputs):
        outputs, saved = fwd()
        ctx.bwd, ctx.saved = bwd, saved
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *ctx.bwd(ctx.saved, grads))


def _acc(total, part):
    return part if total is None else total + part


def _sum_to(g, shape):
    """Sum a broadcast gradient back to `shape` (leading axes, then axes of size 1)."""
    if g.shape == shape:
        return g
    lead = g.dim() - len(shape)
    if lead:
        g = g.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return g.sum(dim=dims, keepdim=True) if dims else g


def _grad_to(g, shape, pad):
    """The gradient of a batched operand that was padded with `pad` axes after its batch axis."""
    if pad:
        g = g.sum(dim=tuple(range(1, 1 + pad)))
    return _sum_to(g, shape)


def _matmul_grad(g, a, b, ra, rb):
    """Gradients of a @ b (per-step ranks ra, rb <= 2; either operand may lack the batch axis)."""
    if ra == 1 and rb == 1:  # a dot product: g has no per-step axes
        g = g.unsqueeze(-1)
        return _sum_to(g * b, a.shape), _sum_to(g * a, b.shape)
    A = a.unsqueeze(-2) if ra == 1 else a
    Bm = b.unsqueeze(-1) if rb == 1 else b
    G = g.unsqueeze(-2) if ra == 1 else g
    G = G.unsqueeze(-1) if rb == 1 else G
    da = G @ Bm.transpose(-1, -2)
    db = A.transpose(-1, -2) @ G
    da = da.squeeze(-2) if ra == 1 else da
    db = db.squeeze(-1) if rb == 1 else db
    return _sum_to(da, a.shape), _sum_to(db, b.shape)


def _normalize_grad(g, x, dim, eps=1e-12):
    norm = x.norm(dim=dim, keepdim=True)
    n = norm.clamp_min(eps)
    inner = (g * x).sum(dim, keepdim=True)
    return g / n - torch.where(norm > eps, x * inner / n ** 3, 0.0)


def _index_grad(g, x, index, newaxes):
    if newaxes:
        g = g.squeeze(newaxes)
    out = torch.zeros_like(x)
    out[index] = g
    return out


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


def _seq_len(names, args, kwargs):
    """T of a call's inputs, to choose a lowering (0 when unclear: the forward reports why)."""
    inputs = _gather_inputs(names, args, kwargs)
    x = inputs[0] if inputs else None
    return x.shape[1] if isinstance(x, torch.Tensor) and x.dim() >= 2 else 0


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


def _varlen(cell, args, kwargs, state, cu_seqlens):
    """Run a packed batch (B = 1, sequences back to back, bounded by cu_seqlens) as independent
    sequences: each from its own initial state, each with its own final state. Sequences of equal
    length run together as one batch, so every backend gets plain [B, T, ...] inputs."""
    inputs = _gather_inputs(cell.INPUTS, args, kwargs)
    for name, x in zip(cell.INPUTS, inputs):
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] != 1:
            raise InputError(f"with cu_seqlens, input {name!r} must be a packed batch [1, T, ...], "
                             f"got {list(getattr(x, 'shape', []))}")
    total = inputs[0].shape[1]
    cu = [int(c) for c in torch.as_tensor(cu_seqlens).reshape(-1).tolist()]
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != total or any(b <= a for a, b in zip(cu, cu[1:])):
        raise InputError(f"cu_seqlens must rise strictly from 0 to T = {total} (sequence boundaries), got {cu}")
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    count = len(lengths)
    _check_state_keys(state, cell.STATES)
    for key, value in (state or {}).items():
        if value is not None and value.shape[0] != count:
            raise InputError(f"with cu_seqlens, initial state {key!r} needs one entry per sequence "
                             f"({count}), got leading size {value.shape[0]}")
    groups = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    outs, finals = [None] * count, [None] * count
    dev = inputs[0].device
    for n, seqs in groups.items():
        index = torch.tensor([[cu[i] + t for t in range(n)] for i in seqs], device=dev)
        picked = torch.tensor(seqs, device=dev)
        st = None if state is None else {k: v[picked] for k, v in state.items() if v is not None}
        y, fin = cell.forward(*[x[0][index] for x in inputs], state=st)
        ys = y if isinstance(y, tuple) else (y,)
        for j, i in enumerate(seqs):
            outs[i] = [v[j] for v in ys]
            finals[i] = {k: v[j] for k, v in fin.items()}
    packed = tuple(torch.cat([outs[i][k] for i in range(count)], 0).unsqueeze(0) for k in range(len(outs[0])))
    final = {k: torch.stack([finals[i][k] for i in range(count)], 0) for k in cell.STATES}
    return (packed[0] if len(packed) == 1 else packed), final

'''
