"""How a built cell is called: inputs gathered and checked, dims bound from their shapes, compute and
output dtypes, initial states, the time-major layout of the lowerings, packed (varlen) batches.

Every check raises `InputError` naming the input and the shape it should have: `rnnc.InputError` in a
module from `rnnc.build`, `ValueError` in a standalone file from `rnnc compile` (which vendors these
functions with a stand-in, see backends/link.py).
"""
import math

import torch

from rnnc.errors import InputError


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


#: The dtypes inputs, states and params may have (computed in float32 at least, float64 kept).
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_float(what, x):
    """A tensor of one of the _FLOATS dtypes: ints, bools and complex numbers are refused, never cast."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise InputError(f"{what} has dtype {x.dtype}; rnnc cells take float16, bfloat16, float32 or float64 "
                         f"(convert it, e.g. x.float())")


def _batch_shape(names, inputs, declared, lead):
    """The shared leading [B, T, *extra] (lead=2) or [B, *extra] (lead=1) of all inputs."""
    common = None
    for name, x, text in zip(names, inputs, declared):
        rank = len(text)
        _check_float(f"input {name!r}", x)
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


def _step_shape(names, inputs, declared, state, states):
    """step()'s inputs are one time step, [B, *extra, ...]. Extra (head) axes are accepted only when
    the state given shows the same [B, *extra] (a cell with states cannot tell heads from a time
    axis otherwise: a whole [B, T, ...] sequence passed to step() is refused, not run as heads)."""
    lead = _batch_shape(names, inputs, declared, 1)
    if len(lead) == 1 or not states:
        return lead
    given = [(k, v) for k, v in (state or {}).items() if isinstance(v, torch.Tensor)]
    if not given:
        shown = ", ".join(f"{n!r}: {list(x.shape)}" for n, x in zip(names, inputs))
        raise InputError(f"step() takes one time step [B, ...] per input, got {shown} with extra axes "
                         f"{list(lead[1:])}: for a sequence call the cell itself (cell(x)); for head axes pass "
                         f"the state, e.g. the initial one from cell(x[:, :0])")
    for key, value in given:
        if tuple(value.shape[:len(lead)]) != tuple(lead):
            raise InputError(f"step() inputs have leading axes [B, *extra] = {list(lead)}, but state {key!r} "
                             f"has shape {list(value.shape)}")
    return lead


def _runs_short(names, args, kwargs, below):
    """Whether a call's sequences are shorter than `below` steps, to choose a lowering (yes when T is
    unclear: the forward reports why). Only in eager mode: compiled and exported code takes the
    parallel form at every length, since the choice would be a guard on T there (a recompilation at
    the threshold, an export that fails); both forms give the same results."""
    if torch.compiler.is_compiling():
        return False
    inputs = _gather_inputs(names, args, kwargs)
    x = inputs[0] if inputs else None
    return (x.shape[1] if isinstance(x, torch.Tensor) and x.dim() >= 2 else 0) < below


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
    for key, value in state.items():
        if key not in names:
            raise InputError(f"unknown state {key!r}; the states are {', '.join(names) or 'none'}")
        if value is not None:
            _check_float(f"initial state {key!r}", value)


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
