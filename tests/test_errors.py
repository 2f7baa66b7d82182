"""Every malformed program (or bad call) is reported as an `rnnc.RnncError` of the right kind.

Each error must carry the file, line and column of the offending token, a caret excerpt of
that line and a non-empty hint, so `rnnc check` can print `file:line:col: error: ...` and
never a Python traceback. An `InternalError` (a compiler bug) or any other exception type
escaping is a failure of these tests.

Type errors may surface at `rnnc.parse` (eager elaboration) or at `rnnc.analyze` (lazy, per
cell); `check()` accepts either by parsing and then analysing every cell.
"""
from __future__ import annotations

import os
import re
import textwrap

import pytest

import rnnc
from rnnc.errors import (
    ArityError,
    BuildError,
    DimError,
    InternalError,
    RnncError,
    RnncSyntaxError,
    ShapeError,
    SpecNotFoundError,
    StateError,
    TypeError_,
    UnknownNameError,
    UnsupportedError,
)

FILE = "t.rnn"


# ---- helpers -----------------------------------------------------------------------------

def src(text: str) -> str:
    """Dedent a triple-quoted program so that its first line is line 1."""
    return textwrap.dedent(text).lstrip("\n")


def check(text: str, filename: str = FILE):
    """Parse, then analyse every cell (errors may come from either step)."""
    prog = rnnc.parse(text, filename=filename)
    for name in list(prog.cells):
        rnnc.analyze(prog, cell=name)
    return prog


def col_of(text: str, line: int, needle: str, nth: int = 0) -> int:
    """1-based column of the `nth` occurrence of `needle` on `line` (1-based) of `text`."""
    row = text.splitlines()[line - 1]
    pos = -1
    for _ in range(nth + 1):
        pos = row.index(needle, pos + 1)
    return pos + 1


def span_of(text: str, line: int, needle: str) -> tuple[int, int]:
    """1-based inclusive column range covered by `needle` on `line`."""
    start = col_of(text, line, needle)
    return start, start + len(needle) - 1


def squash(s: str) -> str:
    return re.sub(r"\s+", "", s)


def assert_reported(err: BaseException, cls, *, file: str | None = FILE, line=None, column=None,
                    contains=(), words=(), hint: bool = True, located: bool = True) -> RnncError:
    """The common contract of a reported error.

    `cls` may be a class or a tuple of acceptable classes. `column` may be an int (exact) or an
    inclusive (lo, hi) range. `contains` are substrings of the message compared with all
    whitespace removed (so `[H, H]` matches `[H,H]`); `words` must appear as whole words.
    """
    assert isinstance(err, RnncError), f"{type(err).__name__} escaped instead of an RnncError: {err!r}"
    assert not isinstance(err, InternalError), f"compiler bug reported as InternalError: {err}"
    assert isinstance(err, cls), f"expected {cls}, got {type(err).__name__}: {err}"
    message = str(err.message if hasattr(err, "message") else err)
    for piece in contains:
        assert squash(piece) in squash(message), f"{piece!r} not in message {message!r}"
    for word in words:
        assert re.search(rf"(?<![A-Za-z0-9_]){re.escape(word)}(?![A-Za-z0-9_])", message), \
            f"{word!r} not named in message {message!r}"
    if hint:
        assert isinstance(err.hint, str) and err.hint.strip(), f"empty hint on {type(err).__name__}: {err}"
    if located:
        assert err.loc is not None, f"no location on {type(err).__name__}: {err}"
        if file is not None:
            assert err.file is not None and str(err.file).endswith(file), (err.file, file)
        if line is not None:
            assert err.line == line, f"line {err.line} != {line}: {err}"
        if column is not None:
            if isinstance(column, tuple):
                lo, hi = column
                assert lo <= err.column <= hi, f"column {err.column} not in [{lo}, {hi}]: {err}"
            else:
                assert err.column == column, f"column {err.column} != {column}: {err}"
        excerpt = err.excerpt()
        assert excerpt, f"no excerpt: {err}"
        rows = excerpt.splitlines()
        assert len(rows) >= 2 and re.fullmatch(r"\^~*", rows[-1].strip()), excerpt
        # The underline starts under the reported column of the quoted source line.
        assert rows[-1].index("^") == 4 + err.column - 1, excerpt
        rendered = str(err)
        assert f":{err.line}:{err.column}:" in rendered and "error" in rendered
    return err


def expect(text: str, cls, *, filename: str = FILE, **kw) -> RnncError:
    """`check(text)` must raise an RnncError of class `cls`; see assert_reported for `kw`."""
    try:
        check(text, filename)
    except RnncError as err:  # any other exception type propagates and fails the test
        return assert_reported(err, cls, file=kw.pop("file", os.path.basename(filename)), **kw)
    pytest.fail(f"no error raised for:\n{text}")


