"""Differential fuzzing of random *programs*: every backend that applies agrees with the loop.

Each run generates FUZZ_PROGRAMS random cells (within a FUZZ_SECONDS budget) from a seed that
changes from run to run: elementwise-affine states with constant terms (several, layered), matrix
states (decayed outer products, a constant decay, the delta rule), declared combines (max,
log-add-exp, sum, the softmax merge), nonlinear cells with params, in varied writings, with an
extra head axis or not, packed batches (cu_seqlens) or not, and the chunk size drawn. Each
program runs in float64 on every backend of `rnnc.backends_for` (the triton backend on one program
in four, it is slow on CPU) and `auto`, and the outputs, final states and gradients (inputs and
params) must match the loop backend with backward="autograd". The loop's generated backward is
compared too.

A failure prints the run's seed and the program; `RNNC_FUZZ_SEED=<seed>` replays that run
(`RNNC_FUZZ_PROGRAMS` and `RNNC_FUZZ_SECONDS` change the budget).
"""
from __future__ import annotations

import os
import random
import time

import pytest
import torch
import torch.nn.functional as F

import rnnc

FUZZ_PROGRAMS = int(os.environ.get("RNNC_FUZZ_PROGRAMS", "10"))
FUZZ_SECONDS = float(os.environ.get("RNNC_FUZZ_SECONDS", "45"))
H, K, V = 3, 3, 2


# ---- random programs ------------------------------------------------------------------------

def _gate(r: random.Random, x: str) -> str:
    """A value in (0, 1) from an input (or a constant), in one of several writings."""
    return r.choice([f"sigmoid({x})", f"exp(-softplus({x}))", f"1 - sigmoid({x})", "0.9", "exp(-0.1)",
                     f"sigmoid({x} + 1)"])


def _affine(r: random.Random) -> tuple[str, list[str]]:
    """Elementwise-affine states h' = a h + b with constant terms, one to three, later ones layered."""
    n = r.randint(1, 3)
    lines, prev = [], None
    for i in range(n):
        h = f"h{i}"
        a = _gate(r, r.choice(["x", "u"]))
        b = r.choice(["x", "1", "-1", "2 * x - 1", "tanh(u) + 0.5", f"(1 - {a}) * x", "x * u", "-0.5"])
        if prev is not None and r.random() < 0.6:
            b = f"{b} + {prev}" if r.random() < 0.5 else f"{prev} * 0.5 - {b}"
        form = r.choice([f"{a} * {h} + {b}", f"{h} * {a} + ({b})", f"{b} + {a} * {h}",
                         f"{a} * ({h} - 1) + {a} + ({b})", f"{h} * {a} - (-({b}))"])
        lines += [f"state {h}: [H] = {r.choice(['0', '1', '-0.5'])}", f"{h} = {form}"]
        prev = h
    out = r.choice([prev, f"{prev} * x", f"tanh({prev}) + x", f"{prev} + h0"])
    return "cell c(x: [H], u: [H]) -> (y: [H]) {\n    " + "\n    ".join(lines + [f"y = {out}"]) + "\n}\n", ["x", "u"]


def _matrix(r: random.Random) -> tuple[str, list[str]]:
    """A matrix state: gated/constant-decay linear attention or the delta rule, varied readouts."""
    kind = r.choice(["gla", "gla", "const", "plain", "delta"])
    if kind == "delta":
        upd = r.choice(["(eye(K) - beta * outer(k, k)) @ S + beta * outer(k, v)",
                        "S - beta * outer(k, k @ S) + beta * outer(k, v)"])
        return ("cell c(q: [K], k: [K], v: [V], beta: []) -> (o: [V]) {\n    state S: [K, V] = 0\n"
                f"    S = {upd}\n    o = q @ S\n}}\n"), ["q", "k", "v", "beta"]
    decay = {"gla": r.choice(["exp(g)[:, None] * S", "S * exp(g)[:, None]"]),
             "const": r.choice(["0.9 * S", "S * 0.9", "S - 0.1 * S"]), "plain": "S"}[kind]
    upd = r.choice([f"{decay} + outer(k, v)", f"outer(k, v) + {decay}"])
    read = r.choice(["q @ S", "sum(q[:, None] * S, axis=0)", "transpose(S) @ q"])
    return ("cell c(q: [K], k: [K], v: [V], g: [K]) -> (o: [V]) {\n    state S: [K, V] = 0\n"
            f"    S = {upd}\n    o = {read}\n}}\n"), ["q", "k", "v", "g"]


