"""Elementwise IR subgraphs as straight-line code over same-shaped values, in Triton or PyTorch.

A fused kernel computes a cell's elementwise math (gates, activations, the a and b of a scan)
inside the kernel from a few "leaf" tensors that PyTorch computes beforehand (projections,
reductions, params). `split_fusable` finds that boundary in the IR; `render` writes the body as
Triton and `render_adjoint` its reverse-mode derivative (so the backward kernel carries the
gradient to the leaves itself). Every value has the same shape (leaves are broadcast to the
state's shape first), so there is no broadcasting or padding to render.
"""
from __future__ import annotations

import math

from rnnc.ir import Graph

# op -> Triton template over the operands' names {0}, {1}, {2}
UNARY = {
    "exp": "tl.exp({0})",
    "log": "tl.log({0})",
    "sigmoid": "tl.sigmoid({0})",
    "tanh": "(2 * tl.sigmoid(2 * {0}) - 1)",  # no libdevice in the interpreter
    "relu": "tl.maximum({0}, 0.0)",
    "abs": "tl.abs({0})",
    "sqrt": "tl.sqrt({0})",
    "rsqrt": "tl.rsqrt({0})",
    "sin": "tl.sin({0})",
    "cos": "tl.cos({0})",
    "square": "{0} * {0}",
    "silu": "{0} * tl.sigmoid({0})",
    # stable forms: no exp of a large positive number
    "softplus": "tl.maximum({0}, 0.0) + tl.log(1 + tl.exp(-tl.abs({0})))",
    "logsigmoid": "tl.minimum({0}, 0.0) - tl.log(1 + tl.exp(-tl.abs({0})))",
    "neg": "-{0}",
}
BINARY = {
    "add": "{0} + {1}", "sub": "{0} - {1}", "mul": "{0} * {1}", "div": "{0} / {1}",
    "maximum": "tl.maximum({0}, {1})", "minimum": "tl.minimum({0}, {1})",
    "lt": "{0} < {1}", "le": "{0} <= {1}", "gt": "{0} > {1}", "ge": "{0} >= {1}",
}
WHERE = "tl.where({0}, {1}, {2})"
# d(op)/d(operand i) times the adjoint {g}, over the operands {0}, {1}, {2} and the result {y}
# (ties of maximum/minimum split the gradient in half, as torch does)
ADJOINT = {
    "add": ("{g}", "{g}"), "sub": ("{g}", "-{g}"), "mul": ("{g} * {1}", "{g} * {0}"),
    "div": ("{g} / {1}", "-{g} * {y} / {1}"), "neg": ("-{g}",),
    "exp": ("{g} * {y}",), "log": ("{g} / {0}",), "sigmoid": ("{g} * {y} * (1 - {y})",),
    "tanh": ("{g} * (1 - {y} * {y})",), "relu": ("tl.where({0} > 0, {g}, 0.0)",),
    "abs": ("tl.where({0} > 0, {g}, tl.where({0} < 0, -{g}, 0.0))",), "sqrt": ("{g} / (2 * {y})",),
    "rsqrt": ("-0.5 * {g} * {y} * {y} * {y}",), "sin": ("{g} * tl.cos({0})",), "cos": ("-{g} * tl.sin({0})",),
    "square": ("2 * {g} * {0}",),
    "silu": ("{g} * (tl.sigmoid({0}) * (1 + {0} * (1 - tl.sigmoid({0}))))",),
    "softplus": ("{g} * tl.sigmoid({0})",), "logsigmoid": ("{g} * (1 - tl.sigmoid({0}))",),
    "maximum": ("{g} * tl.where({0} > {1}, 1.0, tl.where({0} == {1}, 0.5, 0.0))",
                "{g} * tl.where({1} > {0}, 1.0, tl.where({0} == {1}, 0.5, 0.0))"),
    "minimum": ("{g} * tl.where({0} < {1}, 1.0, tl.where({0} == {1}, 0.5, 0.0))",
                "{g} * tl.where({1} < {0}, 1.0, tl.where({0} == {1}, 0.5, 0.0))"),
    "where": (None, "tl.where({0}, {g}, 0.0)", "tl.where({0}, 0.0, {g})"),
    "broadcast": ("{g}",),
}


def _is_number(g: Graph, nid: int) -> bool:
    node = g[nid]
    return node.op == "const" and math.isfinite(float(node.attrs["value"]))


def split_fusable(g: Graph, roots: list[int]) -> tuple[list[int], list[int]]:
    """(leaves, body): the nodes the roots need, split into what PyTorch computes (leaves: float
    tensors) and the elementwise ops computed in the kernel (body, in order)."""
    fusable: dict[int, bool] = {}

    def visit(nid: int) -> bool:
        if nid not in fusable:
            node = g[nid]
            # a node of numbers only stays with PyTorch (Triton's math wants tensors)
            fusable[nid] = _is_number(g, nid) or (
                (node.op in ADJOINT or node.op in BINARY)
                and all(visit(a) or g[a].dtype == "float" for a in node.args)
                and not all(_is_number(g, a) for a in node.args))
        return fusable[nid]

    leaves, body, seen = [], [], set()

    def walk(nid: int) -> None:
        if nid in seen:
            return
        seen.add(nid)
        if not visit(nid):
            leaves.append(nid)
            return
        for a in g[nid].args:
            walk(a)
        body.append(nid)

    for r in roots:
        walk(r)
    return leaves, body


def render(g: Graph, body: list[int], names: dict[int, str], prefix: str = "t") -> list[str]:
    """Assignments `<prefix><id> = ...` for the body; `names` maps leaves to variables (and is
    extended). Bodies of two graphs in one kernel take different prefixes."""
    lines = []
    for nid in body:
        node = g[nid]
        if _is_number(g, nid):
            names[nid] = repr(float(node.attrs["value"]))
            continue
        args = [names[a] for a in node.args]
        if node.op == "broadcast":
            names[nid] = args[0]
            continue
        template = UNARY.get(node.op) or BINARY.get(node.op) or WHERE
        names[nid] = f"{prefix}{nid}"
        lines.append(f"{prefix}{nid} = {template.format(*args)}")
    return lines


def render_adjoint(g: Graph, body: list[int], names: dict[int, str], seeds: list[tuple[int, str]],
                   prefix: str = "t") -> tuple[list[str], dict[int, str]]:
    """Reverse-mode code for the body (after `render`, which filled `names`): given adjoints of
    some body values or leaves (`seeds`, (node, expression) pairs; a node may repeat), defines
    `d<prefix><id>` for every leaf that receives one and returns {leaf: that variable}."""
    adj: dict[int, str] = {}
    lines = []

    def add(nid: int, expr: str) -> None:
        if _is_number(g, nid) or g[nid].dtype != "float":
            return
        var = f"d{prefix}{nid}"
        lines.append(f"{var} = {expr}" if nid not in adj else f"{var} = {var} + {expr}")
        adj[nid] = var

    for nid, expr in seeds:
        add(nid, expr)
    for nid in reversed(body):
        node = g[nid]
        if nid not in adj or node.op not in ADJOINT:
            continue
        args = [names[a] for a in node.args]
        for a, rule in zip(node.args, ADJOINT[node.op]):
            if rule is not None:
                add(a, "(" + rule.format(*args, g=adj[nid], y=names[nid]) + ")")
    return lines, {n: v for n, v in adj.items() if n not in body}
