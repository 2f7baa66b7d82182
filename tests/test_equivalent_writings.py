"""Algebraically equal writings of a cell get the same verdict, the same lowering and the same numbers.

Every library cell is rewritten at least two ways (distributed or factored, terms reordered, the
delta rule in both common writings, a decay applied before or after the update where the math
is equal). The verdict per state (class, transition, decay, readout) and the backend `auto`
picks must match the library cell's, and the rewritten cell, built with `auto` and the library
cell's params, must give the loop's numbers and gradients at a length where the parallel form runs.
"""
import pytest
import torch

import rnnc
from rnnc.resources import specs_dir

from helpers import DIMS, library_inputs, outputs_and_grads

LSTM_HEAD = """cell lstm(x: [I]) -> (h: [H]) {
    param weight_ih: [4*H, I] ~ uniform(-1/sqrt(H), 1/sqrt(H))
    param weight_hh: [4*H, H] ~ uniform(-1/sqrt(H), 1/sqrt(H))
    param bias_ih:   [4*H]    ~ uniform(-1/sqrt(H), 1/sqrt(H))
    param bias_hh:   [4*H]    ~ uniform(-1/sqrt(H), 1/sqrt(H))
    state h: [H] = 0
    state c: [H] = 0
"""
GRU_HEAD = """cell gru(x: [I]) -> (h: [H]) {
    param weight_ih: [3*H, I] ~ uniform(-1/sqrt(H), 1/sqrt(H))
    param weight_hh: [3*H, H] ~ uniform(-1/sqrt(H), 1/sqrt(H))
    param bias_ih:   [3*H]    ~ uniform(-1/sqrt(H), 1/sqrt(H))
    param bias_hh:   [3*H]    ~ uniform(-1/sqrt(H), 1/sqrt(H))
    state h: [H] = 0
"""
ELMAN_HEAD = """cell elman(x: [I]) -> (h: [H]) {
    param weight_ih: [H, I] ~ uniform(-1/sqrt(H), 1/sqrt(H))
    param weight_hh: [H, H] ~ uniform(-1/sqrt(H), 1/sqrt(H))
    param bias_ih:   [H]    ~ uniform(-1/sqrt(H), 1/sqrt(H))
    param bias_hh:   [H]    ~ uniform(-1/sqrt(H), 1/sqrt(H))
    state h: [H] = 0
"""
MIN_GRU_HEAD = """cell mingru(x: [I]) -> (h: [H]) {
    param weight_z: [H, I] ~ uniform(-1/sqrt(I), 1/sqrt(I))
    param bias_z:   [H]    ~ uniform(-1/sqrt(I), 1/sqrt(I))
    param weight_h: [H, I] ~ uniform(-1/sqrt(I), 1/sqrt(I))
    param bias_h:   [H]    ~ uniform(-1/sqrt(I), 1/sqrt(I))
    state h: [H] = 0
    let z = sigmoid(weight_z @ x + bias_z)
    let h_tilde = weight_h @ x + bias_h
"""
MIN_LSTM_HEAD = """cell minlstm(x: [I]) -> (h: [H]) {
    param weight_f: [H, I] ~ uniform(-1/sqrt(I), 1/sqrt(I))
    param bias_f:   [H]    ~ uniform(-1/sqrt(I), 1/sqrt(I))
    param weight_i: [H, I] ~ uniform(-1/sqrt(I), 1/sqrt(I))
    param bias_i:   [H]    ~ uniform(-1/sqrt(I), 1/sqrt(I))
    param weight_h: [H, I] ~ uniform(-1/sqrt(I), 1/sqrt(I))
    param bias_h:   [H]    ~ uniform(-1/sqrt(I), 1/sqrt(I))
    state h: [H] = 0
    let f = sigmoid(weight_f @ x + bias_f)
    let i = sigmoid(weight_i @ x + bias_i)
    let h_tilde = weight_h @ x + bias_h
"""
AAREN_HEAD = """combine softmax_merge((m1, u1, w1), (m2, u2, w2)) identity (-inf, 0, 0) {
    let m = maximum(m1, m2)
    let a = exp(m1 - m)
    let b = exp(m2 - m)
    return m, u1 * a + u2 * b, w1 * a + w2 * b
}
cell aaren(x: [D]) -> (o: [D]) {
    param q:        [D]    ~ normal(0, 1/sqrt(D))
    param weight_k: [D, D] ~ uniform(-1/sqrt(D), 1/sqrt(D))
    param weight_v: [D, D] ~ uniform(-1/sqrt(D), 1/sqrt(D))
    state m: [] = -inf
    state u: [] = 0
    state w: [D] = 0
"""
MAMBA_HEAD = """cell mamba(u: [D], delta: [D], B: [N], C: [N]) -> (y: [D]) {
    param A_log:  [D, N] = log(arange(1, N + 1))
    param D_skip: [D]    = 1
    state h: [D, N] = 0
    let A = -exp(A_log)
"""
LSRL_HEAD = """def lsrl_step(v) {
    let r = relu([[1], [1]] @ v + [0, -1])
    return r[0:1] - r[1:2]
}
def lsrl_larger(a, b) = lsrl_step([[1, -1]] @ concat(a, b))
cell lsrl_majority(x: [1]) -> (y: [1]) {
    state ones:  [1] = 0
    state zeros: [1] = 0
    let not_x = [[-1]] @ x + [1]
"""

