"""Text → AST. Lark parses with grammar/rnnc.lark; a Transformer builds rnnc.ast nodes.

Every Lark failure becomes an RnncSyntaxError with the file, line, column, a caret excerpt
and a hint naming what was expected, so malformed text never escapes as a Lark exception.
"""
from __future__ import annotations

import functools
import keyword
import math
import re

import lark
from lark import Token, v_args
from lark.visitors import Transformer_NonRecursive

from . import ast, nesting, syntax_errors
from .errors import Loc, NumberError, RnncError, RnncSyntaxError, raise_collected
from .parser_tables import load_parser
from .resources import grammar_file

#: Words that cannot name a value, function or cell (Python keywords and the language's own).
RESERVED = frozenset(keyword.kwlist) | {"cell", "param", "state", "let", "dim", "def", "import", "combine"}

#: The most numbers one file may hold (about 10 s of parsing on a slow machine).
MAX_NUMBERS = 1 << 16
_NUMBER = re.compile(r"(?<![A-Za-z0-9_.])(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")
_COMMENT = re.compile(r"#[^\n]*")

#: The longest number literal read (a float64 has 17 significant digits; zeros are padding).
MAX_NUMBER_TEXT = 400

@functools.lru_cache(maxsize=1)
def _lark() -> lark.Lark:
    return load_parser(grammar_file().read_text(), propagate_positions=True, maybe_placeholders=True)


def parse_module(text: str, filename: str = "<string>") -> ast.Module:
    """Parse the text of one .rnn file into an ast.Module (syntax only, no type checking)."""
    lines = text.splitlines()
    _check_numbers(text, filename, lines)
    try:
        tree = _lark().parse(text)
    except lark.exceptions.UnexpectedInput:
        tree = None  # parsed again below, recovering after each error to report them all
    except RecursionError:
        raise RnncSyntaxError("expression nested too deeply", Loc(filename, 1, 1, ""),
                              "split it into several `let` bindings") from None
    if tree is None:
        try:
            errors = syntax_errors.collect(_lark(), text, filename, lines)
        except RecursionError:
            errors = []
        raise_collected(errors or [RnncSyntaxError("expression nested too deeply", Loc(filename, 1, 1, ""),
                                                   "split it into several `let` bindings")])
    build = _Build(filename, lines)
    try:
        module = build.transform(tree)
    except lark.exceptions.VisitError as e:
        if isinstance(e.orig_exc, RnncError):
            raise e.orig_exc from None
        raise
    except RecursionError:
        raise RnncSyntaxError("expression nested too deeply", Loc(filename, 1, 1, ""),
                              "split it into several `let` bindings") from None
    raise_collected(build.errors)
    nesting.check(module)
    return module


def _check_numbers(text: str, filename: str, lines: list[str]) -> None:
    """Refuse a file with more than MAX_NUMBERS numbers before parsing it: parsing takes time in
    proportion, and a table that large (a 1000×1000 literal) belongs in a param."""
    if len(text) < MAX_NUMBERS:
        return
    uncommented = _COMMENT.sub(lambda m: " " * len(m.group()), text)
    for count, m in enumerate(_NUMBER.finditer(uncommented), 1):
        if count > MAX_NUMBERS:
            line = text.count("\n", 0, m.start()) + 1
            column = m.start() - (text.rfind("\n", 0, m.start()) + 1) + 1
            raise NumberError(f"more than {MAX_NUMBERS} numbers in one file", _loc(filename, lines, line, column),
                              "literals are for small constants: make a large table a param and load its "
                              "values with load_state_dict")


def _clip(text: str, n: int = 40) -> str:
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} characters)"


def _loc(filename: str, lines: list[str], line: int, column: int, end_line: int = 0, end_column: int = 0) -> Loc:
    src = lines[line - 1] if 0 < line <= len(lines) else ""
    return Loc(filename, line, column, src, end_line, end_column)


class _Names(list):
    """The names of a `names` rule, with where each is written (`locs`)."""

    def __init__(self, names: list[str], locs: list[Loc]) -> None:
        super().__init__(names)
        self.locs = locs


