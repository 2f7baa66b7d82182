"""AST → IR: resolves names, inlines defs, type-checks shapes, and records state flow.

One `Elaborator` turns one `ast.Cell` into an `ir.Cell`. It walks the body in order, so a
state read before its assignment is the previous step's value and after it the new one, and
it enforces the language's rules: states assigned at most once (and at least once), outputs
exactly once, lets immutable, shapes that fit.
"""
from __future__ import annotations

import difflib
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Union

import sympy

from . import ast, constants, ops, registry
from . import dims as D
from .errors import (ArityError, Diagnostic, DimError, Loc, Note, RnncError, ShapeError, StateError, TypeError_,
                     UnknownNameError, UnsupportedError, raise_collected)
from .ir import Cell, Combine, DimInfo, Graph, Node, Param, Port, State

Value = Union[int, tuple]  # a node id, or a tuple of node ids (split / multi-value def)

#: The .rnn functions: those the registry's ops elaborate from, and clamp (written here as minimum/maximum).
BUILTINS = registry.builtin_names() | {"clamp"}
DISTRIBUTIONS = {"uniform": ("lo", "hi"), "normal": ("mean", "std")}
#: Names that would collide with keyword arguments of build() / forward().
RESERVED_DIMS = frozenset({"device", "dtype", "backend", "cell", "spec", "chunk_size", "backward"})
RESERVED_INPUTS = frozenset({"state", "cu_seqlens", "self"})  # `self`: nn.Module.__call__'s own


#: What a name is bound to when its declaration or statement failed (already reported): a statement that
#: reads it is skipped without a second, echoed error.
POISON = object()


class _Poisoned(Exception):
    """A statement read a name whose definition failed; it is dropped silently."""


@dataclass
class DefInfo:
    node: ast.Def | ast.Combine
    file: str


class Scope:
    """Names visible in a cell body or a def body, plus what they mean."""

    def __init__(self, what: str, graph: Graph | None = None) -> None:
        self.what = what  # "cell", "def f", "state init", "param init"
        self.graph = graph  # the graph the values live in (to read sizes bound to names)
        self.values: dict[str, Value] = {}
        self.where: dict[str, Loc | None] = {}

    def bind(self, name: str, value: Value, loc: Loc | None) -> None:
        self.values[name] = value
        self.where[name] = loc