REWRITES = {
    "linear_attn": [
        "S = outer(k, v) + S",
        "S = S + 0.5 * outer(k, v) + outer(0.5 * k, v)",
    ],
    "simple_gla": [
        "S = S * exp(g) + outer(k, v)",
        "let decayed = exp(g) * S\n    S = outer(k, v) + decayed",
    ],
    "gla": [
        "S = S * exp(g)[:, None] + outer(k, v)",
        "S = (exp(g)[:, None] * eye(K)) @ S + outer(k, v)",
        "S = exp(g[:, None]) * S + outer(k, v)",
    ],
    "rwkv6": [
        "o = sum(r * u * k) * v + r @ S\n    S = outer(k, v) + S * exp(w)[:, None]",
        "o = r @ S + sum(r * u * k) * v\n    S = exp(w)[:, None] * (eye(K) @ S) + outer(k, v)",
    ],
    "deltanet": [
        "S = S + beta * outer(k, v - k @ S)",  # fla's and the DeltaNet paper's writing
        "S = S - beta * outer(k, k @ S) + beta * outer(k, v)",
        "S = S + outer(k, beta * (v - k @ S))",
        "S = (eye(K) - outer(beta * k, k)) @ S + outer(k, beta * v)",
    ],
    "gated_deltanet": [
        "let decayed = exp(g) * S\n    S = decayed + beta * outer(k, v - k @ decayed)",  # decay first
        "S = exp(g) * (S - beta * outer(k, k @ S)) + beta * outer(k, v)",
        "S = exp(g) * S - beta * exp(g) * outer(k, k @ S) + beta * outer(k, v)",
    ],
    "kda": [
        "let d = exp(g)[:, None] * S\n    S = d + beta * outer(k, v - k @ d)",  # fla's naive_recurrent_kda: decay first
        "S = exp(g)[:, None] * S - outer(beta * k, k @ (exp(g)[:, None] * S)) + outer(k, beta * v)",
    ],
    "rwkv7": [
        "S = (exp(w)[:, None] * eye(K) - outer(kk * a, kk)) @ S + outer(k, v)",
        "S = outer(k, v) + outer(-(kk * a), kk @ S) + S * exp(w)[:, None]",
    ],
    "deltaproduct": [
        "let S0 = exp(g) * S\n    let S1 = S0 + beta[0] * outer(k[0], v[0] - k[0] @ S0)\n"
        "    S = S1 + beta[1] * outer(k[1], v[1] - k[1] @ S1)",
        "let S1 = (eye(K) - beta[0] * outer(k[0], k[0])) @ (exp(g) * S) + beta[0] * outer(k[0], v[0])\n"
        "    S = (eye(K) - beta[1] * outer(k[1], k[1])) @ S1 + outer(k[1], beta[1] * v[1])",
    ],
    "deltanet_neg": [
        "let beta = 2 * sigmoid(b)\n    S = (eye(K) - beta * outer(k, k)) @ S + beta * outer(k, v)",
        "S = S + sigmoid(b) * outer(2 * k, v - k @ S)",
    ],
    "mamba": [
        "h = h * exp(A * delta[:, None]) + outer(delta * u, B)\n    y = h @ C + D_skip * u",
        "h = exp(delta[:, None] * A) * h + outer(u, B) * delta[:, None]\n    y = D_skip * u + h @ C",
    ],
    "hgrn": [
        "h = x + h * exp(g)",
        "h = exp(g) * h + 0.5 * x + 0.5 * x",
    ],
    "mingru": [
        "h = h + z * (h_tilde - h)",  # the usual writing: interpolate towards h_tilde
        "h = h - z * h + z * h_tilde",
    ],
    "minlstm": [
        "h = (f * h + i * h_tilde) / (f + i)",
        "h = h * (f / (f + i)) + h_tilde * (i / (f + i))",
    ],
    "lsrl_majority": [
        "ones = ones + x\n    zeros = zeros + not_x\n    y = lsrl_larger(ones, zeros)",
        "ones = [[1]] @ (ones + x)\n    zeros = [[2]] @ zeros - [[1]] @ zeros + not_x\n    y = lsrl_larger(ones, zeros)",
    ],
    "lstm": [
        "let i, f, g, o = split(weight_hh @ h + bias_hh + weight_ih @ x + bias_ih, 4)\n"
        "    c = sigmoid(i) * tanh(g) + c * sigmoid(f)\n    h = tanh(c) * sigmoid(o)",
        "let pre = weight_ih @ x + weight_hh @ h + (bias_ih + bias_hh)\n"
        "    c = sigmoid(pre[H:2*H]) * c + sigmoid(pre[0:H]) * tanh(pre[2*H:3*H])\n"
        "    h = sigmoid(pre[3*H:4*H]) * tanh(c)",
    ],
    "gru": [
        "let x_r, x_z, x_n = split(weight_ih @ x + bias_ih, 3)\n    let h_r, h_z, h_n = split(weight_hh @ h + bias_hh, 3)\n"
        "    let z = sigmoid(h_z + x_z)\n    h = n_of(x_n, h_n, sigmoid(x_r + h_r)) + z * (h - n_of(x_n, h_n, sigmoid(x_r + h_r)))",
        "let x_r, x_z, x_n = split(weight_ih @ x + bias_ih, 3)\n    let h_r, h_z, h_n = split(weight_hh @ h + bias_hh, 3)\n"
        "    let z = sigmoid(x_z + h_z)\n    let n = tanh(x_n + sigmoid(x_r + h_r) * h_n)\n    h = n - z * n + z * h",
    ],
    "elman": [
        "h = tanh(weight_hh @ h + weight_ih @ x + bias_hh + bias_ih)",
        "h = tanh((weight_ih @ x + bias_ih) + (weight_hh @ h + bias_hh))",
    ],
    "aaren": [
        "m, u, w = softmax_merge((m, u, w), ((weight_k @ x) @ q, 1, weight_v @ x))\n    o = w / u",
        "m, u, w = softmax_merge((m, u, w), (q @ (weight_k @ x), 1.0, weight_v @ x))\n    o = w * (1 / u)",
    ],
    "lru": [  # the complex pair: imaginary part first, terms reordered; the decay's modulus factored out
        "let im0 = im\n    im = lr * im + gamma * (B_im @ u) + li * re\n    re = gamma * (B_re @ u) + re * lr - li * im0",
        "let re0 = re\n    re = mag * (cos(exp(theta_log)) * re - sin(exp(theta_log)) * im) + gamma * (B_re @ u)\n"
        "    im = mag * (sin(exp(theta_log)) * re0 + cos(exp(theta_log)) * im) + gamma * (B_im @ u)",
    ],
    "s4d": [
        "let im0 = im\n    im = ai * re + ar * im + bi * u[:, None]\n    re = ar * re - ai * im0 + br * u[:, None]",
        "let re0 = re\n    re = br * u[:, None] + (ar * re - ai * im)\n    im = u[:, None] * bi + (im * ar + re0 * ai)",
    ],
    "lsrl_table": [  # the swap and the product written out, the counter's start by name
        "y = concat(f_counter(s0=0), a, [[0, 1], [1, 0]] @ r[2:4], x[0:1] * x[1:2])",
        "y = concat(f_counter(), r[0:2] + [1, 1], b, f_multiplicative(x))",
    ],
    "lsrl_graph": [  # LSRL's counter LinState written with matrices, and with its input folded
        "c = [[1]] @ c + [[0, 0]] @ z + [1]",
        "c = 1 + c",
    ],
    "lsrl_vec2vec": [
        "acc = f_ifelse(f_larger(hit, 0.5), x[1 + DIN:], 0) + acc",
        "acc = 1 * acc + f_ifelse(f_larger(hit, 0.5), x[1 + DIN:1 + DIN + DOUT], 0.0)",
    ],
    "lsrl_tok2tok": [  # the shift register as buf Sᵀ, and with its terms swapped
        "buf = buf @ eye(n + 2)[0:n + 1, 1:n + 2] + concat(zeros(n), match)",
        "buf = concat(zeros(n), match) + eye(n + 2)[1:n + 2, 0:n + 1] @ buf",
    ],
    "lsrl_modcounter": [  # the LinState as s Aᵀ, and with its zero input map as 0 * u
        "s = s @ transpose(R) + [[0], [0], [0], [0], [0], [0], [0], [0]] @ u",
        "s = R @ s + 0 * u",
    ],
    "running_max": [
        "combine max_merge(a, b) identity -inf = maximum(b, a)\ncell running_max(x: [D]) -> (y: [D]) {\n"
        "    state m: [D] = -inf\n    m = max_merge(m, x)\n    y = m\n}",
        "combine max_merge(a, b) identity -inf = maximum(a, b)\ncell running_max(x: [D]) -> (y: [D]) {\n"
        "    state m: [D] = -inf\n    m = max_merge(m, 1 * x)\n    y = m + 0\n}",
    ],
    "paragru": ["h = h + z * (c - h)", "h = (1 - z) * h + c * z"],
    # tanh(c) spelled out: the same 2×2 block Jacobian
    "paralstm": ["h = tanh(c_new) * o", "h = o * (1 - 2 / (exp(2 * c_new) + 1))"],
    "indrnn": ["h = relu(h * u + (weight @ x + bias))", "h = maximum(weight @ x + bias + u * h, 0)"],
    "running_logsumexp": [
        "combine logaddexp(a, b) identity -inf {\n    let m = maximum(b, a)\n"
        "    return m + log(exp(b - m) + exp(a - m))\n}\ncell running_logsumexp(x: [D]) -> (y: [D]) {\n"
        "    state l: [D] = -inf\n    l = logaddexp(l, x)\n    y = l\n}",
        "combine logaddexp(a, b) identity -inf {\n    let m = maximum(a, b)\n"
        "    return log(exp(a - m) + exp(b - m)) + m\n}\ncell running_logsumexp(x: [D]) -> (y: [D]) {\n"
        "    state l: [D] = -inf\n    l = logaddexp(l, x)\n    y = l\n}",
    ],
    "hgrn2": [
        "S = S * exp(g)[:, None] + outer(1 - exp(g), i)",
        "S = outer(1 - exp(g), i) + exp(g)[:, None] * S",
        "S = exp(g)[:, None] * S - outer(expm1(g), i)",
    ],
    "retnet": [
        "S = S * gamma[:, None, None] + k[:, :, None] * v[:, None, :]",
        "S = gamma[:, None, None] * S + v[:, None, :] * k[:, :, None]",
    ],
    "mamba2": [
        "h = h * exp(dt * A)[:, None, None] + (dt[:, None] * x)[:, :, None] * B",
        "h = exp(dt[:, None, None] * A[:, None, None]) * h + dt[:, None, None] * x[:, :, None] * B[None, None, :]",
    ],
    "rglru": [
        "h = h * exp(log_a) + sqrt(1 - exp(2 * log_a)) * i * x",
        "h = exp(log_a) * h + (i * x) * sqrt(-expm1(log_a + log_a))",
    ],
    "sru": [
        "c = x_tilde + f * (c - x_tilde)",
        "c = (1 - f) * x_tilde + c * f",
    ],
    "qrnn": [
        "c = tanh(z) + sigmoid(f) * (c - tanh(z))",
        "c = sigmoid(-f) * tanh(z) + sigmoid(f) * c",
    ],
    "mlstm": [
        "C = C * f_s + outer(i_s * k_s, v)",
        "C = f_s * C + i_s * k_s[:, None] * v[None, :]",
    ],
    "slstm": [
        "c = c * f_s + tanh(z_pre) * i_s",
        "c = i_s * tanh(z_pre) + f_s * c",
    ],
    "gsa": [
        "hk = exp(g)[None, :] * hk + k[:, None] * s[None, :]",
        "hk = hk * exp(g) + outer(k, s)",
    ],
}

