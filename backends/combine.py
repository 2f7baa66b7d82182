"""The Python source of a declared associative combine, as a function over rows of operands.

`combine_source` renders the combine's own graph (ir.Combine.graph) with the renderer every
lowering shares (backends/render.py): every operand has one leading axis of rows, so one call
combines many pairs at once. The scan backend nests it in the generated forward (it reads `cdt`,
`dev` and dim sizes `d_*` from there); rnnc/associative.py executes it to check associativity on
random operands.
"""
from __future__ import annotations

from rnnc.ir import Combine

from .render import Lines, Renderer
from .torch_expr import shape_text


def _stages(c: Combine) -> dict[int, str]:
    g = c.graph
    live = g.ancestors(c.out)
    out: dict[int, str] = {}
    for nid in g.order(live):
        node = g[nid]
        out[nid] = "hoist" if node.op == "input" else ("const" if all(out[a] == "const" for a in node.args) else "hoist")
    return out


def combine_source(c: Combine, fname: str, indent: str = "") -> list[str]:
    """Lines of `def fname(a_x, ..., b_x, ...)` returning the combined tuple, rows first."""
    g = c.graph
    stages = _stages(c)
    r = Renderer(g, stages, set(c.out))
    params = []
    for side, ids in (("a", c.left), ("b", c.right)):
        for nid in ids:
            r.names[nid] = f"{side}_{g[nid].name}"
            r.used_names.add(r.names[nid])
            params.append(r.names[nid])
    L = Lines()
    L(f"def {fname}({', '.join(params)}):")
    L.indent()
    L(f'"""combine {c.name}: one leading axis of rows on every operand."""')
    r.emit(L, [n for n in g.order(stages) if g[n].op != "input"], "hoist")
    results = []
    for nid in c.out:
        if stages[nid] == "const":  # a constant result still needs its rows
            results.append(f"{r.tensor(nid, 'const')}.expand({params[0]}.shape[0], *{shape_text(g[nid].shape)})")
        else:
            results.append(r.operand(nid, "hoist").text)
    L(f"return {', '.join(results)}{',' if len(results) == 1 else ''}")
    return [indent + line if line else line for line in L.lines]
