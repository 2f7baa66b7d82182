"""Regression tests for bugs found in review, one test per bug (the docstring names it)."""
import importlib.util
import math
import time

import pytest
import torch

import rnnc
from rnnc.cli import main

NESTED_DEFS = ("def f0(a) = a * 0.00001 + 0.000001\n"
               + "".join(f"def f{i}(a) = f{i - 1}(a) + f{i - 1}(a)\n" for i in range(1, 17))
               + "cell deep(x: [H]) -> (h: [H]) {\n    state h: [H] = 0\n    h = tanh(f16(h) + x)\n}\n")


def test_nested_shared_defs_lower_in_linear_time():
    """Bug: a def nested 16 deep (f_i(a) = f_{i-1}(a) + f_{i-1}(a)) made elaboration, the sum
    regrouping and the tile lowering walk 2^16 copies (backends_for took minutes or overflowed the
    stack); each shared value is now built and lowered once."""
    start = time.perf_counter()
    assert rnnc.backends_for(NESTED_DEFS) == ["loop", "triton", "newton"]
    assert time.perf_counter() - start < 10
    assert len(rnnc.parse(NESTED_DEFS).cell().graph) < 100
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    loop = rnnc.build(NESTED_DEFS, backend="loop", H=4)
    triton = rnnc.build(NESTED_DEFS, backend="triton", H=4)
    h = torch.zeros(2, 4, dtype=torch.float64)
    want = []
    for t in range(3):  # f16(a) = 2^16 f0(a)
        h = torch.tanh(2.0 ** 16 * (0.00001 * h + 0.000001) + x[:, t])
        want.append(h)
    torch.testing.assert_close(loop(x)[0], torch.stack(want, 1))
    torch.testing.assert_close(triton(x)[0], torch.stack(want, 1))


STATELESS = "cell b1(x: [2]) -> (y: [2]) { y = 3 * x }"


def _load_module(source: str, tmp_path, name: str):
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_stateless_cell_runs_on_every_backend(tmp_path, capsys):
    """Bug: a cell with no state on the triton backend emitted an empty fused recurrent kernel (a
    module that did not parse, IndentationError), and `rnnc compile --backend triton` wrote it
    with exit status 0. A stateless cell needs no kernel: it runs as hoisted PyTorch."""
    x = torch.randn(3, 5, 2)
    assert "triton" in rnnc.backends_for(STATELESS)
    for backend in rnnc.backends_for(STATELESS):
        m = rnnc.build(STATELESS, backend=backend)
        y, final = m(x)
        torch.testing.assert_close(y, 3 * x)
        assert final == {}
        torch.testing.assert_close(m.step(x[:, 0])[0], 3 * x[:, 0])
    standalone = _load_module(rnnc.compile(STATELESS, backend="triton"), tmp_path, "b1_triton").Cell()
    torch.testing.assert_close(standalone(x)[0], 3 * x)
    spec = tmp_path / "b1.rnn"
    spec.write_text(STATELESS)
    out = tmp_path / "b1_cli.py"
    assert main(["compile", str(spec), "--backend", "triton", "-o", str(out)]) == 0
    torch.testing.assert_close(_load_module(out.read_text(), tmp_path, "b1_cli").Cell()(x)[0], 3 * x)


DEGENERATE = {
    # the decoding kernel of a cell whose outputs are all hoisted returned `(*fin)`, a SyntaxError,
    # and its single result was unpacked into one name without a comma
    "no_loop_output": "cell c(x: [2]) -> (y: [2]) { state s: [2] = 1\n s = tanh(s) + x\n y = 2 * x }",
    "state_from_input": "cell c(x: [2]) -> (y: [2]) { state s: [2] = 0\n s = x\n y = s + x }",
    # the scan of a state with constant a and b (no per-step value) ran 1 step instead of T
    "constant_state": "cell c(x: [2]) -> (y: [2]) { state s: [2] = 1\n s = s\n y = s * x }",
    "constant_affine": "cell c(x: [2]) -> (y: [2]) { state s: [2] = 1\n s = 0.5 * s + 1\n y = s * x }",
}


