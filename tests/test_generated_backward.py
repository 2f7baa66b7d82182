"""The loop's generated backward through time against autograd through the same loop.

Each program below puts a family of ops inside the recurrence (on state-dependent values) so
their derivative rules (the registry's, rendered by backends/bptt.py) run; values and the gradients of
every input, param and initial state must match backward="autograd" in float64.
"""
import pytest
import torch

import rnnc

from helpers import has_generated_backward

PROGRAMS = {
    "unary": """
cell c(x: [K]) -> (y: [K]) {
    state h: [K] = 0.5
    let p = 1 + h * h
    let a = sigmoid(h) + tanh(h) + relu(h) + exp(-p) + log(p) + softplus(h) + silu(h)
    let b = logsigmoid(h) + abs(h) + sqrt(p) + rsqrt(p) + sin(h) + cos(h) + gelu(h)
    let e = elu(h) + sign(h) + log1p(h * h) + expm1(-p) + square(h)
    h = 0.1 * (a + b + e) + x
    y = h
}""",
    "arithmetic": """
cell c(x: [K]) -> (y: [K]) {
    state h: [K] = 0.3
    let p = 1 + h * h
    let a = h / p + p ** 1.5 + p ** sigmoid(x) + 2 ** tanh(h) + h % 0.7 + x % (1 + sigmoid(h)) + h // 0.5
    let b = minimum(h, x) + maximum(h, 0.1) + clamp(h, -0.5, 0.5) + minimum(0.2, x * h)
    let c = where(h > 0 and x < 1 or not h > 2, h * x, -h)
    h = 0.2 * tanh(a + b + c) + x
    y = h
}""",
    "matmul": """
cell c(x: [K], q: [K]) -> (y: [K], z: []) {
    param W: [K, K] ~ normal(0, 0.3)
    param U: [K, K] ~ normal(0, 0.3)
    state h: [K] = 0
    state S: [K, K] = 0
    S = 0.5 * tanh(S @ U) + outer(x, h) + transpose(U @ S) * 0.1
    h = tanh(W @ h + h @ U + (q @ S) + S @ x + eye(K) @ h)
    y = h
    z = h @ x
}""",
    "reductions": """
cell c(x: [K]) -> (y: [K]) {
    state h: [K] = 0.1
    state M: [K, K] = 0.1
    M = 0.5 * softmax(M + outer(h, x), axis=0) + normalize(M)
    let s = sum(M, axis=0) + mean(M, axis=1) + max(M, axis=0) + min(M, axis=-1) + logsumexp(M, axis=1)
    h = tanh(s + sum(h * x) + mean(M) + max(h) + min(x * h) + logsumexp(h)) + x
    y = h
}""",
    "shapes": """
cell c(x: [2*K], s: []) -> (y: [K]) {
    param b: [K] ~ normal(0, 1)
    state h: [K] = 0
    state S: [K, K] = 0
    let lo, hi = split(x, 2)
    let a, unused = split(concat(h, b) * 1, 2)
    let m = concat(S, h[None, :], axis=0)
    S = s * S + outer(lo, a) + m[1:K + 1, ...] * 0.1
    h = tanh(hi + S[0] + S[:, 1] + sum(h * lo) + S[..., 0][None][0])
    y = h
}""",
    "coupled": """
cell c(x: [K]) -> (y: [K], old: [K]) {
    state a: [K] = 0.1
    state b: [K] = 0.2
    state k: [K] = 1
    state z: [K] = 0
    old = a
    a = b
    b = tanh(a + x)
    k = x * 2
    z = 1
    y = a + b + k + z
}""",
}


def _run(cell, inputs, state):
    outs, final = cell(*inputs, state=state)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outs)
    loss = loss + sum((f * 0.3).sum() for f in final.values())
    tensors = list(inputs) + list(state.values()) + [p for _, p in sorted(cell.named_parameters())]
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return outs, final, grads


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_generated_backward_matches_autograd(name):
    text = PROGRAMS[name]
    K, B, T = 3, 2, 6
    gen = rnnc.build(text, K=K, dtype=torch.float64, backward="generated")
    ref = rnnc.build(text, K=K, dtype=torch.float64, backward="autograd")
    assert has_generated_backward(gen) and not has_generated_backward(ref)
    ref.load_state_dict(gen.state_dict())
    torch.manual_seed(0)
    prog = rnnc.parse(text).cell()
    inputs = []
    for p in prog.inputs:
        shape = [B, T, 2] + [int(d.subs({d.free_symbols.pop(): K}) if d.free_symbols else d) for d in p.shape]
        inputs.append((torch.randn(*shape, dtype=torch.float64) * 0.7).requires_grad_())
    state = {s.name: (torch.randn(B, 2, *[K] * len(s.shape), dtype=torch.float64) * 0.5).requires_grad_()
             for s in prog.states}
    out_g, fin_g, grad_g = _run(gen, inputs, state)
    out_r, fin_r, grad_r = _run(ref, inputs, state)
    for a, b in zip(out_g, out_r):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for k in fin_r:
        torch.testing.assert_close(fin_g[k], fin_r[k], rtol=1e-10, atol=1e-10)
    for a, b in zip(grad_g, grad_r):
        if b is None:
            assert a is None or not a.abs().max() > 0
        else:
            assert a is not None
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_scalar_per_step_gate_on_a_matrix_state():
    # regression: the backward must broadcast a [] input against a matrix state like the forward
    text = """cell s(x: [K], a: []) -> (y: [K]) {
        state h: [K] = 0
        h = a * h + x
        y = h
    }"""
    gen = rnnc.build(text, dtype=torch.float64)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    a = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a: gen(x, a)[0], (x, a))


def test_prod_has_a_generated_backward():
    # prod's derivative rule is exact at zeros (the product of the other entries), so a cell
    # using it keeps the generated backward instead of falling back to autograd through the loop
    text = """cell c(x: [K]) -> (y: []) {
        state h: [K] = 1
        h = h * x
        y = prod(h)
    }"""
    cell = rnnc.build(text, K=3, dtype=torch.float64)
    assert has_generated_backward(cell)
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    x[0, 2, 1] = 0.0  # a zero factor from step 2 on
    assert torch.autograd.gradcheck(lambda x: cell(x)[0], (x.requires_grad_(),))


def test_retain_graph_and_repeated_backward():
    cell = rnnc.build("lstm", I=3, H=4, dtype=torch.float64)
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    y, _ = cell(x)
    (g1,) = torch.autograd.grad(y.sum(), x, retain_graph=True)
    (g2,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g1, g2)


def test_elementwise_builtins_against_torch():
    # forward values of the builtins whose lowering differs by operand kind (tensor or number)
    text = """cell c(x: [K], z: [K]) -> (a: [K], b: [K], c: [K], d: [K], e: [K], f: [K]) {
        a = minimum(x, 0.2)
        b = maximum(0.2, x)
        c = minimum(x, z)
        d = clamp(x, -0.5, 0.5)
        e = x % 0.7
        f = z // 0.5
    }"""
    cell = rnnc.build(text, dtype=torch.float64)
    x, z = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    (a, b, c, d, e, f), _ = cell(x, z)
    torch.testing.assert_close(a, torch.clamp(x, max=0.2))
    torch.testing.assert_close(b, torch.clamp(x, min=0.2))
    torch.testing.assert_close(c, torch.minimum(x, z))
    torch.testing.assert_close(d, torch.clamp(x, -0.5, 0.5))
    torch.testing.assert_close(e, torch.remainder(x, 0.7))
    torch.testing.assert_close(f, torch.floor_divide(z, 0.5))
