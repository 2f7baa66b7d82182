"""Associative combines: the library's folds against independent references, the associativity
check (sympy proof, randomized check, rejection with a counterexample), and the language's errors."""
import pytest
import torch

import rnnc

BACKENDS = ["loop", "scan"]
FOLDS = BACKENDS + ["triton"]  # elementwise combines with alike components also fuse into a Triton kernel


def _grad(y, xs):
    w = torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y)
    return torch.autograd.grad((y * w).sum(), xs)


@pytest.mark.parametrize("backend", FOLDS)
@pytest.mark.parametrize("T", [1, 2, 7, 64, 65])
def test_running_max_is_cummax(backend, T):
    cell = rnnc.build("running_max", backend=backend, D=5)
    x = torch.randn(3, T, 5, dtype=torch.float64, requires_grad=True)
    y, final = cell(x)
    ref = torch.cummax(x, dim=1).values
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(final["m"], ref[:, -1])
    torch.testing.assert_close(_grad(y, [x])[0], _grad(ref, [x])[0])


@pytest.mark.parametrize("backend", FOLDS)
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_running_logsumexp_is_logcumsumexp(backend, scale):
    cell = rnnc.build("running_logsumexp", backend=backend, D=4)
    x = (scale * torch.randn(2, 65, 4, dtype=torch.float64)).requires_grad_()
    y, _ = cell(x)
    ref = torch.logcumsumexp(x, dim=1)
    torch.testing.assert_close(y, ref)
    g, g_ref = _grad(y, [x])[0], _grad(ref, [x])[0]
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, g_ref)


def _logcumsumexp_grad(x, w):
    """d/dx of sum(w * logcumsumexp(x, dim=1)) in float64: sum over t >= i of w_t * softmax weight
    exp(x_i - y_t), which is 0 for a masked x_i = -inf (torch's own gradient is NaN there)."""
    y = torch.logcumsumexp(x, dim=1)
    T = x.shape[1]
    weight = torch.exp(x[:, :, None] - y[:, None, :]).nan_to_num(0.0)  # [B, i, t]; -inf - -inf -> 0
    causal = torch.ones(T, T, dtype=torch.bool).triu()  # t >= i
    return (weight * causal[None, :, :, None] * w[:, None, :]).sum(2)


@pytest.mark.parametrize("backend", FOLDS)
@pytest.mark.parametrize("T", [3, 65])
def test_running_logsumexp_with_masked_steps(backend, T):
    """Masked logits (-inf) at the start, in the middle and everywhere: logaddexp(-inf, -inf) is
    -inf, not NaN, so the sequence goes on as torch.logcumsumexp's (-inf, 0, 1.31 for -inf, 0, 1),
    and the masked steps get a zero gradient, never NaN (issue 10, item 6)."""
    cell = rnnc.build("running_logsumexp", backend=backend, D=4)
    x = torch.randn(3, T, 4, dtype=torch.float64)
    x[:, 0, 0] = x[:, :, 1] = -torch.inf           # a masked first step; a column masked throughout
    x[:, : T // 2, 2] = x[:, T // 3, 3] = -torch.inf  # a masked first half; one masked step mid-sequence
    x[:, :3, 0] = torch.tensor([-torch.inf, 0.0, 1.0], dtype=torch.float64)
    x.requires_grad_()
    y, final = cell(x)
    ref = torch.logcumsumexp(x, dim=1)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(y[0, :3, 0], torch.tensor([-torch.inf, 0.0, 1.3132616875182228], dtype=torch.float64))
    torch.testing.assert_close(final["l"], ref[:, -1])
    w = torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y)
    g = torch.autograd.grad((y * w).sum(), x)[0]
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, _logcumsumexp_grad(x.detach(), w))
    assert (g[x.detach() == -torch.inf] == 0).all()


def _softmax_attention(x, q, wk, wv):
    """Aaren's output written as plain causal softmax attention with one learned query."""
    s = (x @ wk.T) @ q  # [B, T]
    T = x.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    att = torch.softmax(s[:, None, :].expand(-1, T, -1).masked_fill(~mask, -torch.inf), dim=-1)
    return att @ (x @ wv.T)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,scale", [(1, 1.0), (33, 1.0), (65, 30.0)])
