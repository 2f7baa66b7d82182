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


def to_svg(cell: Cell) -> str:
    """A self-contained SVG of the IR: layered top to bottom by dependence depth.

    Uses no external program (Graphviz's `dot` lays graphs out better; `rnnc graph -o x.dot`
    writes its input). Carry edges are dashed red, like in the DOT export.
    """
    from xml.sax.saxutils import escape

    stages = compute_stages(cell)
    g = cell.graph
    order = g.order(stages)
    depth: dict[int, int] = {}
    for nid in order:
        depth[nid] = 1 + max((depth[a] for a in g[nid].args), default=-1)
    layers: dict[int, list[int]] = {}
    for nid in order:
        layers.setdefault(depth[nid], []).append(nid)
    box_w, box_h, gap_x, gap_y, margin = 150, 40, 20, 40, 30
    width = margin * 2 + max(len(v) for v in layers.values()) * (box_w + gap_x)
    height = margin * 2 + len(layers) * (box_h + gap_y)
    pos: dict[int, tuple[float, float]] = {}
    for level, nids in layers.items():
        row_w = len(nids) * (box_w + gap_x) - gap_x
        x0 = (width - row_w) / 2
        for i, nid in enumerate(nids):
            pos[nid] = (x0 + i * (box_w + gap_x), margin + level * (box_h + gap_y))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="Helvetica, Arial, sans-serif" font-size="11">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" '
           'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>',
           f'<text x="{margin}" y="18">{escape(f"cell {cell.name}: grey = constant, blue = hoisted, orange = recurrence")}</text>']
    for nid in order:
        x, y = pos[nid]
        for a in g[nid].args:
            ax, ay = pos[a]
            out.append(f'<line x1="{ax + box_w / 2}" y1="{ay + box_h}" x2="{x + box_w / 2}" y2="{y}" '
                       'stroke="#555" marker-end="url(#arrow)"/>')
    for s in cell.states:
        if s.node_out in pos and s.node_in in pos:
            (x1, y1), (x2, y2) = pos[s.node_out], pos[s.node_in]
            out.append(f'<path d="M {x1 + box_w} {y1 + box_h / 2} C {width - margin / 2} {y1}, '
                       f'{width - margin / 2} {y2}, {x2 + box_w} {y2 + box_h / 2}" fill="none" stroke="red" '
                       'stroke-dasharray="5,3" marker-end="url(#arrow)"/>')
    for nid in order:
        node, (x, y) = g[nid], pos[nid]
        label = node.op if not node.name else f"{node.name} = {node.op}"
        shape = "" if node.dtype == "tuple" else fmt_shape(node.shape)
        rx = 18 if node.op in ("input", "param", "state") else 6
        out.append(f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="{rx}" '
                   f'fill="{COLORS[stages[nid]]}" stroke="#333"/>')
        out.append(f'<text x="{x + box_w / 2}" y="{y + 16}" text-anchor="middle">{escape(label[:24])}</text>')
        out.append(f'<text x="{x + box_w / 2}" y="{y + 31}" text-anchor="middle" fill="#444">{escape(shape[:26])}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
