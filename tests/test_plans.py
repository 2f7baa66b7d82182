"""Typed plans: what the chunk and scan lowerings read from a cell, for equal writings."""
import pytest

import rnnc
from rnnc.analysis import analyze_cell
from rnnc.chunkplan import NotChunkable
from rnnc.optimize import optimize
from rnnc.plans import ChunkPlan, ScanPlan, chunk_plan, scan_plan

DELTA = "cell d(q: [K], k: [K], v: [V], beta: []) -> (o: [V]) {{\n state S: [K, V] = 0\n {}\n o = q @ S }}"


def _analysed(text: str):
    cell = optimize(rnnc.parse(text).cell() if "{" in text else rnnc.load(text).cell())
    return cell, analyze_cell(cell)


def _names(cell, plan: ChunkPlan) -> dict:
    g = cell.graph
    return {key: g[getattr(plan, key)].name for key in ("q", "k", "v", "beta")}


@pytest.mark.parametrize("body", [
    "S = (eye(K) - beta * outer(k, k)) @ S + beta * outer(k, v)",
    "S = S + beta * outer(k, v - k @ S)",
    "S = S - outer(beta * k, k @ S) + outer(k, v * beta)",
])
def test_delta_rule_plans_read_the_same_inputs(body):
    cell, report = _analysed(DELTA.format(body))
    plan = chunk_plan(cell, report)
    assert plan.kind == "delta" and plan.g is None and not plan.before
    assert _names(cell, plan) == {"q": "q", "k": "k", "v": "v", "beta": "beta"}


def test_a_delta_rule_whose_update_does_not_match_takes_the_generalized_form():
    """I − β k kᵀ with the update k vᵀ (no β) is not the delta kind: one generalized micro-step
    a = −β k, b = k, update k vᵀ."""
    cell, report = _analysed(DELTA.format("S = S - beta * outer(k, k @ S) + outer(k, v)"))
    plan = chunk_plan(cell, report)
    (step,) = plan.steps
    g = cell.graph
    assert plan.kind == "dplr" and (g[step.b].name, g[step.k].name, g[step.v].name) == ("k", "k", "v")
    assert step.gk is None and step.g is None and g[step.a].op == "mul"


def test_two_low_rank_terms_in_one_update_are_refused_with_the_reason():
    cell, report = _analysed(DELTA.format("S = S + outer(k, q @ S) + outer(q, k @ S) + outer(k, v)"))
    with pytest.raises(NotChunkable, match="2 low-rank terms; write several as successive updates"):
        chunk_plan(cell, report)


def test_gla_plan_has_a_per_key_gate_and_rwkv_reads_before_the_update():
    cell, report = _analysed("gla")
    plan = chunk_plan(cell, report, chunk_size=32)
    assert (plan.kind, cell.graph[plan.gk].name, plan.gv, plan.chunk_size) == ("linear", "g", None, 32)
    cell, report = _analysed("rwkv6")
    plan = chunk_plan(cell, report)
    assert plan.before and len(plan.extra) == 1 and cell.graph[plan.gk].name == "w"


def test_scan_plans_order_layers_and_fold_combines():
    text = """combine mx(a, b) identity -inf = maximum(a, b)
    cell c(x: [2]) -> (y: [2]) {
        state u: [2] = 0
        state n: [2] = 0
        state m: [2] = -inf
        u = sigmoid(n) * u + x
        n = 0.5 * n + x
        m = mx(m, x)
        y = u + m }"""
    cell, report = _analysed(text)
    plan = scan_plan(cell, report)
    assert isinstance(plan, ScanPlan) and not plan.triton
    assert list(plan.linear) == ["n", "u"]  # u reads n: scanned after it
    assert [c.name for c in plan.combines] == ["mx"]
    assert set(plan.nodes()) >= {n for pair in plan.linear.values() for n in pair if n is not None}



@pytest.mark.parametrize("backend, text", [
    ("chunk", "cell r(q: [K], k: [K], v: [V]) -> (o: [V]) {\n state S: [K, V] = 0\n"
              " S = 0.9 * S + outer(k, v)\n o = q @ S }"),
    ("scan", "cell c(x: [2], a: [2]) -> (y: [2]) {\n state h: [2] = 0\n h = h - a * h + x\n y = h }"),
])
def test_planning_and_scheduling_never_change_the_analysed_cell(backend, text):
    from rnnc import schedule

    cell, report = _analysed(text)
    before = [(n.op, n.args) for n in cell.graph.nodes]
    for name in schedule.BACKENDS:
        schedule.why_not(name, report)
    lowered = cell.derived()
    plan = chunk_plan(lowered, report) if backend == "chunk" else scan_plan(lowered, report)
    assert [(n.op, n.args) for n in cell.graph.nodes] == before
    assert len(lowered.graph) > len(cell.graph)  # the plan derived values of its own (log 0.9; 1 - a)
    assert max(plan.nodes()) < len(lowered.graph)
