"""Typed lowering plans: what a parallel lowering needs from a cell, as IR node ids.

A plan names the values a lowering reads (a scan's a and b, a chunk form's q, k, v, gates and β);
planning appends the nodes it derives (a scan coefficient, an update's collected v) to the cell it
is given, which is `Cell.derived()` of the analysed one, so the analysed IR never changes. `scan_plan` and `chunk_plan` build the plan of the chosen backend; the lowering's
fragment (backends/emit_scan.py, emit_chunk.py, emit_loop.py) renders it; `nodes()` lists what
must stay live.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .analysis import Report
from .associative import scan_groups
from .ir import Cell, Combine
from .maxplus import MaxPlus


@dataclass(frozen=True)
class LoopPlan:
    """The sequential loop: its backward through time generated (backends/bptt.py), or autograd's
    through the Python loop (`backward="autograd"`, the reference the generated one is tested against)."""

    generated_backward: bool = True


@dataclass(frozen=True)
class NewtonPlan:
    """Newton's method over time (backends/emit_newton.py, rnnc/runtime/newton.py): the states in groups
    coupled through the step, each with its Jacobian block's structure (rnnc/jacobian.py)."""

    groups: tuple = ()  # of jacobian.JacobianGroup
    # chosen by backend "auto": the module runs Newton only from `auto_from` steps on, with
    # at most `auto_max_entries` state entries per step, and the loop otherwise (rnnc/schedule.py)
    auto_from: int | None = None
    auto_max_entries: int | None = None
    # the module hands the runtime the Triton solves of diagonal and 2x2-block groups (triton is
    # installed and such a group exists); it runs them on CUDA tensors (rnnc/runtime/triton_newton.py)
    triton: bool = False

    def nodes(self) -> list[int]:
        return []


@dataclass(frozen=True)
class MicroStep:
    """One micro-step of the generalized delta rule: S ← diag(e^gk) e^g S + a (bᵀ S) + k vᵀ.

    Every field is a node id, or None where the step has no such part (no decay, no low-rank term,
    no update): RWKV-7 is one step with a ≠ b, KDA one with a = −β k and b = e^gk ⊙ k, DeltaProduct
    one step per Householder factor of the token (rnnc/dplrplan.py reads them off the update).
    """

    a: int | None = None
    b: int | None = None
    k: int | None = None
    v: int | None = None
    gk: int | None = None  # per-key log-decay [K]
    g: int | None = None  # scalar log-decay []

    def nodes(self) -> list[int]:
        return [n for n in (self.a, self.b, self.k, self.v, self.gk, self.g) if n is not None]


@dataclass(frozen=True)
class ChunkPlan:
    """One matrix state in chunkwise form (rnnc/chunkplan.py finds the pieces):
    linear: S' = diag(e^gk) S diag(e^gv) (e^g) + (Π scale) k vᵀ; delta: S' = e^g (I − β k kᵀ) S + β k vᵀ;
    dplr: the micro-steps `steps` in order (k and v unused); the output `q @ S` (after the
    update, or before it with `before`; q carries the readout's sign and scale) plus `extra` terms."""

    kind: str  # "linear" | "delta" | "dplr"
    state: str
    output: str
    q: int
    k: int | None
    v: int | None
    gk: int | None = None
    gv: int | None = None
    g: int | None = None
    beta: int | None = None
    scale: tuple[int, ...] = ()
    before: bool = False
    extra: tuple[tuple[int, int], ...] = ()  # (state-free node, ±1)
    chunk_size: int | None = None  # None: the default for the kind (backends/emit_chunk.py)
    triton: bool = False
    steps: tuple[MicroStep, ...] = ()  # kind "dplr"
    transposed: bool = False  # o = S @ q: the chunk form runs on Sᵀ (k, v are its rows and columns)
    heads: object = None  # a dim: the state is [heads, *matrix], every value of the plan [heads, ...]
    positive: tuple[int, ...] = ()  # constant decays whose log is a gate: checked not negative
    # several states in one pass (rnnc/chunkplan.py, staged_plan): max-plus states scanned first, vector
    # states sharing the matrix state's decay and k joined as extra value columns, and the output read
    # through `reads` (node = sign · q @ state + rest, rest state-free or None); `v` is then the coefficient
    # times v, and the output is computed for all steps from the reads (`extra` unused)
    maxplus: tuple[MaxPlus, ...] = ()
    columns: tuple[tuple[str, int], ...] = ()  # (vector state, c): state' = decay · state + c k
    reads: tuple[tuple[int, str, int, int | None], ...] = ()  # (node, state, sign, rest)

    @property
    def staged(self) -> bool:
        return bool(self.reads)

    def nodes(self) -> list[int]:
        keys = (self.q, self.k, self.v, self.gk, self.gv, self.g, self.beta)
        return ([n for n in keys if n is not None] + list(self.scale) + [t for t, _ in self.extra]
                + [n for st in self.steps for n in st.nodes()] + list(self.positive)
                + [n for m in self.maxplus for n in (m.a, *m.b) if n is not None] + [c for _, c in self.columns]
                + [r for *_, r in self.reads if r is not None])


