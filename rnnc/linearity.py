"""Which states are linear in themselves, and what the linear transition looks like.

Each loop value gets an *affine form* over the states' start-of-step values: for every state,
the chains of linear ops through which it reaches the value (scale by a state-free factor,
multiply by a state-free matrix on the left or right, or another linear op), or a verdict that
the value is nonlinear in the states (with the reason). A state's class follows from the form of
its next value:

  elementwise_affine  h' = a ⊙ h + b (a, b state-free; vector states)
  matrix_affine       S' = decay ⊙ (T S) + U for a matrix state (or T s + u for a vector state
                      with a matrix transition); decay none/scalar/key/value/key_value,
                      T additive (identity) / identity_minus_low_rank / dense
  nonlinear           anything else (why, in one line)

These verdicts are what a parallel lowering needs: elementwise-affine states scan, matrix-affine
states with additive or identity-minus-low-rank transitions and a contraction readout chunk.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import dims as D
from .ir import Cell, Graph

LINEAR_OTHER = {"transpose", "index", "concat", "split", "item", "broadcast", "outer", "reduce"}


@dataclass
class Form:
    """value = Σ_state Σ_chain chain(state) + offset; `nonlinear` holds the reason when it is not."""

    chains: dict[str, list[tuple]] = field(default_factory=dict)
    nonlinear: str | None = None

    @property
    def states(self) -> set[str]:
        return set(self.chains)


def _describe(g: Graph, nid: int) -> str:
    node = g[nid]
    if node.name:
        return node.name
    if node.op in ("const",):
        return repr(node.attrs["value"])
    args = ", ".join(_describe(g, a) if g[a].name or g[a].op == "const" else "…" for a in node.args)
    return f"{node.op}({args})"


def affine_forms(cell: Cell, stages: dict[int, str]) -> dict[int, Form]:
    g = cell.graph
    state_of = {s.node_in: s.name for s in cell.states}
    forms: dict[int, Form] = {}

    def reads(nid: int) -> str:
        return ", ".join(sorted(forms[nid].states)) if nid in forms and forms[nid].states else "a state"

    for nid in g.order(stages):
        if stages.get(nid) != "loop":
            continue
        node = g[nid]
        args = node.args
        dep = [a for a in args if stages.get(a) == "loop"]
        bad = next((forms[a] for a in dep if forms[a].nonlinear), None)
        if node.op == "state":
            forms[nid] = Form({state_of[nid]: [()]})
            continue
        if bad is not None:
            forms[nid] = Form(nonlinear=bad.nonlinear)
            continue
        op = node.op
        if op in ("add", "sub") or (op in LINEAR_OTHER and op != "outer"):
            f = Form()
            for i, a in enumerate(args):
                if a in dep:
                    tag = ("neg",) if op == "sub" and i == 1 else ()
                    extra = () if op in ("add", "sub") else (("other", op),)
                    for s, chains in forms[a].chains.items():
                        f.chains.setdefault(s, []).extend(c + tag + extra for c in chains)
            forms[nid] = f
        elif op == "neg":
            forms[nid] = Form({s: [c + (("neg",),) for c in cs] for s, cs in forms[args[0]].chains.items()})
        elif op in ("mul", "div", "matmul", "outer", "where") and len(dep) == 1:
            (a,) = dep
            other = [x for x in args if x != a]
            if op == "div" and args[1] == a:
                forms[nid] = Form(nonlinear=f"it divides by a value that reads state {reads(a)}")
                continue
            if op == "where" and args[0] == a:
                forms[nid] = Form(nonlinear=f"a where() condition reads state {reads(a)}")
                continue
            if op in ("mul", "div"):
                link = ("scale", other[0], op == "div")  # (factor, whether it divides)
            elif op == "matmul":
                link = ("left", args[0]) if args[1] == a else ("right", args[1])
            else:
                link = ("other", op)
            forms[nid] = Form({s: [c + (link,) for c in cs] for s, cs in forms[a].chains.items()})
        elif op in ("mul", "matmul", "outer") and len(dep) == 2:
            left, right = dep
            forms[nid] = Form(nonlinear=f"`{_describe(g, left)}` (reads state {reads(left)}) and "
                                        f"`{_describe(g, right)}` (reads state {reads(right)}) are multiplied")
        else:
            a = dep[0]
            forms[nid] = Form(nonlinear=f"{op}(…) is applied to `{_describe(g, a)}`, which reads state {reads(a)}")
    return forms


def _decay_kind(g: Graph, factors: list[int], rank: int) -> str:
    """none/scalar/key/value/key_value: along which axes of a [K, V] state the decay varies."""
    rows = cols = False
    for f in factors:
        shape = g[f].shape
        if rank == 2:
            pad = (D.ONE,) * (2 - len(shape)) + tuple(shape[-2:])
            rows |= pad[0] != D.ONE
            cols |= pad[1] != D.ONE
    if not factors:
        return "none"
    return {(False, False): "scalar", (True, False): "key", (False, True): "value", (True, True): "key_value"}[(rows, cols)]


def _is_low_rank(g: Graph, nid: int) -> bool:
    node = g[nid]
    if node.op == "outer":
        return True
    if node.op in ("mul", "div") and any(len(g[a].shape) == 0 for a in node.args):
        return any(_is_low_rank(g, a) for a in node.args if len(g[a].shape) == 2)
    if node.op == "neg":
        return _is_low_rank(g, node.args[0])
    return False


def _transition(g: Graph, matrix: int) -> str:
    node = g[matrix]
    if node.op == "sub" and g[node.args[0]].op == "eye" and _is_low_rank(g, node.args[1]):
        return "identity_minus_low_rank"
    return "dense"


def classify(cell: Cell, stages: dict[int, str]) -> dict[str, dict]:
    """Per state: class, the transition's structure, and a one-line reason."""
    g = cell.graph
    forms = affine_forms(cell, stages)
    out: dict[str, dict] = {}
    for s in cell.states:
        rank = len(s.shape)
        form = forms.get(s.node_out, Form())  # a next value that is not in the loop reads no state
        if form.nonlinear:
            out[s.name] = {"class": "nonlinear", "why": form.nonlinear}
            continue
        others = sorted(form.states - {s.name})
        if others:
            out[s.name] = {"class": "matrix_affine", "transition": "dense",
                           "decay": "none", "coupled": others,
                           "why": f"linear, but its next value also reads state {', '.join(others)} "
                                  "(analysed jointly: a dense transition over the coupled states)"}
            continue
        chains = form.chains.get(s.name, [])
        if not chains:
            out[s.name] = {"class": "elementwise_affine", "decay": "zero",
                           "why": "its next value does not read its previous value"}
            continue
        factors = [link[1] for c in chains for link in c if link[0] == "scale"]
        kinds = {link[0] for c in chains for link in c if link[0] != "neg"}
        if kinds <= {"scale"} and rank <= 1:
            out[s.name] = {"class": "elementwise_affine", "decay": "none" if not factors else "elementwise",
                           "why": f"{s.name}' = a ⊙ {s.name} + b with a and b independent of the states"}
            continue
        info = {"class": "matrix_affine", "decay": _decay_kind(g, factors, rank)}
        if kinds <= {"scale"}:
            info["transition"] = "additive"
        elif kinds <= {"scale", "left"} and len(chains) == 1 and sum(1 for k in chains[0] if k[0] == "left") == 1:
            matrix = next(k[1] for k in chains[0] if k[0] == "left")
            info["transition"] = _transition(g, matrix)
        else:
            info["transition"] = "dense"
        what = {"additive": f"{s.name}' = decay ⊙ {s.name} + update",
                "identity_minus_low_rank": f"{s.name}' = decay · (I − low-rank) {s.name} + update (delta rule)",
                "dense": f"{s.name}' = T {s.name} + update with a state-free matrix T"}[info["transition"]]
        info["why"] = f"{what}; decay {info['decay']}"
        out[s.name] = info
    _readouts(cell, stages, forms, out)
    return out


