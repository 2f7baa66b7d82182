"""Analysis verdicts (rnnc/linearity.py) for every library cell and for hand-written edge cases."""
import pytest

import rnnc

# state -> (class, transition, decay, readout, readout_of); None where the field does not apply
EXPECTED = {
    ("lstm", "c"): ("nonlinear", None, None, "other", "new"),
    ("lstm", "h"): ("nonlinear", None, None, "state", "new"),
    ("gru", "h"): ("nonlinear", None, None, "state", "new"),
    ("elman", "h"): ("nonlinear", None, None, "state", "new"),
    ("mingru", "h"): ("elementwise_affine", None, "elementwise", "state", "new"),
    ("minlstm", "h"): ("elementwise_affine", None, "elementwise", "state", "new"),
    ("hgrn", "h"): ("elementwise_affine", None, "elementwise", "state", "new"),
    ("linear_attn", "S"): ("matrix_affine", "additive", "none", "contraction", "new"),
    ("simple_gla", "S"): ("matrix_affine", "additive", "scalar", "contraction", "new"),
    ("gla", "S"): ("matrix_affine", "additive", "key", "contraction", "new"),
    ("rwkv6", "S"): ("matrix_affine", "additive", "key", "contraction", "old"),
    ("mamba", "h"): ("matrix_affine", "additive", "key_value", "contraction", "new"),
    ("deltanet", "S"): ("matrix_affine", "identity_minus_low_rank", "none", "contraction", "new"),
    ("gated_deltanet", "S"): ("matrix_affine", "identity_minus_low_rank", "scalar", "contraction", "new"),
    ("deltanet_neg", "S"): ("matrix_affine", "identity_minus_low_rank", "none", "contraction", "new"),
    ("kda", "S"): ("matrix_affine", "identity_minus_low_rank", "key", "contraction", "new"),
    ("rwkv7", "S"): ("matrix_affine", "diagonal_plus_low_rank", "key", "contraction", "new"),
    # two Householder factors expanded: I + three low-rank terms (the chunk plan reads them as two steps)
    ("deltaproduct", "S"): ("matrix_affine", "identity_plus_low_rank", "scalar", "contraction", "new"),
    # `[[1]] @ ones`: a 1×1 literal matrix is the number 1, not a dense transition
    ("lsrl_majority", "ones"): ("elementwise_affine", None, "none", "other", "new"),
}


@pytest.mark.parametrize("spec,state", sorted(EXPECTED))
def test_library_verdicts(spec, state):
    got = rnnc.analyze(spec).to_dict()["states"][state]
    cls, transition, decay, readout, of = EXPECTED[spec, state]
    assert got["class"] == cls, got
    assert got.get("transition") == transition, got
    assert got.get("decay") == decay or (cls == "nonlinear" and "decay" not in got), got
    assert got["readout"] == readout and got["readout_of"] == of, got
    assert got["why"]


def test_every_library_spec_has_a_verdict():
    for name in rnnc.library():
        for state in rnnc.analyze(name).to_dict()["states"].values():
            assert state["class"] in ("elementwise_affine", "matrix_affine", "associative", "nonlinear")


def test_lstm_c_is_nonlinear_because_its_gate_reads_h():
    why = rnnc.analyze("lstm").to_dict()["states"]["c"]["why"]
    assert "reads state h" in why and "sigmoid" in why
    assert "nonlinear: sigmoid" in rnnc.analyze("lstm").summary()