def test_aaren_is_softmax_attention_over_the_prefix(backend, T, scale):
    cell = rnnc.build("aaren", backend=backend, D=4, dtype=torch.float64)
    x = (scale * torch.randn(2, T, 4, dtype=torch.float64)).requires_grad_()
    y, _ = cell(x)
    ref = _softmax_attention(x, cell.q, cell.weight_k, cell.weight_v)
    torch.testing.assert_close(y, ref)
    params = [cell.q, cell.weight_k, cell.weight_v]
    for a, b in zip(_grad(y, [x] + params), _grad(ref, [x] + params)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


def test_scan_carries_state_like_the_loop():
    cell = rnnc.build("aaren", backend="scan", D=3, dtype=torch.float64)
    x = torch.randn(2, 20, 3, dtype=torch.float64)
    y, final = cell(x)
    y1, mid = cell(x[:, :9])
    y2, end = cell(x[:, 9:], state=mid)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    for k in final:
        torch.testing.assert_close(end[k], final[k])


def test_analysis_reports_the_class_the_proof_and_the_scan():
    d = rnnc.analyze("aaren").to_dict()
    for name in ("m", "u", "w"):
        info = d["states"][name]
        assert info["class"] == "associative"
        assert info["combine"] == "softmax_merge" and info["group"] == ["m", "u", "w"]
        assert info["verified"] == "sympy proof"
    assert d["backend"] == "scan"
    assert "softmax_merge" in rnnc.analyze("aaren").summary()
    source = rnnc.compile("aaren", backend="scan")
    assert "def combine_softmax_merge(" in source and "_fold_scan(" in source


ARGMAX_NORM = """
combine larger(a, b) identity 0 = where(sum(a * a) >= sum(b * b), a, b)
cell keep_largest(x: [D]) -> (y: [D]) {
    state m: [D] = 0
    m = larger(m, x)
    y = m
}
"""


def test_a_combine_sympy_cannot_read_is_checked_on_random_operands():
    info = rnnc.analyze(ARGMAX_NORM).to_dict()["states"]["m"]
    assert info["class"] == "associative"
    assert info["verified"].startswith("randomized check")
    x = torch.randn(2, 30, 3, dtype=torch.float64)
    y_loop, _ = rnnc.build(ARGMAX_NORM, backend="loop", D=3)(x)
    y_scan, _ = rnnc.build(ARGMAX_NORM, backend="scan", D=3)(x)
    torch.testing.assert_close(y_scan, y_loop)
    norms = (x * x).sum(-1)
    best = torch.cummax(norms, dim=1).indices
    torch.testing.assert_close(y_loop, torch.gather(x, 1, best[..., None].expand_as(x)))


NOT_ASSOCIATIVE = """
combine diff(a, b) identity 0 = a - b
cell c(x: [D]) -> (y: [D]) {
    state m: [D] = 0
    m = diff(m, x)
    y = m
}
"""


def test_a_non_associative_combine_is_rejected_with_a_counterexample():
    with pytest.raises(rnnc.RnncError) as info:
        rnnc.build(NOT_ASSOCIATIVE, D=2)
    e = info.value
    assert e.line == 2 and e.column == 9
    assert "not associative" in e.message and "f(f(a, b), c)" in e.message


def test_a_false_identity_is_rejected():
    spec = NOT_ASSOCIATIVE.replace("identity 0 = a - b", "identity 1 = a + b")
    with pytest.raises(rnnc.RnncError, match="identity that is not one"):
        rnnc.analyze(spec)


def test_cli_check_reports_a_non_associative_combine(tmp_path, capsys):
    from rnnc.cli import main

    path = tmp_path / "bad.rnn"
    path.write_text(NOT_ASSOCIATIVE)
    assert main(["analyze", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:2:9" in err and "not associative" in err and "Traceback" not in err


def test_a_fold_whose_operand_reads_a_state_stays_on_the_loop():
    spec = """
    combine mx(a, b) identity -inf = maximum(a, b)
    cell c(x: [D]) -> (y: [D]) {
        state m: [D] = -inf
        state n: [D] = 0
        m = mx(m, x + n)
        n = x
        y = m
    }
    """
    info = rnnc.analyze(spec).to_dict()["states"]["m"]
    assert info["class"] == "nonlinear" and "reads state n" in info["why"]
    with pytest.raises(rnnc.BuildError, match="state 'm' is nonlinear"):
        rnnc.build(spec, backend="scan", D=2)


@pytest.mark.parametrize("body,message", [
    ("m = mx(m)", "takes two operands"),
    ("m = mx((m, m), (x, x))", "takes operands of 1 value"),
    ("let z = (x, x)\n m = mx(m, x)", "only an operand of a combine"),
    ("m, n = mx(m, x)", "cannot assign 1 value to 2 names"),
])
def test_combine_misuse_is_a_located_error(body, message):
    spec = f"""combine mx(a, b) identity -inf = maximum(a, b)
cell c(x: [D]) -> (y: [D]) {{
    state m: [D] = -inf
    state n: [D] = 0
    {body}
    n = x
    y = m
}}"""
    with pytest.raises(rnnc.RnncError, match=message) as info:
        rnnc.analyze(spec)
    assert info.value.line is not None


def test_identity_must_be_constant_and_have_one_value_per_component():
    spec = """combine mx(a, b) identity IDENT = maximum(a, b)
cell c(x: [D]) -> (y: [D]) {
    state m: [D] = -inf
    m = mx(m, x)
    y = m
}"""
    with pytest.raises(rnnc.RnncError, match="identity of combine 'mx' has 2 values"):
        rnnc.analyze(spec.replace("IDENT", "(0, 1)"))
    with pytest.raises(rnnc.RnncError, match="unknown name 'a'"):
        rnnc.analyze(spec.replace("IDENT", "a"))


def test_a_def_returning_several_values_assigns_several_targets():
    spec = """def pair(x) { return x, 2 * x }
cell c(x: [D]) -> (y: [D], z: [D]) {
    y, z = pair(x)
}"""
    x = torch.randn(1, 3, 2)
    (y, z), _ = rnnc.build(spec, D=2)(x)
    torch.testing.assert_close(z, 2 * y)
