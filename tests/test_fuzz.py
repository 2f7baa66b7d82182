"""Property-based robustness: whatever text rnnc is given, it reports an RnncError or works.

Text from several sources feeds the whole check pipeline (parse, analyse every cell, build
the first cell with every dim = 3, run it forward on a [2, 3, ...] input, backward through it):

  (a) random characters and random soups of the language's tokens;
  (b) valid programs (the spec library, globbed at test time, plus a few embedded here)
      mutated by deletions, insertions, duplications and swaps of characters, tokens and lines;
  (c) the same programs with edits that mostly keep them parseable (renamed values, swapped
      operators, wrapped calls, added indexing) to reach the type checker and the backends;
  (d) minimal programs that once crashed (test_regressions).

The pipeline must either succeed or raise an `rnnc.RnncError`; an `InternalError` (a compiler
bug) or any other exception type (a Python TypeError, a torch RuntimeError, RecursionError ...)
fails the test. Hypothesis is derandomized so CI runs are deterministic.
"""
from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rnnc
from rnnc import ast as A
from rnnc.errors import InternalError, RnncError
from rnnc.parser import parse_module

SPECS_DIR = Path(__file__).resolve().parent.parent / "specs"

EMBEDDED = [
    """\
# an accumulator with a decay
cell decay(x: [H], a: [H]) -> (y: [H]) {
    state h: [H] = 0
    h = sigmoid(a) * h + (1 - sigmoid(a)) * x
    y = h
}
""",
    """\
def softsign(v) = v / (1 + abs(v))
def gates(a, b) {
    let s = a + b
    return sigmoid(s), tanh(s)
}
cell mini(x: [I]) -> (y: [H]) {
    param W: [2*H, I] ~ uniform(-1/sqrt(I), 1/sqrt(I))
    param b: [2*H] = 0
    state h: [H] = 0
    let z, g = split(W @ x + b, 2)
    let p, q = gates(z, g)
    h = p * h + (1 - p) * softsign(q)
    y = h
}
""",
    """\
cell linattn(q: [K], k: [K], v: [V], g: [K]) -> (o: [V]) {
    state S: [K, V] = 0
    S = exp(g)[:, None] * S + outer(k, v)
    o = q @ S
}
""",
    """\
cell lsrl(x: [2]) -> (y: [2]) {
    dim N = 2
    state m: [2] = 0
    let a = relu([[1, 0], [0, -1]] @ x + [0, 1])
    m = maximum(m, concat(a[0:1], a[1:2]))
    y = where(m > 1, m, 0) + sum(x) / N * ones(2)
}
""",
]

# Building blocks for insertions and token soups.
TOKENS = [
    "cell", "def", "param", "state", "let", "dim", "import", "return", "and", "or", "not",
    "None", "lambda", "x", "h", "y", "S", "H", "I", "K", "N", "W", "a", "b", "tmp",
    "sigmoid", "tanh", "exp", "log", "relu", "split", "concat", "outer", "sum", "where",
    "softmax", "transpose", "eye", "zeros", "arange", "maximum", "clamp", "f", "gates",
    "0", "1", "2", "3", "0.5", "1e-3", "-1", '"x.rnn"', "prelude",
    "+", "-", "*", "/", "//", "%", "@", "**", "<", "<=", ">", ">=", "==", "!=",
    "(", ")", "[", "]", "{", "}", ",", ":", ";", "=", "~", "->", "...", "\n", " ", "axis=0",
    "[H]", "[H, H]", "[K, V]", "[]", "x[0]", "x[:, None]", "x[1:2]", "x[..., 0]",
]
# No digits: inserted digits could glue onto numbers and ask for enormous tensors.
CHARS = " \n\t()[]{},:;=~+-*/@%<>!.#\"'_abcxyzHIKNVSW$`\\"

MAX_INT = 64        # skip build/forward when the text mentions a larger integer
MAX_ELEMS = 1 << 16  # ... or declares a param/state/input this large at dims=3


def corpus() -> list[str]:
    texts = [p.read_text() for p in sorted(SPECS_DIR.glob("*.rnn"))]
    return texts + EMBEDDED


CORPUS = corpus()
# Mutations aim at code: spec headers are long comments where most edits would be no-ops.
CODE_CORPUS = [re.sub(r"(?m)^\s*#[^\n]*\n|#[^\n]*", "", t) for t in CORPUS]


