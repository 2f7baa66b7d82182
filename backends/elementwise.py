"""Elementwise IR subgraphs as straight-line code over same-shaped values, in Triton or PyTorch.

A fused kernel computes a cell's elementwise math (gates, activations, the a and b of a scan)
inside the kernel from a few "leaf" tensors that PyTorch computes beforehand (projections,
reductions, params). `split_fusable` finds that boundary in the IR; `render` writes the body as
Triton and `render_adjoint` its reverse-mode derivative (so the backward kernel carries the
gradient to the leaves itself). Every value has the same shape (leaves are broadcast to the
state's shape first), so there is no broadcasting or padding to render.
"""
from __future__ import annotations

import functools
import math
import re

from rnnc import autodiff, registry
from rnnc import dims as D
from rnnc.ir import Graph, Node

# Triton templates come from the registry (rnnc/registry.py: Prim.triton); adjoints are rendered from
# its derivative rules (Prim.vjp_ir), here for fused bodies and by `adjoint` for single ops.
UNARY = registry.triton_templates(1)
BINARY = registry.triton_templates(2)
WHERE = registry.get("where").triton


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
    some body values or leaves (`seeds`, (node, expression) pairs; a node may repeat), returns the
    lines and {leaf: the variable or expression holding its adjoint} for every leaf that gets one.

    The code renders the body's vjp graph (rnnc/autodiff.py, from the registry's rules), built over
    a copy of the body in which every value has one shape, as in the kernel: a leaf's adjoint is
    per element, and the caller sums it over what the leaf was broadcast across."""
    flat, ids = _flat_body(g, body, [nid for nid, _ in seeds])
    local = {ids[n]: names[n] for n in ids if n in names}
    outs, cts = [], []
    for i, (nid, expr) in enumerate(seeds):
        if nid in ids and not _is_number(g, nid) and g[nid].dtype == "float":
            outs.append(ids[nid])
            cts.append(flat.add(Node("input", (), _FLAT, attrs={"name": f"seed{i}"})))
            local[cts[-1]] = f"({expr})"
    inside = set(body)
    leaves = [n for n in ids if n not in inside and not _is_number(g, n) and g[n].dtype == "float"]
    dg, grads = autodiff.vjp(flat, outs, cts, [ids[n] for n in leaves], share=set(local))
    done = [n for n in dg.order(dg.ancestors([c for c in grads if c is not None])) if n not in local]
    lines = render(dg, done, local, prefix=f"v{prefix}")  # v: a value of the vjp graph
    return lines, {leaf: local[c] for leaf, c in zip(leaves, grads) if c is not None}


_FLAT = (D.symbol("BLOCK"),)  # the one shape of every value in a fused body


def _flat_body(g: Graph, body: list[int], seeded: list[int]) -> tuple[Graph, dict[int, int]]:
    """The body, its operands and the `seeded` leaves as a graph of their own in which every value
    is shaped _FLAT (numbers stay numbers, a broadcast is its operand): (that graph, {node in g:
    its id there})."""
    flat, ids = Graph(), {}

    def operand(nid: int) -> int:
        if nid not in ids:
            node = g[nid]
            if _is_number(g, nid):
                ids[nid] = flat.add(Node("const", (), (), attrs=dict(node.attrs), scalar=True))
            else:
                ids[nid] = flat.add(Node("input", (), _FLAT, node.dtype, attrs={"name": f"leaf{nid}"}))
        return ids[nid]

    for nid in body:
        node = g[nid]
        args = tuple(operand(a) for a in node.args)
        if node.op == "broadcast":
            ids[nid] = args[0]
        elif not _is_number(g, nid):
            ids[nid] = flat.add(Node(node.op, args, _FLAT, node.dtype, attrs=dict(node.attrs)))
    for nid in seeded:
        operand(nid)
    return flat, ids


@functools.lru_cache(maxsize=None)
def adjoint(op: str) -> tuple[str | None, ...] | None:
    """Each operand's adjoint for one elementwise op with a Triton template, as a Triton template over
    the operands {0}, {1}, ..., the result {y} and the result's adjoint {g}: the op's vjp rule
    (from the registry) rendered as one expression; None for an operand no gradient reaches, and
    for ops that pass none (or have no template)."""
    prim = registry.get(op)
    if not prim.elementwise or prim.grad != "rule" or not prim.triton:
        return None
    flat = Graph()
    kinds = ["bool" if prim.kind == "select" and i == 0 else "float" for i in range(prim.arity)]
    xs = [flat.add(Node("input", (), _FLAT, kind, attrs={"name": f"x{i}"})) for i, kind in enumerate(kinds)]
    y = flat.add(Node(op, tuple(xs), _FLAT))
    g = flat.add(Node("input", (), _FLAT, attrs={"name": "g"}))
    names = {x: f"{{{i}}}" for i, x in enumerate(xs)} | {y: "{y}", g: "{g}"}
    dg, cts = autodiff.vjp(flat, [y], [g], [x for x, kind in zip(xs, kinds) if kind == "float"], share={*xs, y})
    cts = iter(cts)
    return tuple(None if kind != "float" or (c := next(cts)) is None else _expression(dg, c, names) for kind in kinds)


def _expression(g: Graph, nid: int, names: dict[int, str]) -> str:
    """A node of a (small) elementwise graph as one Triton expression, operands inlined."""
    if nid in names:
        return names[nid]
    node = g[nid]
    if node.op == "const":
        return repr(float(node.attrs["value"]))
    args = [_operand(_expression(g, a, names)) for a in node.args]
    return args[0] if node.op == "broadcast" else registry.get(node).triton.format(*args)


def _operand(text: str) -> str:
    """`text` as an operand: names, placeholders and non-negative numbers as they are, the rest in parentheses."""
    return text if re.fullmatch(r"[\w.{}]+", text) else f"({text})"
