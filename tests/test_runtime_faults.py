"""Faults found by hostile and fuzzed programs (issue 13): each test names the bug it pins down."""
from __future__ import annotations

import re

import pytest
import torch

import rnnc
from rnnc.errors import AssociativityError

from helpers import outputs_and_grads

CONSTANT_TERMS = ["sigmoid(x) * h + 1", "sigmoid(x) * h - 1", "-1 + sigmoid(x) * h", "sigmoid(x) * h - 2 * 3",
                  "(h + 1) * 2", "-(h - 1) * 0.5", "0.5 * h - exp(1)", "h - 1"]


def _scalar_cell(body: str) -> str:
    return f"cell c(x: [4]) -> (y: [4]) {{\n  state h: [4] = 0\n  h = {body}\n  y = h\n}}\n"


@pytest.mark.parametrize("body", CONSTANT_TERMS)
def test_scan_with_a_constant_additive_term(body):
    """Bug: `h = sigmoid(x) * h + 1` crashed the scan backend for T > 1 (T taken from the constant
    term), and `... - 1`, `(h + 1) * 2`, `h - 1` still did (the constant b, a negated or scaled
    compile-time number, was emitted as a Python number, `(-1).reshape(...)`)."""
    src = _scalar_cell(body)
    loop = rnnc.build(src, backend="loop")
    for backend, T in (("scan", 1), ("scan", 2), ("scan", 7), ("auto", 64)):
        m = rnnc.build(src, backend=backend)
        assert m.backend == "scan"
        reads_x = re.search(r"\bx\b", body) is not None
        x = torch.randn(3, T, 4, dtype=torch.float64, requires_grad=reads_x)
        if not reads_x:  # nothing to differentiate
            torch.testing.assert_close(m(x), loop(x))
            continue
        ys, final, grads = outputs_and_grads(m, [x])
        ys0, final0, grads0 = outputs_and_grads(loop, [x])
        torch.testing.assert_close(ys, ys0)
        torch.testing.assert_close(final, final0)
        torch.testing.assert_close(grads, grads0)


def test_loop_backward_of_an_update_rewritten_by_the_optimizer():
    """Bug: `h = 0.9 * h - sum(x) + 1` crashed every build (IndexError in autodiff's graph
    compaction: a node the optimizer rewired reads a later id, and the copy added nodes in id order)."""
    src = "cell c(x: [4]) -> (y: [4]) {\n  state h: [4] = 0\n  h = 0.9 * h - sum(x) + 1\n  y = h\n}\n"
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    want, h = [], torch.zeros(2, 4, dtype=torch.float64)
    for t in range(5):
        h = 0.9 * h - x[:, t].sum(-1, keepdim=True) + 1
        want.append(h)
    for backend in rnnc.backends_for(src):
        if backend == "triton":
            continue
        m = rnnc.build(src, backend=backend)
        torch.testing.assert_close(m(x)[0], torch.stack(want, 1))
        ys, _, grads = outputs_and_grads(m, [x])
        ys0, _, grads0 = outputs_and_grads(rnnc.build(src, backend="loop", backward="autograd"), [x])
        torch.testing.assert_close(grads, grads0)


STALE_OP = """
def op(a, b) = {body}
combine f(a, b) identity -inf = op(a, b)
cell c(x: [4]) -> (y: [4]) {{
  state m: [4] = -inf
  m = f(m, x)
  y = m
}}
"""


def test_the_associativity_verdict_is_keyed_by_the_defs_the_combine_calls():
    """Bug: the verdict was cached by the combine's own text: after a program with
    `def op(a, b) = maximum(a, b)`, one whose `op` is not associative (same combine text) was
    accepted unchecked, auto picked the scan, and it differed from the loop by ~2.7."""
    from rnnc.associative import fingerprint

    good = rnnc.parse(STALE_OP.format(body="maximum(a, b)"))
    bad = rnnc.parse(STALE_OP.format(body="maximum(a, b) * 0.5 + b * 0.5"))
    assert fingerprint(good.cell().combines[0]) != fingerprint(bad.cell().combines[0])
    assert rnnc.analyze(good).backend == "scan"
    with pytest.raises(AssociativityError, match="not associative"):
        rnnc.analyze(bad)
    with pytest.raises(AssociativityError):
        rnnc.build(bad, backend="scan")
    again = rnnc.parse(STALE_OP.format(body="maximum(a, b)"))  # equal graphs share the verdict
    assert fingerprint(again.cell().combines[0]) == fingerprint(good.cell().combines[0])


def test_a_huge_symbolic_expansion_falls_back_to_the_randomized_check():
    """Bug: `combine f(a, b) identity 0 = (a + b) ** 12` ran sympy's expansion (millions of terms)
    for minutes. The proof is bounded; past the bound the randomized check decides, and an
    associative combine beyond the bound is still accepted, its verdict saying why."""
    import time

    start = time.perf_counter()
    with pytest.raises(AssociativityError, match="not associative"):
        rnnc.analyze("combine f(a, b) identity 0 = (a + b) ** 12\n"
                     "cell c(x: [4]) -> (y: [4]) {\n  state m: [4] = 0\n  m = f(m, x)\n  y = m\n}\n")
    assert time.perf_counter() - start < 60  # minutes before; ~1 s now
    # a + b plus a vanishing term whose expansion is over the bound: associative
    src = ("combine f(a, b) identity 0 = a + b + ((a - b) ** 2 - a * a + 2 * a * b - b * b) ** 8\n"
           "cell c(x: [4]) -> (y: [4]) {\n  state m: [4] = 0\n  m = f(m, x)\n  y = m\n}\n")
    info = rnnc.analyze(src).to_dict()["states"]["m"]
    assert info["class"] == "associative"
    assert info["verified"].startswith("randomized check") and "abandoned" in info["verified"]
