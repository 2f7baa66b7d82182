"""Diagnostics: several errors per file, underlined spans, notes, human token names, warnings.

Each test asserts the structure of what is reported (kinds, positions, notes' positions, severity)
and the key words of messages, not whole messages.
"""
from __future__ import annotations

import re
import textwrap
import warnings

import pytest

import rnnc
from rnnc import syntax_errors
from rnnc.cli import main
from rnnc.errors import (ArityError, Diagnostic, DimError, RnncError, RnncSyntaxError, RnncWarning, ShapeError,
                         StateError, UnknownNameError)
from rnnc.parser import _lark

FILE = "t.rnn"


def src(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def errors_of(text: str) -> RnncError:
    with pytest.raises(RnncError) as info:
        rnnc.parse(text, FILE)
    return info.value


def where(diagnostics) -> list[tuple[str, int, int]]:
    return [(d.kind, d.loc.line, d.loc.column) for d in diagnostics]


def col(text: str, line: int, needle: str) -> int:
    return text.splitlines()[line - 1].index(needle) + 1


def underline(loc) -> tuple[int, int]:
    """(start column, width) of the `^~~` under the excerpt of `loc`."""
    from rnnc.errors import excerpt
    marks = excerpt(loc).splitlines()[-1]
    start = marks.index("^")
    return start - 4 + 1, len(marks) - start


# ---- several errors per file ----------------------------------------------------------------

def test_several_syntax_errors_reported_together_in_order():
    text = src("""
        cell c(x: [H]) -> (y: [H]) {
            let a = x + * 2
            let b = a $ 3
            let d = (x
            let e = d
            y = x
        }
        cell d(x: [H]) -> (y: [H]) {
            y = x ]
        }
        """)
    err = errors_of(text)
    assert isinstance(err, RnncSyntaxError)
    got = where(err.diagnostics)
    assert [(line, c) for _, line, c in got] == [(2, col(text, 2, "*")), (3, col(text, 3, "$")),
                                                  (5, col(text, 5, "let")), (9, col(text, 9, "]"))]
    assert {k for k, _, _ in got} == {"RnncSyntaxError"}
    assert (err.line, err.column) == (2, col(text, 2, "*"))  # the exception itself is the first
    rendered = str(err)
    assert rendered.count(": error: ") == 4 and rendered.rstrip().endswith("4 errors")
    for _, line, c in got:
        assert f"t.rnn:{line}:{c}: error:" in rendered


def test_recovery_does_not_echo_a_broken_statement():
    """The rest of a broken statement (an unclosed call spanning lines) is skipped, not reported again."""
    text = src("""
        cell c(x: [H]) -> (y: [H]) {
            let a = f(x,,
                      x, 2)
            y = x
        }
        """)
    err = errors_of(text)
    assert where(err.diagnostics) == [("RnncSyntaxError", 2, col(text, 2, ",,") + 1)]


def test_errors_capped_per_file():
    text = "cell c(x: [H]) -> (y: [H]) {\n" + "    let a = x + * 2\n" * 100 + "    y = x\n}\n"
    err = errors_of(text)
    assert len(err.diagnostics) == syntax_errors.MAX_ERRORS
    assert [d.loc.line for d in err.diagnostics] == list(range(2, 2 + syntax_errors.MAX_ERRORS))


def test_several_elaboration_errors_across_statements_and_cells():
    text = src("""
        cell c(x: [H], u: [I]) -> (y: [H]) {
            param W: [H, I] ~ uniform(-1, 1)
            state h: [H] = 0
            let a = zz + x
            let b = a * 2
            h = h + u
            y = frob(x)
        }
        cell d(x: [H]) -> (y: [H]) {
            y = x[0, 0]
        }
        cell c(x: [H]) -> (y: [H]) {
            y = x
        }
        """)
    err = errors_of(text)
    assert where(err.diagnostics) == [
        ("UnknownNameError", 4, col(text, 4, "zz")),   # `let b = a * 2` reads the failed `a`: no echo
        ("ShapeError", 6, col(text, 6, "h + u")),      # h is then poisoned: no "never assigned", no echo in y
        ("UnknownNameError", 7, col(text, 7, "frob")),
        ("ShapeError", 10, col(text, 10, "x[")),
        ("RnncError", 12, col(text, 12, "c(")),        # the cell defined twice
    ]
    assert isinstance(err, UnknownNameError) and err.line == 4
    assert str(err).rstrip().endswith("5 errors")


def test_failed_declarations_do_not_cascade():
    text = src("""
        cell c(x: [H]) -> (y: [H]) {
            state h: [H] = nope
            param W: [H, H] = oops
            h = W @ h + x
            y = h
        }
        """)
    err = errors_of(text)
    assert where(err.diagnostics) == [("UnknownNameError", 2, col(text, 2, "nope")),
                                      ("UnknownNameError", 3, col(text, 3, "oops"))]


def test_failed_assignment_is_not_also_never_assigned():
    text = src("""
        cell c(x: [H]) -> (y: [H]) {
            state h: [H] = 0
            h = h + undefined_thing
            y = h * 2
        }
        """)
    err = errors_of(text)
    assert where(err.diagnostics) == [("UnknownNameError", 3, col(text, 3, "undefined_thing"))]


def test_error_in_a_def_called_twice_is_reported_once():
    text = src("""
        def f(a) = a + nothing
        cell c(x: [H]) -> (y: [H]) {
            let p = f(x)
            let q = f(x * 2)
            y = p + q
        }
        """)
    err = errors_of(text)
    assert where(err.diagnostics) == [("UnknownNameError", 1, col(text, 1, "nothing"))]


def test_build_raises_one_error_listing_all():
    text = src("""
        cell c(x: [H]) -> (y: [H]) {
            let a = x + q1
            y = x + q2
        }
        """)
    with pytest.raises(UnknownNameError) as info:
        rnnc.build(text, H=4)
    err = info.value
    assert isinstance(err.diagnostics, list) and len(err.diagnostics) == 2
    assert all(isinstance(d, Diagnostic) and d.severity == "error" for d in err.diagnostics)
    assert "'q1'" in str(err) and "'q2'" in str(err)


def test_a_single_error_has_itself_as_diagnostics():
    err = errors_of("cell c(x: [H]) -> (y: [H]) {\n    y = zz\n}\n")
    assert len(err.diagnostics) == 1 and err.diagnostics[0] == err.diagnostic()
    assert not str(err).rstrip().endswith("error")  # no count line for one error


# ---- spans ------------------------------------------------------------------------------------

def test_spans_are_underlined_over_the_whole_token_or_expression():
    text = src("""
        cell c(x: [H], u: [I]) -> (y: [H]) {
            y = x + u
        }
        """)
    err = errors_of(text)
    assert underline(err.loc) == (col(text, 2, "x + u"), len("x + u"))
    assert "^~~~~" in err.excerpt()
    err = errors_of("cell c(x: [H]) -> (y: [H]) {\n    y = unknown_name + x\n}\n")
    assert underline(err.loc) == (9, len("unknown_name"))
    err = errors_of("cell c(x: [H]) -> (y: [H]) {\n    y = frob(x, 1)\n}\n")
    assert underline(err.loc) == (9, len("frob(x, 1)"))  # a call: its name to its ')'


# ---- notes: unclosed delimiters -------------------------------------------------------------

def test_eof_notes_the_unclosed_parenthesis():
    text = "cell c(x: [H]) -> (y: [H]) {\n    y = f(x, (x\n"
    err = errors_of(text)
    assert "end of file" in err.message
    (note,) = err.notes  # the innermost
    assert (note.loc.line, note.loc.column) == (2, col(text, 2, ", (x") + 2)
    assert "'('" in note.message and "not closed" in note.message


def test_eof_notes_the_unclosed_brace_of_the_cell():
    text = "cell acc(x: [H]) -> (y: [H]) {\n    y = x\n"
    err = errors_of(text)
    (note,) = err.notes
    assert (note.loc.line, note.loc.column) == (1, col(text, 1, "{"))
    assert "'{'" in note.message and "acc" in note.message
    assert "}" in err.hint


def test_unexpected_token_after_unclosed_bracket_notes_it():
    text = src("""
        cell c(x: [H]) -> (y: [H]) {
            let a = f(x, 2
            let b = a
            y = b
        }
        """)
    err = errors_of(text)
    assert (err.line, err.column) == (3, col(text, 3, "let"))
    (note,) = err.notes
    assert (note.loc.line, note.loc.column) == (2, col(text, 2, "(x"))
    assert "')'" in err.hint


def test_wrong_closer_notes_the_opener():
    text = "cell c(x: [H]) -> (y: [H]) {\n    let a = f(x]\n    y = a\n}\n"
    err = errors_of(text)
    assert (err.line, err.column) == (2, col(text, 2, "]"))
    assert [(n.loc.line, n.loc.column) for n in err.notes] == [(2, col(text, 2, "(x"))]
    assert "')'" in err.hint


def test_note_is_rendered_with_its_place_and_excerpt():
    text = "cell c(x: [H]) -> (y: [H]) {\n    y = (x\n"
    rendered = str(errors_of(text))
    assert f"t.rnn:2:{col(text, 2, '(')}: note:" in rendered


# ---- what is missing, where -------------------------------------------------------------------

def test_missing_state_initialiser_is_reported_where_it_is_missing():
    text = src("""
        cell c(x: [H]) -> (y: [H]) {
            state h: [H]
            h = tanh(x)
            y = h
        }
        """)
    err = errors_of(text)
    assert len(err.diagnostics) == 1
    assert (err.line, err.column) == (2, len(text.splitlines()[1]) + 1)  # just after `[H]`
    assert "state 'h'" in err.message and "initial value" in err.message
    assert "unexpected" not in err.message
    assert "= 0" in err.hint


def test_missing_param_initialiser_is_reported_where_it_is_missing():
    text = src("""
        cell c(x: [H]) -> (y: [H]) {
            param W: [H, H]
            let a = W @ x
            y = a
        }
        """)
    err = errors_of(text)
    assert (err.line, err.column) == (2, len(text.splitlines()[1]) + 1)
    assert "param 'W'" in err.message and "uniform" in err.hint


def test_operand_missing_at_end_of_line():
    text = src("""
        cell c(x: [H]) -> (y: [H]) {
            let a = x *
            y = a
        }
        """)
    err = errors_of(text)
    assert (err.line, err.column) == (2, len(text.splitlines()[1]) + 1)
    assert "after '*'" in err.message and "'y'" in err.hint


def test_keyword_read_as_an_operand_is_named():
    """`let t = a +` then `return t`: the lexer reads `return` as the operand; the error names it."""
    text = "def f(a) {\n    let t = a +\n    return t\n}\ncell c(x: [H]) -> (y: [H]) {\n    y = f(x)\n}\n"
    err = errors_of(text)
    assert (err.line, err.column) == (3, 5) and "'return'" in err.message
    assert "'+'" in err.hint and "line 2" in err.hint


# ---- notes: the declaration an error refers to ----------------------------------------------

def test_shape_mismatch_notes_the_state_declaration():
    text = src("""
        cell c(x: [H], u: [I]) -> (y: [H]) {
            state h: [H] = 0
            h = u
            y = h
        }
        """)
    err = errors_of(text)
    assert isinstance(err, ShapeError) and (err.line, err.column) == (3, 5)
    assert len(err.diagnostics) == 1  # `y = h` reads the bad value: no echo
    assert [(n.loc.line, n.loc.column) for n in err.notes] == [(2, col(text, 2, "h:"))]
    assert "[H]" in err.notes[0].message


def test_output_shape_mismatch_notes_the_output_declaration():
    text = "cell c(x: [H], u: [I]) -> (y: [H]) {\n    y = u\n}\n"
    err = errors_of(text)
    assert [(n.loc.line, n.loc.column) for n in err.notes] == [(1, col(text, 1, "y:"))]


def test_operand_shapes_note_their_declarations():
    text = src("""
        cell c(x: [H], u: [I]) -> (y: [H]) {
            state h: [H] = 0
            h = h + u
            y = h
        }
        """)
    err = errors_of(text)
    assert sorted((n.loc.line, n.loc.column) for n in err.notes) == [(1, col(text, 1, "u:")), (2, col(text, 2, "h:"))]
    assert any("input 'u'" in n.message and "[I]" in n.message for n in err.notes)


def test_redeclarations_note_the_first():
    text = src("""
        cell c(x: [H]) -> (y: [H]) {
            dim H = 4
            dim H = 5
            param x: [H] = 0
            y = x
            y = x
        }
        """)
    err = errors_of(text)
    kinds = where(err.diagnostics)
    assert kinds == [("DimError", 3, col(text, 3, "H")), ("RnncError", 4, col(text, 4, "x")),
                     ("StateError", 6, 5)]
    dim, param, twice = err.diagnostics
    assert [(n.loc.line, n.loc.column) for n in dim.notes] == [(2, col(text, 2, "H"))]
    assert [(n.loc.line, n.loc.column) for n in param.notes] == [(1, col(text, 1, "x:"))]
    assert [(n.loc.line, n.loc.column) for n in twice.notes] == [(5, 5)]


@pytest.mark.parametrize("decl, kind", [("param W: [H] = 0", "param"), ("let W = x", "defined")])
def test_assigning_a_param_or_let_notes_its_declaration(decl, kind):
    text = f"cell c(x: [H]) -> (y: [H]) {{\n    {decl}\n    W = x\n    y = W\n}}\n"
    err = errors_of(text)
    assert isinstance(err, StateError) and (err.line, err.column) == (3, 5)
    assert [n.loc.line for n in err.notes] == [2] and kind in err.notes[0].message


def test_def_arity_notes_the_def():
    text = "def f(a, b) = a + b\ncell c(x: [H]) -> (y: [H]) {\n    y = f(x)\n}\n"
    err = errors_of(text)
    assert isinstance(err, ArityError)
    assert [(n.loc.line, n.loc.column) for n in err.notes] == [(1, 5)]


def test_dim_error_kind_kept():
    err = errors_of("cell c(x: [H]) -> (y: [H]) {\n    dim H = 0\n    y = x\n}\n")
    assert isinstance(err, DimError)


# ---- human names for tokens --------------------------------------------------------------------

#: Lark's names for terminals (and its anonymous ones) must never reach a message.
def _lark_names() -> set[str]:
    return {t.name for t in _lark().terminals} | {"$END"}


def _leaks(text: str) -> set[str]:
    words = set(re.findall(r"[A-Za-z_$][A-Za-z0-9_]*", text))
    return {w for w in words if w in _lark_names() or w.startswith("__ANON")}


@pytest.mark.parametrize("terminal", sorted(t.name for t in _lark().terminals
                                             if t.name not in _lark().lexer_conf.ignore or t.name == "COMMENT") + ["$END"])
def test_every_terminal_has_a_human_name(terminal):
    name = syntax_errors.token_name(_lark(), terminal)
    assert name != "a token" and terminal not in name, (terminal, name)
    assert not _leaks(syntax_errors.describe(_lark(), {terminal})), terminal


_PROBE = "cell c(x: [H]) -> (y: [H]) {{\n    y = x {} x\n}}\n"


@pytest.mark.parametrize("terminal", sorted(t.name for t in _lark().terminals if t.pattern.type == "str"))
def test_no_lark_name_in_messages(terminal):
    """Every string terminal, put where it does not fit (or does), gives messages in words."""
    token = next(t.pattern.value for t in _lark().terminals if t.name == terminal)
    text = _PROBE.format(token)
    try:
        rnnc.parse(text, FILE)
    except RnncError as err:
        for d in err.diagnostics:
            assert not _leaks(d.message + " " + d.hint + " ".join(n.message for n in d.notes)), d.render()


def test_minus_is_named_as_written():
    err = errors_of("cell c(x: [H]) -> (y: [H]) {\n    y = x * * x\n}\n")
    assert "minus" not in err.hint.lower() and "expression" in err.hint


def test_expected_groups_read_as_words():
    err = errors_of("cell c(x: [H]) -> (y: [H]) {\n    y = x +\n")
    assert "an expression" in str(err) and "NAME" not in str(err)


# ---- warnings -----------------------------------------------------------------------------------

UNUSED = src("""
    cell c(x: [H], u: [H], _v: [H]) -> (y: [H]) {
        param W: [H, H] ~ uniform(-1, 1)
        param b: [H] = 0
        let a = x * 2
        let _scratch = x
        let p, q = two(x * b)
        y = x + p[0]
    }
    def two(a) {
        let unused_in_def = a
        return a, -a
    }
    """)


def test_unused_names_are_warnings():
    with pytest.warns(RnncWarning):
        prog = rnnc.parse(UNUSED, FILE)
    lets = {d.message: (d.loc.line, d.loc.column) for d in prog.warnings if d.kind == "unused-let"}
    assert lets["let 'q' is never used"] == (6, UNUSED.splitlines()[5].index("q") + 1)  # the name itself
    got = sorted((d.kind, d.loc.line) for d in prog.warnings)
    assert got == [("unused-input", 1), ("unused-let", 4), ("unused-let", 6), ("unused-let", 10), ("unused-param", 2)]
    assert all(d.severity == "warning" for d in prog.warnings)
    messages = " ".join(d.message for d in prog.warnings)
    assert "'u'" in messages and "'W'" in messages and "'a'" in messages and "'q'" in messages
    assert "'unused_in_def'" in messages
    assert "'_v'" not in messages and "'_scratch'" not in messages and "'b'" not in messages


def test_warnings_are_python_warnings_and_filterable():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rnnc.parse(UNUSED, FILE)
    rnnc_warnings = [w for w in caught if issubclass(w.category, RnncWarning)]
    assert len(rnnc_warnings) == 5
    assert all(w.filename == __file__ for w in rnnc_warnings)  # attributed to the caller, not to rnnc
    assert all(isinstance(w.message.diagnostic, Diagnostic) for w in rnnc_warnings)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RnncWarning)
        with pytest.raises(RnncWarning):
            rnnc.parse(UNUSED, FILE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=RnncWarning)
        rnnc.parse(UNUSED, FILE)  # silenced


