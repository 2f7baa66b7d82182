"""A state's transition read off the canonical terms of its next value, and printed.

`transition` factors out what every term shares (the decay: scalars, per-row and per-column
diagonals, elementwise factors) and classifies what remains: the identity, the identity plus
low-rank terms (the delta rule, DPLR), or dense. `formula` prints it for the report:
`S' = exp(g) (I - beta · k kᵀ) S + …`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from . import dims as D
from .ir import Graph
from .linear_form import Atom, Form, Term
from .matrix_terms import normal_terms


@dataclass
class Decay:
    """The factors common to every term of a transition: S' = decay ⊙ (T S) + U."""

    num: object = 1
    scalars: tuple[tuple[int, bool], ...] = ()
    left: tuple[Atom, ...] = ()  # per-row diagonals (per key)
    right: tuple[Atom, ...] = ()  # per-column diagonals (per value)
    elem: tuple[tuple[int, bool], ...] = ()

    def kind(self, rank: int) -> str:
        if rank <= 1:
            return "none" if self.num == 1 and not (self.scalars or self.left or self.right or self.elem) \
                else "elementwise"
        rows, cols = bool(self.left) or bool(self.elem), bool(self.right) or bool(self.elem)
        if rows or cols:
            return {(True, False): "key", (False, True): "value", (True, True): "key_value"}[(rows, cols)]
        return "scalar" if self.scalars or self.num != 1 else "none"


@dataclass
class Transition:
    """How a state's next value reads its previous value (the canonical linear form).

    kind: "zero" (it does not), "diagonal" (only diagonal terms: an elementwise scaling),
    "identity" (decay ⊙ S), "identity_plus_low_rank" (decay · (I + Σ c a bᵀ) S),
    "diagonal_plus_low_rank" ((D + Σ c a bᵀ) S where no decay factors out: RWKV-7's diag(w) + a bᵀ;
    `decay` is then D), "dense".
    `low_rank` holds the c a bᵀ terms (left atoms col a, row b; for diagonal_plus_low_rank, with any
    diagonals around them) of the remainder. `inner` is the part of the decay's per-row diagonals
    applied before the low-rank factor ((I − β k kᵀ) diag(e^g) S: KDA's order).
    """

    state: str
    kind: str
    decay: Decay
    terms: list[Term]
    low_rank: list[Term] = field(default_factory=list)
    coupled: list[str] = field(default_factory=list)
    opaque: str | None = None
    form: str = ""  # the transition as text (formula), for the report
    inner: tuple[Atom, ...] = ()


def _common(seqs: list[tuple[Atom, ...]], from_end: bool) -> tuple[Atom, ...]:
    """The longest run of diagonal atoms every sequence starts (or ends) with."""
    out: list[Atom] = []
    for i in range(min(len(s) for s in seqs)):
        atoms = {s[-1 - i] if from_end else s[i] for s in seqs}
        if len(atoms) != 1 or next(iter(atoms)).kind != "diag":
            break
        out.append(next(iter(atoms)))
    return tuple(reversed(out)) if from_end else tuple(out)


def _multiset_common(lists: list[tuple]) -> tuple:
    common = list(lists[0])
    for other in lists[1:]:
        rest = list(other)
        keep = []
        for x in common:
            if x in rest:
                rest.remove(x)
                keep.append(x)
        common = keep
    return tuple(sorted(common))


def _without(items: tuple, remove: tuple) -> tuple:
    rest = list(items)
    for x in remove:
        rest.remove(x)
    return tuple(rest)


def transition(g: Graph, state: str, form: Form, rank: int) -> Transition:
    """The canonical transition of `state` from the form of its next value (assumed linear)."""
    coupled = sorted(form.states - {state})
    if state in form.opaque:
        return Transition(state, "dense", Decay(), [], coupled=coupled, opaque=form.opaque[state])
    if any(t.trans for t in form.of(state)):
        return Transition(state, "dense", Decay(), [], coupled=coupled, opaque="a transpose")
    terms = normal_terms(g, form.of(state))
    if terms is None:
        return Transition(state, "dense", Decay(), [], coupled=coupled, opaque="too many terms")
    if not terms:
        return Transition(state, "zero", Decay(), [], coupled=coupled)
    if all(t.diagonal for t in terms) and (len(terms) > 1 or rank <= 1):
        # S' = (Σ_i decay_i) ⊙ S: the decay's factors are those of all terms together
        decay = Decay(terms[0].sign * terms[0].num if len(terms) == 1 else 1,
                      tuple(s for t in terms for s in t.scalars), tuple(a for t in terms for a in t.left),
                      tuple(a for t in terms for a in t.right), tuple(e for t in terms for e in t.elem))
        return Transition(state, "diagonal", decay, terms, coupled=coupled)
    lead = _common([t.left for t in terms], False)
    trail = _common([t.left[len(lead):] for t in terms], True)
    rlead = _common([t.right for t in terms], False)
    rtrail = _common([t.right[len(rlead):] for t in terms], True)
    scalars = _multiset_common([t.scalars for t in terms])
    elem = _multiset_common([t.elem for t in terms])
    ident = [t for t in terms if len(t.left) == len(lead) + len(trail) and len(t.right) == len(rlead) + len(rtrail)
             and len(t.scalars) == len(scalars) and len(t.elem) == len(elem) and not t.dots]
    num = ident[0].sign * ident[0].num if len(ident) == 1 else 1
    decay = Decay(num, scalars, lead + trail, rlead + rtrail, elem)
    rest = []
    for t in terms:
        if t in ident:
            continue
        rest.append(replace(t, num=t.num / num if num != 1 else t.num, scalars=_without(t.scalars, scalars),
                            elem=_without(t.elem, elem), left=t.left[len(lead):len(t.left) - len(trail)],
                            right=t.right[len(rlead):len(t.right) - len(rtrail)]))
    if len(ident) == 1 and not rest:
        return Transition(state, "identity", decay, terms, coupled=coupled)
    if len(ident) == 1 and all(not t.right and not t.elem and [a.kind for a in t.left] == ["col", "row"]
                               and t.left[0].node is not None and t.left[1].node is not None for t in rest):
        return Transition(state, "identity_plus_low_rank", decay, terms, low_rank=rest, coupled=coupled,
                          inner=trail)
    diag = [t for t in terms if t.diagonal]
    if len(diag) == 1 and all(_low_rank(t) for t in terms if t is not diag[0]):
        d = diag[0]
        return Transition(state, "diagonal_plus_low_rank", Decay(d.sign * d.num, d.scalars, d.left, d.right, d.elem),
                          terms, low_rank=[t for t in terms if t is not d], coupled=coupled)
    return Transition(state, "dense", decay, terms, coupled=coupled)


