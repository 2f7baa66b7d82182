"""Analyses over a cell's IR: time dependence (what can be hoisted) and per-state reads.

Stages:
  const  depends on params and constants only: computed once per call, before the loop;
  hoist  depends on inputs but on no state: computed for all time steps at once;
  loop   depends on a state: computed step by step inside the recurrence.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import dims as D
from .ir import Cell, format_cell, format_node

STAGES = ("const", "hoist", "loop")


def stages(cell: Cell) -> dict[int, str]:
    """The stage of every live node (node ids are already in topological order)."""
    live = cell.live()
    out: dict[int, str] = {}
    for nid in cell.graph.order(live):
        node = cell.graph[nid]
        if node.op == "state":
            out[nid] = "loop"
        elif node.op == "input":
            out[nid] = "hoist"
        elif not node.args:
            out[nid] = "const"
        else:
            out[nid] = max((out[a] for a in node.args), key=STAGES.index)
    return out


def state_reads(cell: Cell) -> dict[str, list[str]]:
    """For each state, the states whose previous value its next value depends on."""
    by_node = {s.node_in: s.name for s in cell.states}
    return {s.name: [by_node[n] for n in sorted(cell.graph.ancestors([s.node_out])) if n in by_node]
            for s in cell.states}


@dataclass
class Report:
    """What analysis found for one cell and which lowering was chosen."""

    cell: Cell
    stages: dict[int, str]
    reads: dict[str, list[str]]
    classes: dict[str, dict]
    backend: str
    notes: list[str] = field(default_factory=list)
    jacobian: tuple = ()  # jacobian.JacobianGroup per group of coupled states

    def to_dict(self) -> dict:
        c = self.cell
        shape = lambda s: [D.fmt(d) for d in s]  # noqa: E731
        counts = {st: sum(1 for v in self.stages.values() if v == st) for st in STAGES}
        hoisted = [format_node(c.graph, n) for n, st in sorted(self.stages.items())
                   if st == "hoist" and c.graph[n].op != "input"]
        return {
            "cell": c.name,
            "file": c.file,
            "dims": {d.name: (None if d.default is None else int(d.default) if d.default.is_Integer else D.fmt(d.default))
                     for d in c.dims.values()},
            "inputs": {p.name: shape(p.shape) for p in c.inputs},
            "outputs": {p.name: shape(p.shape) for p in c.outputs},
            "params": {p.name: shape(p.shape) for p in c.params},
            "states": {s.name: {"shape": shape(s.shape), "reads": self.reads[s.name],
                                "stage": self.stages.get(s.node_out, "const"), **self.classes[s.name],
                                **self._jacobian(s.name)}
                       for s in c.states},
            "ops": counts,
            "hoisted": hoisted,
            "backend": self.backend,
            "notes": list(self.notes),
        }

    def _jacobian(self, state: str) -> dict:
        """{"jacobian": its structure} for a nonlinear state (what Newton's method over time solves)."""
        if self.classes[state]["class"] != "nonlinear":
            return {}
        return {"jacobian": next(g.describe() for g in self.jacobian if state in g.states)}

    def __str__(self) -> str:
        return self.summary() + "\n\nIR (stage of each op: const = once per call, hoist = all time steps at once, " \
            "loop = per step):\n" + "\n".join("  " + line for line in self.listing().splitlines())

    def summary(self) -> str:
        """The verdicts in a few lines, without the IR listing."""
        d = self.to_dict()
        c = self.cell
        lines = [f"cell {c.name} ({c.file})"]
        lines.append("  inputs:  " + ", ".join(f"{k}: [{', '.join(v)}]" for k, v in d["inputs"].items()))
        lines.append("  outputs: " + ", ".join(f"{k}: [{', '.join(v)}]" for k, v in d["outputs"].items()))
        if d["params"]:
            lines.append("  params:  " + ", ".join(f"{k}: [{', '.join(v)}]" for k, v in d["params"].items()))
        for name, s in d["states"].items():
            reads = ", ".join(s["reads"]) or "no state"
            lines.append(f"  state {name}: [{', '.join(s['shape'])}]  {s['class']}: {s['why']}")
            detail = [f"next value reads {reads}"]
            if s.get("after"):
                detail.append(f"a parallel stage after {', '.join(s['after'])}")
            if "jacobian" in s:
                detail.append(f"jacobian {s['jacobian']}" + (" -> newton" if self.backend == "newton" else ""))
            if "transition" in s:
                detail.append(f"transition {s['transition']}, decay {s['decay']}")
            if "readout" in s:
                detail.append(f"read out as {s['readout']} of the {s['readout_of']} value")
            if s.get("form"):
                lines.append("      " + s["form"])
            lines.append("      " + "; ".join(detail))
        ops = d["ops"]
        lines.append(f"  ops: {ops['const']} constant, {ops['hoist']} hoisted over all time steps, "
                     f"{ops['loop']} in the recurrence")
        for note in self.notes:
            lines.append(f"  note: {note}")
        lines.append(f"  backend: {self.backend}")
        return "\n".join(lines)

    def listing(self) -> str:
        """The IR, each line tagged with its stage."""
        return format_cell(self.cell, self.stages)


def analyze_cell(cell: Cell, backend: str = "loop") -> Report:
    """Stages, state reads and linearity verdicts of the cell; `backend` is recorded as chosen."""
    from .associative import classify_combines
    from .jacobian import jacobian_groups
    from .linearity import classify
    from .maxplus import classify_maxplus

    st = stages(cell)
    classes = classify(cell, st)
    classify_combines(cell, st, classes)
    classify_maxplus(cell, st, classes)
    return Report(cell, st, state_reads(cell), classes, backend, jacobian=jacobian_groups(cell, classes))
