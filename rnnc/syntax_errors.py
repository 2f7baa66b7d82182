"""Syntax errors, each said in words, and every independent one in a file found in one pass.

A malformed file is parsed again with Lark's interactive LALR parser. At each error the message
names tokens as a person writes them (`'-'`, "a name", "an expression"; never Lark's `MINUS`),
says what is missing where (a state with no initial value is reported at the end of its
declaration, not as an unexpected name on the next line) and notes the bracket left open. Then
the parser recovers at the next statement boundary: it drops the broken statement (pops the
parse stack to a state where statements start) and skips tokens to the next keyword, `}`, `;`
or assignment that starts a line outside brackets, so later errors are real ones, not echoes.
"""
from __future__ import annotations

import functools

import lark
from lark import Token
from lark.exceptions import UnexpectedCharacters, UnexpectedToken

from .errors import Loc, Note, RnncSyntaxError

#: The most syntax errors reported for one file.
MAX_ERRORS = 20

#: How regular-expression terminals read in a message (string terminals read as their text, quoted).
_PATTERN_NAMES = {"NAME": "a name", "NUMBER": "a number", "INT": "an integer", "STRING": 'a "path"',
                  "COMMENT": "a comment", "$END": "end of file"}
#: Keywords that start a statement or a top-level item: the parser resynchronises on them.
_STATEMENT_KEYWORDS = {"LET", "STATE", "PARAM", "DIM", "RETURN", "CELL", "DEF", "COMBINE", "IMPORT"}
_KEYWORD_TEXTS = {"let", "state", "param", "dim", "return", "cell", "def", "combine", "import"}
_OPEN = {"LPAR": ")", "LSQB": "]", "LBRACE": "}"}
_CLOSE = {"RPAR", "RSQB", "RBRACE"}


@functools.lru_cache(maxsize=4)
def _names(parser: lark.Lark) -> dict[str, str]:
    """Lark terminal name -> how a message names it."""
    out = dict(_PATTERN_NAMES)
    for t in parser.terminals:
        if t.pattern.type == "str":
            out[t.name] = f"'{t.pattern.value}'"
    return out


def token_name(parser: lark.Lark, terminal: str) -> str:
    """How a message names the terminal `terminal` (`'->'` for __ANON_0, "a name" for NAME)."""
    return _names(parser).get(terminal, "a token")


@functools.lru_cache(maxsize=4)
def _groups(parser: lark.Lark) -> tuple[tuple[str, frozenset[str], frozenset[str]], ...]:
    """Sets of terminals a message names as one (when a state accepts the core of one): those that
    start a statement, an expression, and the binary operators (what may follow an operand), read
    from the tables so that they follow the grammar."""
    ip = parser.parse_interactive("cell c() -> () { let a =")
    ip.exhaust_lexer()
    starts = frozenset(ip.accepts())
    ip = parser.parse_interactive("cell c() -> () { let a = b")
    ip.exhaust_lexer()
    names = _names(parser)
    operators = frozenset(t for t in ip.accepts() if names.get(t, "").strip("'") in
                          {"+", "-", "*", "/", "//", "%", "@", "**", "<", "<=", ">", ">=", "==", "!=", "and", "or"})
    ip = parser.parse_interactive("cell c() -> () {")
    ip.exhaust_lexer()
    statements = frozenset(ip.accepts()) - {"RBRACE"}
    return (("a statement", frozenset({"LET", "STATE"}), statements),
            ("an expression", frozenset({"NAME", "NUMBER", "LPAR"}), starts),
            ("an operator", frozenset({"PLUS", "STAR"}), operators))


def describe(parser: lark.Lark, terminals) -> str:
    """`terminals` (those a parser state accepts) in words: groups first ("an expression"), then the
    rest, sorted: "an expression, '(' or ')'"."""
    rest = set(terminals) - {"COMMENT"}
    shown = []
    for words, core, group in _groups(parser):
        if core <= rest:
            shown.append(words)
            rest -= group
    shown += sorted(token_name(parser, t) for t in rest)
    if len(shown) > 8:
        shown = shown[:8] + ["..."]
    return " or ".join(shown) if len(shown) <= 2 else ", ".join(shown[:-1]) + " or " + shown[-1]


