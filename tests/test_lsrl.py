"""LSRL as part of the library: `import lsrl` (its sugar with LSRL's constants) and LSRL's programs
(lsrl_table, lsrl_graph, lsrl_vec2vec, lsrl_tok2tok; lsrl_majority and lsrl_modcounter are tested in
test_library_reference and test_matscan), against

- the values LSRL gives, as recorded in ../shared/research/lsrl.md (marked [run] there: run by us at
  LSRL HEAD 2675cd1; the checks of LSRL's tests/test_sugar.py, test_ua_vec2vec.py, test_ua_tok2tok.py),
- a plain-PyTorch re-implementation of LSRL's semantics written here (`Ref`: its sugar_blocks as
  torch functions, each program a loop over steps with LinStates updated as s = A s + B u + bias),

on the loop, scan and auto backends (LSRL's logic is exact on its integer-valued programs: float32 too).
"""
import math
import random

import pytest
import torch

import rnnc

BACKENDS = ["loop", "scan", "auto"]


class Ref:
    """LSRL's sugar (lsrl/sugar_blocks.py) in plain torch, from lsrl.md §2."""

    MU, LAM = 1000.0, 1e10

    @staticmethod
    def step(x, mu=MU):
        return torch.relu(mu * x) - mu * torch.relu(x - 1 / mu)

    @classmethod
    def larger(cls, x, y, mu=MU):
        return cls.step(x - y, mu)

    @classmethod
    def smaller(cls, x, y, mu=MU):
        return cls.step(y - x, mu)

    @classmethod
    def bump(cls, x, lb, ub, mu=MU):
        return cls.step(x - lb, mu) - cls.step(x - ub, mu)

    @classmethod
    def and_(cls, x, y, mu=MU):
        return torch.relu(cls.step(x, mu) + cls.step(y, mu) - 1)

    @staticmethod
    def not_(x):
        return 1 - x

    @staticmethod
    def ifelse(c, t, f, lam=LAM):
        t, f = torch.as_tensor(t, dtype=c.dtype), torch.as_tensor(f, dtype=c.dtype)
        return (torch.relu(-lam * c + f) + torch.relu(-lam * (1 - c) + t)
                - torch.relu(-lam * c - f) - torch.relu(-lam * (1 - c) - t))

    class ModCounter:
        """f_modulo_counter(d): a LinState with A = R(2 pi / d), s0 = R^-1 e1, then the one-hot readout."""

        def __init__(self, d, dtype):
            a = 2 * math.pi / d
            self.A = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=dtype)
            self.s = torch.tensor([math.cos(a), -math.sin(a)], dtype=dtype)
            i = torch.arange(d, dtype=dtype)
            self.W = torch.stack([torch.cos(a * i), torch.sin(a * i)], -1)
            self.thr, self.i = math.cos(math.pi / d), i

        def __call__(self):
            self.s = self.A @ self.s
            return (Ref.larger(self.W @ self.s, self.thr) @ self.i).reshape(1)


def _cell(body: str, outs: str = "y: [1]", ins: str = "x: [1]") -> str:
    return f"import lsrl\ncell t({ins}) -> ({outs}) {{\n{body}\n}}\n"


def _seq(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype).reshape(1, -1, 1)


# ---- the sugar ----------------------------------------------------------------------------------------

SUGAR = _cell("""    st = f_step(x)
    bu = f_bump(x, 0.2, 0.5)
    ie = [f_ifelse(x, 7, -3)[0], f_ifelse_step(x, 7, -3)[0], f_ifelse_mul(x, 7, -3)[0]]""",
              "st: [1], bu: [1], ie: [3]")


def test_step_and_bump_take_lsrl_values():
    """lsrl.md §2 [run]: f_step (mu = 1000) on -1, 0, 5e-4, 1e-3, 2e-3, 5 gives 0, 0, 0.5, 1, 1, 1; f_bump
    (0.2, 0.5) on 0.2, 0.2005, 0.201, 0.5, 0.5005, 0.501 gives 0, 0.5, 1, 1, 0.5, 0."""
    cell = rnnc.build(SUGAR, backend="loop", dtype=torch.float64)
    (st, _, _), _ = cell(_seq([-1, 0, 5e-4, 1e-3, 2e-3, 5]))
    torch.testing.assert_close(st.flatten(), torch.tensor([0, 0, 0.5, 1, 1, 1], dtype=torch.float64))
    (_, bu, _), _ = cell(_seq([0.2, 0.2005, 0.201, 0.5, 0.5005, 0.501]))
    torch.testing.assert_close(bu.flatten(), torch.tensor([0, 0.5, 1, 1, 0.5, 0], dtype=torch.float64))


