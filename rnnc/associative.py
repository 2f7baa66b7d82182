"""Associative combines: the proof that a declared combine is one, and the states it folds.

A cell states `s1, s2 = f((s1, s2), (x1, x2))` with `combine f(...) identity (...)`. A parallel
scan regroups the steps, so f must be associative, f(f(a, b), c) = f(a, f(b, c)), and its
identity e must satisfy f(e, a) = a = f(a, e). Both are checked before anything is lowered:

  sympy      every op of f is elementwise, so each component is a scalar expression; the two
             sides are built symbolically (real symbols) and their difference simplified to 0;
  randomized otherwise (matmuls, reductions, or an expression sympy cannot simplify): f runs,
             as generated code, in float64 on many random operands, and the two sides must agree.

The sympy proof is bounded (SYMPY_SECONDS, MAX_EXPANDED_TERMS): past either it is abandoned and the
randomized check decides, the verdict saying so. A combine that fails is rejected with an
AssociativityError naming a counterexample. The verdict is cached by a fingerprint of the
combine's graph (its defs inlined) and operand shapes, so a def changed between programs is
checked again.
"""
from __future__ import annotations

import math
import sympy

from . import dims as D
from . import registry
from .errors import AssociativityError
from .ir import Cell, Combine, Graph

SAMPLES = 256  # random operand triples per check
TOLERANCE = 1e-7  # on |lhs - rhs| / (1 + |lhs| + |rhs|), float64
MAX_SIMPLIFY_OPS = 400  # sympy.simplify only below this size (it can take very long)


# ---- which states fold with a combine ------------------------------------------------------

def classify_combines(cell: Cell, stages: dict[int, str], classes: dict[str, dict]) -> None:
    """Check every combine the cell applies; mark the states each one folds as `associative`.

    A state group qualifies when the combine's left operands are exactly the states' values at the
    start of the step, its results are their next values, and its right operands read no state.
    States that linearity already classified as affine keep that (more specific) verdict.
    """
    by_in = {s.node_in: s for s in cell.states}
    for c in cell.combines:
        how = verify(c)
        group = [by_in.get(a) for a in c.args_left]
        names = [s.name for s in group if s is not None]
        why = None
        if None in group or len(set(names)) != len(names):
            why = "its left operands are not distinct states"
        elif any(s.node_out != r for s, r in zip(group, c.results)):
            why = "the combine's results are not the states' next values"
        else:
            reads = sorted({by_in[n].name for a in c.args_right if stages.get(a) == "loop"
                            for n in cell.graph.ancestors([a]) if n in by_in})
            if reads:
                why = f"its right operand reads state {', '.join(reads)}"
        for s in group:
            if s is None or classes[s.name]["class"] != "nonlinear":
                continue
            if why:
                classes[s.name]["why"] = f"folded by combine `{c.name}`, but {why}"
                continue
            verb = "folds" if len(names) == 1 else "fold"
            classes[s.name] = {"class": "associative", "combine": c.name, "group": names, "verified": how,
                               "why": f"{', '.join(names)} {verb} with the associative combine `{c.name}` ({how})"}


def scan_groups(cell: Cell, classes: dict[str, dict]) -> list[Combine]:
    """The combines whose states are all classified associative (what the scan backend runs)."""
    return [c for c in cell.combines
            if all(classes[s.name]["class"] == "associative" for s in cell.states if s.node_in in c.args_left)]


# ---- verification ---------------------------------------------------------------------------

_VERDICTS: dict[str, str] = {}  # fingerprint of the combine's graph -> how it was verified

SYMPY_SECONDS = 15.0  # the proof's time limit (hard in the main thread, see _time_limit); logaddexp's takes ~2 s
MAX_EXPANDED_TERMS = 2000  # a difference whose expansion would exceed this is not expanded


def verify(c: Combine) -> str:
    """How associativity (and the identity) were established; AssociativityError when they fail.

    The verdict is cached by a fingerprint of everything it depends on: f's graph as typed for
    these operands (the defs it calls are inlined there, so a def changed between two programs
    changes the key) and its identity; never by the declaration's text alone."""
    key = fingerprint(c)
    if key not in _VERDICTS:
        proved, note = _sympy_proof(c)
        if proved:
            _VERDICTS[key] = "sympy proof"
        else:
            _randomized(c)
            _VERDICTS[key] = f"randomized check, {SAMPLES} samples" + (f"; {note}" if note else "")
    return _VERDICTS[key]