def build_err(spec, cls, **dims) -> RnncError:
    try:
        rnnc.build(spec, backend="loop", **dims)
    except RnncError as err:
        return assert_reported(err, cls, located=False)
    pytest.fail(f"no error raised by build({dims})")


# ---- controls: the valid neighbours of the malformed programs below are accepted ---------

VALID = [
    src("""
        cell acc(x: [H]) -> (y: [H]) {
            state h: [H] = 0
            h = h + x
            y = h
        }
        """),
    src("""
        def f(a, b) = a + b
        def two(a) {
            let s = sigmoid(a)
            return s, 1 - s
        }
        cell c(x: [I]) -> (y: [H]) {
            param W: [H, I] ~ uniform(-1/sqrt(I), 1/sqrt(I))
            param b: [H] = 0
            state h: [H] = 0
            let p, q = two(W @ x + b)
            h = f(p * h, q * tanh(W @ x))
            y = where(h > 0, h, 0)
        }
        """),
    src("""
        cell splitter(x: [6]) -> (y: [2]) {
            state s: [2] = 0
            let a, b, c = split(x, 3)
            s = maximum(s, a + b - c)
            y = s
        }
        """),
]


@pytest.mark.parametrize("text", VALID, ids=["acc", "defs", "split"])
def test_valid_controls_check_and_build(text):
    prog = check(text)
    assert prog.cells
    name = next(iter(prog.cells))
    dims = {k: v for k, v in {"H": 4, "I": 3}.items() if k in prog.cells[name].dims}
    module = rnnc.build(prog, cell=name, backend="loop", **dims)
    import torch

    shapes = {"acc": {"x": (4,)}, "c": {"x": (3,)}, "splitter": {"x": (6,)}}[name]
    args = [torch.randn(2, 5, *s) for s in shapes.values()]
    y, final = module(*args)
    assert y.shape[:2] == (2, 5)
    assert isinstance(final, dict)


# ---- syntax ------------------------------------------------------------------------------

def test_missing_closing_brace():
    text = src("""
        cell c(x: [H]) -> (y: [H]) {
            y = x
        """)
    err = expect(text, RnncSyntaxError, line=2, contains=["end of file"])
    assert "}" in err.hint


def test_unexpected_eof_in_expression():
    text = "cell c(x: [H]) -> (y: [H]) {\n    y = (x"
    err = expect(text, RnncSyntaxError, line=2, contains=["end of file"])
    assert ")" in err.hint


def test_bad_character():
    text = src("""
        cell c(x: [H]) -> (y: [H]) {
            y = x $ 2
        }
        """)
    expect(text, RnncSyntaxError, line=2, column=col_of(text, 2, "$"), contains=["'$'"])


def test_unexpected_token_points_at_it():
    text = src("""
        cell c(x: [H]) -> (y: [H]) {
            y = x ) + 1
        }
        """)
    err = expect(text, RnncSyntaxError, line=2, column=col_of(text, 2, ")"), contains=["')'"])
    assert "'rpar'" not in str(err).lower()


def test_missing_operand_at_end_of_line_is_reported_there():
    """`y = x +` then `}`: the operand missing after '+' (end of line 2), not an unexpected '}' on line 3."""
    text = src("""
        cell c(x: [H]) -> (y: [H]) {
            y = x +
        }
        """)
    err = expect(text, RnncSyntaxError, line=2, column=len(text.splitlines()[1]) + 1, contains=["after '+'"])
    assert "expression" in err.message and "'}'" in err.hint


def test_missing_arrow():
    text = src("""
        cell c(x: [H]) (y: [H]) {
            y = x
        }
        """)
    err = expect(text, RnncSyntaxError, line=1, column=col_of(text, 1, "(", nth=1))
    assert "->" in err.hint


@pytest.mark.parametrize("line_text, word", [
    ("    let lambda = x", "lambda"),
    ("    let for = x", "for"),
    ("    state if: [H] = 0", "if"),
    ("    let dim = x", "dim"),
    ("    let None = x", "None"),
])
def test_reserved_word_as_name(line_text, word):
    text = f"cell c(x: [H]) -> (y: [H]) {{\n{line_text}\n    y = x\n}}\n"
    expect(text, RnncSyntaxError, line=2, column=col_of(text, 2, word), contains=[f"'{word}'"],
           words=["reserved"])


