"""Which lowering runs a cell: the policy in one place.

Each backend says whether it applies to an analysed cell (`why_not`: None, or the reason);
`pick` resolves "auto" (and checks an explicit choice); the thresholds that depend on
measurements (LOOP_BELOW, RECURRENT_BELOW) live here, with the notes the report gets about them.
"""
from __future__ import annotations

import importlib.util

from .analysis import Report
from .associative import scan_groups
from .backends import tiles, triton_scan
from .chunkplan import NotChunkable, chunk_plan
from .plans import ChunkPlan
from .errors import BuildError

BACKENDS = ("loop", "scan", "chunk", "triton", "newton")
SCANNABLE = {("elementwise_affine", None), ("matrix_affine", "additive"), ("associative", None)}
#: What the triton backend fuses so far: states updated elementwise, h' = a ⊙ h + b.
TRITON_FUSED = {("elementwise_affine", None), ("matrix_affine", "additive")}
#: The classes `auto` sends to the scan (matrix states would materialise every step's state).
SCAN_FIRST = {"elementwise_affine", "associative"}
#: The largest dense or block transition (n×n) the scan backend takes: the matrix scan costs
#: O(n³) per combine. `auto` takes it for block groups (small m, elementwise), for a constant
#: dense matrix up to MATRIX_AUTO_CONSTANT (its powers cost O(n³ log T), then one GEMM a round)
#: and for one that changes per step up to MATRIX_AUTO_PER_STEP (an n×n product per step and
#: row per combine). Measured (benchmarks/bench_matscan.py, B=4, T=1024, fwd+bwd, 1 thread):
#: constant 3.5× the loop at n = 64, 0.85× at 256; per step 1.3× at n = 16, 0.4× at 32.
MATRIX_SCAN_MAX = 256
MATRIX_AUTO_CONSTANT = 64
MATRIX_AUTO_PER_STEP = 16
#: With backend="auto", sequences shorter than this run on the loop (measured: benchmarks/RESULTS.md).
LOOP_BELOW = {"scan": 64, "chunk": 8}
#: `auto` takes Newton's method over time (backend "newton") for a nonlinear cell whose every group of
#: states has a diagonal Jacobian that is smooth in them (no relu or maximum on a state: those make Newton
#: an active-set iteration, IndRNN's 2-23 iterations at H=256, and its loop is cheap), and the built module
#: runs it only where it measured faster than the loop on CPU (benchmarks/RESULTS.md, bench_newton.py,
#: paragru, B=4, 1 thread, with the segmented initial guess: 1 iteration): at B·H = 256 state entries per
#: step, forward 1.3× at T=512, 1.5-2.8× from 1024 (0.9× at 256), forward+backward 3.5-5.7×; at 512
#: entries, forward 1.0-1.2× from T=512, forward+backward 1.8-2.8×; at 1024 entries, forward 0.8-1.1× and
#: forward+backward 1.3-1.5× (no forward gain). So: sequences of NEWTON_FROM steps or more with at most
#: NEWTON_MAX_ENTRIES entries per step (all sequences together); the loop otherwise.
NEWTON_FROM = 512
NEWTON_MAX_ENTRIES = 512
#: On the triton backend, sequences shorter than this (and `step`) run the fused recurrent kernel
#: when the cell also has a parallel form: fla's layers switch to fused_recurrent at T <= 64 too.
RECURRENT_BELOW = 65


def layered(report: Report) -> str | None:
    """Why a state linear only given earlier states keeps the cell off the fused Triton scans (None
    when no state is): the PyTorch scan runs such a state as a parallel stage after those it reads
    (and the chunk form a matrix state after max-plus states: chunkplan.staged_plan)."""
    for name, info in report.classes.items():
        if info.get("after"):
            return (f"state '{name}' is linear only once {', '.join(info['after'])} is known for every step "
                    "(a stage after them: the fused Triton scans do not run such stages)")
    return None


def why_not(backend: str, report: Report) -> str | None:
    """Why `backend` cannot lower the cell (None when it can)."""
    if backend == "chunk":  # (states in stages: rnnc/chunkplan.py's staged_plan decides)
        try:
            chunk_plan(report.cell.derived(), report.stages, report.classes)
        except NotChunkable as e:
            return str(e)
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton, or rnnc[triton])"
        kind, why = triton_kind(report)
        return None if kind else why
    if backend == "newton":
        return newton_why(report)
    if backend == "scan":
        for name, info in report.classes.items():
            if "matrix" in info:
                if (why := matrix_too_large(info["matrix"])) is not None:
                    return f"state '{name}' {why}"
                continue
            if (info["class"], info.get("transition")) not in SCANNABLE or info.get("coupled"):
                kind = info["class"] + (f" ({info['transition']} transition)" if "transition" in info else "")
                return f"state '{name}' is {kind}: {info['why']}"
    return None