def _low_rank(t: Term) -> bool:
    """c (P a)(Q b)ᵀ: one column times one row, with only diagonals around them."""
    kinds = [a.kind for a in t.left]
    return (not t.right and not t.elem and not t.trans and kinds.count("col") == 1 and kinds.count("row") == 1
            and kinds.index("row") == kinds.index("col") + 1 and set(kinds) <= {"diag", "col", "row"}
            and all(a.node is not None for a in t.left))


_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


def expr_text(g: Graph, nid: int | None, depth: int = 3) -> str:
    """A short readable rendering of a state-free value: its spec name, or its expression."""
    if nid is None:
        return "1"
    node = g[nid]
    if node.name:
        return node.name
    if node.op == "const":
        return repr(node.attrs["value"])
    if depth == 0:
        return "…"
    args = [expr_text(g, a, depth - 1) for a in node.args]
    if node.op not in _INFIX:
        args = [_bare(a) for a in args]
    if node.op in _INFIX and len(args) == 2:
        return f"({args[0]} {_INFIX[node.op]} {args[1]})"
    if node.op == "neg":
        return f"-{args[0]}"
    if node.op == "index":
        items = ", ".join("None" if it[0] == "new" else "..." if it[0] == "ellipsis" else
                          ":" if it[0] == "slice" else D.fmt(it[1]) for it in node.attrs["items"])
        return f"{args[0]}[{items}]"
    return f"{node.op}({', '.join(args)})"


def _bare(text: str) -> str:
    """`(a + b)` -> `a + b` where the parentheses enclose the whole text."""
    if not (text.startswith("(") and text.endswith(")")):
        return text
    depth = 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0 and i < len(text) - 1:
            return text
    return text[1:-1]


def _atom_text(g: Graph, a: Atom) -> str:
    x = expr_text(g, a.node)
    if a.kind == "diag":
        x = _bare(x)
    if a.kind == "diag":
        return f"diag({'1 / ' if a.inv else ''}{x})"
    if a.kind == "row":
        return f"{x}ᵀ"
    if a.kind == "mat":
        return x + ("ᵀ" if a.trans else "")
    if a.kind == "sel":
        return "sel"
    return x


def _coef_text(g: Graph, sign: int, num, scalars, elem) -> str:
    parts = [] if num == 1 else [str(num)]
    parts += [("1 / " if inv else "") + expr_text(g, n) for n, inv in scalars]
    parts += [("1 / " if inv else "") + expr_text(g, n) + " ⊙" for n, inv in elem]
    text = " · ".join(parts)
    return ("-" if sign < 0 else "") + text


def term_text(g: Graph, t: Term, state: str) -> str:
    """One term: `-beta · k kᵀ S`."""
    core = " ".join([_atom_text(g, a) for a in t.left] + [state] + [_atom_text(g, a) for a in t.right])
    dots = "".join(f" ({expr_text(g, b)}ᵀ{expr_text(g, c)})" for b, c in t.dots)
    coef = _coef_text(g, t.sign, t.num, t.scalars, t.elem)
    return (f"{coef} · " if coef not in ("", "-") else coef) + core + dots


def formula(g: Graph, t: Transition) -> str:
    """The transition as text, decay factored out: `S' = exp(g) · (I - beta · k kᵀ) S + …`."""
    s = t.state
    if t.kind == "zero":
        return f"{s}' = …  (does not read {s})"
    if t.kind in ("dense", "diagonal") or t.opaque:
        if t.opaque or not t.terms:
            return f"{s}' = T({s}) + …  (through {t.opaque})"
        return f"{s}' = " + " + ".join(term_text(g, x, s) for x in t.terms).replace("+ -", "- ") + " + …"
    d = t.decay
    low = " ".join(("- " if x.sign < 0 else "+ ") + term_text(g, replace(x, sign=1), "").strip() for x in t.low_rank)
    if t.kind == "diagonal_plus_low_rank":
        diag = term_text(g, next(x for x in t.terms if x.diagonal), "").strip()
        return f"{s}' = ({diag} {low}) {s} + …"
    decay = _coef_text(g, 1, d.num, d.scalars, d.elem)
    left = " ".join(_atom_text(g, a) for a in d.left[:len(d.left) - len(t.inner)])
    right = " ".join(_atom_text(g, a) for a in d.right)
    first = "".join(_atom_text(g, a) + " " for a in t.inner)  # applied before the low-rank factor
    inner = s if t.kind == "identity" else f"(I {low}) {first}{s}"
    parts = [p for p in (decay + (" ⊙" if d.elem else ""), left, inner, right) if p]
    return f"{s}' = " + " ".join(parts).replace("⊙ ⊙", "⊙") + " + …"