HEADS = {"lstm": LSTM_HEAD, "gru": GRU_HEAD, "elman": ELMAN_HEAD, "mingru": MIN_GRU_HEAD, "minlstm": MIN_LSTM_HEAD,
         "aaren": AAREN_HEAD, "mamba": MAMBA_HEAD, "lsrl_majority": LSRL_HEAD}
MATRIX = {"linear_attn": "(q: [K], k: [K], v: [V]) -> (o: [V])",
          "simple_gla": "(q: [K], k: [K], v: [V], g: []) -> (o: [V])",
          "gla": "(q: [K], k: [K], v: [V], g: [K]) -> (o: [V])",
          "deltanet": "(q: [K], k: [K], v: [V], beta: []) -> (o: [V])",
          "gated_deltanet": "(q: [K], k: [K], v: [V], g: [], beta: []) -> (o: [V])",
          "kda": "(q: [K], k: [K], v: [V], g: [K], beta: []) -> (o: [V])",
          "deltaproduct": "(q: [K], k: [2, K], v: [2, V], beta: [2], g: []) -> (o: [V])",
          "deltanet_neg": "(q: [K], k: [K], v: [V], b: []) -> (o: [V])"}
GRU_DEF = "def n_of(x_n, h_n, r) = tanh(x_n + r * h_n)\n"