def test_reserved_word_as_cell_or_def_name():
    expect("cell while(x: [H]) -> (y: [H]) {\n    y = x\n}\n", RnncSyntaxError, line=1, column=6)
    expect("def return(a) = a\n", RnncSyntaxError, line=1, column=5)
    expect("def f(in) = in\n", RnncSyntaxError, line=1, column=7)


def test_rendered_error_has_location_excerpt_and_hint():
    text = src("""
        cell c(x: [H]) -> (y: [H]) {
            y = x $ 2
        }
        """)
    with pytest.raises(RnncSyntaxError) as info:
        check(text)
    rendered = str(info.value)
    first, quoted, caret, *rest = rendered.splitlines()
    assert first.startswith("t.rnn:2:11: error:")
    assert quoted.strip() == "y = x $ 2"
    assert caret.index("^") == quoted.index("$")
    assert any(r.strip().startswith("hint:") for r in rest)


def test_rnnc_error_is_exported():
    assert rnnc.RnncError is RnncError


# ---- unknown names ------------------------------------------------------------------------

def test_unknown_value():
    text = src("""
        cell c(x: [H]) -> (y: [H]) {
            y = x + zz
        }
        """)
    expect(text, UnknownNameError, line=2, column=col_of(text, 2, "zz"), words=["zz"])


def test_unknown_function():
    text = src("""
        cell c(x: [H]) -> (y: [H]) {
            y = frobnicate(x)
        }
        """)
    expect(text, UnknownNameError, line=2, column=col_of(text, 2, "frobnicate"), words=["frobnicate"])


def test_unknown_dim_in_param_initialiser():
    text = src("""
        cell c(x: [H]) -> (y: [H]) {
            param w: [H] ~ uniform(-1/sqrt(Q), 1/sqrt(H))
            y = w * x
        }
        """)
    expect(text, UnknownNameError, line=2, column=col_of(text, 2, "Q"), words=["Q"])


def test_unknown_name_in_state_initialiser():
    text = src("""
        cell c(x: [H]) -> (y: [H]) {
            state h: [H] = Zed
            h = h + x
            y = h
        }
        """)
    expect(text, UnknownNameError, line=2, column=col_of(text, 2, "Zed"), words=["Zed"])


def test_unknown_name_inside_def_body():
    text = src("""
        def f(a) = a * nope
        cell c(x: [H]) -> (y: [H]) {
            y = f(x)
        }
        """)
    expect(text, UnknownNameError, line=1, column=col_of(text, 1, "nope"), words=["nope"])


def test_assign_to_undeclared_name():
    text = src("""
        cell c(x: [H]) -> (y: [H]) {
            q = x
            y = x
        }
        """)
    expect(text, (UnknownNameError, StateError), line=2, column=5, words=["q"])


# ---- shapes -------------------------------------------------------------------------------

def test_add_mismatched_vectors_names_both_shapes():
    text = src("""
        cell c(x: [I]) -> (y: [H]) {
            state h: [H] = 0
            h = h + x
            y = h
        }
        """)
    expect(text, ShapeError, line=3, column=span_of(text, 3, "h + x"), contains=["[H]", "[I]"])


def test_matmul_wrong_inner_dims():
    text = src("""
        cell c(x: [I]) -> (y: [H]) {
            param W: [H, H] ~ normal(0, 1)
            y = W @ x
        }
        """)
    expect(text, ShapeError, line=3, column=span_of(text, 3, "W @ x"), contains=["[H, H]", "[I]"])


def test_assigned_value_does_not_fit_output():
    text = src("""
        cell c(x: [I]) -> (y: [H]) {
            y = x
        }
        """)
    expect(text, ShapeError, line=2, column=(1, len(text.splitlines()[1])), contains=["[H]", "[I]"])


def test_assigned_value_does_not_fit_state():
    text = src("""
        cell c(x: [I]) -> (y: [I]) {
            state h: [H] = 0
            h = x
            y = x
        }
        """)
    expect(text, ShapeError, line=3, contains=["[H]", "[I]"])


def test_where_branches_mismatch():
    text = src("""
        cell c(x: [I], z: [H]) -> (y: [I]) {
            y = where(x > 0, x, z)
        }
        """)
    expect(text, ShapeError, line=2, contains=["[H]", "[I]"])


def test_split_not_divisible_constant():
    text = src("""
        cell c(x: [5]) -> (y: [5]) {
            let a, b = split(x, 2)
            y = x
        }
        """)
    expect(text, ShapeError, line=2, words=["5", "2"])


def test_split_sizes_do_not_sum():
    text = src("""
        cell c(x: [5]) -> (y: [5]) {
            let a, b = split(x, [2, 2])
            y = x
        }
        """)
    expect(text, ShapeError, line=2, words=["5"])