def test_warning_is_rebuilt_from_its_args_and_pickles():
    """pytest-xdist passes warnings between processes as cls(*args); pickle keeps the diagnostic."""
    import pickle

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rnnc.parse(UNUSED, FILE)
    w = caught[0].message
    rebuilt = type(w)(*w.args)
    assert str(rebuilt) == str(w) and rebuilt.diagnostic is None
    twin = pickle.loads(pickle.dumps(w))
    assert str(twin) == str(w) and twin.diagnostic == w.diagnostic


def test_a_cell_with_errors_gets_no_unused_warnings():
    err = errors_of("cell c(x: [H], u: [H]) -> (y: [H]) {\n    y = zz\n}\n")
    assert [d.severity for d in err.diagnostics] == ["error"]


@pytest.mark.parametrize("name", rnnc.library())
def test_library_specs_have_no_warnings(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RnncWarning)
        prog = rnnc.load(name)
    assert prog.warnings == []


# ---- the command line ---------------------------------------------------------------------------

def test_check_prints_every_error_in_order(tmp_path, capsys):
    path = tmp_path / "bad.rnn"
    path.write_text("cell c(x: [H]) -> (y: [H]) {\n    let a = q1\n    y = x + q2\n}\n")
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    found = re.findall(r"bad\.rnn:(\d+):(\d+): error: ", err)
    assert found == [("2", "13"), ("3", "13")]
    assert "2 errors" in err and "Traceback" not in err