@dataclass(frozen=True)
class MatrixScan:
    """A group of states scanned as one, next = A states + b (rnnc/matrix_scan.py): "block", states
    of one shape with a[i][j] the elementwise coefficient of state j in state i (an m×m matrix per
    element), or "dense", vector states with a[i][j] the [n_i, n_j] block of one matrix over their
    concatenation. None: a zero coefficient, or a zero b."""

    kind: str  # "block" | "dense"
    states: tuple[str, ...]
    a: tuple[tuple[int | None, ...], ...]
    b: tuple[int | None, ...]

    def nodes(self) -> list[int]:
        return [n for row in self.a for n in row if n is not None] + [n for n in self.b if n is not None]


@dataclass(frozen=True)
class ScanPlan:
    """States by parallel scans: `linear` state -> (a, b) with next = a ⊙ state + b (b None: zero);
    `matrix` groups of states with a block or dense transition, keyed by their first state; `order`
    the keys of both in scan order (a later layer after the states it reads; empty: `linear`'s
    order); `combines` fold their states. On the triton backend `fused` state -> (a, b, leaves,
    body) and `folds` (combine, leaves, body, cbody) are the fused kernels' plans
    (backends/triton_scan.py)."""

    linear: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    combines: tuple[Combine, ...] = ()
    fused: dict[str, tuple] = field(default_factory=dict)
    folds: tuple[tuple, ...] = ()
    matrix: dict[str, MatrixScan] = field(default_factory=dict)
    order: tuple[str, ...] = ()

    @property
    def triton(self) -> bool:
        return bool(self.fused or self.folds)

    def nodes(self) -> list[int]:
        return ([n for pair in self.linear.values() for n in pair if n is not None]
                + [n for c in self.combines for n in c.args_right]
                + [n for f in self.fused.values() for n in f[2]] + [n for f in self.folds for n in f[1]]
                + [n for m in self.matrix.values() for n in m.nodes()])


def scan_plan(cell: Cell, report: Report, triton: bool = False) -> ScanPlan:
    """The scan plan of an analysed cell: folds by their combines, the other states linear."""
    from .backends import triton_scan
    from .linearity import group_stages, state_groups
    from .matrix_scan import coefficients
    from .scanplan import scan_coefficients

    combines = tuple(scan_groups(cell, report.classes))
    folded = frozenset(s.name for s in cell.states for c in combines if s.node_in in c.args_left)
    matrix, order = {}, []
    for group in state_groups(cell):
        info = report.classes[group[0]].get("matrix")
        if info is not None and not triton:
            a, b = coefficients(cell, group_stages(cell, report.stages, group), group, info["kind"])
            matrix[info["states"][0]] = MatrixScan(info["kind"], tuple(info["states"]), a, b)
        order += [info["states"][0]] if info is not None else [n for n in group if n not in folded]
    linear = scan_coefficients(cell, report.stages, skip=folded | {n for m in matrix.values() for n in m.states})
    if not triton:
        return ScanPlan(linear, combines, matrix=matrix, order=tuple(order))
    fused = {name: (a, b, *triton_scan.plan(cell.graph, a, b)) for name, (a, b) in linear.items()}
    folds = tuple((c, *triton_scan.fold_plan(cell.graph, c)) for c in combines)
    return ScanPlan(fused=fused, folds=folds)


def newton_plan(report: Report, auto: bool = False, kernels: bool = True) -> NewtonPlan:
    """Newton's plan: the Jacobian's structure, per group of coupled states; with `auto`, where the
    module runs it rather than the loop (rnnc/schedule.py's measured thresholds). Without `kernels`
    (a standalone module, which needs only torch outside the triton backend) no Triton solves."""
    import importlib.util

    from .schedule import NEWTON_FROM, NEWTON_MAX_ENTRIES

    triton = kernels and importlib.util.find_spec("triton") is not None and any(
        g.kind == "diagonal" or (g.kind == "block" and len(g.states) == 2) for g in report.jacobian)
    if auto:
        return NewtonPlan(tuple(report.jacobian), NEWTON_FROM, NEWTON_MAX_ENTRIES, triton)
    return NewtonPlan(tuple(report.jacobian), triton=triton)


def chunk_plan(cell: Cell, report: Report, chunk_size: int | None = None, triton: bool = False) -> ChunkPlan:
    """The chunk plan of an analysed cell (NotChunkable with the reason when there is none)."""
    from .chunkplan import chunk_plan as find

    plan = find(cell, report.stages, report.classes)
    return replace(plan, chunk_size=chunk_size, triton=triton)