def _readouts(cell: Cell, stages: dict[int, str], forms: dict[int, Form], out: dict[str, dict]) -> None:
    """Mark the states the outputs read through a contraction `q @ S` (what a chunkwise form needs)."""
    g = cell.graph
    for s in cell.states:
        info = out[s.name]
        kinds = set()
        for o in cell.outputs:
            deps = g.ancestors([o.node])
            if s.node_in not in deps:
                continue
            new = s.node_out in deps and s.node_out != s.node_in
            terms = _state_terms(g, stages, o.node)
            if all(g[t].op == "matmul" and any(stages.get(a) != "loop" for a in g[t].args) for t in terms):
                kinds.add(("contraction", "new" if new else "old"))
            elif o.node in (s.node_out, s.node_in):
                kinds.add(("state", "new" if o.node == s.node_out else "old"))
            else:
                kinds.add(("other", "new" if new else "old"))
        if kinds:
            info["readout"] = sorted({k for k, _ in kinds})[0] if len(kinds) == 1 else "mixed"
            info["readout_of"] = sorted({w for _, w in kinds})[0] if len({w for _, w in kinds}) == 1 else "both"


def _state_terms(g: Graph, stages: dict[int, str], nid: int) -> list[int]:
    """The state-dependent terms of a sum (through add/sub/neg), e.g. `q @ S` in `q @ S + d * x`."""
    node = g[nid]
    if node.op in ("add", "sub", "neg"):
        return [t for a in node.args if stages.get(a) == "loop" for t in _state_terms(g, stages, a)]
    return [nid]
