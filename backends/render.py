"""The renderer every lowering shares: IR nodes to lines of PyTorch, and the contract between the
module assembler (backends/assemble.py) and each lowering's fragment (backends/emit_*.py).

One renderer serves the constants, the hoisted values and the per-step code of every lowering, so a
value is named and inlined the same way wherever it is emitted.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field

from rnnc import dims as D
from rnnc.errors import InternalError
from rnnc.ir import Cell, Graph, Port, State

from .torch_expr import ATOM, Operand, TorchExpr, shape_text


class Lines:
    """The generated source, line by line, at the current indentation."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 0

    def __call__(self, text: str = "") -> None:
        self.lines.append(("    " * self.depth + text) if text else "")

    def indent(self, n: int = 1) -> None:
        self.depth += n

    def dedent(self, n: int = 1) -> None:
        self.depth -= n


def docstring(text: str) -> str:
    """A triple-quoted literal whose value is exactly `text`, whatever it holds (a spec's path can hold
    quotes, backslashes, control characters, undecodable bytes): those are escaped, newlines kept."""
    escaped = "".join(c if c == "\n" or (c.isprintable() and c not in '\\"') else
                      "\\" + c if c in '\\"' else ascii(c)[1:-1] for c in text)
    literal = f'"""{escaped}"""'
    if ast.literal_eval(literal) != text:
        raise InternalError(f"cannot write {text[:40]!r}... as a docstring")
    return literal


class Renderer:
    """Emits the statements of one group of nodes, inlining single-use temporaries."""

    def __init__(self, graph: Graph, stages: dict[int, str], roots: set[int]) -> None:
        self.graph = graph
        self.stages = stages
        self.expr = TorchExpr(graph)
        self.names: dict[int, str] = {}
        self.inline: dict[int, Operand] = {}
        self.step_ref: dict[int, str] = {}  # hoisted node -> its per-step slice expression
        self.roots = roots
        self.used_names: set[str] = set()
        self.deferred: dict[str, str] = {}  # param variable -> its _DeferredWeight (loop stage)
        self.use_deferred = True  # off when the loop has a generated backward
        self.keep: set[int] = set()  # nodes never inlined (their values are saved for the backward)

    def batched(self, nid: int) -> bool:
        return self.stages.get(nid, "const") != "const"

    def name(self, nid: int) -> str:
        if nid in self.names:
            return self.names[nid]
        node = self.graph[nid]
        prefix = {"input": "x_", "param": "p_", "state": "s_"}.get(node.op)
        base = (prefix + node.name) if prefix else (f"v_{node.name}" if node.name else f"t{nid}")
        name, k = base, 2
        while name in self.used_names:
            name, k = f"{base}_{k}", k + 1
        self.used_names.add(name)
        self.names[nid] = name
        return name

    def operand(self, nid: int, stage: str) -> Operand:
        node = self.graph[nid]
        if nid in self.inline:
            return self.inline[nid]
        batched = self.batched(nid)
        if stage not in ("const", "hoist") and self.stages.get(nid) == "hoist":  # read per step
            return Operand(self.step_ref[nid], ATOM, True, len(node.shape), False)
        return Operand(self.name(nid), ATOM, batched, len(node.shape), node.scalar)

    def tensor(self, nid: int, stage: str) -> str:
        """The node's value as a tensor expression (compile-time scalars are wrapped)."""
        a = self.operand(nid, stage)
        return TorchExpr.tensor(a) if a.scalar else a.at(ATOM)

    def _linear(self, node, args: list[Operand], stage: str) -> tuple[str, str, str | None] | None:
        """(x, W, deferred) when the node is F.linear(x, W) of a batched x (see TorchExpr._fuse_linear).

        Inside the loop, a param W goes through a _DeferredWeight, which computes W's gradient
        as one matmul over all steps instead of one per step.
        """
        if not (node.op == "matmul" and args[0].rank == 2 and args[1].rank == 1 and not args[0].batched
                and args[1].batched and not args[0].scalar):
            return None
        w = node.args[0]
        deferred = None
        if stage == "loop" and self.use_deferred and self.graph[w].op == "param":
            deferred = self.deferred.setdefault(self.name(w), f"lin_{self.graph[w].name}")
        return args[1].text, args[0].at(ATOM), deferred

    def emit(self, out: Lines, nids: list[int], stage: str) -> None:
        users = {n: [u for u in self.graph.users(n) if u in self.stages] for n in nids}
        for nid in nids:
            node = self.graph[nid]
            if node.op in ("input", "param", "state", "item"):
                continue
            args = [self.operand(a, stage) for a in node.args]
            text, prec = self.expr.render(nid, args, self.batched(nid))
            linear = self._linear(node, args, stage)
            if linear and linear[2]:
                text, prec = f"{linear[2]}({linear[0]})", ATOM
            if node.op == "split":
                parts = {self.graph[u].attrs["index"]: u for u in users[nid]}
                names = [self.name(parts[i]) if i in parts else "_"
                         for i in range(len(node.attrs["sizes"]))]
                out(f"{', '.join(names)}{',' if len(names) == 1 else ''} = {text}")
                continue
            simple = not node.args and node.op in ("const", "dim")
            single = (len(users[nid]) == 1 and self.stages.get(users[nid][0]) == stage
                      and self.graph[users[nid][0]].op != "split") or not users[nid]
            short = len(text) <= 160  # keeps lines readable and generated expressions shallow
            if nid not in self.roots and nid not in self.keep and (simple or (node.name is None and single and short)):
                self.inline[nid] = Operand(text, prec, self.batched(nid), len(node.shape), node.scalar, linear)
                continue
            out(f"{self.name(nid)} = {text}")