def _combine(r: random.Random) -> tuple[str, list[str]]:
    """A declared associative combine folding one or three states."""
    kind = r.choice(["max", "lse", "sum", "merge"])
    if kind == "merge":
        return ("combine merge((m1, u1, w1), (m2, u2, w2)) identity (-inf, 0, 0) {\n"
                "    let m = maximum(m1, m2)\n    let a = exp(m1 - m)\n    let b = exp(m2 - m)\n"
                "    return m, u1 * a + u2 * b, w1 * a + w2 * b\n}\n"
                "cell c(x: [H], s: []) -> (o: [H]) {\n    state m: [] = -inf\n    state u: [] = 0\n"
                "    state w: [H] = 0\n    m, u, w = merge((m, u, w), (s, 1, x))\n    o = w / u\n}\n"), ["x", "s"]
    body, ident = {"max": ("maximum(a, b)", "-inf"), "sum": ("a + b", "0"),
                   "lse": ("maximum(a, b) + log(exp(a - maximum(a, b)) + exp(b - maximum(a, b)))", "-inf")}[kind]
    operand = r.choice(["x", "tanh(x) * 2", "x + s"])
    out = r.choice(["m", "m * s", "m + x"])
    return (f"combine f(a, b) identity {ident} = {body}\n"
            "cell c(x: [H], s: []) -> (o: [H]) {\n"
            f"    state m: [H] = {ident}\n    m = f(m, {operand})\n    o = {out}\n}}\n"), ["x", "s"]


def _nonlinear(r: random.Random) -> tuple[str, list[str]]:
    """A nonlinear cell with params: Elman, a GRU-like gate, or two coupled states."""
    kind = r.choice(["elman", "gated", "coupled"])
    params = ("    param W: [H, H] ~ uniform(-0.5, 0.5)\n    param U: [H, H] ~ uniform(-0.5, 0.5)\n"
              "    param b: [H] ~ normal(0, 0.1)\n")
    if kind == "elman":
        body = f"    state h: [H] = 0\n    h = {r.choice(['tanh', 'sigmoid', 'relu'])}(W @ x + U @ h + b)\n    y = h\n"
    elif kind == "gated":
        body = ("    state h: [H] = 0\n    let z = sigmoid(W @ x + b)\n"
                "    h = z * h + (1 - z) * tanh(U @ h + x)\n    y = h * 2\n")
    else:
        body = ("    state h: [H] = 0\n    state c: [H] = 0.5\n    c = sigmoid(x) * c + tanh(U @ h)\n"
                "    h = tanh(c) * sigmoid(W @ x + b)\n    y = h + c\n")
    return "cell c(x: [H]) -> (y: [H]) {\n" + params + body + "}\n", ["x"]


KINDS = [_affine, _matrix, _combine, _nonlinear]


def program(seed: int) -> tuple[str, list[str]]:
    r = random.Random(seed)
    return r.choice(KINDS)(r)


# ---- inputs and comparison --------------------------------------------------------------------

def _dims(text: str) -> dict[str, int]:
    return {k: v for k, v in {"H": H, "K": K, "V": V}.items() if k in rnnc.parse(text).cell().dims}


def _inputs(text: str, r: random.Random, B: int, T: int, heads: tuple) -> list[torch.Tensor]:
    cell = rnnc.parse(text).cell()
    g = torch.Generator().manual_seed(r.randrange(2**31))
    out = []
    for p in cell.inputs:
        shape = [B, T, *heads] + [{"H": H, "K": K, "V": V}[str(d)] for d in p.shape]
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        if p.name == "g":
            x = F.logsigmoid(x + 2)
        elif p.name == "beta":
            x = torch.sigmoid(x)
        elif p.name == "k" and "beta" in text:
            x = F.normalize(x, dim=-1)
        out.append(x.requires_grad_())
    return out


def _run(cell, inputs, cu):
    """(outputs, final states, gradients of a fixed weighted loss w.r.t. inputs and params)."""
    y, final = cell(*inputs, cu_seqlens=cu) if cu is not None else cell(*inputs)
    ys = y if isinstance(y, tuple) else (y,)
    w = [torch.cos(torch.arange(v.numel(), dtype=v.dtype)).view_as(v) for v in ys]
    loss = sum((v * wi).sum() for v, wi in zip(ys, w)) + sum((f * 0.5).sum() for f in final.values())
    params = [p for _, p in sorted(cell.named_parameters())]
    if not loss.requires_grad:  # nothing the outputs or states read is differentiable (h = 0.9 h - 1)
        return list(ys), final, []
    grads = torch.autograd.grad(loss, list(inputs) + params, allow_unused=True)
    return list(ys), final, [torch.zeros_like(x) if g is None else g for g, x in zip(grads, list(inputs) + params)]