def matrix_too_large(matrix: dict) -> str | None:
    """Why a group's dense or block transition is too large for the matrix scan (None when it is
    not): a combine costs O(n³) for an n×n matrix, and a matrix that changes per step is kept for
    every step (T·n² numbers per sequence). A size that is a symbolic dim is taken (the built
    module's dims are known only when it runs)."""
    size = matrix["size"]
    if size.isdigit() and int(size) > MATRIX_SCAN_MAX:
        return (f"has a {matrix['kind']} transition of size {size}×{size}, above the matrix scan's limit of "
                f"{MATRIX_SCAN_MAX} (each combine costs O(n³))")
    return None


def auto_matrix(matrix: dict) -> bool:
    """Whether `auto` scans a dense or block group (else the loop; measured, see MATRIX_AUTO_*). A
    dense matrix whose size is a symbolic dim is left to the loop (its cost grows as n³)."""
    if matrix["kind"] == "block":
        return not matrix_too_large(matrix)
    limit = MATRIX_AUTO_PER_STEP if matrix["per_step"] else MATRIX_AUTO_CONSTANT
    return matrix["size"].isdigit() and int(matrix["size"]) <= limit


def newton_why(report: Report) -> str | None:
    """Why Newton's method over time cannot solve the cell (None when it can): it needs a state, a
    step every op of which has derivative rules, and no dense Jacobian over a matrix state's entries
    (K*V entries: a (K*V)² matrix per step)."""
    from .autodiff import differentiable

    cell = report.cell
    if not cell.states:
        return "the cell has no state: there is no recurrence to solve"
    for nid, stage in report.stages.items():
        if stage == "loop" and not differentiable(cell.graph[nid]):
            return f"its step uses `{cell.graph[nid].op}`, which has no derivative rule"
    for group in report.jacobian:
        big = [s.name for s in cell.states if s.name in group.states and len(s.shape) > 1]
        if group.kind == "dense" and big:
            return (f"the Jacobian over state {big[0]} is dense ({group.size}×{group.size} per step): "
                    "far too large for Newton's linear solves")
    return None


def newton_pays(report: Report) -> bool:
    """Whether `auto` takes Newton's method for the cell (see NEWTON_FROM): it applies, some state is
    nonlinear, and every group's Jacobian is diagonal and smooth in the states."""
    return (newton_why(report) is None and diagonal_nonlinear(report)
            and all(g.jumps is None for g in report.jacobian))


def diagonal_nonlinear(report: Report) -> bool:
    """Whether some state is nonlinear (no parallel PyTorch form: Newton or the loop otherwise) and every
    state group's Jacobian is diagonal: each state entry reads only itself across a step, so the fused
    recurrent kernel needs no weight tile over the states."""
    return (any(info["class"] == "nonlinear" for info in report.classes.values())
            and bool(report.jacobian) and all(g.kind == "diagonal" for g in report.jacobian))


def triton_kind(report: Report) -> tuple[str | None, str]:
    """Which Triton lowering takes the cell: "chunk" (matrix states, chunkwise), "scan"
    (elementwise-affine states and elementwise folds) or "recurrent" (any other cell whose step
    the fused recurrent kernel can compute); (None, why not) otherwise."""
    if triton_chunk_plan(report) is not None:
        return "chunk", ""
    why = triton_scan_why(report)
    if why is None:
        return "scan", ""
    try:
        tile_program(report.cell, report.stages)
    except tiles.NotFusable as e:
        return None, f"{why}, and the fused recurrent kernel cannot compute its step: {e}"
    return "recurrent", ""


def tile_program(cell, stages: dict[int, str]) -> tiles.TileProgram:
    """tiles.lower, once per cell and stages: one build asks for it up to four times (kind, note,
    decoding kernel, emission). The result, or the NotFusable, is kept on the cell."""
    hit = getattr(cell, "tile_program", None)
    if hit is None or hit[0] != stages:
        try:
            hit = (dict(stages), tiles.lower(cell, stages), None)
        except tiles.NotFusable as e:
            hit = (dict(stages), None, e)
        cell.tile_program = hit
    if hit[2] is not None:
        raise tiles.NotFusable(str(hit[2]))
    return hit[1]


def triton_scan_why(report: Report) -> str | None:
    """Why the fused scan kernels do not take the cell (None when they do)."""
    if why := layered(report):
        return why
    folds = {s.name: triton_scan.fold_plan(report.cell.graph, c)
             for c in scan_groups(report.cell, report.classes) for s in report.cell.states
             if s.node_in in c.args_left}
    for name, info in report.classes.items():
        if info["class"] == "associative":
            if folds.get(name) is None:
                return (f"state '{name}' folds with combine `{info['combine']}`, which the fused scan "
                        "takes only when all its components are shaped alike")
        elif (info["class"], info.get("transition")) not in TRITON_FUSED or info.get("coupled"):
            return f"state '{name}' is {info['class']}, not elementwise-affine"
    return None