@pytest.mark.parametrize("name", sorted(DEGENERATE))
def test_degenerate_recurrences_match_the_loop_on_every_backend(name):
    """Bug: cells whose recurrence does no per-step work (outputs all hoisted, or a state with
    constant coefficients) failed to build on triton (SyntaxError) or ran a wrong number of steps
    on the scan; each backend now matches the loop, values, final states and gradients."""
    src = DEGENERATE[name]
    ref = rnnc.build(src, backend="loop").double()
    x = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    y0, f0 = ref(x)
    (g0,) = torch.autograd.grad(y0.sum() + f0["s"].sum(), x)
    assert len(rnnc.backends_for(src)) > 1
    for backend in rnnc.backends_for(src):
        m = rnnc.build(src, backend=backend).double()
        y, f = m(x)
        (g,) = torch.autograd.grad(y.sum() + f["s"].sum(), x)
        torch.testing.assert_close(y, y0)
        torch.testing.assert_close(f["s"], f0["s"])
        torch.testing.assert_close(g, g0)
        torch.testing.assert_close(m.step(x[:, 0])[0], ref.step(x[:, 0])[0])


def test_an_indexed_number_is_a_tensor():
    """Bug: `cos(1.0)[None]` passed the checks and failed at run time on every backend (the number
    was emitted as a Python float and indexed); a number given axes is now a filled tensor."""
    src = "cell c(x: [1]) -> (y: [1]) { state h: [2, 1] = 0\n h = tanh(h * cos(1.0)[None, None] + x)\n" \
          "y = x + cos(1.0)[None] + sin(0.5)[...] }"
    x = torch.randn(2, 3, 1, dtype=torch.float64)
    h = torch.zeros(2, 2, 1, dtype=torch.float64)
    for t in range(3):
        h = torch.tanh(h * math.cos(1.0) + x[:, t, None])
    for backend in rnnc.backends_for(src):
        y, final = rnnc.build(src, backend=backend).double()(x)
        torch.testing.assert_close(y, x + math.cos(1.0) + math.sin(0.5))
        torch.testing.assert_close(final["h"], h)


def test_a_literal_mixes_ints_and_floats():
    """Bug: `[1, 2.5]` was rejected as "a literal mixes numbers and rows" (an int and a float are
    both numbers); a real mix of rows and numbers is still rejected where it is written."""
    src = "cell c(x: [2]) -> (y: [2]) { y = [1, 2.5] * x + [[1, -2], [0.5, 3]] @ x }"
    x = torch.randn(2, 3, 2, dtype=torch.float64)
    want = torch.tensor([1, 2.5], dtype=torch.float64) * x + x @ torch.tensor([[1, -2], [0.5, 3]]).double().T
    for backend in rnnc.backends_for(src):
        torch.testing.assert_close(rnnc.build(src, backend=backend).double()(x)[0], want)
    with pytest.raises(rnnc.ShapeError, match="mixes numbers and rows") as err:
        rnnc.parse("cell c(x: [2]) -> (y: [2]) {\n    y = [[1, 2], 3] @ x\n}")
    assert (err.value.loc.line, err.value.loc.column) == (2, 9)
    assert err.value.hint


CONCAT_OUTPUTS = {
    "brief": "cell c(x: [2]) -> (y: [4]) { state c: [2] = 0\n c = c + x\n y = concat(c, x) }",
    "nonlinear": "cell c(x: [2]) -> (y: [4]) { state c: [2] = 0\n c = tanh(c) + x\n y = concat(c, x) }",
    "nested": "cell c(x: [2]) -> (y: [7]) { state c: [2] = 0\n c = tanh(c) + x\n"
              "y = concat(concat(c, x * c), concat(sum(c)[None], c)) }",
    "axis1": "cell c(x: [2]) -> (y: [2, 3]) { state c: [2] = 0\n c = tanh(c) + x\n"
             "y = concat(c[:, None], x[:, None], (c * x)[:, None], axis=1) }",
}


