"""Errors and warnings rnnc reports about user programs and calls.

Every problem with a spec (or with how a cell is called) is an `RnncError` carrying the
place it was found (a span: the whole token or expression), a one-line hint and notes that
point at related places (the declaration it refers to, an unclosed bracket), so the CLI can
print `file:line:col: error: ...` with an underlined excerpt and never a Python traceback.

A file with several independent errors raises one `RnncError`: the first by position, whose
`diagnostics` lists them all (and whose text renders them all). Warnings (a name declared and
never used) are `Diagnostic`s of severity "warning"; the Python API issues them as `RnncWarning`.
"""
from __future__ import annotations

from dataclasses import dataclass


#: The most characters of a source line an error quotes.
EXCERPT_WIDTH = 160


@dataclass(frozen=True)
class Loc:
    """A position in a source file (1-based line and column), and where its span ends (`end_line`,
    `end_column`: the column just past the span's last character; 0 where unknown)."""

    file: str
    line: int
    column: int
    source_line: str = ""
    end_line: int = 0
    end_column: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"

    def width(self) -> int:
        """How many columns to underline on the first line (1 for a point, to the end of the line for a
        span that runs onto later lines)."""
        if self.end_line == self.line and self.end_column > self.column:
            return self.end_column - self.column
        if self.end_line > self.line:
            text = self.source_line.rstrip("\n").rstrip()
            return max(len(text) - self.column + 1, 1)
        return 1


@dataclass(frozen=True)
class Note:
    """A place related to a diagnostic: the declaration it refers to, the bracket left open, ..."""

    message: str
    loc: Loc | None = None


@dataclass(frozen=True)
class Diagnostic:
    """One reported problem: severity "error" or "warning", what, where, what to do, related places.
    `kind` names the error class (ShapeError, ...) or the warning (unused-param, ...)."""

    severity: str
    message: str
    loc: Loc | None = None
    hint: str = ""
    notes: tuple[Note, ...] = ()
    kind: str = ""

    def sort_key(self) -> tuple:
        loc = self.loc
        return (loc.file, loc.line, loc.column) if loc else ("", 0, 0)

    def excerpt(self) -> str:
        return excerpt(self.loc)

    def render(self) -> str:
        """Compiler style: `file:line:col: error: message`, the underlined line, the hint, the notes."""
        parts = [f"{self.loc}: {self.severity}: {self.message}" if self.loc else f"{self.severity}: {self.message}"]
        if self.excerpt():
            parts.append(self.excerpt())
        if self.hint:
            parts.append(f"  hint: {self.hint}")
        for note in self.notes:
            parts.append(f"{note.loc}: note: {note.message}" if note.loc else f"  note: {note.message}")
            if excerpt(note.loc):
                parts.append(excerpt(note.loc))
        return "\n".join(parts)