#: Library cells rewritten in place: the spec file's text with this update replaced by the body.
SPEC_EDITS = {
    "lru": "let re0 = re\n    re = lr * re - li * im + gamma * (B_re @ u)\n    im = li * re0 + lr * im + gamma * (B_im @ u)",
    "s4d": "let re0 = re\n    re = ar * re - ai * im + br * u[:, None]\n    im = ai * re0 + ar * im + bi * u[:, None]",
    "hgrn2": "S = exp(g)[:, None] * S + outer(1 - exp(g), i)",
    "retnet": "S = gamma[:, None, None] * S + k[:, :, None] * v[:, None, :]",
    "mamba2": "h = exp(dt * A)[:, None, None] * h + (dt[:, None] * x)[:, :, None] * B",
    "rglru": "h = exp(log_a) * h + sqrt(-expm1(2 * log_a)) * (i * x)",
    "sru": "c = f * c + (1 - f) * x_tilde",
    "qrnn": "c = sigmoid(f) * c + (1 - sigmoid(f)) * tanh(z)",
    "mlstm": "C = f_s * C + i_s * outer(k_s, v)",
    "slstm": "c = f_s * c + i_s * tanh(z_pre)",
    "gsa": "hk = hk * exp(g)[None, :] + outer(k, s)",
    "paragru": "h = z * c + (1 - z) * h",
    "paralstm": "h = o * tanh(c_new)",
    "indrnn": "h = relu(weight @ x + u * h + bias)",
    "lsrl_table": "y = concat(f_counter(), a, b, f_multiplicative(x))",
    "lsrl_graph": "c = c + ([[0, 0]] @ z + 1)",
    "lsrl_vec2vec": "acc = acc + f_ifelse(f_larger(hit, 0.5), x[1 + DIN:1 + DIN + DOUT], 0)",
    "lsrl_tok2tok": "buf = eye(n + 2)[1:n + 2, 0:n + 1] @ buf + concat(zeros(n), match)",
}


