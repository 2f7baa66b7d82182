"""The IR: one cell's step as a DAG of typed ops with symbolic shapes.

Nodes are integer ids; each carries a `Node` (op name, operand ids in order, per-step shape,
dtype, attributes, source location). Edges run operand → user. The state flow from one step to
the next is explicit: every state has an `in` node (its value at the start of the step) and a
`carry` edge from the node holding its value at the end of the step back to that `in` node.
Printed, a cell reads like a jaxpr: one line per op.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field, replace
from typing import Any, Iterable


from .dims import Dim, Shape, fmt, fmt_shape
from .errors import Loc


@dataclass
class Node:
    op: str
    args: tuple[int, ...]
    shape: Shape
    dtype: str = "float"  # "float" | "bool" | "tuple"
    attrs: dict[str, Any] = field(default_factory=dict)
    loc: Loc | None = None
    name: str | None = None  # the spec name bound to this value, when there is one
    scalar: bool = False  # a compile-time scalar (number/dim arithmetic), emitted as a Python number


class Graph:
    """An append-only DAG of Nodes (plus carry edges, which close the per-step cycle).

    Plain lists rather than a graph library: node ids are list indices, each node keeps its
    users in insertion order, and the only algorithms needed (a topological order with ties
    broken by id, ancestors) are a few lines each; `import networkx` alone cost ~0.8 s.
    """

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self._users: list[dict[int, None]] = []  # operand -> its users (an ordered set)
        self.carries: list[tuple[int, int]] = []  # (end-of-step value, state's start-of-step node)

    def add(self, node: Node) -> int:
        nid = len(self.nodes)
        self.nodes.append(node)
        self._users.append({})
        for a in node.args:
            self._users[a][nid] = None
        return nid

    def head(self, n: int) -> "Graph":
        """A graph of this one's first n nodes (same ids; carries kept). Rewritten nodes may read
        later ids (`rewire`), so users are filled in after all n nodes are there."""
        out = Graph()
        out.nodes = self.nodes[:n]
        out._users = [{} for _ in range(n)]
        for nid, node in enumerate(out.nodes):
            for a in node.args:
                out._users[a][nid] = None
        out.carries = list(self.carries)
        return out

    def __getitem__(self, nid: int) -> Node:
        return self.nodes[nid]

    def extensible(self) -> "Graph":
        """A copy that new nodes can be appended to without touching this graph (the nodes
        themselves are shared: a copy is for appending, not for rewriting)."""
        out = Graph()
        out.nodes = list(self.nodes)
        out._users = [dict(u) for u in self._users]
        out.carries = list(self.carries)
        return out

    def __len__(self) -> int:
        return len(self.nodes)

    def ids(self) -> Iterable[int]:
        return range(len(self))

    def add_carry(self, src: int, state_in: int) -> None:
        self.carries.append((src, state_in))

    def replace(self, nid: int, op: str, args: tuple[int, ...]) -> None:
        """Rewrite a node in place to `op(*args)` (same value, so same shape and dtype)."""
        self.rewire(nid, args)
        node = self[nid]
        node.op, node.attrs = op, {}

    def rewire(self, nid: int, args: tuple[int, ...]) -> None:
        """Point a node at other operands holding the same values (op and attrs unchanged)."""
        node = self[nid]
        for a in set(node.args):
            self._users[a].pop(nid, None)
        node.args = tuple(args)
        for a in args:
            self._users[a][nid] = None

    def order(self, nodes: Iterable[int] | None = None) -> list[int]:
        """Topological order of `nodes` (all by default) within one step, ties broken by id."""
        keep = set(self.ids()) if nodes is None else set(nodes)
        pending = {n: len({a for a in self[n].args if a in keep}) for n in keep}
        ready = [n for n, k in pending.items() if k == 0]
        heapq.heapify(ready)
        out = []
        while ready:
            n = heapq.heappop(ready)
            out.append(n)
            for u in self._users[n]:
                if u in pending:
                    pending[u] -= 1
                    if pending[u] == 0:
                        heapq.heappush(ready, u)
        return out

    def users(self, nid: int) -> list[int]:
        return list(self._users[nid])

    def ancestors(self, roots: Iterable[int]) -> set[int]:
        """Every node the roots depend on within one step (carry edges not followed)."""
        seen: set[int] = set()
        stack = list(roots)
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            stack.extend(self[n].args)
        return seen


@dataclass
class Port:
    name: str
    shape: Shape
    node: int
    loc: Loc | None = None


@dataclass
class Param:
    name: str
    shape: Shape
    init: tuple  # ("uniform", lo, hi) | ("normal", mean, std) | ("value", node): ids in Cell.init_graph
    node: int
    loc: Loc | None = None


@dataclass
class State:
    name: str
    shape: Shape
    init: int  # node (in Cell.graph, depends on params/constants only) giving the initial value
    node_in: int  # value at the start of the step
    node_out: int  # value at the end of the step
    loc: Loc | None = None


@dataclass
class DimInfo:
    name: str
    default: Dim | None = None
    loc: Loc | None = None


@dataclass
class Combine:
    """One application `s1, s2 = f((s1, s2), (x1, x2))` of a declared associative combine f.

    `graph` holds f alone (inputs `left` and `right`, results `out`, constant `identity`), typed
    with this application's operand shapes: what the associativity check and the scan's combine
    function are built from. `args_left`, `args_right` and `results` are the operand and result
    nodes of the application in the cell's graph (where f's body is inlined, so the loop
    backend needs nothing special).
    """

    name: str
    graph: Graph
    left: list[int]
    right: list[int]
    out: list[int]
    identity: list[int]
    args_left: list[int]
    args_right: list[int]
    results: list[int]
    loc: Loc | None = None  # the declaration
    use_loc: Loc | None = None  # the application
    source: str = ""  # the declaration's text


@dataclass
class Cell:
    """One elaborated cell: its interface and the graph of one step."""

    name: str
    file: str
    dims: dict[str, DimInfo]
    inputs: list[Port]
    outputs: list[Port]
    params: list[Param]
    states: list[State]
    graph: Graph
    init_graph: Graph
    loc: Loc | None = None
    extra_roots: list[int] = field(default_factory=list)  # values a lowering plan needs (e.g. scan coefficients)
    combines: list[Combine] = field(default_factory=list)  # applications of associative combines

    def roots(self) -> list[int]:
        """Nodes whose values leave a step: outputs, next states, initial states (and plan values)."""
        return ([o.node for o in self.outputs] + [s.node_out for s in self.states] + [s.init for s in self.states]
                + self.extra_roots)

    def live(self) -> set[int]:
        return self.graph.ancestors(self.roots())

    def derived(self) -> "Cell":
        """The cell a lowering plan extends with the values it derives (a scan's coefficients, a
        chunk form's gates): same ids, a graph of its own, so planning never changes this cell."""
        return replace(self, graph=self.graph.extensible(), extra_roots=list(self.extra_roots))

    def __str__(self) -> str:
        return format_cell(self)


# ---- printing ---------------------------------------------------------------------------

def _index_text(items: tuple) -> str:
    parts = []
    for item in items:
        kind = item[0]
        parts.append(fmt(item[1]) if kind == "int" else f"{fmt(item[1])}:{fmt(item[2])}" if kind == "slice"
                     else "None" if kind == "new" else "...")
    return "[" + ", ".join(parts) + "]"


def _attr_text(node: Node) -> str:
    if node.op == "index":
        return _index_text(node.attrs["items"])
    parts = []
    for k, v in node.attrs.items():
        if k in ("name",):
            continue
        if isinstance(v, tuple) and v and not isinstance(v[0], (tuple, list)):
            v = "(" + ", ".join(fmt(x) if hasattr(x, "free_symbols") else repr(x) for x in v) + ")"
        elif hasattr(v, "free_symbols"):
            v = fmt(v)
        parts.append(f"{k}={v}")
    return ("{" + ", ".join(parts) + "}") if parts else ""


def format_node(graph: Graph, nid: int) -> str:
    n = graph[nid]
    args = " ".join(f"%{a}" for a in n.args)
    label = f"  # {n.name}" if n.name else ""
    shape = "tuple" if n.dtype == "tuple" else f"{'bool' if n.dtype == 'bool' else 'f'}{fmt_shape(n.shape)}"
    return f"%{nid}: {shape} = {n.op}{_attr_text(n)} {args}".rstrip() + label


def format_cell(cell: Cell, stages: dict[int, str] | None = None) -> str:
    """A jaxpr-like listing of the cell (stages, when given, tag each line const/hoist/loop)."""
    out = []
    ins = ", ".join(f"{p.name}: {fmt_shape(p.shape)}" for p in cell.inputs)
    outs = ", ".join(f"{p.name}: {fmt_shape(p.shape)}" for p in cell.outputs)
    out.append(f"cell {cell.name}({ins}) -> ({outs})")
    if cell.dims:
        out.append("  dims " + ", ".join(
            d.name + (f"={fmt(d.default)}" if d.default is not None else "") for d in cell.dims.values()))
    for p in cell.params:
        out.append(f"  param {p.name}: {fmt_shape(p.shape)} = %{p.node}")
    for s in cell.states:
        out.append(f"  state {s.name}: {fmt_shape(s.shape)}  in %{s.node_in}, init %{s.init}, next %{s.node_out}")
    for nid in cell.graph.order(cell.live()):
        line = format_node(cell.graph, nid)
        if stages is not None:
            line = f"{stages.get(nid, ''):>5}  {line}"
        out.append("  " + line)
    for s in cell.states:
        out.append(f"  carry {s.name} <- %{s.node_out}")
    for o in cell.outputs:
        out.append(f"  out {o.name} = %{o.node}")
    return "\n".join(out)