def test_partial_conditions_take_lsrl_values():
    """lsrl.md §2 [run], c = 0.5, t = 7, f = -3: f_ifelse 0, f_ifelse_step 0, f_ifelse_mul 2; c = 1e-9:
    f_ifelse 0 (lambda c = 10 overpowers f: the paper's instability), f_ifelse_mul -2.99999999."""
    cell = rnnc.build(SUGAR, backend="loop", dtype=torch.float64)
    (_, _, ie), _ = cell(_seq([0.5, 1e-9, 0, 1]))
    got = ie[0]
    torch.testing.assert_close(got[0], torch.tensor([0, 0, 2], dtype=torch.float64))
    assert got[1, 0] == 0 and abs(got[1, 2] - (-2.99999999)) < 1e-12
    torch.testing.assert_close(got[2], torch.tensor([-3.0] * 3, dtype=torch.float64))  # c = 0: f
    torch.testing.assert_close(got[3], torch.tensor([7.0] * 3, dtype=torch.float64))  # c = 1: t


def test_logic_truth_tables():
    """LSRL's test_sugar: and/or/not truth tables; eq/neq, smaller/larger at mu = 1e5; ifeq over 4-tuples
    of small vectors at mu = 1e4."""
    src = _cell("""    let a = x[0:1]
    let b = x[1:2]
    y = [f_and(a, b)[0], f_or(a, b)[0], f_not(a)[0], f_eq(a, b, mu=1e5)[0], f_neq(a, b, mu=1e5)[0],
         f_larger(a, b, mu=1e5)[0], f_smaller(a, b, mu=1e5)[0], f_ifeq(a, b, 10 * a + 1, -b, mu=1e4)[0]]""",
                "y: [8]", "x: [2]")
    cell = rnnc.build(src, backend="loop", dtype=torch.float64)
    pairs = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1], [0.3, 0.3], [-2, 3], [3, -2], [1e-3, 0]],
                         dtype=torch.float64)
    y, _ = cell(pairs[None])
    a, b = pairs[:, 0], pairs[:, 1]
    logic = (a == 1) & (b == 1), ((a == 1) | (b == 1)), a == 0
    for k, want in enumerate(logic):
        torch.testing.assert_close(y[0, :4, k], want[:4].double())
    torch.testing.assert_close(y[0, :, 3], (a == b).double())
    torch.testing.assert_close(y[0, :, 4], (a != b).double())
    torch.testing.assert_close(y[0, :, 5], (a > b).double())
    torch.testing.assert_close(y[0, :, 6], (a < b).double())
    torch.testing.assert_close(y[0, :, 7], torch.where(a == b, 10 * a + 1, -b))


