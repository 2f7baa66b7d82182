"""Heads declared as a dim: a state [NH, K, V] that is NH independent matrix states.

Cells with per-head constants or params (RetNet's fixed decays, Mamba-2's A and D) declare the heads
as a leading dim of the state, the inputs and the outputs. Every op of such a step acts on each head
alone (an elementwise op, an index or a reduction that keeps the head axis), so one head's step is
an ordinary one-head cell. `head_slice` writes that one-head step (same node ids, the head axis
dropped from every value that has it, per-head values of the others broadcast as they were), the
chunk form is planned on it, and `Lift` writes what the plan derived back into the cell's graph
with the head axis in front, so the chunk runtime runs the NH heads as NH more rows of its batch.
"""
from __future__ import annotations

from dataclasses import replace

from . import dims as D
from . import registry
from .ir import Cell, Graph, Node

class NotPerHead(Exception):
    """The step mixes heads (or reads them in a way this module does not slice)."""


def _headed_shape(shape: D.Shape, heads) -> bool:
    return len(shape) >= 1 and D.equal(shape[0], heads)


def _lead_ok(shape: D.Shape, heads) -> bool:
    """A per-head value's leading axis: the heads, or 1 (one value for every head, `b[None, ...]`)."""
    return len(shape) >= 1 and (D.equal(shape[0], heads) or D.equal(shape[0], D.ONE))


def _new_axis_in_front(node: Node) -> bool:
    """`b[None, ...]`: a shared value given a unit axis where the heads are (broadcast across them)."""
    return node.op == "index" and bool(node.attrs["items"]) and node.attrs["items"][0][0] == "new"


def heads_dim(cell: Cell):
    """The heads dim of a cell whose states all lead with one dim and one of which is [NH, K, V] (the
    candidates head_slice takes), or None."""
    states = cell.states
    if not states or not any(len(s.shape) == 3 for s in states) or any(not s.shape for s in states):
        return None
    heads = states[0].shape[0]
    return heads if all(D.equal(s.shape[0], heads) for s in states) else None


def head_slice(cell: Cell) -> tuple[Cell, dict[int, bool]]:
    """The one-head step of a cell whose states are all [NH, *shape], and which nodes have the head
    axis (node id -> True). NotPerHead when an op mixes heads."""
    heads = heads_dim(cell)
    if heads is None:
        raise NotPerHead("the states do not all lead with the heads")
    ranks = {len(st.shape) for st in cell.states}
    g = cell.graph
    sliced = g.extensible()
    headed: dict[int, bool] = {}
    for nid in g.order():
        node = g[nid]
        flags = [headed[a] for a in node.args]
        if not node.args:
            headed[nid] = _headed_shape(node.shape, heads)
        elif not any(flags):
            headed[nid] = _new_axis_in_front(node) and len(node.shape) in ranks
        else:
            headed[nid] = True
            if not _lead_ok(node.shape, heads):
                raise NotPerHead(f"{node.op} drops the heads axis")
        if headed[nid]:
            sliced.nodes[nid] = replace(node, shape=tuple(node.shape[1:]), attrs=_sliced_attrs(g, node, flags))
    if not all(headed[n] for st in cell.states for n in (st.node_in, st.node_out)) \
            or not all(headed[o.node] for o in cell.outputs):
        raise NotPerHead("an output or a state's next value is not per head")
    one = replace(cell, graph=sliced, states=[replace(st, shape=tuple(st.shape[1:])) for st in cell.states],
                  outputs=[replace(o, shape=tuple(o.shape[1:])) for o in cell.outputs])
    return one, headed


def _sliced_attrs(g: Graph, node: Node, flags: list[bool]) -> dict:
    """The attrs of a headed op on one head; NotPerHead for an op that mixes heads."""
    attrs = dict(node.attrs)
    op = node.op
    if not node.args:  # a per-head table (an input, a param, arange(NH), ...)
        if "shape" in attrs:
            attrs["shape"] = tuple(attrs["shape"][1:])
        return attrs
    if op == "index":
        items = attrs["items"]
        if not flags[0]:  # b[None, ...]: the unit axis in front is the heads'
            attrs["items"] = tuple(items[1:])
            return attrs
        first = items[0] if items else ("slice", 0, node.shape[0])
        if first[0] != "slice" or not D.equal(first[1], 0) or not D.equal(first[2], node.shape[0]):
            raise NotPerHead("an index selects among the heads")
        attrs["items"] = tuple(items[1:])
        return attrs
    if op == "reduce":
        ax = attrs["axis"]
        rank = len(g[node.args[0]].shape)
        if ax is None or ax % rank == 0:
            raise NotPerHead("a reduction sums over the heads")
        attrs["axis"] = ax % rank - 1
        return attrs
    if op == "broadcast":
        if flags[0] and len(g[node.args[0]].shape) != len(node.shape):
            raise NotPerHead("a broadcast moves the heads axis")
        attrs["shape"] = tuple(attrs["shape"][1:])
        return attrs
    if registry.is_elementwise(node):
        rank = len(node.shape)
        for a, h in zip(node.args, flags):
            if (len(g[a].shape) == rank) != h:  # a per-head value must keep the axis in front; a shared one must not reach it
                raise NotPerHead(f"{op} broadcasts a value across the heads axis")
        return attrs
    raise NotPerHead(f"{op} reads per-head values")


