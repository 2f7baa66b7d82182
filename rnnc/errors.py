"""Errors rnnc reports about user programs and calls.

Every problem with a spec (or with how a cell is called) is an `RnncError` carrying the
place it was found and a one-line hint, so the CLI can print `file:line:col: error: ...`
with a caret excerpt and never a Python traceback.
"""
from __future__ import annotations

from dataclasses import dataclass


#: The most characters of a source line an error quotes.
EXCERPT_WIDTH = 160


@dataclass(frozen=True)
class Loc:
    """A position in a source file (1-based line and column)."""

    file: str
    line: int
    column: int
    source_line: str = ""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


class RnncError(Exception):
    """Base class of every error rnnc reports about user input."""

    kind = "error"

    def __init__(self, message: str, loc: Loc | None = None, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.loc = loc
        self.hint = hint

    @property
    def file(self) -> str | None:
        return self.loc.file if self.loc else None

    @property
    def line(self) -> int | None:
        return self.loc.line if self.loc else None

    @property
    def column(self) -> int | None:
        return self.loc.column if self.loc else None

    def excerpt(self) -> str:
        """The offending source line with a caret under the column."""
        if not self.loc or not self.loc.source_line:
            return ""
        text = self.loc.source_line.rstrip("\n")
        caret = max(self.loc.column, 1) - 1
        if len(text) > EXCERPT_WIDTH:  # a window around the column: a 50 MB line gives a short message
            start = max(0, min(caret - EXCERPT_WIDTH // 2, len(text) - EXCERPT_WIDTH))
            head, tail = ("... " if start else ""), (" ..." if start + EXCERPT_WIDTH < len(text) else "")
            text, caret = head + text[start:start + EXCERPT_WIDTH] + tail, caret - start + len(head)
        text = text.expandtabs(1)
        return f"    {text}\n    {' ' * caret}^"

    def __str__(self) -> str:
        where = f"{self.loc}: " if self.loc else ""
        parts = [f"{where}error: {self.message}"]
        excerpt = self.excerpt()
        if excerpt:
            parts.append(excerpt)
        if self.hint:
            parts.append(f"  hint: {self.hint}")
        return "\n".join(parts)


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