@pytest.mark.parametrize("name", sorted(CONCAT_OUTPUTS))
def test_a_concat_output_runs_in_the_recurrent_kernel(name):
    """Bug: the fused recurrent kernel refused an output `concat(c, x)` of a state and a per-step
    value, saying "a slice across the parts of a concat" in a cell with no slice; an output concat
    is now stored part by part, and matches the loop (values, final state, gradients)."""
    src = CONCAT_OUTPUTS[name]
    assert "triton" in rnnc.backends_for(src)
    x = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    results = []
    for backend in ("loop", "triton"):
        y, final = rnnc.build(src, backend=backend).double()(x)
        weights = torch.arange(math.prod(y.shape[2:]), dtype=torch.float64).reshape(y.shape[2:])
        (grad,) = torch.autograd.grad((y * weights).sum() + final["c"].sum(), x)
        results.append((y, final["c"], grad))
    for want, got in zip(*results):
        torch.testing.assert_close(got, want)


def test_a_concat_used_whole_in_the_step_is_refused_with_the_reason():
    """Bug (same): the refusal of a concat the kernel cannot take apart named a slice; it now says
    that the concat is used whole, and a real slice across a concat's parts is still named so."""
    whole = "cell c(x: [2]) -> (y: [4]) { state h: [2] = 0\n h = tanh(x + h)\n y = tanh(concat(h, x)) }"
    with pytest.raises(rnnc.BuildError, match=r"a concat \(line 3\) used whole inside the step") as err:
        rnnc.build(whole, backend="triton")
    assert "slice" not in str(err.value).split("used whole")[0]
    sliced = "cell c(x: [2]) -> (y: [2]) { state h: [2] = 0\n h = tanh(x + h)\n y = concat(x, h)[1:3] }"
    with pytest.raises(rnnc.BuildError, match=r"a slice across the parts of a concat \(line 3\)"):
        rnnc.build(sliced, backend="triton")


REGROUPED_SUM = """cell regrouped(x: [D]) -> (h: [D]) {
    param b: [D] = 0
    state c: [D] = 0
    let f = x + c + b
    c = (1 - f) * x
    h = c
}"""


def test_the_generated_backward_of_a_regrouped_sum():
    """Bug: `x + c + b` (input + state + param) is regrouped so the hoisted x + b is a node added
    after the sum that reads it; autodiff's compaction re-added the forward nodes in id order and
    failed with an IndexError, so the loop backend could not build such a cell (SRU's gates)."""
    torch.manual_seed(0)
    generated = rnnc.build(REGROUPED_SUM, backend="loop", D=3, dtype=torch.float64)
    reference = rnnc.build(REGROUPED_SUM, backend="loop", D=3, dtype=torch.float64, backward="autograd")
    with torch.no_grad():
        generated.b.normal_()
    reference.load_state_dict(generated.state_dict())
    x = (0.5 * torch.randn(2, 6, 3, dtype=torch.float64)).requires_grad_()
    grads = []
    for cell in (generated, reference):
        h, _ = cell(x)
        grads.append(torch.autograd.grad(h.sin().sum(), [x, cell.b]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


LAYERED_MATMUL = """cell layered(x: [D]) -> (h: [D]) {
    param W: [D, D] ~ uniform(-1, 1)
    state p: [D] = 0
    state c: [D] = 0
    c = sigmoid(W @ p) * c + x
    p = x
    h = c
}"""


def test_a_param_matmul_of_an_earlier_state_on_the_scan():
    """Bug: on the scan backend a param matrix times an earlier layered state (QRNN's convolution
    tap W x_{t-1}, with x_{t-1} carried as a state) was rendered as the loop's per-step
    `lin_W(...)` weight wrapper, which only the loop defines: the module failed to build."""
    torch.manual_seed(0)
    loop = rnnc.build(LAYERED_MATMUL, backend="loop", D=3, dtype=torch.float64)
    scan = rnnc.build(LAYERED_MATMUL, backend="scan", D=3, dtype=torch.float64)
    scan.load_state_dict(loop.state_dict())
    x = torch.randn(2, 70, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for cell in (loop, scan):
        h, final = cell(x)
        results.append((h, final["c"], *torch.autograd.grad(h.sin().sum() + final["p"].sum(), [x, cell.W])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
