"""Elementwise IR subgraphs as straight-line code over same-shaped values, in Triton or PyTorch.

A fused kernel computes a cell's elementwise math (gates, activations, the a and b of a scan)
inside the kernel from a few "leaf" tensors that PyTorch computes beforehand (projections,
reductions, params). `split_fusable` finds that boundary in the IR; `render` writes the body
once per dialect: Triton for the kernel, PyTorch for the backward, which differentiates the same
math with autograd. Every value has the same shape (leaves are broadcast to the state's shape
first), so there is no broadcasting or padding to render.
"""
from __future__ import annotations

import math

from rnnc.ir import Graph

# op -> (Triton, PyTorch) templates over the operands' names {0}, {1}, {2}
UNARY = {
    "exp": ("tl.exp({0})", "torch.exp({0})"),
    "log": ("tl.log({0})", "torch.log({0})"),
    "sigmoid": ("tl.sigmoid({0})", "torch.sigmoid({0})"),
    "tanh": ("(2 * tl.sigmoid(2 * {0}) - 1)", "torch.tanh({0})"),  # no libdevice in the interpreter
    "relu": ("tl.maximum({0}, 0.0)", "torch.relu({0})"),
    "abs": ("tl.abs({0})", "torch.abs({0})"),
    "sqrt": ("tl.sqrt({0})", "torch.sqrt({0})"),
    "rsqrt": ("tl.rsqrt({0})", "torch.rsqrt({0})"),
    "sin": ("tl.sin({0})", "torch.sin({0})"),
    "cos": ("tl.cos({0})", "torch.cos({0})"),
    "square": ("{0} * {0}", "{0} * {0}"),
    "silu": ("{0} * tl.sigmoid({0})", "F.silu({0})"),
    # stable forms: no exp of a large positive number
    "softplus": ("tl.maximum({0}, 0.0) + tl.log(1 + tl.exp(-tl.abs({0})))", "F.softplus({0})"),
    "logsigmoid": ("tl.minimum({0}, 0.0) - tl.log(1 + tl.exp(-tl.abs({0})))", "F.logsigmoid({0})"),
    "neg": ("-{0}", "-{0}"),
}
BINARY = {
    "add": ("{0} + {1}", "{0} + {1}"), "sub": ("{0} - {1}", "{0} - {1}"),
    "mul": ("{0} * {1}", "{0} * {1}"), "div": ("{0} / {1}", "{0} / {1}"),
    "maximum": ("tl.maximum({0}, {1})", "torch.maximum({0}, {1})"),
    "minimum": ("tl.minimum({0}, {1})", "torch.minimum({0}, {1})"),
    "lt": ("{0} < {1}", "{0} < {1}"), "le": ("{0} <= {1}", "{0} <= {1}"),
    "gt": ("{0} > {1}", "{0} > {1}"), "ge": ("{0} >= {1}", "{0} >= {1}"),
}
WHERE = ("tl.where({0}, {1}, {2})", "torch.where({0}, {1}, {2})")
DIALECTS = ("triton", "torch")


def _is_number(g: Graph, nid: int) -> bool:
    node = g[nid]
    return node.op == "const" and math.isfinite(float(node.attrs["value"]))


def split_fusable(g: Graph, stages: dict[int, str], roots: list[int]) -> tuple[list[int], list[int]]:
    """(leaves, body): the state-free nodes the roots need, split into what PyTorch computes
    (leaves: float tensors) and the elementwise ops computed in the kernel (body, in order)."""
    fusable: dict[int, bool] = {}

    def visit(nid: int) -> bool:
        if nid in fusable:
            return fusable[nid]
        node = g[nid]
        ok = False
        if _is_number(g, nid):
            ok = True
        elif node.op == "broadcast" or node.op in UNARY or node.op in BINARY or node.op == "where":
            # a node of numbers only stays with PyTorch (Triton's math wants tensors)
            ok = (all(visit(a) or g[a].dtype == "float" for a in node.args)
                  and not all(_is_number(g, a) for a in node.args))
        fusable[nid] = ok
        return ok

    for r in roots:
        visit(r)
    leaves, body, seen = [], [], set()

    def walk(nid: int) -> None:
        if nid in seen:
            return
        seen.add(nid)
        if not fusable[nid]:
            leaves.append(nid)
            return
        for a in g[nid].args:
            if a not in fusable:
                fusable[a] = visit(a)
            walk(a)
        body.append(nid)

    for r in roots:
        walk(r)
    return leaves, body


def render(g: Graph, body: list[int], names: dict[int, str], dialect: str) -> list[str]:
    """Assignments `t<id> = ...` for the body; `names` maps leaves to variables (and is extended)."""
    which = DIALECTS.index(dialect)
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
        if node.op in UNARY:
            text = UNARY[node.op][which].format(*args)
        elif node.op in ("maximum", "minimum") and dialect == "torch" and any(_is_number(g, a) for a in node.args):
            x, c = (args[1], args[0]) if _is_number(g, node.args[0]) else args
            text = f"torch.clamp({x}, {'min' if node.op == 'maximum' else 'max'}={c})"
        elif node.op in BINARY:
            text = BINARY[node.op][which].format(*args)
        else:
            text = WHERE[which].format(*args)
        names[nid] = f"t{nid}"
        lines.append(f"t{nid} = {text}")
    return lines
