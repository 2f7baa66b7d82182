"""The abstract syntax tree of a .rnn file: plain dataclasses, no behaviour.

rnnc/parser.py builds it from Lark's parse tree; rnnc/elaborate.py turns it into IR.
Every node carries the `Loc` it came from so later stages can point at the source.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from .errors import Loc


# ---- dim expressions (shapes) ---------------------------------------------------------

@dataclass
class DimNum:
    value: int
    loc: Loc


@dataclass
class DimName:
    name: str
    loc: Loc


@dataclass
class DimBin:
    op: str  # + - * //
    left: "DimExpr"
    right: "DimExpr"
    loc: Loc


DimExpr = Union[DimNum, DimName, DimBin]


# ---- value expressions ----------------------------------------------------------------

@dataclass
class Number:
    value: float
    text: str
    loc: Loc


@dataclass
class Name:
    id: str
    loc: Loc


@dataclass
class Call:
    func: str
    args: list["Expr"]
    kwargs: dict[str, "Expr"]
    loc: Loc


@dataclass
class BinOp:
    op: str  # + - * / // % @ ** < <= > >= == != and or
    left: "Expr"
    right: "Expr"
    loc: Loc


@dataclass
class UnaryOp:
    op: str  # - not
    operand: "Expr"
    loc: Loc


@dataclass
class Slice:
    lo: "Expr | None"
    hi: "Expr | None"
    loc: Loc


@dataclass
class NewAxis:
    loc: Loc


@dataclass
class EllipsisItem:
    loc: Loc


Subscript = Union["Expr", Slice, NewAxis, EllipsisItem]


@dataclass
class Index:
    value: "Expr"
    items: list[Subscript]
    loc: Loc


@dataclass
class Literal:
    """A literal vector or matrix: `[1, 0, -1]`, `[[1, 0], [0, 1]]`."""

    items: list["Expr"]
    loc: Loc


@dataclass
class Tuple:
    """A parenthesised group `(a, b, c)`: only as an operand of a combine or its identity."""

    items: list["Expr"]
    loc: Loc


Expr = Union[Number, Name, Call, BinOp, UnaryOp, Index, Literal, Tuple]


# ---- statements and declarations ------------------------------------------------------

@dataclass
class Port:
    name: str
    shape: list[DimExpr]
    loc: Loc


@dataclass
class DimDecl:
    name: str
    default: DimExpr | None
    loc: Loc


@dataclass
class RandomInit:
    """`~ uniform(lo, hi)` / `~ normal(mean, std)` / ..."""

    dist: str
    args: list[Expr]
    kwargs: dict[str, Expr]
    loc: Loc


@dataclass
class ParamDecl:
    name: str
    shape: list[DimExpr]
    init: RandomInit | Expr
    loc: Loc


@dataclass
class StateDecl:
    name: str
    shape: list[DimExpr]
    init: Expr
    loc: Loc


@dataclass
class Let:
    names: list[str]
    value: Expr
    loc: Loc
    name_locs: list[Loc] = field(default_factory=list)  # where each name is written


@dataclass
class Assign:
    names: list[str]  # several when the value is a group (a combine, split or multi-value def)
    value: Expr
    loc: Loc


Stmt = Union[DimDecl, ParamDecl, StateDecl, Let, Assign]


@dataclass
class Cell:
    name: str
    inputs: list[Port]
    outputs: list[Port]
    body: list[Stmt]
    loc: Loc


@dataclass
class Def:
    name: str
    params: list[str]
    lets: list[Let | StateDecl | Assign]  # in order; states and their assignments make a stateful def
    returns: list[Expr]
    loc: Loc
    defaults: dict[str, Expr] = field(default_factory=dict)  # parameter -> default value (`mu = 1000`)

    @property
    def stateful(self) -> bool:
        return any(isinstance(s, StateDecl) for s in self.lets)


@dataclass
class Combine:
    """`combine f((a1, ..), (b1, ..)) identity (e1, ..) = ...`: a declared associative operator."""

    name: str
    left: list[str]
    right: list[str]
    identity: Expr
    lets: list[Let]
    returns: list[Expr]
    loc: Loc
    source: str = ""  # the declaration's text (keys the associativity proof's cache)


@dataclass
class Import:
    target: str
    is_path: bool
    loc: Loc


@dataclass
class Module:
    """One parsed .rnn file."""

    file: str
    source: str
    imports: list[Import] = field(default_factory=list)
    defs: list[Def] = field(default_factory=list)
    combines: list[Combine] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)