class Lift:
    """Writes the values a plan derived on the one-head slice into the cell's graph, head axis first.

    Nodes of the cell keep their ids (the slice shares them); a node the plan appended to the slice
    is rebuilt over its lifted operands (an elementwise op, an index, a reduction, a broadcast, a
    constant); `full` gives a value of shape [NH, *one-head shape] for every head."""

    def __init__(self, cell: Cell, sliced: Graph, headed: dict[int, bool]) -> None:
        self.g, self.sliced, self.headed = cell.graph, sliced, dict(headed)  # headed: of the cell's nodes
        self.heads = cell.states[0].shape[0]
        self.shared = len(headed)  # slice nodes below this id are the cell's own
        self.done: dict[int, int] = {}

    def node(self, nid: int) -> int:
        """The cell's node for a slice node (headed or shared, as it comes)."""
        if nid < self.shared:
            return nid
        if nid in self.done:
            return self.done[nid]
        node = self.sliced[nid]
        args = [self.node(a) for a in node.args]
        flags = [self.headed[a] for a in args]
        if not any(flags):
            out = self.g.add(replace(node, args=tuple(args), attrs=dict(node.attrs)))
            self.headed[out] = False
        else:
            out = self.g.add(self._rebuilt(node, args, flags))
            self.headed[out] = True
        self.done[nid] = out
        return out

    def full(self, nid: int | None) -> int | None:
        """The slice node's value for every head, [NH, *its one-head shape]."""
        if nid is None:
            return None
        out = self.node(nid)
        if self.headed[out] and D.equal(self.g[out].shape[0], self.heads):
            return out
        shape = (self.heads, *self.sliced[nid].shape)
        new = self.g.add(Node("broadcast", (out,), shape, attrs={"shape": shape}))
        self.headed[new] = True
        return new

    def _rebuilt(self, node: Node, args: list[int], flags: list[bool]) -> Node:
        attrs = dict(node.attrs)
        leads = [self.g[a].shape[0] for a, f in zip(args, flags) if f]
        lead = self.heads if any(D.equal(d, self.heads) for d in leads) else D.ONE
        shape = (lead, *node.shape)
        if node.op == "index":
            attrs["items"] = (("slice", D.const(0), lead),) + tuple(attrs["items"])
        elif node.op == "reduce":
            if attrs["axis"] is None:
                raise NotPerHead("a reduction over a whole per-head value")
            attrs["axis"] = attrs["axis"] % len(self.sliced[node.args[0]].shape) + 1
        elif node.op == "broadcast":
            attrs["shape"] = shape
        elif node.op == "concat":
            attrs["axis"] = attrs["axis"] % len(node.shape) + 1
            args = [a if f else self._every_head(a, len(node.shape)) for a, f in zip(args, flags)]
        elif registry.is_elementwise(node):  # a per-head operand of lower rank: its head axis in front
            args = [self._aligned(a, len(node.shape)) if f else a for a, f in zip(args, flags)]
        else:
            raise NotPerHead(f"{node.op} in the chunk plan of a per-head state")
        return Node(node.op, tuple(args), shape, node.dtype, attrs, node.loc, None, False)

    def _aligned(self, nid: int, rank: int) -> int:
        """A per-head value [NH, *s] reshaped to [NH, 1, ..., *s] of rank + 1 (numpy alignment)."""
        shape = self.g[nid].shape
        pad = rank + 1 - len(shape)
        if pad <= 0:
            return nid
        items = (("slice", D.const(0), shape[0]),) + (("new",),) * pad + tuple(("slice", D.const(0), d) for d in shape[1:])
        new = self.g.add(Node("index", (nid,), (shape[0],) + (D.ONE,) * pad + tuple(shape[1:]), attrs={"items": items}))
        self.headed[new] = True
        return new

    def _every_head(self, nid: int, rank: int) -> int:
        shape = (self.heads, *self.g[nid].shape)
        new = self.g.add(Node("broadcast", (nid,), shape, attrs={"shape": shape}))
        self.headed[new] = True
        return new