# ---- the pipeline under test -------------------------------------------------------------

def _dim_env(cell: A.Cell) -> dict[str, int] | None:
    """Bind every dim name the cell mentions to 3 (dims with a compound default keep it)."""
    names: set[str] = set()
    compound: set[str] = set()

    def walk(d):
        if isinstance(d, A.DimName):
            names.add(d.name)
        elif isinstance(d, A.DimBin):
            walk(d.left)
            walk(d.right)

    for port in cell.inputs + cell.outputs:
        for d in port.shape:
            walk(d)
    for stmt in cell.body:
        if isinstance(stmt, (A.ParamDecl, A.StateDecl)):
            for d in stmt.shape:
                walk(d)
        elif isinstance(stmt, A.DimDecl):
            names.add(stmt.name)
            if stmt.default is not None and not isinstance(stmt.default, A.DimNum):
                compound.add(stmt.name)
    reserved = {n for n, p in inspect.signature(rnnc.build).parameters.items()
                if p.kind is not inspect.Parameter.VAR_KEYWORD}
    if (names - compound) & reserved:
        return None  # a "dim" named like a build() argument: cannot be passed as a keyword
    return {n: 3 for n in names - compound}


def _eval_dim(d, env):
    if isinstance(d, A.DimNum):
        return d.value
    if isinstance(d, A.DimName):
        return env[d.name]
    left, right = _eval_dim(d.left, env), _eval_dim(d.right, env)
    if d.op == "+":
        return left + right
    if d.op == "-":
        return left - right
    if d.op == "*":
        return left * right
    return left // right


def _shape(dims, env):
    try:
        shape = [_eval_dim(d, env) for d in dims]
    except (KeyError, ZeroDivisionError):
        return None
    if any(s <= 0 for s in shape) or math.prod(shape) > MAX_ELEMS:
        return None
    return shape


def pipeline(text: str) -> None:
    """parse → analyse every cell → build the first cell (dims=3) → forward on [2, 3, ...]."""
    prog = rnnc.parse(text, filename="fuzz.rnn")
    names = list(prog.cells)
    for name in names:
        rnnc.analyze(prog, cell=name)
    if not names:
        return
    code = re.sub(r"#[^\n]*", "", text)  # comments hold arXiv ids, not sizes
    if any(int(m) > MAX_INT for m in re.findall(r"\d+", code)):
        return  # legal, but might ask for huge tensors; the front end was exercised above
    module_ast = parse_module(text, "fuzz.rnn")
    cell_ast = next((c for c in module_ast.cells if c.name == names[0]), None)
    if cell_ast is None:
        return
    env = _dim_env(cell_ast)
    if env is None:
        return
    shapes = {}
    for stmt in cell_ast.body:
        if isinstance(stmt, (A.ParamDecl, A.StateDecl)) and _shape(stmt.shape, env) is None:
            return
    for port in cell_ast.inputs:
        shape = _shape(port.shape, env)
        if shape is None:
            return
        shapes[port.name] = shape
    module = rnnc.build(prog, cell=names[0], backend="loop", **env)
    inputs = [torch.randn(2, 3, *shapes[p.name], requires_grad=True) for p in cell_ast.inputs]
    out = module(*inputs)
    assert isinstance(out, tuple) and len(out) == 2, type(out)
    ys, final = out
    assert isinstance(final, dict)
    ys = ys if isinstance(ys, tuple) else (ys,)
    assert all(isinstance(y, torch.Tensor) and tuple(y.shape[:2]) == (2, 3) for y in ys)
    # Backward through whatever depends on the inputs or params (autograd must not break).
    total = sum(y.float().sum() for y in ys if y.requires_grad)
    if isinstance(total, torch.Tensor):
        total.backward()


def run_checked(text: str) -> None:
    try:
        pipeline(text)
    except InternalError as err:
        raise AssertionError(f"InternalError (compiler bug) on:\n{text}\n---\n{err}") from err
    except RnncError as err:
        # A reported error must be printable and point somewhere sensible when located.
        rendered = str(err)
        assert rendered
        if err.loc is not None:
            assert err.line is None or err.line >= 1, rendered
            assert err.column is None or err.column >= 1, rendered


# ---- strategies ---------------------------------------------------------------------------