def _modcounter(body: str) -> str:
    """lsrl_modcounter with its 8×8 literal bound to R first (the readout unchanged)."""
    text = (specs_dir() / "lsrl_modcounter.rnn").read_text()
    start = text.index("    s = [[-1, 0")
    end = text.index("@ u\n", start) + 4
    matrix = text[start + len("    s = "):text.index("] @ s", start) + 1]
    return text[:start] + f"    let R = {matrix}\n    {body}\n" + text[end:]


def source(name: str, body: str) -> str:
    """The full spec text of one rewrite."""
    if body.startswith("combine"):
        return body
    if name == "lsrl_modcounter":
        return _modcounter(body)
    if name in SPEC_EDITS:
        text = (specs_dir() / f"{name}.rnn").read_text()
        assert SPEC_EDITS[name] in text
        return text.replace(SPEC_EDITS[name], body)
    if name in MATRIX:
        return f"cell {name}{MATRIX[name]} {{\n    state S: [K, V] = 0\n    {body}\n    o = (q * K ** -0.5) @ S\n}}\n"
    if name == "rwkv6":
        return ("cell rwkv6(r: [K], k: [K], v: [V], w: [K]) -> (o: [V]) {\n    param u: [K] = 0\n"
                f"    state S: [K, V] = 0\n    {body}\n}}\n")
    if name == "rwkv7":
        return (f"cell rwkv7(r: [K], w: [K], k: [K], v: [V], kk: [K], a: [K]) -> (o: [V]) {{\n"
                f"    state S: [K, V] = 0\n    {body}\n    o = r @ S\n}}\n")
    if name == "hgrn":
        return f"cell hgrn(x: [D], g: [D]) -> (o: [D]) {{\n    state h: [D] = 0\n    {body}\n    o = h\n}}\n"
    head = HEADS[name]
    return (GRU_DEF if name == "gru" else "") + head + f"    {body}\n}}\n"


