"""Compile-time scalars (numbers and the arithmetic on them) evaluated while the spec is checked.

Generated code computes such a scalar as a Python number (`t6 = 2.0 ** 4096`); one that overflows,
divides by zero, leaves the reals or is not a number would otherwise fail (or give NaN) only when
the built cell runs, far from the spec. Each is evaluated here with the very expression the
generated code holds (backends/torch_expr.py renders it from IR nodes, never from spec text), and
a bad one is a NumberError at its place. Scalars that read a dim are known only at build time:
bind.check_bound_dims evaluates them again then, with the dims given to build().
"""
from __future__ import annotations

import math

from .errors import NumberError
from .ir import Graph

#: Integers beyond this magnitude cannot become a tensor (torch's int64).
INT64_MAX = 2**63 - 1


def check(graph: Graph, nid: int, values: dict[int, object], dims: dict[str, int] | None = None,
          given: str = "") -> None:
    """Evaluate scalar node `nid` of `graph` from its operands' values in `values` (node id -> number,
    or None where unknown) and record its value there; raise NumberError if it is out of range. `dims`:
    the values of the dims bound so far (build time), `given` says which (for the message)."""
    from .backends.torch_expr import ATOM, Operand, TorchExpr

    node = graph[nid]
    if node.op == "const":
        values[nid] = node.attrs["value"]
        return
    if node.op == "dim":
        values[nid] = (dims or {}).get(node.attrs["name"])
        return
    operands = [graph[a].attrs["value"] if graph[a].op == "const" else values.get(a) for a in node.args]
    if any(v is None for v in operands) or not node.args:
        values[nid] = None
        return
    at = f" with {given}" if given else ""
    if node.op == "pow" and _huge_power(*operands):  # exact integers: 99999999 ** 99999999 would take hours
        raise NumberError(f"this constant expression is an integer of more than 19 digits{at}, too large for "
                          "a tensor", node.loc, "write a float (2.0 rather than 2) to compute in floating point")
    args = [Operand(f"v{i}", ATOM, False, 0, True) for i in range(len(node.args))]
    text, _ = TorchExpr(graph).render(nid, args, batched=False)
    scope = {"math": math, "min": min, "max": max, "abs": abs,
             **{f"v{i}": v for i, v in enumerate(operands)}}
    try:
        value = eval(compile(text, "<constant>", "eval"), {"__builtins__": {}}, scope)  # rendered from IR only
    except NameError:  # an op the generated code computes with torch: checked when the cell runs
        values[nid] = None
        return
    except (ArithmeticError, ValueError) as e:
        raise NumberError(f"this constant expression cannot be computed{at}: {_reason(e)}", node.loc,
                          "check the numbers: the value must be a finite real number") from None
    if isinstance(value, complex):
        raise NumberError(f"this constant expression is not a real number{at}", node.loc,
                          "a negative number to a fractional power is complex; check the signs")
    if isinstance(value, bool):
        values[nid] = value
        return
    if isinstance(value, int) and abs(value) > INT64_MAX:
        raise NumberError(f"this constant expression is an integer of {len(str(abs(value)))} digits{at}, "
                          "too large for a tensor", node.loc, "write a float (2.0 rather than 2) to compute "
                          "in floating point")
    if isinstance(value, float) and math.isnan(value) and not any(_nan(v) for v in operands):
        raise NumberError(f"this constant expression is not a number (NaN){at}", node.loc,
                          "it combines infinities (inf - inf, 0 * inf); check the constants")
    if isinstance(value, float) and math.isinf(value) and not any(_inf(v) for v in operands):
        raise NumberError(f"this constant expression overflows float64 (beyond about 1.8e308){at}", node.loc,
                          "use smaller numbers, or compute in log space")
    values[nid] = value


def _huge_power(base, exponent) -> bool:
    """An integer power beyond int64, known from the operands' sizes before computing it."""
    if isinstance(base, bool) or isinstance(exponent, bool) or not (isinstance(base, int) and isinstance(exponent, int)):
        return False
    return abs(base) > 1 and exponent > 0 and exponent * (abs(base).bit_length() - 1) > 63


def _reason(e: Exception) -> str:
    if isinstance(e, ZeroDivisionError):
        return "division by zero"
    if isinstance(e, OverflowError):
        return "it overflows float64 (beyond about 1.8e308)"
    return f"{e} (outside the function's domain)" if "domain" in str(e) else str(e)


def _inf(v) -> bool:
    return isinstance(v, float) and math.isinf(v)


def _nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)
