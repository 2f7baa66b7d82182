"""Symbolic dims: shapes are tuples of sympy integer expressions over dim symbols.

Distinct dim names are distinct sizes (`[H]` never matches `[I]`), so equality is exact
algebraic equality, decided by expanding the difference.
"""
from __future__ import annotations

import functools

import sympy

Dim = sympy.Expr
Shape = tuple  # tuple[Dim, ...]

ONE = sympy.Integer(1)


@functools.lru_cache(maxsize=None)
def symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, integer=True, positive=True)


def const(n: int) -> Dim:
    return sympy.Integer(n)


def equal(a: Dim, b: Dim) -> bool:
    if a is b or a == b:
        return True
    return sympy.expand(a - b) == 0


def shapes_equal(a: Shape, b: Shape) -> bool:
    return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))


def broadcast(a: Shape, b: Shape) -> Shape | None:
    """numpy broadcasting of two symbolic shapes, or None when they do not broadcast."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else ONE
        y = b[-i] if i <= len(b) else ONE
        if equal(x, y) or y == ONE:
            out.append(x)
        elif x == ONE:
            out.append(y)
        else:
            return None
    return tuple(reversed(out))


def is_int(d: Dim) -> bool:
    return isinstance(d, sympy.Integer)


def free_names(d: Dim) -> set[str]:
    return {s.name for s in d.free_symbols}


def fmt(d: Dim) -> str:
    """Spec-style text of one dim: `4*H`, `K + 1`, `H//2`."""
    return str(d).replace(" ", "")


def fmt_shape(shape: Shape) -> str:
    return "[" + ", ".join(fmt(d) for d in shape) + "]"


def is_integral_poly(d: Dim) -> bool:
    """True when d is provably an integer for all positive integer dims (integer coefficients)."""
    d = sympy.expand(d)
    if not d.free_symbols:
        return bool(d.is_Integer)
    try:
        poly = sympy.Poly(d, *sorted(d.free_symbols, key=lambda s: s.name))
    except sympy.PolynomialError:
        return False
    return all(c.is_integer for c in poly.coeffs())


def to_python(d: Dim, names: dict[str, str]) -> str:
    """Python source computing d at run time, with each dim symbol replaced by names[sym]."""
    if d.is_Integer:
        return str(int(d))
    if d.is_Symbol:
        return names[d.name]
    if isinstance(d, sympy.floor):
        (arg,) = d.args
        num, den = sympy.fraction(sympy.together(arg))
        return f"({to_python(num, names)}) // ({to_python(den, names)})"
    if d.is_Add:
        return "(" + " + ".join(to_python(t, names) for t in d.args) + ")"
    if d.is_Mul:
        return "(" + " * ".join(to_python(t, names) for t in d.args) + ")"
    if d.is_Pow and d.exp.is_Integer and d.exp > 0:
        return "(" + " * ".join([to_python(d.base, names)] * int(d.exp)) + ")"
    raise ValueError(f"cannot render dim expression {d}")
