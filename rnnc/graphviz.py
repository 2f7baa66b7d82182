"""IR → Graphviz DOT text (`rnnc graph`). Nodes are coloured by stage; carry edges are dashed."""
from __future__ import annotations

from .analysis import stages as compute_stages
from .dims import fmt_shape
from .ir import Cell

COLORS = {"const": "#e8e8e8", "hoist": "#cfe8ff", "loop": "#ffd9b3"}


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(cell: Cell) -> str:
    stages = compute_stages(cell)
    g = cell.graph
    lines = [f"digraph {_quote(cell.name)} {{", "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
             f"  label={_quote(f'cell {cell.name}: grey = constant, blue = hoisted over time, orange = recurrence')};"]
    outputs = {o.node: o.name for o in cell.outputs}
    for nid in sorted(stages):
        node = g[nid]
        label = node.op if not node.name else f"{node.name} = {node.op}"
        if node.dtype != "tuple":
            label += f"\\n{fmt_shape(node.shape)}"
        shape = "ellipse" if node.op in ("input", "param", "state") else "box"
        lines.append(f"  n{nid} [label={_quote(label)}, shape={shape}, fillcolor={_quote(COLORS[stages[nid]])}];")
    for nid in sorted(stages):
        for a in g[nid].args:
            lines.append(f"  n{a} -> n{nid};")
    for s in cell.states:
        lines.append(f"  n{s.node_out} -> n{s.node_in} [style=dashed, color=red, label={_quote('next ' + s.name)}, "
                     "constraint=false];")
    for nid, name in outputs.items():
        lines.append(f"  out_{name} [label={_quote('output ' + name)}, shape=plaintext];")
        lines.append(f"  n{nid} -> out_{name};")
    lines.append("}")
    return "\n".join(lines) + "\n"