def test_split_not_divisible_symbolic_at_build():
    text = src("""
        cell c(x: [H]) -> (y: [H]) {
            let a, b = split(x, 2)
            y = concat(b, a)
        }
        """)
    # Either rejected up front (H is not provably even) or at build time for an odd H.
    try:
        prog = check(text)
    except RnncError as err:
        assert_reported(err, ShapeError, line=2, column=span_of(text, 2, "let a, b = split(x, 2)"))
        assert "2" in err.hint
        return
    rnnc.build(prog, backend="loop", H=4)
    build_err(prog, (ShapeError, DimError, BuildError), H=3)


def test_split_of_provably_divisible_symbolic_size():
    text = src("""
        cell c(x: [2*H]) -> (y: [H]) {
            let a, b = split(x, 2)
            y = a * b
        }
        """)
    check(text)
    rnnc.build(rnnc.parse(text, filename=FILE), backend="loop", H=3)


# ---- dims ---------------------------------------------------------------------------------

def test_undefined_dim_at_build_is_named():
    text = src("""
        cell c(x: [H]) -> (y: [H]) {
            param w: [M, H] ~ normal(0, 1)
            y = x + sum(w, axis=0)
        }
        """)
    prog = check(text)  # M may be given at build time
    err = build_err(prog, (BuildError, DimError), H=3)
    assert re.search(r"\bM\b", err.message), err.message
    assert err.hint.strip()
    rnnc.build(prog, backend="loop", H=3, M=2)  # and binding it works


def test_dim_declared_twice():
    text = src("""
        cell c(x: [N]) -> (y: [N]) {
            dim N = 4
            dim N = 5
            y = x
        }
        """)
    expect(text, DimError, line=3, column=col_of(text, 3, "N"), words=["N"])


@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_dim_at_build(value):
    err = build_err(rnnc.parse(VALID[0], filename=FILE), (BuildError, DimError), H=value)
    assert re.search(r"\bH\b", err.message), err.message


def test_non_integer_dim_at_build():
    err = build_err(rnnc.parse(VALID[0], filename=FILE), (BuildError, DimError), H=2.5)
    assert re.search(r"\bH\b", err.message), err.message


# ---- states and outputs -------------------------------------------------------------------

def test_state_assigned_twice():
    text = src("""
        cell c(x: [H]) -> (y: [H]) {
            state h: [H] = 0
            h = h + x
            h = h * 2
            y = h
        }
        """)
    expect(text, StateError, line=4, column=5, words=["h"])


def test_output_assigned_twice():
    text = src("""
        cell c(x: [H]) -> (y: [H]) {
            y = x
            y = x * 2
        }
        """)
    expect(text, StateError, line=3, column=5, words=["y"])


def test_output_never_assigned():
    text = src("""
        cell c(x: [H]) -> (y: [H], z: [H]) {
            y = x
        }
        """)
    expect(text, StateError, line=1, column=(col_of(text, 1, "c"), col_of(text, 1, "z:")), words=["z"])


def test_state_never_assigned():
    text = src("""
        cell c(x: [H]) -> (y: [H]) {
            state s: [H] = 1
            y = x * s
        }
        """)
    err = expect(text, StateError, line=2, column=col_of(text, 2, "s:"), words=["s"])
    assert "param" in err.hint or "let" in err.hint, err.hint


@pytest.mark.parametrize("body", [
    "    x = x + 1\n    y = x",            # an input
    "    let a = x\n    a = x\n    y = a",  # a let binding
])
def test_assign_to_immutable(body):
    text = "cell c(x: [H]) -> (y: [H]) {\n" + body + "\n}\n"
    row = 2 if body.startswith("    x") else 3
    expect(text, (StateError, TypeError_), line=row, column=5)


# ---- arity --------------------------------------------------------------------------------

@pytest.mark.parametrize("call", ["sigmoid(x, x)", "maximum(x)", "outer(x)", "exp()"])
def test_builtin_wrong_arg_count(call):
    text = f"cell c(x: [H]) -> (y: [H]) {{\n    y = x + sum({call})\n}}\n"
    func = call.split("(")[0]
    expect(text, ArityError, line=2, column=col_of(text, 2, func), words=[func])


def test_user_def_wrong_arg_count():
    text = src("""
        def f(a, b) = a + b
        cell c(x: [H]) -> (y: [H]) {
            y = f(x)
        }
        """)
    expect(text, ArityError, line=3, column=col_of(text, 3, "f("), words=["f"])