@dataclass
class Recurrence:
    """What a lowering's fragment gets from the assembled forward (backends/assemble.py).

    On entry the generated forward has bound B, T, extra, N, cdt, odt, dev, the dims (`d_<name>`),
    the constants and the hoisted values, all named by `r`, and every state's initial value
    ([N, *shape]) as `s0_<name>`. A fragment `emit(L, rec, plan)` steps
    through (or scans, or chunks) the recurrence and must leave bound `out_<name>` for every output
    in `loop_outs` (a [T, N, ...] tensor or a list of T steps, for `_unsteps`) and the final value
    of every state under `r.name(state.node_in)`; the assembler returns them.
    """

    cell: Cell
    r: Renderer
    stages: dict[int, str]
    loop: list[int]  # the state-dependent nodes, in order
    into_loop: list[int]  # hoisted values the loop stage reads (and states whose next value is hoisted)
    loop_outs: list[Port]  # outputs computed in the loop stage

    top: Lines | None = None  # the module's top level, where the loop writes its functions (backends/opaque.py)
    forward_locals: set[str] = field(default_factory=set)  # the names the forward has bound on entry

    def initial(self, s: State) -> str:
        """State `s`'s initial value ([N, *shape]), bound by the forward before the fragment."""
        return f"s0_{s.name}"

    @staticmethod
    def initial_of(r: Renderer, s: State) -> str:
        init = r.tensor(s.init, "const")
        return f"_initial(state, {s.name!r}, {init}, B, extra, {shape_text(s.shape)}, cdt)"


def next_state(r: Renderer, nid: int, shape: D.Shape, stages: dict[int, str]) -> str:
    """A state's next value inside the loop; a constant one is broadcast over the N rows."""
    stage = stages.get(nid, "const")
    if stage == "const":
        return f"{r.tensor(nid, 'const')}.expand(N, *{shape_text(shape)})"
    return r.operand(nid, "loop").text


def node_dims(graph: Graph, nid: int) -> set[str]:
    """The dims a node's shape (or a `dim` node itself) names: the forward binds them as `d_<name>`."""
    node = graph[nid]
    names = {n for d in node.shape for n in D.free_names(d)}
    if node.op == "dim":
        names.add(node.attrs["name"])
    return names