CASES = [pytest.param(name, i, id=f"{name}-{i}") for name in sorted(REWRITES) for i in range(len(REWRITES[name]))]
VERDICT = ("class", "transition", "decay", "coupled", "readout", "readout_of")


def test_every_library_cell_is_rewritten_twice():
    assert set(REWRITES) == set(rnnc.library())
    assert all(len(v) >= 2 for v in REWRITES.values())


@pytest.mark.parametrize("name,i", CASES)
def test_same_verdict_and_backend(name, i):
    ref = rnnc.analyze(name).to_dict()
    got = rnnc.analyze(source(name, REWRITES[name][i])).to_dict()
    assert set(got["states"]) == set(ref["states"])
    for state, want in ref["states"].items():
        have = got["states"][state]
        assert {k: have.get(k) for k in VERDICT} == {k: want.get(k) for k in VERDICT}, (state, have["why"])
    assert got["backend"] == ref["backend"]
    assert rnnc.backends_for(source(name, REWRITES[name][i])) == rnnc.backends_for(name)


def _plan_shape(spec: str):
    """What a chunk plan is made of (its kind, readout and which parts each micro-step has), or None."""
    from rnnc.analysis import analyze_cell
    from rnnc.chunkplan import NotChunkable
    from rnnc.optimize import optimize
    from rnnc.plans import chunk_plan

    cell = optimize((rnnc.parse(spec) if "{" in spec else rnnc.load(spec)).cell())
    try:
        plan = chunk_plan(cell, analyze_cell(cell))
    except NotChunkable:
        return None
    parts = ("gk", "gv", "g", "beta")
    return (plan.kind, plan.before, len(plan.extra), len(plan.scale),
            tuple(getattr(plan, p) is None for p in parts),
            tuple(tuple(n is None for n in (st.a, st.b, st.k, st.v, st.gk, st.g)) for st in plan.steps))


@pytest.mark.parametrize("name,i", CASES)
def test_same_chunk_plan(name, i):
    """Equal writings of a matrix state give the same kind of chunk plan with the same parts (the delta
    rule, the generalized delta rule's micro-steps, the decays)."""
    assert _plan_shape(source(name, REWRITES[name][i])) == _plan_shape(name)