def test_split_into_wrong_number_of_names():
    text = src("""
        cell c(x: [6]) -> (y: [6]) {
            let a, b = split(x, 3)
            y = x
        }
        """)
    expect(text, ArityError, line=2, column=(5, len(text.splitlines()[1])))


def test_destructure_multi_value_def_wrongly():
    text = src("""
        def two(a) {
            return a, a
        }
        cell c(x: [H]) -> (y: [H]) {
            let p, q, r = two(x)
            y = p
        }
        """)
    expect(text, ArityError, line=5)


def test_multi_value_def_used_as_one_value():
    text = src("""
        def two(a) {
            return a, a
        }
        cell c(x: [H]) -> (y: [H]) {
            y = two(x) + 1
        }
        """)
    expect(text, (ArityError, TypeError_), line=5)


# ---- types --------------------------------------------------------------------------------

@pytest.mark.parametrize("expr", ["(x > 0) * x", "x + (x < 1)", "-(x >= 0)", "exp(x == 0)"])
def test_boolean_in_arithmetic(expr):
    text = f"cell c(x: [H]) -> (y: [H]) {{\n    y = {expr}\n}}\n"
    err = expect(text, TypeError_, line=2, column=(9, 8 + len(expr)))
    assert "where" in err.hint or "bool" in err.message.lower()


# ---- unsupported --------------------------------------------------------------------------

def test_matmul_of_rank3_is_unsupported():
    text = src("""
        cell c(x: [N, N, N]) -> (y: [N, N, N]) {
            y = x @ x
        }
        """)
    expect(text, UnsupportedError, line=2, column=span_of(text, 2, "x @ x"))


# ---- imports and library ------------------------------------------------------------------

def test_bad_import_path(tmp_path):
    text = src("""
        import "does_not_exist.rnn"
        cell c(x: [H]) -> (y: [H]) {
            y = x
        }
        """)
    filename = str(tmp_path / "t.rnn")
    expect(text, SpecNotFoundError, filename=filename, line=1, column=col_of(text, 1, '"'),
           contains=["does_not_exist"])


def test_bad_import_library_name():
    text = src("""
        import no_such_library_spec_xyz
        cell c(x: [H]) -> (y: [H]) {
            y = x
        }
        """)
    expect(text, SpecNotFoundError, line=1, column=col_of(text, 1, "no_such"),
           contains=["no_such_library_spec_xyz"])


def test_error_inside_imported_file_points_into_it(tmp_path):
    (tmp_path / "helpers.rnn").write_text("def good(a) = a\ndef bad(a) = a +\n")
    text = 'import "helpers.rnn"\ncell c(x: [H]) -> (y: [H]) {\n    y = good(x)\n}\n'
    try:
        check(text, str(tmp_path / "t.rnn"))
    except RnncError as err:  # its place, not its text: an import must not reveal a file that is not rnnc
        assert_reported(err, RnncSyntaxError, located=False)
        assert err.file.endswith("helpers.rnn") and err.line == 2 and not err.excerpt()
        assert "a +" not in str(err)
    else:
        pytest.fail("syntax error in an imported file not reported")


def test_import_of_defs_works_and_cycles_terminate(tmp_path):
    (tmp_path / "a.rnn").write_text('import "b.rnn"\ndef fa(x) = x + 1\n')
    (tmp_path / "b.rnn").write_text('import "a.rnn"\ndef fb(x) = x * 2\n')
    text = 'import "a.rnn"\ncell c(x: [H]) -> (y: [H]) {\n    y = fa(fb(x))\n}\n'
    try:
        check(text, str(tmp_path / "t.rnn"))
    except RnncError as err:  # rejecting a cycle is fine; hanging or crashing is not
        assert_reported(err, RnncError, file=None)


def test_unknown_library_name_for_load():
    with pytest.raises(RnncError) as info:
        rnnc.load("no_such_spec_xyz")
    assert_reported(info.value, SpecNotFoundError, located=False, contains=["no_such_spec_xyz"])


def test_missing_path_for_load(tmp_path):
    with pytest.raises(RnncError) as info:
        rnnc.load(str(tmp_path / "missing.rnn"))
    assert_reported(info.value, SpecNotFoundError, located=False, contains=["missing.rnn"])


def test_unknown_library_name_for_build():
    with pytest.raises(RnncError) as info:
        rnnc.build("no_such_spec_xyz")
    assert_reported(info.value, SpecNotFoundError, located=False)


# ---- recursion ----------------------------------------------------------------------------