NEWTON_LAYERED = """cell c(x: [3], u: [3]) -> (y: [3]) {
    state h0: [3] = 0
    h0 = 0.9 * h0 + x
    state h1: [3] = 0
    h1 = 0.9 * h1 + h0
    state h2: [3] = 0
    h2 = sigmoid(u) * h2 + x
    y = h2
}
"""


def check_program(seed: int) -> list[str]:
    """Run program `seed` on every backend; the disagreements found (empty when all agree)."""
    r = random.Random(seed * 7919 + 1)
    text, _ = program(seed)
    packed = r.random() < 0.3
    heads = () if packed or r.random() < 0.6 else (2,)
    T = r.choice([1, 2, 5, 9, 17, 33, 70])
    B = 1 if packed else r.choice([1, 2, 3])
    inputs = _inputs(text, r, B, T, heads)
    cu = None
    if packed:
        cuts = sorted(r.sample(range(1, T), min(r.randint(1, 3), T - 1))) if T > 1 else []
        cu = torch.tensor([0, *cuts, T])
    ref = rnnc.build(text, backend="loop", backward="autograd", **_dims(text))
    want = _run(ref, inputs, cu)
    problems = []
    backends = ["loop", "auto"] + [b for b in rnnc.backends_for(text) if b != "loop"]
    if "triton" in backends and r.random() < 0.75:
        backends.remove("triton")
    for backend in backends:
        options = {}
        if backend == "chunk":
            options["chunk_size"] = r.choice([None, 1, 2, 4, 16])
        try:
            cell = rnnc.build(text, backend=backend, **_dims(text), **options)
            cell.load_state_dict(ref.state_dict())
            got = _run(cell, inputs, cu)
        except Exception as e:  # noqa: BLE001 - every failure is reported with the program
            problems.append(f"{backend} {options}: {type(e).__name__}: {e}")
            continue
        tol = dict(rtol=1e-4, atol=1e-5) if backend in ("triton", "newton") or cell.backend == "newton" else \
            dict(rtol=1e-6, atol=1e-8)
        for what, a, b in (("outputs", got[0], want[0]), ("final states", got[1], want[1]),
                           ("gradients", got[2], want[2])):
            try:
                torch.testing.assert_close(a, b, **tol)
            except AssertionError as e:
                problems.append(f"{backend} {options} ({cell.backend}): {what} differ: {str(e).splitlines()[0:3]}")
    if problems:
        return [f"program seed {seed} (B={B}, T={T}, heads={heads}, cu_seqlens={None if cu is None else cu.tolist()}):\n{text}"
                + "\n".join(problems)]
    return []


def _run_seed() -> int:
    raw = os.environ.get("RNNC_FUZZ_SEED")
    return int(raw) if raw else int.from_bytes(os.urandom(4), "little")


pytestmark = pytest.mark.usefixtures("private_cache")


def test_random_programs_agree_with_the_loop():
    seed = _run_seed()
    print(f"rnnc fuzz: RNNC_FUZZ_SEED={seed}")
    start, done, failures = time.monotonic(), 0, []
    for i in range(FUZZ_PROGRAMS):
        if done and time.monotonic() - start > FUZZ_SECONDS:
            break
        failures += check_program(seed + i)
        done += 1
    print(f"rnnc fuzz: {done} programs in {time.monotonic() - start:.1f} s")
    assert not failures, f"RNNC_FUZZ_SEED={seed} replays this run; {len(failures)} of {done} programs failed:\n" + \
        "\n\n".join(failures)


@pytest.mark.parametrize("kind", range(len(KINDS)), ids=[k.__name__.strip("_") for k in KINDS])
def test_every_kind_of_program_is_generated_and_valid(kind):
    """The generator's programs parse and build on the loop (a broken generator would test nothing)."""
    seen = 0
    for seed in range(200):
        r = random.Random(seed)
        if r.choice(KINDS) is not KINDS[kind]:
            continue
        text, _ = program(seed)
        rnnc.build(text, backend="loop", **_dims(text))
        seen += 1
        if seen == 3:
            break
    assert seen == 3


def test_newton_gradients_with_layered_and_independent_states():
    """Found by this fuzzer: with a 2-state block (h1 reads h0) beside a diagonal state h2, the
    newton backend's Jacobian of h2 was overwritten by the block's second column (zero for h2),
    so the adjoint scan, and every gradient through h2, was wrong (values were right)."""
    x, u = (torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    want = _run(rnnc.build(NEWTON_LAYERED, backend="loop", backward="autograd"), [x, u], None)
    got = _run(rnnc.build(NEWTON_LAYERED, backend="newton"), [x, u], None)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[2], want[2])