def excerpt(loc: Loc | None) -> str:
    """The source line of `loc` with its span underlined (`^~~~`)."""
    if not loc or not loc.source_line:
        return ""
    text = loc.source_line.rstrip("\n")
    caret = max(loc.column, 1) - 1
    width = loc.width()
    if len(text) > EXCERPT_WIDTH:  # a window around the column: a 50 MB line gives a short message
        start = max(0, min(caret - EXCERPT_WIDTH // 2, len(text) - EXCERPT_WIDTH))
        head, tail = ("... " if start else ""), (" ..." if start + EXCERPT_WIDTH < len(text) else "")
        text, caret = head + text[start:start + EXCERPT_WIDTH] + tail, caret - start + len(head)
        width = min(width, EXCERPT_WIDTH // 2)
    text = text.expandtabs(1)
    return f"    {text}\n    {' ' * caret}^{'~' * (width - 1)}"


def summary(diagnostics: list[Diagnostic]) -> str:
    """`2 errors, 1 warning`."""
    counts = []
    for severity in ("error", "warning"):
        n = sum(d.severity == severity for d in diagnostics)
        if n:
            counts.append(f"{n} {severity}{'s' * (n != 1)}")
    return ", ".join(counts)


class RnncError(Exception):
    """Base class of every error rnnc reports about user input.

    `diagnostics` lists every problem found in the same file (this one first among the errors
    by position); `str()` renders them all."""

    kind = "error"

    def __init__(self, message: str, loc: Loc | None = None, hint: str = "", notes=()) -> None:
        super().__init__(message)
        self.message = message
        self.loc = loc
        self.hint = hint
        self.notes = tuple(notes)
        self._diagnostics: list[Diagnostic] | None = None

    @property
    def file(self) -> str | None:
        return self.loc.file if self.loc else None

    @property
    def line(self) -> int | None:
        return self.loc.line if self.loc else None

    @property
    def column(self) -> int | None:
        return self.loc.column if self.loc else None

    def diagnostic(self) -> Diagnostic:
        """This error alone, as a Diagnostic."""
        return Diagnostic("error", self.message, self.loc, self.hint, self.notes, type(self).__name__)

    @property
    def diagnostics(self) -> list[Diagnostic]:
        return list(self._diagnostics) if self._diagnostics else [self.diagnostic()]

    @diagnostics.setter
    def diagnostics(self, value: list[Diagnostic]) -> None:
        self._diagnostics = list(value)

    def excerpt(self) -> str:
        """The offending source line with its span underlined (`^~~~`)."""
        return excerpt(self.loc)

    def __str__(self) -> str:
        diagnostics = self.diagnostics
        if len(diagnostics) == 1:
            return diagnostics[0].render()
        return "\n".join([d.render() for d in diagnostics] + [summary(diagnostics)])


def raise_collected(errors: list[RnncError], warnings: list[Diagnostic] = ()) -> None:
    """Raise the first of `errors` by position, carrying all of them (and `warnings`) as its diagnostics.
    The same error found twice (a def's body inlined at two calls) is reported once."""
    if not errors:
        return
    unique: dict[tuple, RnncError] = {}
    for e in errors:
        unique.setdefault((type(e), e.message, e.loc), e)
    errors = sorted(unique.values(), key=lambda e: e.diagnostic().sort_key())
    diagnostics = [d for e in errors for d in e.diagnostics]
    first = errors[0]
    first.diagnostics = sorted(dict.fromkeys(diagnostics + list(warnings)), key=Diagnostic.sort_key)
    raise first


class RnncSyntaxError(RnncError):
    """The text is not a well-formed program."""


class UnknownNameError(RnncError):
    """A name (value, function, dim, spec) that is not defined."""


class ShapeError(RnncError):
    """Shapes that do not fit together (both shapes are named in the message)."""


class DimError(RnncError):
    """A dim that is undefined, declared twice, or bound to conflicting sizes."""


class StateError(RnncError):
    """A state assigned twice in one step, or never; an output never assigned."""


class ArityError(RnncError):
    """A function or destructuring called with the wrong number of values."""


class TypeError_(RnncError):
    """A value of the wrong kind: a boolean in arithmetic, a non-constant where a constant is needed."""


class NumberError(RnncError):
    """A number out of range: a literal beyond float64, a constant expression that overflows, divides
    by zero or leaves the reals."""


class AssociativityError(RnncError):
    """A declared combine that is not associative, or whose identity is not one."""


class UnsupportedError(RnncError):
    """A construct the language parses but rnnc cannot lower (yet)."""


class SpecNotFoundError(RnncError):
    """A library name or path that does not name a spec, or an import that cannot be read."""


class BuildError(RnncError):
    """Bad arguments to build(): unknown backend, missing or conflicting dims."""


class InputError(RnncError, ValueError):
    """A built cell called with inputs or states of the wrong type, rank or size."""


class InternalError(RnncError):
    """A bug in rnnc itself; reported as an error so the CLI still never shows a traceback."""


class RnncWarning(UserWarning):
    """A warning about a spec (a param, let or input declared and never used), issued with
    `warnings.warn` by rnnc.parse/load/build: filter it as any Python warning, e.g.
    `warnings.simplefilter("error", rnnc.RnncWarning)`. `diagnostic` holds its place and hint."""

    def __init__(self, diagnostic: Diagnostic | str) -> None:
        # args is the rendered text alone, so that the warning is rebuilt from it (pytest-xdist calls
        # cls(*args) to pass a warning between processes; pickle restores `diagnostic` too).
        text = diagnostic.render() if isinstance(diagnostic, Diagnostic) else str(diagnostic)
        super().__init__(text)
        self.diagnostic = diagnostic if isinstance(diagnostic, Diagnostic) else None