def collect(parser: lark.Lark, text: str, filename: str, lines: list[str]) -> list[RnncSyntaxError]:
    """Every independent syntax error in `text` (at most MAX_ERRORS), in order."""
    return _Recovery(parser, text, filename, lines).run()


class _Recovery:
    def __init__(self, parser: lark.Lark, text: str, filename: str, lines: list[str]) -> None:
        self.parser = parser
        self.text = text
        self.filename = filename
        self.lines = lines
        self.ip = parser.parse_interactive(text)
        self.errors: list[RnncSyntaxError] = []
        self.last: Token | None = None  # the last token the parser took
        self.before_last: Token | None = None
        self.third_last: Token | None = None
        self.queue: list[Token] = []  # tokens read while resynchronising, fed before lexing resumes

    # -- driving the parser --
    def run(self) -> list[RnncSyntaxError]:
        while len(self.errors) < MAX_ERRORS:
            yielded = None  # iter_parse yields each token before feeding it
            try:
                while self.queue:
                    yielded = self.queue.pop(0)
                    self.ip.feed_token(yielded)
                    self._take(yielded)
                    yielded = None
                for token in self.ip.iter_parse():
                    self._take(yielded)
                    yielded = token
                self._take(yielded)
                yielded = None
                self.ip.feed_eof(self.last)
                return self.errors
            except UnexpectedToken as e:
                if e.token is not yielded:  # the lexer failed after `yielded` was taken
                    self._take(yielded)
                self._report(e.token)
                if e.token.type == "$END" or not self._resync(e.token):
                    return self.errors
            except UnexpectedCharacters as e:
                self._take(yielded)
                self._bad_character(e)
                if not self._resync(None):
                    return self.errors
        return self.errors

    def _take(self, token: Token | None) -> None:
        if token is not None:
            self.third_last, self.before_last, self.last = self.before_last, self.last, token

    # -- reporting --
    def _loc(self, line: int, column: int, end_line: int = 0, end_column: int = 0) -> Loc:
        src = self.lines[line - 1] if 0 < line <= len(self.lines) else ""
        return Loc(self.filename, line, column, src, end_line, end_column)

    def _token_loc(self, tok: Token) -> Loc:
        return self._loc(tok.line, tok.column, tok.end_line or 0, tok.end_column or 0)

    def _eof_loc(self) -> Loc:
        line = len(self.lines)
        while line > 1 and not self.lines[line - 1].strip():
            line -= 1
        return self._loc(max(line, 1), len(self.lines[line - 1].rstrip()) + 1 if self.lines else 1)

    def _expected(self) -> set[str]:
        try:
            return set(self.ip.accepts())
        except Exception:  # accepts() copies the parser; never let that hide the error itself
            return set(self.ip.choices())

    def _report(self, tok: Token) -> None:
        prev = self.last
        expected = self._expected()
        stack = self.ip.parser_state.value_stack
        open_brackets = _unclosed(stack)
        statement = self._statement(stack)
        notes = []
        if tok.type == "$END":
            if open_brackets:
                notes.append(self._unclosed_note(open_brackets[-1], stack))
            self.errors.append(RnncSyntaxError("unexpected end of file", self._eof_loc(),
                                               f"expected {describe(self.parser, expected)}", notes))
            return
        inner = [t for t in open_brackets if t.type != "LBRACE"]
        if inner:
            notes.append(self._unclosed_note(inner[-1], stack))
        keyword, op = prev, self.before_last
        if prev is not None and prev.type == "NAME" and self.before_last is not None \
                and self.before_last.type == "NAME" and str(self.before_last) in _KEYWORD_TEXTS:
            keyword, op = self.before_last, self.third_last  # `return t`: t was taken as a new statement's target
        if keyword is not None and keyword.type == "NAME" and str(keyword) in _KEYWORD_TEXTS and op is not None:
            # The contextual lexer reads a keyword where a name may stand as a name: `x +` then `return t`.
            prev = keyword
            self.errors.append(RnncSyntaxError(
                f"unexpected {_quote(prev)}", self._token_loc(prev),
                f"{_quote(prev)} is a keyword, not a value: is an operand missing after {_quote(op)} "
                f"(line {op.end_line or op.line})?", notes))
            return
        missing = None if inner else self._missing_initialiser(statement, expected)
        if missing and prev is not None:
            message, hint = missing
            at = self._loc(prev.end_line, prev.end_column)
            self.errors.append(RnncSyntaxError(message, at, hint))
            return
        operand = self._operand_on_next_line(tok)
        if operand is not None:
            op, name = operand
            self.errors.append(RnncSyntaxError(
                f"expected an expression after {_quote(op)}", self._loc(op.end_line, op.end_column),
                f"{_quote(name)} on the next line was read as its operand, then {_quote(tok)} made no sense; "
                f"complete the expression, or remove {_quote(op)}", notes))
            return
        if prev is not None and tok.line > (prev.end_line or prev.line) and not inner:
            at = self._loc(prev.end_line, prev.end_column)
            self.errors.append(RnncSyntaxError(
                f"expected {describe(self.parser, expected)} after {_quote(prev)}", at,
                f"the next line starts with {_quote(tok)}, which cannot continue this statement", notes))
            return
        hint = f"expected {describe(self.parser, expected)}"
        if tok.type in _CLOSE and inner:
            hint += f"; {_quote(inner[-1])} is closed by '{_OPEN[inner[-1].type]}'"
        self.errors.append(RnncSyntaxError(f"unexpected {_quote(tok)}", self._token_loc(tok), hint, notes))

    def _operand_on_next_line(self, tok: Token) -> tuple[Token, Token] | None:
        """(operator, name) when a line ends in an operator and the next line's assignment target was
        read as its operand: `let a = x +` then `y = a` fails at the '='."""
        name, op = self.last, self.before_last
        if tok.type not in ("EQUAL", "COMMA") or name is None or op is None or name.type != "NAME":
            return None
        if name.line <= (op.end_line or op.line) or op.type in ("NAME", "NUMBER", "RPAR", "RSQB"):
            return None
        return op, name

    def _bad_character(self, e: UnexpectedCharacters) -> None:
        self.errors.append(RnncSyntaxError(f"unexpected character {e.char!r}",
                                           self._loc(e.line, e.column, e.line, e.column + 1),
                                           "remove it; comments start with '#'"))
        state = self.ip.lexer_thread.state
        state.line_ctr.feed(self.text[state.line_ctr.char_pos:state.line_ctr.char_pos + 1])

    def _unclosed_note(self, bracket: Token, stack: list) -> Note:
        owner = ""
        if bracket.type == "LBRACE":  # the body of which cell or def
            i = next(k for k, item in enumerate(stack) if item is bracket)
            for j in range(i - 1, -1, -1):
                item = stack[j]
                if isinstance(item, Token) and item.type in ("CELL", "DEF", "COMBINE"):
                    name = stack[j + 1] if j + 1 < len(stack) and isinstance(stack[j + 1], Token) else None
                    owner = f" by {item} '{name}'" if name is not None else ""
                    break
        return Note(f"{_quote(bracket)} opened here{owner} is not closed",
                    self._loc(bracket.line, bracket.column, bracket.end_line, bracket.end_column))

    def _statement(self, stack: list) -> list:
        """The part of the value stack above the last statement boundary (the broken statement so far)."""
        states = self.ip.parser_state.state_stack
        table = self.ip.parser_state.parse_conf.parse_table.states
        for depth in range(len(states) - 1, -1, -1):
            if _boundary(table[states[depth]]):
                return stack[depth:]
        return list(stack)

    @staticmethod
    def _missing_initialiser(statement: list, expected: set[str]) -> tuple[str, str] | None:
        """(message, hint) when the statement so far is a state or param declared up to its shape."""
        kinds = [item.type if isinstance(item, Token) else "" for item in statement[:3]]
        if kinds == ["STATE", "NAME", "COLON"] and expected == {"EQUAL"}:
            name = statement[1]
            return (f"state '{name}' has no initial value",
                    f"a state starts from a value: write `state {name}: [...] = 0` (or any expression of params, "
                    "dims and numbers)")
        if kinds == ["PARAM", "NAME", "COLON"] and expected == {"EQUAL", "TILDE"}:
            name = statement[1]
            return (f"param '{name}' has no initialiser",
                    f"write `param {name}: [...] ~ uniform(lo, hi)`, `~ normal(mean, std)` or `= value`")
        return None

    # -- recovering --
    def _next_token(self) -> Token | None:
        """The next token (queued, or read from the text whatever the parser's state), reporting bad
        characters on the way; None at the end."""
        if self.queue:
            return self.queue.pop(0)
        lexer = self.ip.lexer_thread.lexer
        root = getattr(lexer, "root_lexer", lexer)
        state = self.ip.lexer_thread.state
        while len(self.errors) < MAX_ERRORS:
            try:
                return root.next_token(state, self.ip.parser_state)
            except EOFError:
                return None
            except UnexpectedCharacters as e:
                self._bad_character(e)
        return None

    def _resync(self, first: Token | None) -> bool:
        """Drop the broken statement and skip to where the next one starts, queueing the tokens to feed
        next; False at the end of the text. A token is a place to start again if it is a statement
        keyword, `}` or `;`, or a name first on its line and outside brackets followed by `=` or `,` (an
        assignment), and a statement boundary on the parse stack takes it."""
        depth = sum(t.type != "LBRACE" for t in _unclosed(self.ip.parser_state.value_stack))
        prev_line = (self.last.end_line or self.last.line) if self.last is not None else 0
        refused: set[str] = set()  # token types no boundary takes (the stack does not change while skipping)
        tok = first
        while True:
            if tok is None:
                tok = self._next_token()
                if tok is None:
                    return False
            if tok.type in _STATEMENT_KEYWORDS or tok.type in ("RBRACE", "SEMICOLON"):
                if tok.type not in refused:
                    if self._restart_at(tok):
                        self.queue.insert(0, tok)
                        return True
                    refused.add(tok.type)
                depth = 0
            elif tok.type == "NAME" and depth == 0 and tok.line > prev_line and "NAME" not in refused:
                after = self._next_token()
                if after is not None:
                    self.queue.insert(0, after)
                    if after.type in ("EQUAL", "COMMA"):
                        if self._restart_at(tok):
                            self.queue.insert(0, tok)
                            return True
                        refused.add("NAME")
            if tok.type in ("LPAR", "LSQB"):
                depth += 1
            elif tok.type in ("RPAR", "RSQB"):
                depth = max(depth - 1, 0)
            prev_line = tok.end_line or tok.line
            tok = None

    def _restart_at(self, tok: Token) -> bool:
        """Pop the parse stack to the innermost statement boundary that takes `tok`; False if none does."""
        state = self.ip.parser_state
        table = state.parse_conf.parse_table.states
        for depth in range(len(state.state_stack) - 1, -1, -1):
            actions = table[state.state_stack[depth]]
            if not _boundary(actions) or tok.type not in actions:
                continue
            trial = state.copy(deepcopy_values=False)
            del trial.state_stack[depth + 1:]
            del trial.value_stack[depth:]
            try:
                trial.feed_token(tok)
            except UnexpectedToken:
                continue
            del state.state_stack[depth + 1:]
            del state.value_stack[depth:]
            return True
        return False


def _unclosed(stack: list) -> list[Token]:
    """The brackets on the parse stack not (yet) closed, outermost first. A rule keeps its brackets on
    the stack until it is reduced, so a `(` followed by its `)` there is closed."""
    out: list[Token] = []
    for item in stack:
        if isinstance(item, Token):
            if item.type in _OPEN:
                out.append(item)
            elif out and item.type in _CLOSE and _OPEN[out[-1].type] == str(item):
                out.pop()
    return out


def _boundary(actions: dict) -> bool:
    """A parse state where statements (or top-level items) start."""
    return "LET" in actions or "CELL" in actions


def _quote(tok: Token) -> str:
    text = str(tok)
    text = text if len(text) <= 40 else f"{text[:40]}... ({len(text)} characters)"
    return repr(text)
