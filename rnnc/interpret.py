"""A reference evaluator of IR graphs on torch tensors, for checking derivative graphs.

`evaluate(graph, leaves, dims)` computes the nodes the roots need, one sample (no batch axis),
in the dtype of the leaves (float64 in the tests). Each op goes through the PyTorch renderer the
generated modules use (backends/torch_expr.py), so this is that renderer applied node by node
rather than a second definition of every op: the derivative graphs rnnc/autodiff.py builds are
checked against torch.autograd on exactly the code a back end would emit for them. The text
evaluated is rendered from IR nodes (names are `v<id>`), never from spec text.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F

from .backends.torch_expr import ATOM, Operand, TorchExpr
from .ir import Graph

#: Leaves whose values the caller gives (by node id): the ones a cell binds by name.
BOUND = ("input", "param", "state")


def evaluate(graph: Graph, leaves: Mapping[int, torch.Tensor], dims: Mapping[str, int] | None = None,
             roots: Iterable[int] | None = None) -> dict[int, object]:
    """The value of every node the roots (all nodes by default) depend on: a tensor, a Python
    number for compile-time scalars, a tuple for a split. `leaves` gives each input, param and
    state node needed; `dims` the size of each dim symbol."""
    need = graph.ancestors(roots) if roots is not None else set(graph.ids())
    first = next(iter(leaves.values()), None)
    dtype = first.dtype if isinstance(first, torch.Tensor) else torch.float64
    device = first.device if isinstance(first, torch.Tensor) else "cpu"
    env: dict[str, object] = {"torch": torch, "F": F, "math": math, "cdt": dtype, "dev": device}
    env.update({f"d_{k}": v for k, v in (dims or {}).items()})
    renderer = TorchExpr(graph)
    values: dict[int, object] = {}
    for nid in graph.order(need):
        node = graph[nid]
        if node.op in BOUND:
            if nid not in leaves:
                raise KeyError(f"no value given for {node.op} %{nid} ({node.name or node.attrs.get('name')})")
            values[nid] = leaves[nid]
        elif node.op == "item":
            values[nid] = values[node.args[0]][node.attrs["index"]]
        else:
            args = [Operand(f"v{a}", ATOM, False, len(graph[a].shape), graph[a].scalar) for a in node.args]
            text, _ = renderer.render(nid, args, batched=False)
            scope = dict(env, **{f"v{a}": values[a] for a in node.args})
            values[nid] = eval(compile(text, f"<%{nid} {node.op}>", "eval"), scope)  # rendered from IR only
    return values