CASES = {
    # value-side decay: a [V] factor scales the columns of S
    "value_decay": ("""cell c(k: [K], v: [V], d: [V]) -> (o: [V]) {
        state S: [K, V] = 0
        S = exp(d) * S + outer(k, v)
        o = k @ S }""", "S", {"class": "matrix_affine", "transition": "additive", "decay": "value"}),
    # a state scaled by a value that reads the state is not linear
    "self_gated": ("""cell c(x: [H]) -> (y: [H]) {
        state h: [H] = 0
        h = sigmoid(h) * h + x
        y = h }""", "h", {"class": "nonlinear"}),
    # the product of two states on a cycle is not linear
    "product": ("""cell c(x: [H]) -> (y: [H]) {
        state a: [H] = 1
        state b: [H] = 1
        a = a * b + x
        b = b * a + x
        y = a }""", "a", {"class": "nonlinear"}),
    # ... but a state scaled by an earlier layer's state is linear once that layer is known
    "layered": ("""cell c(x: [H]) -> (y: [H]) {
        state a: [H] = 1
        state b: [H] = 1
        a = a * b + x
        b = b + x
        y = a }""", "a", {"class": "elementwise_affine", "after": ["b"]}),
    # linear in an earlier layer's state too: a stage after it, elementwise in itself
    "coupled_to_earlier": ("""cell c(x: [H]) -> (y: [H]) {
        state a: [H] = 0
        state b: [H] = 0
        a = 0.5 * a + 0.5 * b + x
        b = b + x
        y = a }""", "a", {"class": "elementwise_affine", "after": ["b"]}),
    # two states that read each other linearly: one block state, 2×2 per element
    "coupled": ("""cell c(x: [H]) -> (y: [H]) {
        state a: [H] = 0
        state b: [H] = 0
        let a0 = a
        a = 0.5 * a + 0.5 * b + x
        b = b - a0
        y = a }""", "a", {"class": "matrix_affine", "transition": "block", "coupled": ["b"],
                           "matrix": {"kind": "block", "size": "2", "states": ["a", "b"],
                                      "per_step": False}}),
    # a vector state read through a state-free matrix: dense, scanned with H×H matrices
    "dense_vector": ("""cell c(x: [H], A: [H, H]) -> (y: [H]) {
        state h: [H] = 0
        h = A @ h + x
        y = h }""", "h", {"class": "matrix_affine", "transition": "dense",
                           "matrix": {"kind": "dense", "size": "H", "states": ["h"],
                                      "per_step": True}}),
    # a general state-free matrix on the left: dense transition
    "dense": ("""cell c(k: [K], v: [V], A: [K]) -> (o: [V]) {
        state S: [K, V] = 0
        S = outer(A, A) @ S + outer(k, v)
        o = k @ S }""", "S", {"class": "matrix_affine", "transition": "dense"}),
    # dividing by the state is not linear
    "divide": ("""cell c(x: [H]) -> (y: [H]) {
        state h: [H] = 1
        h = x / h
        y = h }""", "h", {"class": "nonlinear"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hand_written_cases(case):
    text, state, expected = CASES[case]
    got = rnnc.analyze(text).to_dict()["states"][state]
    for key, value in expected.items():
        assert got.get(key) == value, (key, got)


@pytest.mark.parametrize("fn", ["max", "min", "prod", "logsumexp"])
def test_a_nonlinear_reduction_of_a_state_is_nonlinear(fn):
    """`s = x + max(s)` is not linear in s (it was once counted as matrix_affine)."""
    text = f"""cell c(x: [H]) -> (y: [H]) {{
        state s: [H] = 0
        s = x + {fn}(s)
        y = s }}"""
    got = rnnc.analyze(text).to_dict()["states"]["s"]
    assert got["class"] == "nonlinear", got
    assert fn in got["why"], got
    assert rnnc.analyze(text).backend == "loop"


@pytest.mark.parametrize("fn", ["sum", "mean"])
def test_a_sum_or_mean_of_a_state_is_linear(fn):
    """h' = x + sum(h) · 1 is linear in h: a dense (all-ones) transition, not nonlinear."""
    text = f"""cell c(x: [H]) -> (y: [H]) {{
        state h: [H] = 0
        h = x + 0.5 * {fn}(h)
        y = h }}"""
    got = rnnc.analyze(text).to_dict()["states"]["h"]
    assert got["class"] == "matrix_affine", got


def test_a_one_by_one_literal_matrix_is_a_number():
    """LSRL's LinState with A = [[1]] is a plain running sum: elementwise, scanned."""
    text = """cell c(x: [1]) -> (y: [1]) {
        state s: [1] = 0
        s = [[1]] @ s + [[2]] @ x
        y = s }"""
    rep = rnnc.analyze(text)
    assert rep.to_dict()["states"]["s"]["class"] == "elementwise_affine"
    assert rep.backend == "scan"


def test_a_scaled_identity_literal_and_an_outer_product_update():
    """`[[0.5, 0], [0, 0.5]] @ h` is 0.5 h; `h - outer(k, k) @ h` an identity-minus-low-rank map."""
    scaled = """cell c(x: [2]) -> (y: [2]) {
        state h: [2] = 0
        h = [[0.5, 0], [0, 0.5]] @ h + x
        y = h }"""
    assert rnnc.analyze(scaled).to_dict()["states"]["h"]["decay"] == "elementwise"
    delta = """cell c(k: [H], x: [H]) -> (y: [H]) {
        state h: [H] = 0
        h = h - outer(k, k) @ h + x
        y = h }"""
    got = rnnc.analyze(delta).to_dict()["states"]["h"]
    assert (got["class"], got["transition"]) == ("matrix_affine", "identity_minus_low_rank"), got


def test_dplr_transition_is_identity_plus_low_rank():
    """(I + a bᵀ) with a ≠ b is recognised, and runs chunkwise (the generalized delta rule)."""
    text = """cell c(q: [K], a: [K], b: [K], k: [K], v: [V]) -> (o: [V]) {
        state S: [K, V] = 0
        S = S + outer(a, b @ S) + outer(k, v)
        o = q @ S }"""
    rep = rnnc.analyze(text)
    got = rep.to_dict()["states"]["S"]
    assert got["transition"] == "identity_plus_low_rank" and rep.backend == "chunk", got


def test_a_decay_with_a_low_rank_term_and_no_common_factor_is_diagonal_plus_low_rank():
    """RWKV-7's diag(e^w) + a bᵀ: no decay factors out of both terms; printed as (D + a bᵀ) S."""
    got = rnnc.analyze("rwkv7").to_dict()["states"]["S"]
    assert got["transition"] == "diagonal_plus_low_rank" and got["decay"] == "key"
    assert got["form"] == "S' = (diag(exp(w)[:, None]) - (kk * a) kkᵀ) S + …"


def test_kda_prints_the_decay_before_the_correction():
    """(I − β k kᵀ) diag(e^g) S is not diag(e^g) (I − β k kᵀ) S: the form keeps the order."""
    assert rnnc.analyze("kda").to_dict()["states"]["S"]["form"] == "S' = (I - beta · k kᵀ) diag(exp(g)[:, None]) S + …"
    text = """cell c(q: [K], k: [K], v: [V], g: [K], beta: []) -> (o: [V]) {
        state S: [K, V] = 0
        S = exp(g)[:, None] * ((eye(K) - beta * outer(k, k)) @ S) + beta * outer(k, v)
        o = q @ S }"""
    assert rnnc.analyze(text).to_dict()["states"]["S"]["form"] == \
        "S' = diag(exp(g)[:, None]) (I - beta · k kᵀ) S + …"


def test_states_in_layers():
    """An LSRL-style stack: a counter, a gate computed from it, a state gated by that gate. Each is
    linear in itself given the layers below; the groups come out in dependency order; until
    staged lowering exists the cell runs the loop, and says why the scan does not apply."""
    text = """cell c(x: [1]) -> (y: [1]) {
        state n: [1] = 0
        state s: [1] = 0
        state m: [1] = 0
        n = n + 1
        s = sigmoid(n - 3) * s + x
        m = relu(m) + s
        y = m }"""
    rep = rnnc.analyze(text)
    states = rep.to_dict()["states"]
    assert states["n"]["class"] == "elementwise_affine" and "after" not in states["n"]
    assert states["s"]["class"] == "elementwise_affine" and states["s"]["after"] == ["n"]
    assert states["m"]["class"] == "nonlinear"  # relu of itself: sequential whatever the layers
    from rnnc.linearity import state_groups
    assert state_groups(rnnc.parse(text).cell()) == [["n"], ["s"], ["m"]]
    assert rep.backend == "loop"  # m is sequential whatever the layers
    with pytest.raises(rnnc.BuildError, match="state 'm' is nonlinear"):
        rnnc.build(text, backend="scan")
    with pytest.raises(rnnc.BuildError, match="the chunk backend needs a matrix state"):
        rnnc.build(text.replace("relu(m) + s", "m + s"), backend="chunk")


def test_lstm_states_form_one_group():
    from rnnc.linearity import state_groups
    assert state_groups(rnnc.load("lstm").cell()) == [["c", "h"]]


def test_the_report_prints_the_canonical_form():
    """Both writings of the gated delta rule print the same transition, decay factored out."""
    head = "cell c(q: [K], k: [K], v: [V], g: [], beta: []) -> (o: [V]) {\n state S: [K, V] = 0\n"
    forms = {rnnc.analyze(head + body + "\n o = q @ S }").to_dict()["states"]["S"]["form"] for body in (
        "S = exp(g) * ((eye(K) - beta * outer(k, k)) @ S) + beta * outer(k, v)",
        "let d = exp(g) * S\n S = d + beta * outer(k, v - k @ d)")}
    assert forms == {"S' = exp(g) (I - beta · k kᵀ) S + …"}
    assert "S' = exp(g) (I - beta · k kᵀ) S" in rnnc.analyze("gated_deltanet").summary()


def test_a_transposed_state_is_linear_but_dense():
    """S' = Sᵀ + ... is linear (a permutation of entries): dense, never nonlinear."""
    text = """cell c(k: [K], v: [K]) -> (o: [K]) {
        state S: [K, K] = 0
        S = transpose(S) + outer(k, v)
        o = k @ S }"""
    got = rnnc.analyze(text).to_dict()["states"]["S"]
    assert (got["class"], got["transition"]) == ("matrix_affine", "dense"), got
    assert "transpose" in got["why"]