token_soup = st.lists(st.sampled_from(TOKENS), max_size=40).map(" ".join)
random_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=120)
structured_soup = st.tuples(
    st.sampled_from(["cell c(x: [H]) -> (y: [H]) {\n", "def f(a) = ", "cell c() -> () {\n", ""]),
    token_soup,
    st.sampled_from(["\n}\n", "", "\n"]),
).map("".join)

_TOKEN_RE = re.compile(r"\s+|[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|->|//|\*\*|[<>=!]=|\.\.\.|\S")


@st.composite
def mutated(draw):
    text = draw(st.sampled_from(CODE_CORPUS))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from([
            "del_chars", "ins_char", "ins_token", "del_token", "dup_token", "swap_tokens",
            "replace_name", "del_line", "dup_line", "swap_lines",
        ]))
        if kind in ("del_line", "dup_line", "swap_lines"):
            lines = text.split("\n")
            i = draw(st.integers(0, len(lines) - 1))
            if kind == "del_line":
                del lines[i]
            elif kind == "dup_line":
                lines.insert(i, lines[i])
            else:
                j = draw(st.integers(0, len(lines) - 1))
                lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
        elif kind in ("del_chars", "ins_char"):
            pos = draw(st.integers(0, len(text)))
            if kind == "del_chars":
                text = text[:pos] + text[pos + draw(st.integers(1, 8)):]
            else:
                text = text[:pos] + draw(st.sampled_from(CHARS)) + text[pos:]
        else:
            toks = _TOKEN_RE.findall(text)
            if not toks:
                continue
            i = draw(st.integers(0, len(toks) - 1))
            if kind == "ins_token":
                toks.insert(i, " " + draw(st.sampled_from(TOKENS)) + " ")
            elif kind == "del_token":
                del toks[i]
            elif kind == "dup_token":
                toks.insert(i, toks[i])
            elif kind == "swap_tokens":
                j = draw(st.integers(0, len(toks) - 1))
                toks[i], toks[j] = toks[j], toks[i]
            else:  # replace a name with another name from the same program (semantic errors)
                idents = sorted({t for t in toks if re.fullmatch(r"[A-Za-z_]\w*", t)})
                if idents and re.fullmatch(r"[A-Za-z_]\w*", toks[i]):
                    toks[i] = draw(st.sampled_from(idents))
            text = "".join(toks)
    return text


_IDENT = re.compile(r"[A-Za-z_]\w*")
_KEYWORDS = {"cell", "def", "param", "state", "let", "dim", "import", "return", "and", "or", "not",
             "None", "uniform", "normal"}
BUILTIN_POOL = ["sigmoid", "tanh", "exp", "log", "relu", "softplus", "silu", "abs", "sum", "mean",
                "max", "logsumexp", "outer", "transpose", "softmax", "normalize", "concat", "split",
                "where", "maximum", "minimum", "clamp", "eye", "zeros", "ones", "arange", "sqrt"]
BINOPS = ["+", "-", "*", "/", "//", "%", "@", "**", "<", ">", "==", "and", "or"]
SUFFIXES = ["[0]", "[-1]", "[:, None]", "[None]", "[1:2]", "[..., 0]", "[0, 0]", "[:]"]


@st.composite
def semantic_mutated(draw):
    """Edits that mostly keep the text parseable, to exercise the type checker and backends."""
    text = draw(st.sampled_from(CODE_CORPUS))
    for _ in range(draw(st.integers(1, 3))):
        toks = _TOKEN_RE.findall(text)
        idx_names = [i for i, t in enumerate(toks) if _IDENT.fullmatch(t) and t not in _KEYWORDS]
        idx_ops = [i for i, t in enumerate(toks) if t in BINOPS]
        idx_nums = [i for i, t in enumerate(toks) if re.fullmatch(r"\d+(\.\d*)?", t)]
        kind = draw(st.sampled_from(["rename", "rename", "op", "number", "wrap", "suffix",
                                     "del_line", "dup_line", "swap_lines"]))
        if kind in ("del_line", "dup_line", "swap_lines"):
            lines = text.split("\n")
            i = draw(st.integers(0, len(lines) - 1))
            if kind == "del_line":
                del lines[i]
            elif kind == "dup_line":
                lines.insert(i, lines[i])
            else:
                j = draw(st.integers(0, len(lines) - 1))
                lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
            continue
        if kind == "op" and idx_ops:
            toks[draw(st.sampled_from(idx_ops))] = " " + draw(st.sampled_from(BINOPS)) + " "
        elif kind == "number" and idx_nums:
            toks[draw(st.sampled_from(idx_nums))] = draw(st.sampled_from(["0", "1", "2", "3", "4", "0.5"]))
        elif idx_names:
            i = draw(st.sampled_from(idx_names))
            names = sorted({toks[j] for j in idx_names})
            if kind == "rename":
                toks[i] = draw(st.sampled_from(names + BUILTIN_POOL[:6]))
            elif kind == "wrap":
                fn = draw(st.sampled_from(BUILTIN_POOL))
                extra = draw(st.sampled_from(["", ", " + draw(st.sampled_from(names)), ", 2",
                                              ", axis=0", ", axis=-1"]))
                toks[i] = f"{fn}({toks[i]}{extra})"
            else:
                toks[i] = toks[i] + draw(st.sampled_from(SUFFIXES))
        text = "".join(toks)
    return text


SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])


# ---- the properties -----------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("private_cache")


def test_corpus_programs_pass_the_pipeline():
    """The unmutated programs are valid: the mutation test starts from working programs."""
    for text in CORPUS:
        pipeline(text)


@pytest.mark.timeout(120)
@settings(max_examples=100, **SETTINGS)
@given(random_text)
def test_random_text(text):
    run_checked(text)


@pytest.mark.timeout(120)
@settings(max_examples=100, **SETTINGS)
@given(st.one_of(token_soup, structured_soup))
def test_token_soup(text):
    run_checked(text)


@pytest.mark.timeout(180)
@settings(max_examples=300, **SETTINGS)
@given(mutated())
def test_mutated_valid_programs(text):
    run_checked(text)


@pytest.mark.timeout(180)
@settings(max_examples=500, **SETTINGS)
@given(semantic_mutated())
def test_semantically_mutated_programs(text):
    run_checked(text)


# ---- regressions: minimal programs the fuzzer (or its authors) found crashing ------------
# Each must go through the pipeline (build, forward, backward) or raise an RnncError.

REGRESSIONS = {
    # x // y has no autograd formula in torch: backward raised a RuntimeError.
    "floordiv-backward": "cell c(x: [H]) -> (y: [H]) {\n    y = x // 2 + x\n}\n",
    # a % b with b depending on the input: torch has no derivative of remainder w.r.t. b.
    "remainder-backward": "cell c(x: [H]) -> (y: [H]) {\n    y = 1 % sigmoid(x)\n}\n",
    # one part of a split unused: generated `v_b, = torch.split(...)` raised ValueError.
    "split-part-unused": "cell c(x: [2*H]) -> (y: [H]) {\n    let a, b = split(x, 2)\n    y = b\n}\n",
    "split-part-unused-in-loop": "cell c(x: [2*H]) -> (y: [H]) {\n    state s: [H] = 0\n"
                                 "    let a, b = split(x + concat(s, s), 2)\n    s = b\n    y = s\n}\n",
    # elementwise builtins in constant initialisers: KeyError in the expression printer.
    **{f"{fn}-in-initialiser": f"cell c(x: [H]) -> (y: [H]) {{\n    param w: [H] = {fn}(2)\n"
                               f"    param v: [H] ~ uniform(-1, 1 + {fn}(0.5))\n    y = w * x + v\n}}\n"
       for fn in ["sigmoid", "relu", "softplus", "silu", "gelu", "elu", "logsigmoid", "rsqrt", "sign",
                  "tanh", "exp", "log", "sqrt", "abs"]},
    # scalar (per-step) states: generated code called .expand on a Python number.
    "scalar-state": "cell c(x: []) -> (y: []) {\n    state s: [] = 0\n    s = s + x\n    y = s\n}\n",
    "scalar-state-float-init": "cell c(x: [H]) -> (y: []) {\n    state s: [] = 1.5\n    s = s + sum(x)\n"
                               "    y = s\n}\n",
    # a cell with no outputs: the generated module was not valid Python (SyntaxError on import).
    "no-outputs": "cell c(x: [H]) -> () {\n    state s: [H] = 0\n    s = s + x\n}\n",
}


@pytest.mark.parametrize("text", list(REGRESSIONS.values()), ids=list(REGRESSIONS))
def test_regressions(text):
    run_checked(text)