def fingerprint(c: Combine) -> str:
    """A hash of the nodes f's results and identity are computed from (ops, operands by position,
    shapes, attributes), numbered canonically so equal combines in different programs agree."""
    import hashlib

    g = c.graph
    roots = list(c.out) + list(c.identity)
    nodes = g.order(g.ancestors(roots + list(c.left) + list(c.right)))
    number = {n: i for i, n in enumerate(nodes)}
    role = {n: f"left{i}" for i, n in enumerate(c.left)} | {n: f"right{i}" for i, n in enumerate(c.right)}
    rows = [repr((role.get(n), g[n].op, tuple(number[a] for a in g[n].args), tuple(D.fmt(d) for d in g[n].shape),
                  g[n].dtype, g[n].scalar, sorted((k, repr(v)) for k, v in g[n].attrs.items()))) for n in nodes]
    rows.append(repr(([number[n] for n in c.out], [number[n] for n in c.identity])))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


class _GiveUp(Exception):
    """The sympy proof is abandoned (too large or too slow); the randomized check decides."""


def _sympy_proof(c: Combine) -> tuple[bool, str]:
    """(True, "") when sympy shows associativity and the identity; (False, why not) when it cannot
    decide ("" when f is simply not elementwise or not provably so), within SYMPY_SECONDS."""
    import time

    deadline = time.monotonic() + SYMPY_SECONDS
    n = len(c.left)
    a, b, e = ([sympy.Symbol(f"{p}{i}", real=True) for i in range(n)] for p in "abc")
    try:
        with _time_limit(SYMPY_SECONDS):
            f = _sympy_fn(c)
            identity = _sympy_values(c.graph, c.identity, {})
            lhs, rhs = f(f(a, b), e), f(a, f(b, e))
            pairs = list(zip(lhs, rhs)) + list(zip(f(identity, a), a)) + list(zip(f(a, identity), a))
            for x, y in pairs:
                if time.monotonic() > deadline:
                    raise _GiveUp(f"the sympy proof was abandoned after {SYMPY_SECONDS:g} s")
                if not _is_zero(x - y):
                    return False, ""
            return True, ""
    except _GiveUp as why:
        return False, str(why)
    except (_NotElementwise, TypeError, ValueError, ZeroDivisionError, RecursionError):
        return False, ""


