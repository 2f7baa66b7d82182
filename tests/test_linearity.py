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
    ("lsrl_majority", "ones"): ("matrix_affine", "dense", "none", "other", "new"),
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
    # the product of two states is not linear
    "product": ("""cell c(x: [H]) -> (y: [H]) {
        state a: [H] = 1
        state b: [H] = 1
        a = a * b + x
        b = b + x
        y = a }""", "a", {"class": "nonlinear"}),
    # linear in two states at once: analysed jointly, dense
    "coupled": ("""cell c(x: [H]) -> (y: [H]) {
        state a: [H] = 0
        state b: [H] = 0
        a = 0.5 * a + 0.5 * b + x
        b = b + x
        y = a }""", "a", {"class": "matrix_affine", "transition": "dense", "coupled": ["b"]}),
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