@v_args(meta=True)
class _Build(Transformer_NonRecursive):
    """Lark tree → rnnc.ast, without recursion (a flat sum of many terms is a deep tree). Each method
    receives the rule's children after transformation. Errors found here (a reserved word as a name, a
    number out of range) are collected in `errors`, the tree built on with a stand-in."""

    def __init__(self, filename: str, lines: list[str]) -> None:
        super().__init__()
        self.filename = filename
        self.lines = lines
        self.errors: list[RnncError] = []

    # -- helpers --
    def _at(self, meta_or_token, end=None) -> Loc:
        """The span of a token or rule (from its start to the end of `end`, when given)."""
        line = getattr(meta_or_token, "line", 1) or 1
        column = getattr(meta_or_token, "column", 1) or 1
        end = meta_or_token if end is None else end
        return _loc(self.filename, self.lines, line, column,
                    getattr(end, "end_line", 0) or 0, getattr(end, "end_column", 0) or 0)

    def _name(self, token: Token) -> str:
        name = str(token)
        if name in RESERVED:
            self.errors.append(RnncSyntaxError(f"'{name}' is a reserved word and cannot be used as a name",
                                               self._at(token), "pick another name"))
        return name

    # -- file structure --
    def start(self, meta, items):
        module = ast.Module(self.filename, "\n".join(self.lines))
        for item in items:
            if isinstance(item, ast.Import):
                module.imports.append(item)
            elif isinstance(item, ast.Def):
                module.defs.append(item)
            elif isinstance(item, ast.Combine):
                module.combines.append(item)
            elif isinstance(item, ast.Cell):
                module.cells.append(item)
        return module

    def import_stmt(self, meta, children):
        (tok,) = children
        if tok.type == "STRING":
            return ast.Import(str(tok)[1:-1], True, self._at(tok))
        return ast.Import(str(tok), False, self._at(tok))

    def def_stmt(self, meta, children):
        name, params, body = children
        lets, returns = body
        names, defaults = [], {}
        for pname, default, loc in params or []:
            if default is None and defaults:
                raise RnncSyntaxError(f"parameter '{pname}' without a default follows one with a default", loc,
                                      "put the parameters with defaults last")
            names.append(pname)
            if default is not None:
                defaults[pname] = default
        return ast.Def(self._name(name), names, lets, returns, self._at(name), defaults)

    def def_params(self, meta, children):
        return list(children)

    def def_param(self, meta, children):
        name, default = children
        return self._name(name), default, self._at(name)

    def combine_stmt(self, meta, children):
        name, left, right, identity, body = children
        lets, returns = body
        for s in lets:
            if not isinstance(s, ast.Let):
                what = "declare states" if isinstance(s, ast.StateDecl) else "assign names"
                raise RnncSyntaxError(f"a combine cannot {what}", s.loc,
                                      "a combine is a pure function of its operands: use `let` and `return`")
        text = "\n".join(self.lines[meta.line - 1:meta.end_line])
        return ast.Combine(self._name(name), left, right, identity, lets, returns, self._at(name), text)

    def combine_side(self, meta, children):
        if isinstance(children[0], list):
            return list(children[0])
        return [self._name(children[0])]

    def def_expr(self, meta, children):
        return [], [children[0]]

    def def_block(self, meta, children):
        body = (ast.Let, ast.StateDecl, ast.Assign)
        lets = [c for c in children if isinstance(c, body)]
        returns = [c for c in children if not isinstance(c, body) and c is not None and not isinstance(c, Token)]
        return lets, returns

    def cell(self, meta, children):
        name, inputs, outputs, *body = children
        body = [s for s in body if s is not None and not isinstance(s, Token)]
        return ast.Cell(self._name(name), inputs or [], outputs or [], body, self._at(name))

    def ports(self, meta, children):
        return list(children)

    def port(self, meta, children):
        name, shape = children
        return ast.Port(self._name(name), shape, self._at(name))

    def names(self, meta, children):
        return _Names([self._name(t) for t in children], [self._at(t) for t in children])

    # -- statements --
    def dim_stmt(self, meta, children):
        name, default = children
        return ast.DimDecl(self._name(name), default, self._at(name))

    def param_stmt(self, meta, children):
        name, shape, init = children
        return ast.ParamDecl(self._name(name), shape, init, self._at(name))

    def init_random(self, meta, children):
        dist, args = children
        pos, kw = args if args is not None else ([], {})
        return ast.RandomInit(str(dist), pos, kw, self._at(dist))

    def init_value(self, meta, children):
        return children[0]

    def state_stmt(self, meta, children):
        name, shape, init = children
        return ast.StateDecl(self._name(name), shape, init, self._at(name))

    def let_stmt(self, meta, children):
        names, value = children
        return ast.Let(list(names), value, self._at(meta), names.locs)

    def assign_stmt(self, meta, children):
        names, value = children
        return ast.Assign(list(names), value, self._at(meta))

    # -- shapes --
    def shape(self, meta, children):
        return [c for c in children if c is not None]

    def dim_int(self, meta, children):
        token = children[0]
        if len(token) > 18:  # beyond 10**18 no size can be allocated, and the text could be any length
            self.errors.append(NumberError(f"dim size {_clip(str(token))} is too large", self._at(token),
                                           "sizes must be below 10**18"))
            return ast.DimNum(1, self._at(token))
        return ast.DimNum(int(token), self._at(token))

    def dim_name(self, meta, children):
        return ast.DimName(self._name(children[0]), self._at(children[0]))

    def _dim_bin(op):
        def build(self, meta, children):
            return ast.DimBin(op, children[0], children[1], self._at(meta))
        return build

    dim_add = _dim_bin("+")
    dim_sub = _dim_bin("-")
    dim_mul = _dim_bin("*")
    dim_floordiv = _dim_bin("//")

    # -- expressions --
    def number(self, meta, children):
        """An integer in int64's range stays exact; a larger one is the nearest float64, as in torch. A
        number beyond float64's range (or too long to read) is an error: nothing is silently infinite."""
        text = str(children[0])
        if len(text) > MAX_NUMBER_TEXT:
            self.errors.append(NumberError(f"number literal of {len(text)} characters", self._at(children[0]),
                                           f"write it in at most {MAX_NUMBER_TEXT} characters (e.g. 1.5e300)"))
            return ast.Number(0, "0", self._at(children[0]))
        value = float(text) if any(c in text for c in ".eE") else int(text)
        if isinstance(value, int) and value >= 2**63:
            value = float(value) if len(text) <= 308 else math.inf
        if value == math.inf:
            self.errors.append(NumberError(f"number {_clip(text)} is beyond float64's range (about 1.8e308)",
                                           self._at(children[0]), "write `inf` for infinity, or a smaller number"))
            value = 0
        return ast.Number(value, text, self._at(children[0]))

    def name(self, meta, children):
        return ast.Name(self._name(children[0]), self._at(children[0]))

    def call(self, meta, children):
        func, args = children
        pos, kw = args if args is not None else ([], {})
        return ast.Call(self._name(func), pos, kw, self._at(func, meta))

    def args(self, meta, children):
        pos, kw = [], {}
        for child in children:
            if isinstance(child, tuple):
                key, value, loc = child
                if key in kw:
                    self.errors.append(RnncSyntaxError(f"keyword argument '{key}' given twice", loc,
                                                       "give each keyword once"))
                kw.setdefault(key, value)
            elif kw:
                self.errors.append(RnncSyntaxError("positional argument after a keyword argument",
                                                   child.loc, "put positional arguments first"))
            else:
                pos.append(child)
        return pos, kw

    def kwarg(self, meta, children):
        name, value = children
        return (self._name(name), value, self._at(name))

    def _binop(op):
        def build(self, meta, children):
            return ast.BinOp(op, children[0], children[1], self._at(meta))
        return build

    add, sub, mul, div = _binop("+"), _binop("-"), _binop("*"), _binop("/")
    floordiv, mod, matmul, pow = _binop("//"), _binop("%"), _binop("@"), _binop("**")
    lt, le, gt, ge = _binop("<"), _binop("<="), _binop(">"), _binop(">=")
    eq, ne, and_, or_ = _binop("=="), _binop("!="), _binop("and"), _binop("or")

    def neg(self, meta, children):
        return ast.UnaryOp("-", children[0], self._at(meta))

    def not_(self, meta, children):
        return ast.UnaryOp("not", children[0], self._at(meta))

    def tuple(self, meta, children):
        return ast.Tuple(list(children), self._at(meta))

    def literal(self, meta, children):
        return ast.Literal(list(children), self._at(meta))

    def index(self, meta, children):
        value, items = children
        return ast.Index(value, items, self._at(meta))

    def subscripts(self, meta, children):
        return list(children)

    def slice(self, meta, children):
        lo, hi = children
        return ast.Slice(lo, hi, self._at(meta))

    def newaxis(self, meta, children):
        return ast.NewAxis(self._at(meta))

    def ellipsis(self, meta, children):
        return ast.EllipsisItem(self._at(meta))