def pick(backend: str, report: Report | None = None, device=None) -> str:
    if backend == "auto":
        # On CUDA, generated Triton kernels where a parallel form applies, and the fused recurrent
        # kernel for nonlinear cells whose state Jacobian is diagonal (no [H, H] weight tile):
        # measured on an H200 (benchmarks/RESULTS.md, gpu_families.py), paragru's and indrnn's
        # recurrent kernel runs 5-13x faster than Newton and 60-340x faster than the loop, B=4,
        # H=64-256, T=1024-16384. Other cells only that kernel takes (LSTM, GRU) keep the loop:
        # it holds whole weight tiles in registers and refuses large ones.
        if on_cuda(device) and report is not None and report.classes \
                and importlib.util.find_spec("triton") is not None:
            kind = triton_kind(report)[0]
            if kind in ("chunk", "scan") or (kind == "recurrent" and diagonal_nonlinear(report)):
                return "triton"
        # Chunk and scan beat the loop on CPU from short lengths on (benchmarks/RESULTS.md); the
        # scan of a matrix state would materialise every step's state, so those take the chunk
        # form or the loop. Below LOOP_BELOW steps the built module runs the loop itself.
        # Newton for smooth diagonal nonlinear cells, which the module runs where it measured faster
        # (long sequences, few entries per step: NEWTON_FROM), the loop elsewhere.
        if report is not None and report.classes:
            if why_not("chunk", report) is None:
                return "chunk"
            if why_not("scan", report) is None and all(
                    info["class"] in SCAN_FIRST or ("matrix" in info and auto_matrix(info["matrix"]))
                    for info in report.classes.values()):
                return "scan"
            if newton_pays(report):
                return "newton"
        return "loop"
    if backend not in BACKENDS:
        raise BuildError(f"unknown backend '{backend}'", hint=f"choose one of: auto, {', '.join(BACKENDS)}")
    why = why_not(backend, report) if report is not None else None
    if why:
        cell = report.cell
        raise BuildError(f"backend '{backend}' does not apply to cell '{cell.name}': {why}", cell.loc,
                         "use backend='loop' (always applies) or 'auto'")
    return backend


def on_cuda(device) -> bool:
    if device is None:
        return False
    import torch

    return torch.device(device).type == "cuda"


def recurrent_for_decoding(cell, report: Report):
    """The tile program for short sequences of a cell with a parallel Triton form, or None: when
    its step has no tile form, or needs a general matrix-matrix product (a [K, K, V] block in
    registers; the delta rule's (I - b k kᵀ) S is rewritten without one, see tiles.py)."""
    try:
        prog = tile_program(cell, report.stages)
    except tiles.NotFusable:
        return None
    return None if any(t.op == "mm" for t in prog.tiles) else prog


def triton_chunk_plan(report: Report) -> ChunkPlan | None:
    """The chunk plan when Triton chunk kernels apply: every chunk plan (the additive form, also as
    several states in one pass after a max-plus scan, mLSTM's; the delta rule; the generalized delta
    rule of KDA, RWKV-7 and DeltaProduct)."""
    try:
        return chunk_plan(report.cell.derived(), report.stages, report.classes)
    except NotChunkable:
        return None


def triton_note(report: Report) -> None:
    """On the triton backend, which kernels run the cell (noted in the report)."""
    if report.backend != "triton":
        return
    if not report.cell.states:
        report.notes.append("triton: no state, so no kernel: every step is computed at once in PyTorch")
        return
    kind = triton_kind(report)[0]
    if kind == "recurrent":
        report.notes.append("triton: the fused recurrent kernel (no parallel form applies)")
        return
    report.notes.append(f"triton: {'chunkwise' if kind == 'chunk' else 'fused scan'} kernels")
    if kind == "chunk" and (plan := triton_chunk_plan(report)) is not None and plan.staged:
        report.notes.append("triton: one chunk pass over the joined states; "
                            + ("the max-plus scan before it and " if plan.maxplus else "")
                            + "the elementwise reads after it run in PyTorch")
    if recurrent_for_decoding(report.cell, report) is not None:
        report.notes.append(f"triton: sequences shorter than {RECURRENT_BELOW} steps (and step) run the fused "
                            "recurrent kernel")


def loop_below(backend: str, report: Report) -> int | None:
    """With auto and a parallel lowering: the length below which the module runs the loop (noted)."""
    if backend == "auto" and report.backend == "newton":
        report.notes.append(f"auto: newton runs from {NEWTON_FROM} steps with at most {NEWTON_MAX_ENTRIES} state "
                            "entries per step; the loop otherwise (faster there)")
        return None
    n = LOOP_BELOW.get(report.backend) if backend == "auto" else None
    if n:
        report.notes.append(f"auto: sequences shorter than {n} steps run on the loop (faster there)")
    return n