@pytest.mark.parametrize("name,i", CASES)
def test_same_numbers(name, i):
    """The rewrite on `auto` (its parallel form at T = 70) against the library cell on the loop."""
    dims = {k: v for k, v in DIMS.items() if k in rnnc.load(name).cell().dims}
    ref = rnnc.build(name, backend="loop", dtype=torch.float64, **dims)
    cell = rnnc.build(source(name, REWRITES[name][i]), dtype=torch.float64, **dims)
    cell.load_state_dict(ref.state_dict())
    inputs = library_inputs(name, 2, 70, 1, False, torch.float64)
    ys, final, grads = outputs_and_grads(cell, inputs)
    ys_ref, final_ref, grads_ref = outputs_and_grads(ref, inputs)
    for a, b in zip(ys + tuple(final.values()) + grads, ys_ref + tuple(final_ref.values()) + grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


#: Writings that scale the readout by a state-free factor (a constant, a dim expression, a per-step
#: scalar) or write the update's outer product by broadcasting: the chunk form absorbs the factor into
#: the query (rnnc/chunkplan.py `_scaled_query`) and reads `a[:, None] * b[None, :]` as `outer(a, b)`
#: (rnnc/matrix_terms.py), so each gets the plan of the plain writing and the loop's numbers.
SCALED = {
    "outer-by-broadcasting": ("gla", "outer(k, v)", "k[:, None] * v[None, :]"),
    "outer-by-broadcasting-row": ("simple_gla", "outer(k, v)", "v * k[:, None]"),
    "outer-in-delta-rule": ("deltanet", "beta * outer(k, k)", "beta * (k[:, None] * k[None, :])"),
    "unscaled-readout": ("gla", "o = q @ S / sqrt(K)", "o = q @ S"),
    "halved-readout": ("gla", "o = q @ S / sqrt(K)", "o = 0.5 * (q @ S)"),
    "scaled-query": ("simple_gla", "o = q @ S / sqrt(K)", "o = (q * K ** -0.5) @ S"),
    "gated-readout": ("simple_gla", "o = q @ S / sqrt(K)", "o = sigmoid(g) * (q @ S)"),
    "negated-scaled-readout": ("deltanet", "o = q @ S / sqrt(K)", "o = -(q / sqrt(K)) @ S"),
    "scaled-dplr-readout": ("kda", "o = q @ S / sqrt(K)", "o = (q @ S) * K ** -0.5"),
    "scaled-readout-before": ("rwkv6", "o = r @ S", "o = 2 * (r @ S)"),
}


def _scaled_source(name: str, old: str, new: str) -> str:
    text = (specs_dir() / f"{name}.rnn").read_text()
    text = text[:text.index(f"cell {name}_heads")] if f"cell {name}_heads" in text else text  # the file's first cell
    assert old in text
    return text.replace(old, new)


@pytest.mark.parametrize("name,old,new", list(SCALED.values()), ids=list(SCALED))
def test_scaled_writings_keep_the_chunk_plan(name, old, new):
    text = _scaled_source(name, old, new)
    assert _plan_shape(text) is not None
    assert _plan_shape(text) == _plan_shape(name)
    assert rnnc.backends_for(text) == rnnc.backends_for(name)


@pytest.mark.parametrize("name,old,new", list(SCALED.values()), ids=list(SCALED))
def test_scaled_writings_match_the_loop(name, old, new):
    """The scaled writing on the chunk backend against itself on the loop, values and gradients."""
    text = _scaled_source(name, old, new)
    dims = {k: v for k, v in DIMS.items() if k in rnnc.load(name).cell().dims}
    ref = rnnc.build(text, backend="loop", dtype=torch.float64, **dims)
    cell = rnnc.build(text, backend="chunk", dtype=torch.float64, chunk_size=16, **dims)
    cell.load_state_dict(ref.state_dict())
    inputs = library_inputs(name, 2, 37, 1, False, torch.float64)
    got, want = outputs_and_grads(cell, inputs), outputs_and_grads(ref, inputs)
    for a, b in zip(got[0] + tuple(got[1].values()) + got[2], want[0] + tuple(want[1].values()) + want[2]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