def _counter_cell(d, mu=None):
    extra = f", mu={mu}" if mu is not None else ""
    return _cell(f"    y = f_modulo_counter({d}{extra})", ins="u: [1]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [1, 2, 3, 5, 20])
def test_modulo_counter_counts(d, backend):
    """LSRL's test_sugar: d in {1, 2, 3, 5, 20} over 50 steps gives t mod d (t = 0, 1, ...)."""
    y, _ = rnnc.build(_counter_cell(d), backend=backend)(torch.zeros(2, 50, 1))
    assert y[..., 0].tolist() == [[t % d for t in range(50)]] * 2


def test_modulo_counter_limits_match_lsrl():
    """lsrl.md §2 [run]: exact for d = 70 over 143 steps; d = 72 gives 0, 0.95, 1.90, ... (the one-hot's
    margin 1 - cos(pi / d) is below the ramp 1/mu); LSRL cannot change mu, rnnc can: mu = 1e5 is exact.
    d = 7 over 5000 steps drifts by at most 9e-14 in LSRL (float64): here as little, on the loop."""
    u = torch.zeros(1, 143, 1, dtype=torch.float64)
    y70, _ = rnnc.build(_counter_cell(70), backend="loop", dtype=torch.float64)(u)
    assert y70.flatten().tolist() == [t % 70 for t in range(143)]
    y72, _ = rnnc.build(_counter_cell(72), backend="loop", dtype=torch.float64)(u)
    torch.testing.assert_close(y72.flatten()[:3], torch.tensor([0, 0.95, 1.90], dtype=torch.float64),
                               atol=0.01, rtol=0)
    exact, _ = rnnc.build(_counter_cell(72, 1e5), backend="loop", dtype=torch.float64)(u)
    assert exact.flatten().tolist() == [t % 72 for t in range(143)]
    y7, _ = rnnc.build(_counter_cell(7), backend="loop", dtype=torch.float64)(torch.zeros(1, 5000, 1,
                                                                                               dtype=torch.float64))
    want = torch.arange(5000, dtype=torch.float64) % 7
    assert (y7.flatten() - want).abs().max() < 1e-12


# ---- the programs ---------------------------------------------------------------------------------------

def ref_table(x):
    """TestBasicBlocks.test_forward's program, step by step (lsrl.md §4.2 P2)."""
    out, ctr = [], torch.zeros(1, dtype=x.dtype)
    for xt in x:
        r = torch.relu(torch.cat([xt, xt]))
        ctr = ctr + 1
        out.append(torch.cat([ctr, r[0:2] + 1, r[2:4].flip(0), xt[0:1] * xt[1:2]]))
    return torch.stack(out)


def ref_graph(x):
    """TestComputationGraphSimplification.test_all's program (lsrl.md §4.2 P3)."""
    out, ctr = [], torch.zeros(1, dtype=x.dtype)
    for xt in x:
        z = torch.relu(xt)
        u = torch.relu(z - 5)
        w = torch.relu(torch.relu(torch.cat([xt, xt])))
        v = torch.cat([w[0:2] + u, w[2:4]])
        g = v[0:2] * v[2:4] + (2 * v[0:2] - 1) * (2 * v[2:4] - 1)
        ctr = ctr + 1
        out.append(torch.cat([ctr, v[0:2] + 1, v[2:4].flip(0), g]))
    return torch.stack(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,ref", [("lsrl_table", ref_table), ("lsrl_graph", ref_graph)])
def test_basic_programs(name, ref, backend):
    g = torch.Generator().manual_seed(0)
    x = 8 * torch.randn(3, 70, 2, generator=g, dtype=torch.float64)  # some coordinates beyond 5 (u > 0)
    y, _ = rnnc.build(name, backend=backend, dtype=torch.float64)(x)
    for b in range(3):
        torch.testing.assert_close(y[b], ref(x[b]))


def test_table_by_hand():
    """The first steps of lsrl_table, computed by hand from the program (c, a, b, x0 x1)."""
    y, _ = rnnc.build("lsrl_table", backend="loop")(torch.tensor([[[1.0, -2.0], [3.0, 4.0], [-1.0, 0.5]]]))
    assert y[0].tolist() == [[1, 2, 1, 0, 1, -2], [2, 4, 5, 4, 3, 12], [3, 1, 1.5, 0.5, 0, -0.5]]


# vec2vec: LSRL's construct_prompt (lsrl.md §4.2 P4): N^DIN cells, lexicographic, each
# [1/N, i_1/N, ..., i_DIN/N, f(cell centre)], after the query token [q, 0, ..., 0].

def _target(p):
    return torch.stack([torch.sin(3 * p[..., 0]) + p[..., 1], p[..., 0] * p[..., 1] - 0.25], -1)


def vec2vec_prompt(q, n, dtype=torch.float64):
    din = q.shape[-1]
    idx = torch.cartesian_prod(*[torch.arange(n)] * din).reshape(-1, din).to(dtype)
    cells = torch.cat([torch.full((len(idx), 1), 1 / n, dtype=dtype), idx / n, _target((idx + 0.5) / n)], -1)
    query = torch.cat([q, torch.zeros(1 + 2, dtype=dtype)])
    return torch.cat([query[None], cells])


def ref_vec2vec(x, din=2):
    """Lst. 1 step by step: LSRL's semantics in torch."""
    c, q, acc, out = torch.zeros(1, dtype=x.dtype), torch.zeros(din, dtype=x.dtype), 0, []
    for xt in x:
        c = c + 1
        q = q + Ref.ifelse(Ref.smaller(c.expand(din), 1.5), xt[0:din], 0)
        lb = xt[1:1 + din]
        hit = Ref.and_(Ref.larger(Ref.bump(q, lb, lb + xt[0]).sum(), din - 0.5), Ref.larger(c, 0.5))
        acc = acc + Ref.ifelse(Ref.larger(hit.expand(2), 0.5), xt[1 + din:], 0)
        out.append(acc)
    return torch.stack(out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vec2vec_answers_with_the_cell_value(backend):
    """The last output is f at the centre of the cell (l, l + 1/N] holding the query (LSRL's test_ua_vec2vec
    checks this within 0.1 of the target; with queries away from the cell bounds it is exact); a query
    coordinate of exactly 0 lies in no cell and gives 0 (lsrl.md §4.2 P4)."""
    n = 8
    g = torch.Generator().manual_seed(1)
    qs = (torch.randint(0, n, (10, 2), generator=g) + 0.1 + 0.8 * torch.rand(10, 2, generator=g, dtype=torch.float64)) / n
    qs = torch.cat([qs, torch.tensor([[0.0, 0.5]], dtype=torch.float64)])
    x = torch.stack([vec2vec_prompt(q, n) for q in qs])
    y, _ = rnnc.build("lsrl_vec2vec", backend=backend, dtype=torch.float64)(x)
    want = _target((torch.ceil(qs * n) - 0.5) / n)
    torch.testing.assert_close(y[:10, -1], want[:10], rtol=0, atol=1e-12)
    assert y[10, -1].tolist() == [0, 0]
    torch.testing.assert_close(y[0], ref_vec2vec(x[0]), rtol=0, atol=1e-12)
    y32, _ = rnnc.build("lsrl_vec2vec", backend=backend)(x.float())
    torch.testing.assert_close(y32[:10, -1], want[:10].float(), rtol=0, atol=1e-5)


def tok2tok_prompt(n, pairs, vocab, rng, query=None):
    """LSRL's test_ua_tok2tok prompt: n query tokens, then key‖value pairs (distinct keys); the query is
    the key of pair `query`, or a key in no pair when None. Returns (tokens, the expected value)."""
    keys = set()
    while len(keys) < pairs + 1:
        keys.add(tuple(rng.randrange(vocab) for _ in range(n)))
    keys = list(keys)
    values = [tuple(rng.randrange(vocab) for _ in range(n)) for _ in keys]
    q, want = (keys[pairs], (0,) * n) if query is None else (keys[query], values[query])
    tokens = list(q) + [t for k, v in zip(keys[:pairs], values[:pairs]) for t in k + v]
    return tokens, want


def ref_tok2tok(x, n=3):
    """Lst. 2 step by step (lsrl.md §4.2 P5): LSRL's semantics in torch, LinStates as A s + B u."""
    dt = x.dtype
    g = torch.full((1,), -1.0, dtype=dt)
    mn, m2n = Ref.ModCounter(n, dt), Ref.ModCounter(2 * n, dt)
    q, buf, start, reg = torch.zeros(n, dtype=dt), torch.zeros(n + 1, dtype=dt), torch.zeros(1, dtype=dt), \
        torch.zeros(n, dtype=dt)
    shift = torch.diag(torch.ones(n, dtype=dt), 1)  # buf[j] <- buf[j + 1]
    e_n = torch.zeros(n + 1, dtype=dt)
    e_n[n] = 1
    i = torch.arange(n, dtype=dt)
    out = []
    for xt in x:
        g = g + 1
        a, b = mn(), m2n()
        is_prompt = Ref.larger(g, n - 0.5)
        is_cmp = Ref.larger(b, n - 0.5)
        is_copy = Ref.and_(is_prompt, Ref.not_(is_cmp))
        first_cp = Ref.and_(is_copy, Ref.smaller(a, 0.5))
        at = Ref.and_(Ref.larger(a, i - 0.5), Ref.smaller(a, i + 0.5))
        q = q + Ref.ifelse(at, Ref.ifelse(Ref.smaller(is_prompt, 0.5), xt, 0), 0)
        cq = Ref.ifelse(at, q, 0).sum()
        match = Ref.and_(Ref.and_(Ref.larger(xt, cq - 0.5), Ref.smaller(xt, cq + 0.5)), is_cmp)
        buf = shift @ buf + e_n * match
        all_matched = Ref.larger(buf[0:n].sum(), n - 0.5)
        start = start + Ref.ifelse(Ref.and_(all_matched, first_cp), g, 0)
        copying = Ref.and_(is_copy, Ref.smaller(g, start + n))
        reg = reg + Ref.ifelse(Ref.larger(Ref.and_(copying, at), 0.5), xt, 0)
        out.append(Ref.ifelse(Ref.larger(at, 0.5), reg, 0).sum().reshape(1))
    return torch.stack(out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tok2tok_looks_up_the_value(backend):
    """LSRL's test_ua_tok2tok: vocabulary 10, n = 3, random distinct keys; the last n outputs are the value
    of the queried key, exactly (here 25 pairs: the paper's 153-token prompts), zeros when no key matches;
    before the value starts the output is 0, then it repeats the value (lsrl.md §4.2 P5 [run])."""
    rng = random.Random(0)
    batch = [tok2tok_prompt(3, 25, 10, rng, query=k) for k in range(0, 25, 3)] + [tok2tok_prompt(3, 25, 10, rng)]
    x = torch.tensor([t for t, _ in batch], dtype=torch.float32)[..., None]
    assert x.shape == (10, 153, 1)
    y, _ = rnnc.build("lsrl_tok2tok", backend=backend)(x)
    for b, (tokens, want) in enumerate(batch):
        assert y[b, -3:, 0].tolist() == list(want)
    k = 3  # the query of row 1 is the key of pair 3: its value starts at step 3 + 6 * 3 + 3
    start = 3 + 6 * k + 3
    assert y[1, :start, 0].abs().max() == 0
    assert y[1, start:, 0].tolist() == [batch[1][1][t % 3] for t in range(start, 153)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_tok2tok_matches_lsrl_semantics(backend):
    """Every step's output against the plain-torch LSRL program, on prompts with repeated tokens."""
    rng = random.Random(5)
    rows = [tok2tok_prompt(3, 12, 4, rng, query=rng.randrange(12))[0] for _ in range(3)]
    x = torch.tensor(rows, dtype=torch.float64)[..., None]
    y, _ = rnnc.build("lsrl_tok2tok", backend=backend, dtype=torch.float64)(x)
    for b in range(3):
        torch.testing.assert_close(y[b], ref_tok2tok(x[b]), rtol=0, atol=0)


def test_tok2tok_runs_in_parallel_stages():
    """auto scans it: every state is linear in itself once the earlier ones are known (layers)."""
    rep = rnnc.analyze("lsrl_tok2tok")
    assert rep.backend == "scan"
    states = rep.to_dict()["states"]
    assert states["dictionary_lookup_buf"]["matrix"]["kind"] == "dense"
    assert states["dictionary_lookup_reg"].get("after")


def test_other_key_lengths_by_import():
    """`import lsrl_tok2tok` and dictionary_lookup(x, 5): keys and values of 5 tokens."""
    src = "import lsrl_tok2tok\ncell lookup5(x: [1]) -> (y: [1]) {\n    y = dictionary_lookup(x, 5)\n}\n"
    rng = random.Random(2)
    tokens, want = tok2tok_prompt(5, 8, 10, rng, query=6)
    y, _ = rnnc.build(src)(torch.tensor(tokens, dtype=torch.float32).reshape(1, -1, 1))
    assert y[0, -5:, 0].tolist() == list(want)


@pytest.mark.parametrize("T", [1, 2, 7, 64, 153, 1000])
def test_a_rotation_without_input_scans_by_its_powers(T):
    """The modulo counters' states have a constant transition and no input: the runtime applies the
    powers A^t (doubling); against the step-by-step recursion, values and gradients, float64."""
    from rnnc.runtime.scan import _group_scan

    a = torch.tensor(2 * math.pi / 7, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    A = torch.stack([torch.stack([torch.cos(a), -torch.sin(a)]), torch.stack([torch.sin(a), torch.cos(a)])])
    got, = _group_scan(T, ((A.reshape(1, 1, 2, 2),),), (None,), (h0,), dense=True)
    h, want = h0, []
    for _ in range(T):
        h = h @ A.T
        want.append(h)
    want = torch.stack(want)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    w = torch.randn_like(want)
    g1 = torch.autograd.grad((got * w).sum(), (a, h0), retain_graph=True)
    g2 = torch.autograd.grad((want * w).sum(), (a, h0))
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)
