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

from rnnc import registry
from rnnc.ir import Graph

# Triton templates and adjoints come from the registry (rnnc/registry.py: Prim.triton, Prim.triton_vjp);
# these derived tables stay for tiles.py and triton_recurrent.py, which import them.
UNARY = registry.triton_templates(1)
BINARY = registry.triton_templates(2)
WHERE = registry.get("where").triton
ADJOINT = registry.triton_adjoints()


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
                registry.get(node).triton is not None
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
        names[nid] = f"{prefix}{nid}"
        lines.append(f"{prefix}{nid} = {registry.get(node).triton.format(*args)}")
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
        rules = registry.get(node).triton_vjp
        if nid not in adj or rules is None:
            continue
        args = [names[a] for a in node.args]
        for a, rule in zip(node.args, rules):
            if rule is not None:
                add(a, "(" + rule.format(*args, g=adj[nid], y=names[nid]) + ")")
    return lines, {n: v for n, v in adj.items() if n not in body}