class Elaborator:
    def __init__(self, cell: ast.Cell, defs: dict[str, DefInfo], file: str) -> None:
        self.ast = cell
        self.defs = defs
        self.file = file
        self.graph = Graph()
        self.init_graph = Graph()
        self.dims: dict[str, DimInfo] = {}
        self._dim_nodes: dict[tuple[int, str], int] = {}
        self._constants: dict[int, dict[int, object]] = {}  # id(graph) -> scalar node -> value (None: unknown)
        self._inline_stack: list[str] = []
        self._inlined: dict[tuple, tuple[Graph, Value]] = {}  # (graph, def, operands, scope) -> result
        self.cell_scope = Scope("cell", self.graph)
        self.kinds: dict[str, str] = {}  # cell-level name -> input/param/state/output
        self.combines: list[Combine] = []
        self.errors: list[RnncError] = []  # every independent error, reported together at the end
        self.warnings: list[Diagnostic] = []
        self._failed: set[str] = set()  # declared names whose declaration failed
        self._reads: set[str] = set()  # cell-level names read by some expression
        self._declared: dict[str, tuple[D.Shape, str, Loc]] = {}  # state/output -> (shape, what, where declared)
        self.def_states: list[State] = []  # states made by calls of stateful defs, in call order
        self._state_prefix: list[str] = []  # the names of the stateful calls being inlined (outermost first)
        self._let_names: dict[int, str] = {}  # id(call expression) -> the let name bound to its value
        self._pure = 0  # > 0 while elaborating a combine (where a def may not hold states)

    # ---- entry point ------------------------------------------------------------------

    def run(self) -> Cell:
        """The cell's IR; raises the first error (by position) carrying every independent one."""
        c = self.ast
        self._declare_dims(c)
        inputs = self._each(c.inputs, self._input)
        params = self._each([s for s in c.body if isinstance(s, ast.ParamDecl)], self._param)
        states = self._each([s for s in c.body if isinstance(s, ast.StateDecl)], self._state)
        self._declare_outputs(c.outputs, states)
        assigned: dict[str, Loc] = {}
        for stmt in c.body:
            if isinstance(stmt, ast.Let):
                with self._recover(lambda: self._poison(stmt.names)):
                    self._let(stmt, self.cell_scope, self.graph)
            elif isinstance(stmt, ast.Assign):
                with self._recover(lambda: self._poison_targets(stmt, assigned)):
                    self._assign(stmt, assigned)
        for s in states:
            with self._recover():
                if s.name not in assigned:
                    raise StateError(f"state '{s.name}' is never assigned", s.loc,
                                     "assign it in the body, or make a value that never changes a param or a let")
                s.node_out = self._fit(self._value(s.name), s.shape, f"state '{s.name}'", assigned[s.name],
                                       decl=s.loc)
                self.graph.add_carry(s.node_out, s.node_in)
        states += self.def_states
        outputs = []
        for p in c.outputs:
            if p.name in self._failed:
                continue
            with self._recover():
                if p.name not in assigned:
                    raise StateError(f"output '{p.name}' is never assigned", p.loc, f"add `{p.name} = ...` to the body")
                node = self._fit(self._value(p.name), self._shape(p.shape), f"output '{p.name}'", assigned[p.name],
                                 decl=p.loc)
                outputs.append(Port(p.name, self._shape(p.shape), node, p.loc))
        raise_collected(self.errors)
        self._warn_unused(c)
        return Cell(c.name, self.file, self.dims, inputs, outputs, params, states, self.graph,
                    self.init_graph, c.loc, combines=self.combines)

    # ---- collecting errors ----------------------------------------------------------------

    @contextmanager
    def _recover(self, on_error: Callable[[], None] | None = None):
        """Run one declaration or statement: an error in it is recorded (and `on_error` poisons what it
        would have defined), and elaboration goes on with the next one."""
        try:
            yield
        except RnncError as e:
            self.errors.append(e)
            if on_error:
                on_error()
        except _Poisoned:
            if on_error:
                on_error()

    def _each(self, decls: list, declare: Callable) -> list:
        out = []
        for d in decls:
            with self._recover(lambda: self._poison([d.name], failed=True)):
                out.append(declare(d))
        return out

    def _poison(self, names: list[str], failed: bool = False) -> None:
        for name in names:
            if name not in self.cell_scope.values:
                self.cell_scope.bind(name, POISON, None)
            if failed:
                self._failed.add(name)

    def _poison_targets(self, stmt: ast.Assign, assigned: dict[str, Loc]) -> None:
        """A failed assignment still counts as one (no "never assigned" echo); what it assigns is poisoned."""
        for name in stmt.names:
            if name not in assigned and self.kinds.get(name) in ("a state", "an output", None):
                assigned[name] = stmt.loc
                self.cell_scope.bind(name, POISON, stmt.loc)
            if name not in self.kinds:
                self._failed.add(name)

    def _value(self, name: str) -> Value:
        value = self.cell_scope.values[name]
        if value is POISON:
            raise _Poisoned(name)
        return value

    # ---- warnings -----------------------------------------------------------------------

    def _warn_unused(self, c: ast.Cell) -> None:
        """A warning for each input, param and let of the cell that nothing reads (names starting with
        '_' are unused on purpose)."""
        def warn(kind: str, name: str, loc: Loc | None, hint: str) -> None:
            if name not in self._reads and not name.startswith("_"):
                self.warnings.append(Diagnostic("warning", f"{kind} '{name}' is never used", loc, hint,
                                                kind=f"unused-{kind}"))

        for p in c.inputs:
            warn("input", p.name, p.loc, "remove it from the cell's inputs, or use it")
        for s in c.body:
            if isinstance(s, ast.ParamDecl):
                warn("param", s.name, s.loc, "remove it (it is still trained and saved), or use it")
            elif isinstance(s, ast.Let):
                for name, loc in zip(s.names, s.name_locs or [s.loc] * len(s.names)):
                    warn("let", name, loc, f"remove it, or name it '_{name}' if it is unused on purpose")

    # ---- declarations -----------------------------------------------------------------

    def _declare_dims(self, c: ast.Cell) -> None:
        for s in c.body:
            if isinstance(s, ast.DimDecl):
                if s.name in self.dims:
                    first = self.dims[s.name].loc
                    self.errors.append(DimError(f"dim '{s.name}' is declared twice", s.loc,
                                                f"the first declaration is at line {first.line}",
                                                [Note(f"dim '{s.name}' is first declared here", first)]))
                    continue
                with self._recover():
                    self._check_dim_name(s.name, s.loc)
                self.dims[s.name] = DimInfo(s.name, None, s.loc)
        shapes = [p.shape for p in c.inputs + c.outputs]
        shapes += [s.shape for s in c.body if isinstance(s, (ast.ParamDecl, ast.StateDecl))]
        shapes += [[s.default] for s in c.body if isinstance(s, ast.DimDecl) and s.default is not None]
        for shape in shapes:
            for d in shape:
                self._collect_dim_names(d)
        for s in c.body:
            if isinstance(s, ast.DimDecl) and s.default is not None and self.dims[s.name].loc is s.loc:
                with self._recover():
                    default = self._dim(s.default)
                    if default.is_Integer and default <= 0:
                        raise DimError(f"the default of dim '{s.name}' must be a positive integer, got "
                                       f"{D.fmt(default)}", s.loc, "write e.g. `dim N = 16` or `dim M = 2*N`")
                    if not D.is_integral_poly(default) and not default.has(sympy.floor):
                        raise DimError(f"the default of dim '{s.name}' is not an integer: {D.fmt(default)}", s.loc,
                                       "use + - * // on integers and dims")
                    self.dims[s.name].default = default
        with self._recover():
            self._order_dim_defaults()

    def _order_dim_defaults(self) -> None:
        """Dims whose defaults are expressions of other dims (`dim M = 2*N`), checked acyclic, and
        self.dims reordered so that every dim comes after the dims its default reads."""
        order: list[str] = []
        state: dict[str, int] = {}  # 1: being visited, 2: done

        def visit(name: str, path: list[str]) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                chain = " -> ".join(path[path.index(name):] + [name])
                raise DimError(f"the dim defaults refer to each other in a cycle: {chain}", self.dims[name].loc,
                               "give one of them a number as its default")
            state[name] = 1
            default = self.dims[name].default
            for dep in sorted(D.free_names(default)) if default is not None else ():
                visit(dep, path + [name])
            state[name] = 2
            order.append(name)

        for name in list(self.dims):
            visit(name, [])
        self.dims = {name: self.dims[name] for name in order}

    def _collect_dim_names(self, d: ast.DimExpr) -> None:
        if isinstance(d, ast.DimName):
            if d.name not in self.dims:
                with self._recover():
                    self._check_dim_name(d.name, d.loc)
            self.dims.setdefault(d.name, DimInfo(d.name, None, d.loc))
        elif isinstance(d, ast.DimBin):
            self._collect_dim_names(d.left)
            self._collect_dim_names(d.right)

    @staticmethod
    def _check_dim_name(name: str, loc: Loc) -> None:
        if name in RESERVED_DIMS:
            raise DimError(f"'{name}' cannot name a dim (build() takes a '{name}' argument)", loc,
                           "pick another name")

    def _dim(self, d: ast.DimExpr, scope: Scope | None = None) -> D.Dim:
        if isinstance(d, ast.DimNum):
            return D.const(d.value)
        if isinstance(d, ast.DimName):
            if scope is not None and d.name in scope.values:  # a def's size argument
                return self._node_dim(scope, scope.values[d.name], d.loc)
            if d.name not in self.dims:
                raise DimError(f"unknown dim '{d.name}'", d.loc, "dims are named in the shapes of inputs, params or states")
            return D.symbol(d.name)
        left, right = self._dim(d.left, scope), self._dim(d.right, scope)
        if d.op == "+":
            return left + right
        if d.op == "-":
            out = left - right
        elif d.op == "*":
            out = left * right
        else:
            if right == 0:
                raise DimError("division by zero in a shape", d.loc, "divide by a positive size")
            out = sympy.floor(left / right)
        if out.is_Integer and out <= 0:
            raise DimError(f"shape size {D.fmt(out)} is not positive", d.loc, "sizes must be at least 1")
        return out

    def _shape(self, shape: list[ast.DimExpr], scope: Scope | None = None) -> D.Shape:
        return tuple(self._dim(d, scope) for d in shape)

    #: The scalar ops a size may be computed with (a def's size argument `2*n + 1`).
    _SIZE_OPS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
                 "floordiv": lambda a, b: sympy.floor(a / b), "neg": lambda a: -a}

    def _node_dim(self, scope: Scope, v: Value, loc: Loc | None, name: str = "") -> D.Dim:
        """The size a name holds: a number, a dim, or + - * // of them, passed to a def (`arange(d)`)."""
        graph = scope.graph
        what = f"'{name}' must be" if name else "expected"
        bad = TypeError_(f"{what} a constant integer (numbers and dims with + - * //)", loc,
                         "indices, slice bounds and sizes must be known before the step runs; pass a size "
                         "such as 3 or N to the def")
        if graph is None or isinstance(v, tuple):
            raise bad

        def walk(nid: int) -> D.Dim:
            node = graph[nid]
            if node.op == "const" and isinstance(node.attrs["value"], int) and not isinstance(node.attrs["value"], bool):
                return D.const(node.attrs["value"])
            if node.op == "dim":
                return D.symbol(node.attrs["name"])
            if node.scalar and node.op in self._SIZE_OPS:
                args = [walk(a) for a in node.args]
                if node.op == "floordiv" and args[1] == 0:
                    raise ShapeError("integer division by zero", loc, "divide by a positive size")
                return self._SIZE_OPS[node.op](*args)
            raise bad
        return walk(v)

    def _declare_name(self, name: str, kind: str, loc: Loc) -> None:
        if name in self.dims:
            raise DimError(f"'{name}' is used both as a dim and as {kind} name", loc,
                           "rename one of them (dims are usually upper-case)")
        if name in self.kinds:
            prev = self.cell_scope.where.get(name)
            at = f" at line {prev.line}" if prev else ""
            raise RnncError(f"'{name}' is already declared as {self.kinds[name]}{at}", loc, "use another name",
                            [Note(f"'{name}' is first declared here", prev)] if prev else ())
        self.kinds[name] = kind

    def _input(self, p: ast.Port) -> Port:
        if p.name in RESERVED_INPUTS:
            raise RnncError(f"'{p.name}' cannot name an input (the cell's forward takes a '{p.name}' argument)",
                            p.loc, "pick another name")
        self._declare_name(p.name, "an input", p.loc)
        shape = self._shape(p.shape)
        nid = self.graph.add(Node("input", (), shape, attrs={"name": p.name}, loc=p.loc, name=p.name))
        self.cell_scope.bind(p.name, nid, p.loc)
        return Port(p.name, shape, nid, p.loc)

    def _param(self, s: ast.ParamDecl) -> Param:
        self._declare_name(s.name, "a param", s.loc)
        shape = self._shape(s.shape)
        nid = self.graph.add(Node("param", (), shape, attrs={"name": s.name}, loc=s.loc, name=s.name))
        self.cell_scope.bind(s.name, nid, s.loc)
        scope = Scope("param init")
        if isinstance(s.init, ast.RandomInit):
            init = self._random_init(s.init, scope)
        else:
            value = self._single(self.expr(s.init, scope, self.init_graph), s.init.loc)
            init = ("value", self._fit(value, shape, f"the initial value of param '{s.name}'", s.init.loc,
                                       graph=self.init_graph, decl=s.loc))
        return Param(s.name, shape, init, nid, s.loc)

    def _random_init(self, r: ast.RandomInit, scope: Scope) -> tuple:
        if r.dist not in DISTRIBUTIONS:
            raise UnknownNameError(f"unknown initialiser '{r.dist}'", r.loc,
                                   "use uniform(lo, hi) or normal(mean, std), or `= value`")
        names = DISTRIBUTIONS[r.dist]
        defaults = {"mean": 0.0, "std": 1.0}
        values = list(r.args)
        if len(values) > len(names):
            raise ArityError(f"{r.dist} takes {len(names)} arguments, got {len(values)}", r.loc,
                             f"write {r.dist}({', '.join(names)})")
        out = []
        for i, key in enumerate(names):
            if i < len(values):
                e = values[i]
                if key in r.kwargs:
                    raise ArityError(f"{r.dist}: '{key}' given twice", r.loc, "give it either by position or by name")
            elif key in r.kwargs:
                e = r.kwargs[key]
            elif key in defaults:
                out.append(self._const(defaults[key], self.init_graph, r.loc))
                continue
            else:
                raise ArityError(f"{r.dist} needs '{key}'", r.loc, f"write {r.dist}({', '.join(names)})")
            v = self._single(self.expr(e, scope, self.init_graph), e.loc)
            if not self.init_graph[v].scalar:
                raise TypeError_(f"{r.dist}'s '{key}' must be a constant scalar", e.loc,
                                 "use numbers, dims and functions of them, e.g. 1/sqrt(H)")
            out.append(v)
        extra = set(r.kwargs) - set(names)
        if extra:
            raise ArityError(f"{r.dist} has no argument '{sorted(extra)[0]}'", r.loc, f"its arguments are {', '.join(names)}")
        return (r.dist, *out)

    def _state(self, s: ast.StateDecl) -> State:
        self._declare_name(s.name, "a state", s.loc)
        shape = self._shape(s.shape)
        scope = Scope("state init")
        for p in self.kinds:
            if self.kinds[p] == "a param":
                scope.bind(p, self.cell_scope.values[p], self.cell_scope.where[p])
        init = None
        with self._recover():  # a bad initial value: the state is still declared, its uses still checked
            init = self._single(self.expr(s.init, scope, self.graph), s.init.loc)
            init = self._fit(init, shape, f"the initial value of state '{s.name}'", s.init.loc, decl=s.loc)
        nid = self.graph.add(Node("state", (), shape, attrs={"name": s.name}, loc=s.loc, name=s.name))
        self._declared[s.name] = (shape, f"state '{s.name}'", s.loc)
        self.cell_scope.bind(s.name, nid, s.loc)
        return State(s.name, shape, init, nid, nid, s.loc)

    def _declare_outputs(self, outputs: list[ast.Port], states: list[State]) -> None:
        state_shapes = {s.name: s for s in states}
        seen: dict[str, Loc] = {}
        for p in outputs:
            if p.name in seen:
                self.errors.append(RnncError(f"output '{p.name}' is declared twice", p.loc, "use another name",
                                             [Note(f"output '{p.name}' is first declared here", seen[p.name])]))
                continue
            seen[p.name] = p.loc
            with self._recover(lambda: self._fail_output(p.name)):
                shape = self._shape(p.shape)
                if p.name in state_shapes:
                    state = state_shapes[p.name]
                    if not D.shapes_equal(shape, state.shape):
                        raise ShapeError(f"output '{p.name}' is declared {D.fmt_shape(shape)} but state '{p.name}' is "
                                         f"{D.fmt_shape(state.shape)}", p.loc, "give both the same shape",
                                         [Note(f"state '{p.name}' is declared here", state.loc)])
                    continue
                self._declare_name(p.name, "an output", p.loc)
                self._declared[p.name] = (shape, f"output '{p.name}'", p.loc)

    def _fail_output(self, name: str) -> None:
        self._failed.add(name)
        self.kinds.setdefault(name, "an output")

    # ---- statements ---------------------------------------------------------------------

    def _let(self, stmt: ast.Let, scope: Scope, graph: Graph) -> None:
        if isinstance(stmt.value, ast.Call):  # names the states a stateful def makes (`let mn = counter(3)`)
            self._let_names[id(stmt.value)] = stmt.names[0]
        value = self.expr(stmt.value, scope, graph)
        names = stmt.names
        if len(names) == 1:
            values = (self._single(value, stmt.value.loc),)
        else:
            if not isinstance(value, tuple):
                raise ArityError(f"cannot unpack one value into {len(names)} names", stmt.loc,
                                 "several names need split(...) or a def that returns several values")
            if len(value) != len(names):
                raise ArityError(f"cannot unpack {len(value)} values into {len(names)} names", stmt.loc,
                                 f"write {len(value)} names on the left")
            values = value
        for name, v in zip(names, values):
            self._check_new_name(name, scope, stmt.loc)
            node = graph[v]
            if node.name is None and node.op not in ("input", "param", "state"):
                node.name = name
            scope.bind(name, v, stmt.loc)

    def _check_new_name(self, name: str, scope: Scope, loc: Loc) -> None:
        if name in scope.values or (scope is self.cell_scope and name in self.kinds):
            prev = scope.where.get(name)
            at = f" (line {prev.line})" if prev else ""
            raise RnncError(f"'{name}' is already defined{at}", loc,
                            "let names are immutable; pick a new name",
                            [Note(f"'{name}' is first defined here", prev)] if prev else ())
        if name in self.dims:
            raise DimError(f"'{name}' is a dim and cannot be rebound", loc, "pick a new name")

    def _assign(self, stmt: ast.Assign, assigned: dict[str, Loc]) -> None:
        for name in stmt.names:
            self._check_assignable(name, stmt.loc, assigned)
        if len(set(stmt.names)) != len(stmt.names):
            raise StateError("a name is assigned twice in one statement", stmt.loc, "name each target once")
        value = self.expr(stmt.value, self.cell_scope, self.graph)
        if len(stmt.names) == 1:
            values = (self._single(value, stmt.value.loc),)
        elif not isinstance(value, tuple) or len(value) != len(stmt.names):
            n = len(value) if isinstance(value, tuple) else 1
            raise ArityError(f"cannot assign {n} value{'s' * (n != 1)} to {len(stmt.names)} names", stmt.loc,
                             "several targets need a combine, split(...) or a def that returns as many values")
        else:
            values = value
        for name, v in zip(stmt.names, values):
            node = self.graph[v]
            if node.dtype != "float":
                raise TypeError_(f"'{name}' must hold numbers, got a boolean", stmt.loc, "use where(cond, 1, 0)")
            if name in self._declared:  # checked here, so that a later read of the bad value is no echo
                shape, what, decl = self._declared[name]
                self._check_fit(node, shape, what, stmt.loc, decl)
            if node.name is None and node.op not in ("input", "param", "state"):
                node.name = name
            assigned[name] = stmt.loc
            self.cell_scope.bind(name, v, stmt.loc)

    def _check_assignable(self, name: str, loc: Loc, assigned: dict[str, Loc]) -> None:
        if name in self._failed:
            raise _Poisoned(name)
        kind = self.kinds.get(name)
        where = self.cell_scope.where.get(name)
        if kind is None:
            if name in self.cell_scope.values:
                raise StateError(f"cannot assign '{name}': it is a let binding", loc,
                                 "let names are immutable; declare a state to carry a value across steps",
                                 [Note(f"'{name}' is defined here", where)] if where else ())
            raise UnknownNameError(f"assignment to undeclared name '{name}'", loc,
                                   f"use `let {name} = ...`, or declare `state {name}: [...] = ...`")
        if kind not in ("a state", "an output"):
            raise StateError(f"cannot assign '{name}': it is {kind}", loc,
                             "only states and outputs are assigned; use `let` for new names",
                             [Note(f"'{name}' is declared {kind} here", where)] if where else ())
        if name in assigned:
            what = "state" if kind == "a state" else "output"
            raise StateError(f"{what} '{name}' is assigned twice in one step", loc,
                             f"it was first assigned at line {assigned[name].line}; "
                             "compute intermediate values with `let`",
                             [Note(f"'{name}' is first assigned here", assigned[name])])

    def _fit(self, nid: int, shape: D.Shape, what: str, loc: Loc | None, graph: Graph | None = None,
             decl: Loc | None = None) -> int:
        """nid if it has exactly `shape`, else a broadcast to it (or a ShapeError noting `decl`, where
        `what` is declared)."""
        graph = graph or self.graph
        node = graph[nid]
        if self._check_fit(node, shape, what, loc, decl):
            return nid
        return graph.add(Node("broadcast", (nid,), shape, attrs={"shape": shape}, loc=loc))

    @staticmethod
    def _check_fit(node: Node, shape: D.Shape, what: str, loc: Loc | None, decl: Loc | None) -> bool:
        """True if `node` has exactly `shape`, False if it broadcasts to it; else a TypeError_ or ShapeError."""
        if node.dtype != "float":
            raise TypeError_(f"{what} must be numbers, got a boolean", loc, "use where(cond, 1, 0)")
        if D.shapes_equal(node.shape, shape):
            return True
        out = D.broadcast(node.shape, shape)
        if out is None or not D.shapes_equal(out, shape):
            raise ShapeError(f"{what} is declared {D.fmt_shape(shape)} but the value has shape {D.fmt_shape(node.shape)}",
                             loc, "the value must have the declared shape (or broadcast to it)",
                             [Note(f"{what.replace('the initial value of ', '')} is declared "
                                   f"{D.fmt_shape(shape)} here", decl)] if decl else ())
        return False

    # ---- expressions ----------------------------------------------------------------------

    def _single(self, v: Value, loc: Loc | None) -> int:
        if isinstance(v, tuple):
            raise ArityError(f"expected one value, got a group of {len(v)} (from split or a def)", loc,
                             f"bind them with let {', '.join('abcdefgh'[:min(len(v), 8)])} = ...")
        return v

    def _const(self, value: float, graph: Graph, loc: Loc | None) -> int:
        return graph.add(Node("const", (), (), attrs={"value": value}, loc=loc, scalar=True))

    def _scalar(self, graph: Graph, nid: int) -> int:
        """`nid`, a compile-time scalar whose value (when only numbers make it) is checked now."""
        values = self._constants.setdefault(id(graph), {})
        if nid not in values:
            constants.check(graph, nid, values)
        return nid

    def _dim_value(self, name: str, graph: Graph, loc: Loc | None) -> int:
        key = (id(graph), name)
        if key not in self._dim_nodes:
            self._dim_nodes[key] = graph.add(Node("dim", (), (), attrs={"name": name}, loc=loc, scalar=True))
        return self._dim_nodes[key]

    def expr(self, e: ast.Expr, scope: Scope, graph: Graph) -> Value:
        method = getattr(self, "_e_" + type(e).__name__)
        return method(e, scope, graph)

    def _e_Number(self, e: ast.Number, scope: Scope, graph: Graph) -> Value:
        return self._const(e.value, graph, e.loc)

    def _e_Name(self, e: ast.Name, scope: Scope, graph: Graph) -> Value:
        if e.id in scope.values:
            value = scope.values[e.id]
            if value is POISON:
                raise _Poisoned(e.id)
            if scope.what in ("cell", "state init"):
                self._reads.add(e.id)
            return value
        if e.id in self.dims:
            return self._dim_value(e.id, graph, e.loc)
        if e.id == "inf":
            return self._const(math.inf, graph, e.loc)
        if e.id == "pi":
            return self._const(math.pi, graph, e.loc)
        if scope.what in ("state init", "param init") and e.id in self.kinds:
            allowed = "params, dims and constants" if scope.what == "state init" else "numbers, dims and constants"
            raise TypeError_(f"{scope.what.replace('init', 'initial value')} cannot use {self.kinds[e.id]} ('{e.id}')",
                             e.loc, f"it may use only {allowed}")
        if e.id in BUILTINS or e.id in self.defs:
            raise TypeError_(f"'{e.id}' is a function; call it", e.loc, f"write {e.id}(...)")
        raise self._unknown(e.id, scope, e.loc)

    def _e_Tuple(self, e: ast.Tuple, scope: Scope, graph: Graph) -> Value:
        raise TypeError_("a parenthesised group (a, b, ...) is only an operand of a combine", e.loc,
                         "apply a combine to it, e.g. `s1, s2 = f((s1, s2), (x1, x2))`; "
                         "or drop the commas")

    def _unknown(self, name: str, scope: Scope, loc: Loc) -> RnncError:
        known = list(scope.values) + list(self.dims)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "declare it as an input, param, state or let"
        return UnknownNameError(f"unknown name '{name}'", loc, hint)

    def _e_UnaryOp(self, e: ast.UnaryOp, scope: Scope, graph: Graph) -> Value:
        x = self._single(self.expr(e.operand, scope, graph), e.operand.loc)
        op = "neg" if e.op == "-" else "not"
        shape, dtype = ops.elementwise(op, [graph[x]], e.loc)
        nid = graph.add(Node(op, (x,), shape, dtype, loc=e.loc, scalar=graph[x].scalar and op == "neg"))
        return self._scalar(graph, nid) if graph[nid].scalar else nid

    def _e_BinOp(self, e: ast.BinOp, scope: Scope, graph: Graph) -> Value:
        """Left to right along the left spine without recursing on it: `x + x + ... + x` (a tree as deep
        as it is long) elaborates in constant stack depth, operands in the same order as recursion."""
        spine = [e]
        while isinstance(spine[-1].left, ast.BinOp):
            spine.append(spine[-1].left)
        a = self._single(self.expr(spine[-1].left, scope, graph), spine[-1].left.loc)
        for node in reversed(spine):
            b = self._single(self.expr(node.right, scope, graph), node.right.loc)
            a = self._apply(ops.BINOP_NAMES[node.op], [a, b], graph, node.loc)
        return a

    def _apply(self, op: str, args: list[int], graph: Graph, loc: Loc | None, **attrs) -> int:
        nodes = [graph[a] for a in args]
        try:
            if op == "matmul":
                return graph.add(Node("matmul", tuple(args), ops.matmul(nodes[0], nodes[1], loc), loc=loc))
            shape, dtype = ops.elementwise(op, nodes, loc)
        except ShapeError as e:
            e.notes += _declared_here(nodes)
            raise
        scalar = all(n.scalar for n in nodes) and (op in ops.ARITH or op in ops.MATH_UNARY)
        nid = graph.add(Node(op, tuple(args), shape, dtype, attrs=attrs, loc=loc, scalar=scalar))
        return self._scalar(graph, nid) if scalar else nid

    def _e_Index(self, e: ast.Index, scope: Scope, graph: Graph) -> Value:
        x = self._single(self.expr(e.value, scope, graph), e.value.loc)
        node = graph[x]
        if node.dtype == "tuple":
            raise TypeError_("cannot index several values", e.loc, "destructure them first")
        items, shape = [], list(node.shape)
        consumed = sum(1 for it in e.items if not isinstance(it, (ast.NewAxis, ast.EllipsisItem)))
        if consumed > len(shape):
            raise ShapeError(f"too many indices ({consumed}) for a value of shape {D.fmt_shape(node.shape)}", e.loc,
                             "index at most one position per axis")
        if sum(isinstance(it, ast.EllipsisItem) for it in e.items) > 1:
            raise ShapeError("an index can have only one '...'", e.loc, "'...' stands for all the axes not indexed")
        out: list[D.Dim] = []
        axis = 0
        for it in e.items:
            if isinstance(it, ast.NewAxis):
                items.append(("new",))
                out.append(D.ONE)
            elif isinstance(it, ast.EllipsisItem):
                n = len(shape) - consumed
                items.append(("ellipsis",))
                out.extend(shape[axis:axis + n])
                axis += n
            elif isinstance(it, ast.Slice):
                size = shape[axis]
                lo = self._norm_bound(it.lo, size, scope, D.const(0))
                hi = self._norm_bound(it.hi, size, scope, size)
                length = sympy.expand(hi - lo)
                if (length.is_Integer and length <= 0) or (
                        hi.is_Integer and size.is_Integer and hi > size) or (lo.is_Integer and lo < 0):
                    raise ShapeError(f"slice {D.fmt(lo)}:{D.fmt(hi)} is empty or out of range for an axis of size "
                                     f"{D.fmt(size)}", it.loc, "slices must select at least one element")
                items.append(("slice", lo, hi))
                out.append(length)
                axis += 1
            else:
                size = shape[axis]
                i = self.dimval(it, scope)
                if i.is_Integer and size.is_Integer and not -size <= i < size:
                    raise ShapeError(f"index {i} is out of range for an axis of size {size}", it.loc,
                                     f"valid indices run from {-size} to {size - 1}")
                if i.is_Integer and i < 0:
                    i = sympy.expand(size + i)
                items.append(("int", i))
                axis += 1
        out.extend(shape[axis:])
        if node.scalar:  # a number is emitted as a Python float, which has no axes: x[None] is a filled tensor
            return graph.add(Node("broadcast", (x,), tuple(out), attrs={"shape": tuple(out)}, loc=e.loc)) if out else x
        return graph.add(Node("index", (x,), tuple(out), node.dtype, attrs={"items": tuple(items)}, loc=e.loc,
                              scalar=False))

    def _norm_bound(self, e: ast.Expr | None, size: D.Dim, scope: Scope, default: D.Dim) -> D.Dim:
        if e is None:
            return default
        v = self.dimval(e, scope)
        if v.is_Integer and v < 0:
            v = sympy.expand(size + v)
        return v

    def dimval(self, e: ast.Expr, scope: Scope) -> D.Dim:
        """An expression that must be a constant integer (numbers, dims, + - * //)."""
        if isinstance(e, ast.Number):
            if isinstance(e.value, float):
                raise TypeError_(f"expected an integer, got {e.text}", e.loc, "indices and sizes are integers")
            return D.const(e.value)
        if isinstance(e, ast.Name) and e.id in self.dims and e.id not in scope.values:
            return D.symbol(e.id)
        if isinstance(e, ast.Name) and e.id in scope.values:
            return self._node_dim(scope, scope.values[e.id], e.loc, e.id)
        if isinstance(e, ast.UnaryOp) and e.op == "-":
            return -self.dimval(e.operand, scope)
        if isinstance(e, ast.BinOp) and e.op in ("+", "-", "*", "//"):
            a, b = self.dimval(e.left, scope), self.dimval(e.right, scope)
            if e.op == "+":
                return a + b
            if e.op == "-":
                return a - b
            if e.op == "*":
                return a * b
            if b == 0:
                raise ShapeError("integer division by zero", e.loc, "divide by a positive size")
            return sympy.floor(a / b)
        raise TypeError_("expected a constant integer (numbers and dims with + - * //)", e.loc,
                         "indices, slice bounds and sizes must be known before the step runs")

    def _e_Literal(self, e: ast.Literal, scope: Scope, graph: Graph) -> Value:
        """A literal vector or matrix. Its entries are numbers, constant expressions (`cos(2*pi/d)`),
        or values of one shape, stacked along new leading axes (`[cos(a), sin(a)]` for vectors `a`).
        With every entry a number known now it is one `literal` node; otherwise the entries are
        concatenated axis by axis (a scalar known at build time is broadcast, a value indexed [None])."""
        entries = self._literal(e, scope, graph)
        outer = _shape_of(entries)
        flat = _flatten(entries)
        inner = graph[flat[0]].shape
        for v in flat:
            if not D.shapes_equal(graph[v].shape, inner):
                raise ShapeError(f"the entries of a literal have different shapes ({D.fmt_shape(inner)} and "
                                 f"{D.fmt_shape(graph[v].shape)})", e.loc, "give every entry the same shape")
        values = self._constants.get(id(graph), {})
        known = [graph[v].attrs["value"] if graph[v].op == "const" else values.get(v) for v in flat]
        if not inner and all(isinstance(k, (int, float)) and not isinstance(k, bool) for k in known):
            it = iter(known)
            value = _nest(entries, lambda _: next(it))
            return graph.add(Node("literal", (), tuple(D.const(n) for n in outer), attrs={"value": value}, loc=e.loc))
        return self._stack(entries, len(outer), graph, e.loc)

    def _stack(self, entries, rank: int, graph: Graph, loc: Loc) -> int:
        """Entries (nested lists of node ids) stacked along `rank` new leading axes."""
        if not isinstance(entries, list):
            node = graph[entries]
            ones = (D.ONE,) * rank
            if node.scalar:  # a number in the generated code: fill a tensor of ones' shape
                return graph.add(Node("broadcast", (entries,), ones, attrs={"shape": ones}, loc=loc))
            return graph.add(Node("index", (entries,), ones + tuple(node.shape), node.dtype,
                                  attrs={"items": (("new",),) * rank + (("ellipsis",),)}, loc=loc))
        parts = [self._stack(x, rank, graph, loc) for x in entries]
        if len(parts) == 1:
            return parts[0]
        axis = rank - len(_shape_of(entries))
        shape, ax = ops.concat([graph[x] for x in parts], axis, loc)
        return graph.add(Node("concat", tuple(parts), shape, attrs={"axis": ax}, loc=loc))

    def _literal(self, e: ast.Expr, scope: Scope, graph: Graph):
        """The entries of a literal as nested lists of node ids."""
        if isinstance(e, ast.Literal):
            items = [self._literal(i, scope, graph) for i in e.items]
            kinds = {isinstance(i, list) for i in items}  # rows or entries
            if len(kinds) > 1:
                raise ShapeError("a literal mixes numbers and rows", e.loc, "write every row as [...]")
            if isinstance(items[0], list) and len({_shape_of(i) for i in items}) > 1:
                raise ShapeError("the rows of a literal matrix have different lengths", e.loc,
                                 "every row needs the same number of entries")
            return items
        v = self._single(self.expr(e, scope, graph), e.loc)
        if graph[v].dtype != "float":
            raise TypeError_("the entries of a literal must be numbers, got a boolean", e.loc,
                             "use where(cond, 1, 0)")
        return v

    # ---- calls --------------------------------------------------------------------------

    def _e_Call(self, e: ast.Call, scope: Scope, graph: Graph) -> Value:
        if e.func in scope.values:
            raise TypeError_(f"'{e.func}' is a value, not a function", e.loc,
                             "a let, input or param cannot be called; rename it if a def of that name was meant")
        if e.func in self.defs:
            if isinstance(self.defs[e.func].node, ast.Combine):
                return self._combine(e, scope, graph)
            return self._inline(e, scope, graph)
        if e.func not in BUILTINS:
            close = difflib.get_close_matches(e.func, sorted(BUILTINS | set(self.defs)), n=1)
            hint = f"did you mean '{close[0]}'?" if close else "define it with `def` or import a file that does"
            raise UnknownNameError(f"unknown function '{e.func}'", e.loc, hint)
        return self._builtin(e, scope, graph)

    def _inline(self, e: ast.Call, scope: Scope, graph: Graph) -> Value:
        info = self.defs[e.func]
        d = info.node
        if e.func in self._inline_stack:
            chain = " -> ".join(self._inline_stack + [e.func])
            raise UnsupportedError(f"recursive def: {chain}", e.loc, "defs are inlined and cannot call themselves")
        if d.stateful and (graph is not self.graph or self._pure or scope.what in ("state init", "param init")):
            raise UnsupportedError(f"def '{e.func}' holds states, so it can only be called in a cell's body", e.loc,
                                   f"call it in a cell (it is defined at {d.loc})")
        given = self._bind_args(e, d)
        inner = Scope(f"def {e.func}", graph) if scope.what not in ("state init", "param init") else Scope(scope.what, graph)
        args = []
        for name in d.params:
            if name in inner.values:
                raise RnncError(f"parameter '{name}' of '{e.func}' is named twice", d.loc, "give each parameter its own name")
            if name in given:
                v = self._single(self.expr(given[name], scope, graph), given[name].loc)
            else:  # its default, which may read the parameters before it
                v = self._single(self.expr(d.defaults[name], inner, graph), d.defaults[name].loc)
            inner.bind(name, v, d.loc)
            args.append(v)
        # A def is pure, so a second call with the same operands is the first one's result: sharing
        # it keeps nested calls (f1(a) = f0(a) + f0(a), ...) linear in size rather than exponential.
        # A call that made states is never shared: each call of a stateful def has states of its own.
        key = (id(graph), e.func, tuple(args), inner.what)
        if key in self._inlined and self._inlined[key][0] is graph:
            return self._inlined[key][1]
        made = len(self.def_states)
        prefix = self._let_names.pop(id(e), e.func)
        self._inline_stack.append(e.func)
        self._state_prefix.append(prefix)
        try:
            if d.stateful:
                self._stateful_body(d, inner, graph)
            else:
                for let in d.lets:
                    self._let(let, inner, graph)
            results = tuple(self._single(self.expr(r, inner, graph), r.loc) for r in d.returns)
        finally:
            self._inline_stack.pop()
            self._state_prefix.pop()
        value = results[0] if len(results) == 1 else results
        if len(self.def_states) == made:
            self._inlined[key] = (graph, value)
        return value

    def _bind_args(self, e: ast.Call, d: ast.Def) -> dict[str, ast.Expr]:
        """The call's arguments by parameter name (positional, then keyword; defaults fill the rest)."""
        usage = f"{e.func}({', '.join(p + (' = ...' if p in d.defaults else '') for p in d.params)})"
        here = [Note(f"'{e.func}' is defined here", d.loc)]
        if len(e.args) > len(d.params):
            raise ArityError(f"'{e.func}' takes {len(d.params)} argument{'s' * (len(d.params) != 1)}, "
                             f"got {len(e.args)}", e.loc, f"call it as {usage}", here)
        given = dict(zip(d.params, e.args))
        for key, value in e.kwargs.items():
            if key not in d.params:
                raise ArityError(f"'{e.func}' has no parameter '{key}'", value.loc, f"call it as {usage}", here)
            if key in given:
                raise ArityError(f"'{e.func}': '{key}' is given twice (by position and by name)", value.loc,
                                 "give it either by position or by name")
            given[key] = value
        missing = [p for p in d.params if p not in given and p not in d.defaults]
        if missing:
            what = f"takes {len(d.params)} argument{'s' * (len(d.params) != 1)}, got {len(given)}: "
            raise ArityError(f"'{e.func}' {what}'{missing[0]}' is missing", e.loc, f"call it as {usage}", here)
        return given

    def _stateful_body(self, d: ast.Def, inner: Scope, graph: Graph) -> None:
        """A stateful def's body, for one call: its states become the cell's (named after the call,
        e.g. `let mn = counter(3)` makes `mn_s` from the def's `state s`), read and assigned in order."""
        local: dict[str, State] = {}
        assigned: dict[str, Loc] = {}
        for stmt in d.lets:
            if isinstance(stmt, ast.Let):
                self._let(stmt, inner, graph)
            elif isinstance(stmt, ast.StateDecl):
                self._check_new_name(stmt.name, inner, stmt.loc)
                local[stmt.name] = self._def_state(stmt, inner)
                inner.bind(stmt.name, local[stmt.name].node_in, stmt.loc)
            else:
                for name in stmt.names:
                    if name not in local:
                        what = "a parameter or let" if name in inner.values else "not declared"
                        raise StateError(f"cannot assign '{name}' in def '{d.name}': it is {what}", stmt.loc,
                                         "a def assigns only the states it declares (`state s: [n] = 0`)")
                    if name in assigned:
                        raise StateError(f"state '{name}' is assigned twice in def '{d.name}'", stmt.loc,
                                         f"it was first assigned at line {assigned[name].line}")
                value = self.expr(stmt.value, inner, graph)
                values = (self._single(value, stmt.value.loc),) if len(stmt.names) == 1 else value
                if not isinstance(values, tuple) or len(values) != len(stmt.names):
                    raise ArityError(f"cannot assign {len(values) if isinstance(values, tuple) else 1} values to "
                                     f"{len(stmt.names)} names", stmt.loc, "give as many values as names")
                for name, v in zip(stmt.names, values):
                    st = local[name]
                    st.node_out = self._fit(v, st.shape, f"state '{name}' of def '{d.name}'", stmt.loc)
                    graph.add_carry(st.node_out, st.node_in)
                    assigned[name] = stmt.loc
                    inner.bind(name, st.node_out, stmt.loc)
        for name, st in local.items():
            if name not in assigned:
                raise StateError(f"state '{name}' of def '{d.name}' is never assigned", st.loc,
                                 "assign it in the def's body")

    def _def_state(self, s: ast.StateDecl, inner: Scope) -> State:
        """A state declared in a def, for one call: a cell state named after the call path."""
        base = "_".join(self._state_prefix + [s.name])
        name, k = base, 1
        while name in self.kinds or name in self.cell_scope.values or name in self.dims:
            k += 1
            name = f"{base}_{k}"
        self.kinds[name] = "a def's state"
        shape = self._shape(s.shape, inner)
        init = self._single(self.expr(s.init, inner, self.graph), s.init.loc)
        if any(self.graph[a].op in ("input", "state") for a in self.graph.ancestors([init])):
            raise TypeError_(f"the initial value of state '{s.name}' must be constant", s.init.loc,
                             "it may use numbers, dims, params and the def's constant arguments")
        init = self._fit(init, shape, f"the initial value of state '{s.name}'", s.init.loc)
        nid = self.graph.add(Node("state", (), shape, attrs={"name": name}, loc=s.loc, name=name))
        state = State(name, shape, init, nid, nid, s.loc)
        self.def_states.append(state)
        return state

    def _combine(self, e: ast.Call, scope: Scope, graph: Graph) -> Value:
        """Apply a declared combine: inline its body, and record the application (ir.Combine)."""
        c: ast.Combine = self.defs[e.func].node
        n = len(c.left)
        usage = f"{e.func}(({', '.join(c.left)}), ({', '.join(c.right)}))" if n > 1 else f"{e.func}(a, b)"
        if scope is not self.cell_scope:
            raise UnsupportedError(f"combine '{e.func}' can only be applied in a cell's body", e.loc,
                                   "apply it to the states it folds, e.g. `s = f(s, x)`")
        if e.kwargs or len(e.args) != 2:
            raise ArityError(f"combine '{e.func}' takes two operands of {n} value{'s' * (n != 1)}", e.loc,
                             f"call it as {usage}")
        sides = []
        for arg in e.args:
            items = arg.items if isinstance(arg, ast.Tuple) else [arg]
            if len(items) != n:
                raise ArityError(f"combine '{e.func}' takes operands of {n} value{'s' * (n != 1)}, got {len(items)}",
                                 arg.loc, f"call it as {usage}")
            sides.append([self._single(self.expr(x, scope, graph), x.loc) for x in items])
        for a, b, name in zip(sides[0], sides[1], c.left):
            if not D.shapes_equal(graph[a].shape, graph[b].shape):
                raise ShapeError(f"combine '{e.func}': operand '{name}' has shape {D.fmt_shape(graph[a].shape)} on "
                                 f"the left and {D.fmt_shape(graph[b].shape)} on the right", e.loc,
                                 "both operands hold values of the same kind: give them the same shapes")
        results = self._combine_body(c, sides, graph)
        alone = Graph()
        ins = [[alone.add(Node("input", (), graph[v].shape, name=p)) for v, p in zip(side, names)]
               for side, names in zip(sides, (c.left, c.right))]
        out = self._combine_body(c, ins, alone)
        identity = self._combine_identity(c, alone, [graph[v].shape for v in sides[0]])
        for name, v, r in zip(c.left, sides[0], results):
            if not D.shapes_equal(graph[r].shape, graph[v].shape):
                raise ShapeError(f"combine '{e.func}' returns shape {D.fmt_shape(graph[r].shape)} for '{name}', "
                                 f"which has shape {D.fmt_shape(graph[v].shape)}", c.loc,
                                 "a combine returns values shaped like its operands")
        self.combines.append(Combine(e.func, alone, ins[0], ins[1], out, identity, sides[0], sides[1], results,
                                     c.loc, e.loc, c.source))
        return tuple(results) if n > 1 else results[0]

    def _combine_body(self, c: ast.Combine, sides: list[list[int]], graph: Graph) -> list[int]:
        inner = Scope(f"combine {c.name}")
        for side, names in zip(sides, (c.left, c.right)):
            for name, v in zip(names, side):
                if name in inner.values:
                    raise RnncError(f"parameter '{name}' of combine '{c.name}' is named twice", c.loc,
                                    "give each parameter its own name")
                inner.bind(name, v, c.loc)
        if len(c.returns) != len(c.left):
            raise ArityError(f"combine '{c.name}' returns {len(c.returns)} value{'s' * (len(c.returns) != 1)} "
                             f"but folds {len(c.left)}", c.loc, "return one value per operand component")
        self._pure += 1
        try:
            for let in c.lets:
                self._let(let, inner, graph)
            return [self._single(self.expr(r, inner, graph), r.loc) for r in c.returns]
        finally:
            self._pure -= 1

    def _combine_identity(self, c: ast.Combine, graph: Graph, shapes: list[D.Shape]) -> list[int]:
        items = c.identity.items if isinstance(c.identity, ast.Tuple) else [c.identity]
        if len(items) != len(c.left):
            raise ArityError(f"the identity of combine '{c.name}' has {len(items)} value{'s' * (len(items) != 1)} "
                             f"but the combine folds {len(c.left)}", c.identity.loc, "give one value per component")
        out = []
        scope = Scope("combine identity")
        for item, shape, name in zip(items, shapes, c.left):
            v = self._single(self.expr(item, scope, graph), item.loc)
            if any(graph[a].op == "input" for a in graph.ancestors([v])):
                raise TypeError_(f"the identity of combine '{c.name}' must be constant", item.loc,
                                 "write numbers such as 0, 1 or -inf")
            out.append(self._fit(v, shape, f"the identity's '{name}'", item.loc, graph))
        return out

    def _kw(self, e: ast.Call, allowed: set[str]) -> None:
        extra = set(e.kwargs) - allowed
        if extra:
            hint = f"it accepts {', '.join(sorted(allowed))}" if allowed else "it takes no keyword arguments"
            raise ArityError(f"{e.func}() got an unexpected keyword argument '{sorted(extra)[0]}'", e.loc, hint)

    def _nargs(self, e: ast.Call, lo: int, hi: int | None = None) -> None:
        hi = lo if hi is None else hi
        n = len(e.args)
        if n < lo or (hi >= 0 and n > hi):
            want = str(lo) if lo == hi else (f"{lo} or more" if hi < 0 else f"{lo} to {hi}")
            raise ArityError(f"{e.func}() takes {want} argument{'s' * (want != '1')}, got {n}", e.loc,
                             "see docs/language.md for its signature")

    def _axis(self, e: ast.Call, scope: Scope, default: int | None) -> int | None:
        if "axis" not in e.kwargs:
            return default
        v = self.dimval(e.kwargs["axis"], scope)
        if not v.is_Integer:
            raise TypeError_("axis must be an integer", e.kwargs["axis"].loc, "write e.g. axis=0 or axis=-1")
        return int(v)

    def _builtin(self, e: ast.Call, scope: Scope, graph: Graph) -> Value:
        f, loc = e.func, e.loc
        arg = lambda i: self._single(self.expr(e.args[i], scope, graph), e.args[i].loc)  # noqa: E731
        if f in ops.UNARY:
            self._kw(e, set()), self._nargs(e, 1)
            return self._apply(f, [arg(0)], graph, loc)
        if f in ("minimum", "maximum"):
            self._kw(e, set()), self._nargs(e, 2)
            return self._apply(f, [arg(0), arg(1)], graph, loc)
        if f == "clamp":
            self._kw(e, set()), self._nargs(e, 3)
            x, lo, hi = arg(0), arg(1), arg(2)
            return self._apply("minimum", [self._apply("maximum", [x, lo], graph, loc), hi], graph, loc)
        if f == "where":
            self._kw(e, set()), self._nargs(e, 3)
            return self._apply("where", [arg(0), arg(1), arg(2)], graph, loc)
        if f in ops.REDUCE:
            self._kw(e, {"axis"}), self._nargs(e, 1)
            x = arg(0)
            shape, ax = ops.reduce(graph[x], self._axis(e, scope, None), f, loc)
            return graph.add(Node("reduce", (x,), shape, attrs={"fn": f, "axis": ax}, loc=loc))
        if f in ("softmax", "normalize"):
            self._kw(e, {"axis"}), self._nargs(e, 1)
            x = arg(0)
            ops._need_float(graph[x], f, loc)
            rank = len(graph[x].shape)
            if rank == 0:
                raise ShapeError(f"{f} needs a vector, got a scalar", loc, "it works along an axis of a vector or matrix")
            ax = ops.norm_axis(self._axis(e, scope, -1), rank, f, loc)
            return graph.add(Node(f, (x,), graph[x].shape, attrs={"axis": ax}, loc=loc))
        if f == "outer":
            self._kw(e, set()), self._nargs(e, 2)
            a, b = arg(0), arg(1)
            return graph.add(Node("outer", (a, b), ops.outer(graph[a], graph[b], loc), loc=loc))
        if f == "transpose":
            self._kw(e, set()), self._nargs(e, 1)
            x = arg(0)
            return graph.add(Node("transpose", (x,), ops.transpose(graph[x], loc), loc=loc))
        if f == "concat":
            self._kw(e, {"axis"}), self._nargs(e, 1, -1)
            xs = [arg(i) for i in range(len(e.args))]
            shape, ax = ops.concat([graph[x] for x in xs], self._axis(e, scope, -1), loc)
            return graph.add(Node("concat", tuple(xs), shape, attrs={"axis": ax}, loc=loc))
        if f == "split":
            return self._split(e, scope, graph, arg(0) if e.args else None)
        if f == "eye":
            self._kw(e, set()), self._nargs(e, 1)
            n = self._size(e.args[0], scope)
            return graph.add(Node("eye", (), (n, n), attrs={"n": n}, loc=loc))
        if f in ("zeros", "ones"):
            self._kw(e, set()), self._nargs(e, 1, -1)
            shape = tuple(self._size(a, scope) for a in e.args)
            return graph.add(Node("full", (), shape, attrs={"value": 0 if f == "zeros" else 1, "shape": shape},
                                  loc=loc))
        if f == "arange":
            self._kw(e, set()), self._nargs(e, 1, 2)
            lo = self.dimval(e.args[0], scope) if len(e.args) == 2 else D.const(0)
            hi = self.dimval(e.args[-1], scope)
            n = sympy.expand(hi - lo)
            if n.is_Integer and n <= 0:
                raise ShapeError(f"arange({D.fmt(lo)}, {D.fmt(hi)}) is empty", loc, "arange(lo, hi) needs lo < hi")
            return graph.add(Node("arange", (), (n,), attrs={"lo": lo, "hi": hi}, loc=loc))
        raise UnsupportedError(f"builtin '{f}' is not implemented", loc, "")  # pragma: no cover

    def _size(self, e: ast.Expr, scope: Scope) -> D.Dim:
        n = self.dimval(e, scope)
        if n.is_Integer and n <= 0:
            raise ShapeError(f"size {n} is not positive", e.loc, "sizes must be at least 1")
        return n

    def _split(self, e: ast.Call, scope: Scope, graph: Graph, x: int | None) -> Value:
        self._kw(e, {"axis"}), self._nargs(e, 2)
        node = graph[x]
        ops._need_float(node, "split", e.loc)
        if not node.shape:
            raise ShapeError("cannot split a scalar", e.loc, "split works along an axis of a vector or matrix")
        ax = ops.norm_axis(self._axis(e, scope, -1), len(node.shape), "split", e.loc)
        size = node.shape[ax]
        spec = e.args[1]
        if isinstance(spec, ast.Literal):
            sizes = tuple(self._size(i, scope) for i in spec.items)
            if not D.equal(sum(sizes, D.const(0)), size):
                raise ShapeError(f"split sizes ({', '.join(map(D.fmt, sizes))}) do not add up to the axis size "
                                 f"{D.fmt(size)} of {D.fmt_shape(node.shape)}", e.loc,
                                 "the sizes must add up to the size of the split axis")
        else:
            n = self._size(spec, scope)
            part = sympy.expand(size / n)
            if not D.is_integral_poly(part):
                raise ShapeError(f"cannot split an axis of size {D.fmt(size)} ({D.fmt_shape(node.shape)}) into {n} "
                                 "equal parts", e.loc, f"the size must be a multiple of {n}, e.g. [{n}*H]")
            if not n.is_Integer:
                raise UnsupportedError("split into a symbolic number of parts", e.loc, "use an integer count")
            sizes = (part,) * int(n)
        whole = graph.add(Node("split", (x,), node.shape, "tuple", attrs={"axis": ax, "sizes": sizes}, loc=e.loc))
        items = []
        for i, s in enumerate(sizes):
            shape = node.shape[:ax] + (s,) + node.shape[ax + 1:]
            items.append(graph.add(Node("item", (whole,), shape, attrs={"index": i}, loc=e.loc)))
        return tuple(items)


def _declared_here(nodes: list[Node]) -> tuple[Note, ...]:
    """Notes pointing at where the named operands of a failed operation got their shapes."""
    notes, seen = [], set()
    for n in nodes:
        if n.name and n.loc and n.loc.line and id(n) not in seen:
            seen.add(id(n))
            what = {"input": "input", "param": "param", "state": "state"}.get(n.op, "let")
            verb = "declared" if what != "let" else "defined"
            notes.append(Note(f"{what} '{n.name}' is {verb} {D.fmt_shape(n.shape)} here", n.loc))
    return tuple(notes)


def _flatten(v) -> list:
    return [x for item in v for x in _flatten(item)] if isinstance(v, list) else [v]


def _nest(v, f):
    """Nested lists shaped like `v`, each leaf replaced by f(leaf)."""
    return [_nest(item, f) for item in v] if isinstance(v, list) else f(v)


def _shape_of(v) -> tuple:
    out = []
    while isinstance(v, list):
        out.append(len(v))
        v = v[0]
    return tuple(out)