@pytest.mark.parametrize("defs", [
    "def f(a) = f(a)\n",
    "def f(a) = g(a)\ndef g(a) = f(a) + 1\n",
])
def test_recursive_defs_are_an_error(defs):
    text = defs + "cell c(x: [H]) -> (y: [H]) {\n    y = f(x)\n}\n"
    nlines = len(text.splitlines())
    try:
        check(text)
    except RecursionError:  # pragma: no cover - the failure we test against
        pytest.fail("Python RecursionError escaped instead of an RnncError")
    except RnncError as err:
        assert_reported(err, RnncError)
        assert 1 <= err.line <= nlines
        assert re.search(r"recurs|cycle|itself", str(err).lower()), str(err)
    else:
        pytest.fail("recursive defs accepted")


# ---- build() arguments --------------------------------------------------------------------

def test_unknown_backend():
    with pytest.raises(RnncError) as info:
        rnnc.build(rnnc.parse(VALID[0], filename=FILE), backend="no_such_backend", H=4)
    assert_reported(info.value, BuildError, located=False, contains=["no_such_backend"])


def test_unknown_cell_name():
    with pytest.raises(RnncError) as info:
        rnnc.build(rnnc.parse(VALID[0], filename=FILE), cell="nope", backend="loop", H=4)
    assert_reported(info.value, (BuildError, UnknownNameError, SpecNotFoundError), located=False,
                    contains=["nope"])


# ---- calling a built cell -----------------------------------------------------------------

@pytest.fixture(scope="module")
def acc_cell():
    return rnnc.build(rnnc.parse(VALID[0], filename=FILE), backend="loop", H=4)


def _call_error(fn) -> RnncError:
    try:
        fn()
    except RnncError as err:
        assert not isinstance(err, InternalError), str(err)
        # Call-time problems have their own class (also a ValueError, as torch users expect).
        assert isinstance(err, getattr(rnnc, "InputError", RnncError)), f"{type(err).__name__}: {err}"
        return err
    pytest.fail("no error raised")


def test_call_with_right_shapes_works(acc_cell):
    import torch

    y, final = acc_cell(torch.randn(2, 3, 4))
    assert y.shape == (2, 3, 4) and final["h"].shape == (2, 4)
    y, final = acc_cell(torch.randn(2, 3, 5, 4))  # an extra (head) dim
    assert y.shape == (2, 3, 5, 4) and final["h"].shape == (2, 5, 4)


def test_call_with_wrong_size_names_input_and_shape(acc_cell):
    import torch

    err = _call_error(lambda: acc_cell(torch.randn(2, 3, 5)))
    message = str(err)
    assert re.search(r"\bx\b", message), message
    assert re.search(r"\b4\b", message), message


@pytest.mark.parametrize("shape", [(4,), (2, 4), ()])
def test_call_with_wrong_rank_names_input_and_shape(acc_cell, shape):
    import torch

    err = _call_error(lambda: acc_cell(torch.randn(shape)))
    message = str(err)
    assert re.search(r"\bx\b", message), message
    assert "4" in message or "H" in message, message
    assert re.search(r"\bT\b|time|rank|dims|dimensions", message), message


def test_call_with_wrong_state_shape_names_state(acc_cell):
    import torch

    err = _call_error(lambda: acc_cell(torch.randn(2, 3, 4), state={"h": torch.randn(2, 5)}))
    assert re.search(r"\bh\b", str(err)), str(err)


def test_call_with_unknown_state_name(acc_cell):
    import torch

    err = _call_error(lambda: acc_cell(torch.randn(2, 3, 4), state={"zz": torch.randn(2, 4)}))
    assert "zz" in str(err), str(err)