def test_check_prints_warnings_and_passes(tmp_path, capsys):
    path = tmp_path / "warn.rnn"
    path.write_text(UNUSED)
    assert main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert len(re.findall(r"warn\.rnn:\d+:\d+: warning: ", err)) == 5 and "5 warnings" in err
    assert "ok" in out


def test_check_W_error_fails_on_warnings(tmp_path, capsys):
    path = tmp_path / "warn.rnn"
    path.write_text(UNUSED)
    assert main(["check", "-W", "error", str(path)]) == 1
    err = capsys.readouterr().err
    assert len(re.findall(r"warn\.rnn:\d+:\d+: error: ", err)) == 5 and "warning:" not in err


def test_check_W_ignore_hides_warnings(tmp_path, capsys):
    path = tmp_path / "warn.rnn"
    path.write_text(UNUSED)
    assert main(["check", "-W", "ignore", str(path)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_check_library_W_error_is_clean(capsys):
    assert main(["check", "-W", "error", *rnnc.library()]) == 0
    assert "warning" not in capsys.readouterr().err


MALFORMED = [
    "cell c(x: [H]) -> (y: [H]) {\n    state h: [H]\n    h = x\n    y = h\n",
    "cell c(x: [H]) -> (y: [H]) {\n    y = f(x,,\n",
    "cell (x: [H]) -> {\n}}}\n" * 30,
    "def f(a) = a +\ncell c(x: [H]) -> (y: [H]) {\n    y = f(x) $ ( [ {\n}\n",
    "import\ncell\ndef\ncombine\n",
    "cell c(x: [H]) -> (y: [H]) {\n    let for = x\n    let a, a = split(x, 2)\n    y = 1e999 + a\n}\n",
    "cell c(x: [H]) -> (y: [H]) { y = x ; ; ; let = ; }\n",
    "))))]]]]}}}}",
    "",
]


@pytest.mark.parametrize("text", MALFORMED)
def test_check_never_shows_a_traceback(tmp_path, capsys, text):
    path = tmp_path / "m.rnn"
    path.write_text(text)
    code = main(["check", str(path)])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err
    assert code in (0, 1)
    if code == 1:
        assert re.search(r"m\.rnn:\d+:\d+: error: ", err), err


def test_unpickling_a_cell_does_not_warn_again(monkeypatch):
    """A cell's warnings are shown when it is built, not again each time it is loaded."""
    import pickle

    from rnnc import saving

    with pytest.warns(RnncWarning):
        cell = rnnc.build("cell c(x: [H], u: [H]) -> (y: [H]) {\n    y = x\n}\n", backend="loop", H=2)
    data = pickle.dumps(cell)
    monkeypatch.setattr(saving, "_classes", {})  # regenerate the class, as in a fresh process
    with warnings.catch_warnings():
        warnings.simplefilter("error", RnncWarning)
        twin = pickle.loads(data)
    assert type(twin).__name__ == type(cell).__name__


def test_check_prints_several_syntax_errors(tmp_path, capsys):
    path = tmp_path / "syn.rnn"
    path.write_text("cell c(x: [H]) -> (y: [H]) {\n    state h: [H]\n    let a = x + * 2\n    h = x\n    y = h\n}\n")
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert re.findall(r"syn\.rnn:(\d+):(\d+): error: ", err) == [("2", "17"), ("3", "17")]
    assert "state 'h' has no initial value" in err and "2 errors" in err


def test_other_commands_print_warnings_and_succeed(tmp_path, capsys):
    path = tmp_path / "warn.rnn"
    path.write_text(UNUSED)
    out = tmp_path / "out.py"
    assert main(["compile", str(path), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert len(re.findall(r"warn\.rnn:\d+:\d+: warning: ", err)) == 5 and out.is_file()