class _time_limit:
    """Raise _GiveUp inside sympy after `seconds` (SIGALRM: only in the main thread and when no
    other handler holds the alarm; elsewhere the size bound of _is_zero is the only limit)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.old = seconds, None

    def __enter__(self):
        import signal
        import threading

        if (not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, None)
                or signal.getitimer(signal.ITIMER_REAL)[0] > 0):
            return self

        def alarm(signum, frame):
            raise _GiveUp(f"the sympy proof was abandoned after {self.seconds:g} s")

        self.old = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self.old is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old)


class _NotElementwise(Exception):
    pass


def _sympy_fn(c: Combine):
    def f(x: list, y: list) -> list:
        env = dict(zip(c.left, x)) | dict(zip(c.right, y))
        return _sympy_values(c.graph, c.out, env)
    return f


def _sympy_values(g: Graph, roots: list[int], env: dict[int, sympy.Expr]) -> list[sympy.Expr]:
    vals = dict(env)
    for nid in g.order(g.ancestors(roots)):
        if nid in vals:
            continue
        node = g[nid]
        args = [vals[a] for a in node.args]
        if node.op == "const":
            v = node.attrs["value"]
            vals[nid] = sympy.oo if v == math.inf else sympy.nsimplify(v)
        elif (fn := registry.get(node).sympy) is not None:
            vals[nid] = fn(*args)
        else:
            raise _NotElementwise(node.op)
    return [vals[r] for r in roots]


def _expanded_terms(d: sympy.Expr, cap: int) -> int:
    """An upper bound on the number of terms of expand(d) (capped at cap + 1): a sum adds its
    terms' counts, a product multiplies them, a power x**n of m terms has at most C(m + n - 1, n);
    any other function is one term."""
    if d.is_Add:
        total = 0
        for t in d.args:
            total += _expanded_terms(t, cap)
            if total > cap:
                return cap + 1
        return total
    if d.is_Mul:
        total = 1
        for t in d.args:
            total *= _expanded_terms(t, cap)
            if total > cap:
                return cap + 1
        return total
    if d.is_Pow and d.exp.is_Integer and d.exp > 1:
        m, n = _expanded_terms(d.base, cap), int(d.exp)
        return min(math.comb(m + n - 1, n), cap + 1) if m <= cap else cap + 1
    return 1


def _is_zero(d: sympy.Expr) -> bool:
    if d == 0:
        return True
    if _expanded_terms(d, MAX_EXPANDED_TERMS) > MAX_EXPANDED_TERMS:
        raise _GiveUp(f"the sympy proof was abandoned: its expansion would exceed {MAX_EXPANDED_TERMS} terms")
    d = sympy.expand(sympy.powsimp(sympy.expand(d)))
    if d == 0:
        return True
    if d.is_polynomial():  # a nonzero expanded polynomial is not zero: nothing to simplify
        return False
    if sympy.count_ops(d) > MAX_SIMPLIFY_OPS:
        return False
    return sympy.simplify(d) == 0


def _randomized(c: Combine) -> None:
    """Run the combine on random float64 operands; AssociativityError on a counterexample."""
    import torch

    f = _torch_fn(c)
    gen = torch.Generator().manual_seed(0)
    sizes = _sizes(c)

    def sample() -> list:
        out = []
        for nid in c.left:
            shape = tuple(int(d.subs({x: sizes[x.name] for x in d.free_symbols})) for d in c.graph[nid].shape)
            scale = torch.tensor([0.5, 1.0, 3.0]).repeat(SAMPLES)[:SAMPLES]
            x = torch.randn(SAMPLES, *shape, generator=gen, dtype=torch.float64)
            out.append(x * scale.view(-1, *[1] * len(shape)))
        return out

    a, b, e = sample(), sample(), sample()
    with torch.no_grad():
        lhs, rhs = f(*f(*a, *b), *e), f(*a, *f(*b, *e))
        ident = [v.expand_as(x).clone() for v, x in zip(_identity_values(c, sizes), a)]
        left_id, right_id = f(*ident, *a), f(*a, *ident)
    _compare(c, "f(f(a, b), c)", "f(a, f(b, c))", lhs, rhs, {"a": a, "b": b, "c": e}, "is not associative")
    _compare(c, "f(e, a)", "a", left_id, a, {"e": ident, "a": a}, "has an identity that is not one")
    _compare(c, "f(a, e)", "a", right_id, a, {"a": a, "e": ident}, "has an identity that is not one")


def _compare(c: Combine, left: str, right: str, xs: list, ys: list, operands: dict, what: str) -> None:
    import torch

    valid = torch.ones(xs[0].shape[0], dtype=torch.bool)
    bad = torch.zeros_like(valid)
    for x, y in zip(xs, ys):
        x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
        finite = (torch.isfinite(x) & torch.isfinite(y)).all(1)
        valid &= finite | (x == y).all(1)
        err = ((x - y).abs() / (1 + x.abs() + y.abs())).nan_to_num(0.0).amax(1)
        bad |= finite & (err > TOLERANCE)
    if valid.sum() < SAMPLES // 4:
        raise AssociativityError(f"combine '{c.name}' could not be checked: it gives NaN or inf on most random "
                                 "operands", c.loc, "make it finite for finite operands (e.g. guard log and division)")
    if bad.any():
        i = int(bad.nonzero()[0])
        names = [c.graph[n].name for n in c.left]

        def show(vals: list) -> str:
            if len(vals) == 1:
                return _fmt(vals[0][i])
            return "(" + ", ".join(f"{n}={_fmt(v[i])}" for n, v in zip(names, vals)) + ")"

        args = ", ".join(f"{p} = {show(v)}" for p, v in operands.items())
        raise AssociativityError(
            f"combine '{c.name}' {what}: {left} = {show(xs)} but {right} = {show(ys)} for {args}", c.loc,
            "a scan regroups the steps, so the combine must be associative with a true identity; "
            "write a recurrence that is not as a plain state update (`s = ...`), which runs step by step")


def _fmt(v) -> str:
    flat = v.reshape(-1)
    if flat.numel() == 1:
        return f"{float(flat[0]):.4g}"
    return "[" + ", ".join(f"{float(x):.4g}" for x in flat[:3]) + (", ...]" if flat.numel() > 3 else "]")


def _identity_values(c: Combine, sizes: dict[str, int]) -> list:
    f = _exec(c, "_identity", _identity_source(c), sizes)
    return [v.unsqueeze(0) for v in f()]


def _identity_source(c: Combine) -> list[str]:
    from rnnc.backends.render import Lines, Renderer

    g = c.graph
    nodes = g.order(g.ancestors(c.identity))
    r = Renderer(g, {n: "const" for n in nodes}, set(c.identity))
    L = Lines()
    L("def _identity():")
    L.indent()
    r.emit(L, nodes, "const")
    L(f"return [{', '.join(r.tensor(n, 'const') for n in c.identity)}]")
    return L.lines


def _torch_fn(c: Combine):
    from rnnc.backends.combine import combine_source

    return _exec(c, "_combine", combine_source(c, "_combine"), _sizes(c))


def _sizes(c: Combine) -> dict[str, int]:
    """Small sizes for the dims in the operands' shapes (the check's operands)."""
    return {name: 3 for n in c.left for d in c.graph[n].shape for name in D.free_names(d)}


def _exec(c: Combine, fname: str, lines: list[str], sizes: dict[str, int]):
    """Define rnnc-generated code (names validated at parse time, never spec text) and return fname."""
    import torch
    import torch.nn.functional as F

    namespace = {"torch": torch, "F": F, "math": math, "cdt": torch.float64, "dev": torch.device("cpu")}
    namespace.update({f"d_{k}": v for k, v in sizes.items()})
    exec(compile("\n".join(lines), f"<rnnc combine {c.name}>", "exec"), namespace)  # noqa: S102
    return namespace[fname]