def test_call_with_too_many_inputs(acc_cell):
    import torch

    with pytest.raises((RnncError, TypeError)) as info:
        acc_cell(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    assert not isinstance(info.value, InternalError)


# ---- more malformed programs: class, line and a hint -------------------------------------

def _cell(body: str, ports: str = "x: [H]", outs: str = "y: [H]", pre: str = "") -> str:
    return f"{pre}cell c({ports}) -> ({outs}) {{\n{body}\n}}\n"


# (id, text, acceptable classes, line of the offending token)
MORE = [
    ("index-out-of-range", _cell("    y = x + x[10]", "x: [4]", "y: [4]"), ShapeError, 2),
    ("negative-index-out-of-range", _cell("    y = x + x[-5]", "x: [4]", "y: [4]"), ShapeError, 2),
    ("empty-slice", _cell("    y = x[3:1]", "x: [4]", "y: [4]"), ShapeError, 2),
    ("too-many-indices", _cell("    y = x + x[0, 0, 0]"), ShapeError, 2),
    ("two-ellipses", _cell("    y = x + x[..., ...]"), ShapeError, 2),
    ("float-index", _cell("    y = x + x[0.5]"), TypeError_, 2),
    ("axis-out-of-range", _cell("    y = x + sum(x, axis=5)"), ShapeError, 2),
    ("softmax-axis-out-of-range", _cell("    y = softmax(x, axis=3)"), ShapeError, 2),
    ("concat-axis-out-of-range", _cell("    y = concat(x, x, axis=3)"), ShapeError, 2),
    ("non-constant-axis", _cell("    y = x + sum(x, axis=x)"), TypeError_, 2),
    ("non-constant-split", _cell("    let a, b = split(x, x)\n    y = x"), TypeError_, 2),
    ("split-into-zero", _cell("    let a = split(x, 0)\n    y = x"), ShapeError, 2),
    ("arange-empty", _cell("    y = x + sum(arange(5, 1))"), ShapeError, 2),
    ("zeros-negative", _cell("    y = x + sum(zeros(-1))"), ShapeError, 2),
    ("eye-zero", _cell("    y = x + sum(eye(0))"), ShapeError, 2),
    ("ragged-literal", _cell("    y = x + sum([[1, 2], [3]])"), ShapeError, 2),
    ("literal-of-mixed-shapes", _cell("    y = x + sum([x, x[0]])"), ShapeError, 2),
    ("literal-of-booleans", _cell("    y = x + sum([x[0] > 0, 1])"), TypeError_, 2),
    ("transpose-vector", _cell("    y = transpose(x)"), ShapeError, 2),
    ("outer-of-matrices", _cell("    y = sum(outer(eye(H), eye(H)), axis=0)[0]"), ShapeError, 2),
    ("where-numeric-condition", _cell("    y = where(x, x, x)"), TypeError_, 2),
    ("and-on-numbers", _cell("    y = where(x and x, x, x)"), TypeError_, 2),
    ("boolean-output", _cell("    y = x > 0"), TypeError_, 2),
    ("boolean-state", _cell("    state s: [H] = 0\n    s = x > 0\n    y = x"), TypeError_, 3),
    ("unknown-keyword", _cell("    y = sigmoid(x, foo=1)"), ArityError, 2),
    ("keyword-to-def", _cell("    y = f(b=x)", pre="def f(a) = a\n"), ArityError, 3),
    ("keyword-twice-to-def", _cell("    y = f(x, a=x)", pre="def f(a) = a\n"), ArityError, 3),
    ("def-missing-argument", _cell("    y = f()", pre="def f(a, b = 1) = a + b\n"), ArityError, 3),
    ("stateful-def-in-param-init", _cell("    param p: [1] = ctr()\n    y = x", pre="def ctr() {\n    state s: [1] = 0\n    s = s + 1\n    return s\n}\n"), UnsupportedError, 7),
    ("stateful-def-in-combine", "def ctr() {\n    state s: [1] = 0\n    s = s + 1\n    return s\n}\ncombine m(a, b) identity 0 = a + b + ctr()\n" + _cell("    state q: [H] = 0\n    q = m(q, x)\n    y = q"), UnsupportedError, 6),
    ("def-state-never-assigned", _cell("    y = x + f()", pre="def f() {\n    state s: [1] = 0\n    return s\n}\n"), StateError, 2),
    ("def-state-assigned-twice", _cell("    y = x + f()", pre="def f() {\n    state s: [1] = 0\n    s = s + 1\n    s = s + 1\n    return s\n}\n"), StateError, 4),
    ("def-assigns-its-parameter", _cell("    y = f(x)", pre="def f(a) {\n    state s: [1] = 0\n    s = s + 1\n    a = s\n    return a\n}\n"), StateError, 4),
    ("def-state-init-reads-a-value", _cell("    y = f(x)", pre="def f(a) {\n    state s: [H] = a\n    s = s + 1\n    return s\n}\n"), TypeError_, 2),
    ("combine-declares-a-state", "combine m(a, b) identity 0 {\n    state s: [1] = 0\n    return a + b\n}\n" + _cell("    y = x"), RnncSyntaxError, 2),
    ("def-default-before-plain", _cell("    y = x", pre="def f(a = 1, b) = a + b\n"), RnncSyntaxError, 1),
    ("dim-defaults-in-a-cycle", _cell("    dim M = 2 * K\n    dim K = M + 1\n    param w: [M] = 1\n    y = x + sum(w)"), DimError, 2),
    ("dim-default-not-an-integer", _cell("    dim M = H // 0\n    param w: [M] = 1\n    y = x + sum(w)"), DimError, 2),
    ("def-size-from-a-value", _cell("    y = x + sum(f(x[0]))", pre="def f(d) = arange(d)\n"), TypeError_, 1),
    ("dim-division-by-zero", _cell("    y = x", "x: [H // 0]", "y: [H // 0]"), DimError, 1),
    ("dim-size-zero", _cell("    y = x", "x: [H - H]", "y: [H - H]"), DimError, 1),
    ("dim-default-zero", _cell("    dim N = 0\n    param w: [N] = 1\n    y = x + sum(w)"), DimError, 2),
    ("dim-default-self", _cell("    dim N = N\n    param w: [N] = 1\n    y = x + sum(w)"), DimError, 2),
    ("dim-and-param-same-name", _cell("    param w: [H] = 1\n    y = x", "x: [w]"), DimError, 2),
    ("unknown-distribution", _cell("    param w: [H] ~ cauchy(0, 1)\n    y = x * w"), UnknownNameError, 2),
    ("distribution-bad-keyword", _cell("    param w: [H] ~ normal(mu=0, std=1)\n    y = x * w"), ArityError, 2),
    ("distribution-missing-arg", _cell("    param w: [H] ~ uniform(1)\n    y = x * w"), ArityError, 2),
    ("param-init-uses-input", _cell("    param w: [H] = x\n    y = x * w"), TypeError_, 2),
    ("state-init-uses-state", _cell("    state s: [H] = 0\n    state t: [H] = s\n    s = s + 1\n"
                                    "    t = t + 1\n    y = t"), TypeError_, 3),
    ("state-init-wrong-shape", _cell("    state s: [H] = eye(H)\n    s = s + x\n    y = s"), ShapeError, 2),
    ("param-init-wrong-shape", _cell("    param a: [2] = [1, 2, 3]\n    y = x + sum(a)"), ShapeError, 2),
    ("output-and-state-shapes-differ", _cell("    state y: [2] = 0\n    y = y + 1"), ShapeError, 1),
    # Redefinitions: any RnncError subclass, pointing at the second definition.
    ("let-defined-twice", _cell("    let a = x\n    let a = x + 1\n    y = a"), RnncError, 3),
    ("state-declared-twice", _cell("    state h: [H] = 0\n    state h: [H] = 0\n    h = h + x\n    y = h"),
     RnncError, 3),
    ("input-declared-twice", _cell("    y = x", "x: [H], x: [H]"), RnncError, 1),
    ("def-defined-twice", _cell("    y = f(x)", pre="def f(a) = a\ndef f(a) = a + 1\n"), RnncError, 2),
    ("cell-defined-twice", _cell("    y = x", pre="cell c(x: [H]) -> (y: [H]) {\n    y = x\n}\n"), RnncError, 4),
]


@pytest.mark.parametrize("text, cls, line", [m[1:] for m in MORE], ids=[m[0] for m in MORE])
def test_more_malformed_programs(text, cls, line):
    err = expect(text, cls, line=line)
    row = text.splitlines()[line - 1]
    assert 1 <= err.column <= len(row) + 1, err


# ---- errors that can only be found once dims are bound (build time) ----------------------

@pytest.mark.parametrize("text, dims", [
    pytest.param(_cell("    y = x[5]", outs="y: []"), {"H": 3}, id="index-past-H"),
    pytest.param(_cell("    y = x[1:5]", outs="y: [4]"), {"H": 3}, id="slice-past-H"),
    pytest.param(_cell("    y = x", "x: [2 - H]", "y: [2 - H]"), {"H": 3}, id="negative-size"),
])
def test_sizes_checked_when_dims_are_bound(text, dims):
    """Valid for some dims, wrong for these: an RnncError at build() or at the first call."""
    import torch

    prog = check(text)
    try:
        module = rnnc.build(prog, backend="loop", **dims)
        module(torch.randn(2, 3, 3))
    except RnncError as err:
        assert not isinstance(err, InternalError), str(err)
        assert isinstance(err, (ShapeError, DimError, BuildError)), f"{type(err).__name__}: {err}"
    else:
        pytest.fail("out-of-range size accepted")


@pytest.mark.parametrize("init", ["uniform(1, -1)", "normal(0, -1)"])
def test_bad_initialiser_arguments(init):
    """Arguments torch.nn.init would reject are reported as an RnncError, not a torch error."""
    text = _cell(f"    param w: [H] ~ {init}\n    y = w * x")
    try:
        rnnc.build(check(text), backend="loop", H=3)
    except RnncError as err:
        assert not isinstance(err, InternalError), str(err)
        if err.loc is not None:
            assert err.line == 2
    else:
        pytest.fail(f"{init} accepted")
