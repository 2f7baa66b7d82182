"""Links a generated module to the code it calls at run time (rnnc/runtime/).

The cell's own code (its class, its generated kernels) is the same in both forms; only what precedes it
differs:
- `imports` (what `rnnc.build` loads): one `from rnnc.runtime.<module> import ...` line per runtime
  module, naming the functions the cell's code reads;
- `vendor` (what `rnnc compile` writes): those definitions copied in, with every definition they read in
  turn, transitively, grouped by runtime module in the package's order (rnnc.runtime.MODULES), each
  group headed by where it came from; the file then needs only torch (and triton where it launches
  kernels). Both forms run the very same function bodies, so they compute the same numbers.

Names are resolved on the syntax tree, never by slicing text: `ast` finds each top-level definition of
the runtime and the exact lines it spans; `symtable` (Python's own scope analysis) says which global names
a definition, or the generated code, reads, so a local variable never counts as a dependency.
"""
from __future__ import annotations

import ast
import builtins
import functools
import symtable
from dataclasses import dataclass
from pathlib import Path

from rnnc.errors import InternalError

#: The only modules a standalone file imports, as generated code and the runtime spell them.
EXTERNAL = {
    "math": "import math",
    "os": "import os",
    "warnings": "import warnings",
    "torch": "import torch",
    "nn": "import torch.nn as nn",
    "F": "import torch.nn.functional as F",
    "triton": "import triton",
    "tl": "import triton.language as tl",
}
#: Names the runtime imports from the rest of rnnc, and what a standalone file has in their place.
STANDINS = {
    ("rnnc.errors", "InputError"): "InputError = ValueError  # rnnc.build's modules raise rnnc.InputError, "
                                   "a ValueError too",
}
_BUILTINS = frozenset(dir(builtins))


@dataclass(frozen=True)
class Definition:
    """One top-level function, class or constant of a runtime module."""

    name: str
    module: str                # "chunk" for rnnc/runtime/chunk.py
    position: int              # its index among the module's statements (the vendored order)
    source: str                # its lines, decorators and the comment lines right above included
    reads: frozenset[str]      # the global names it reads


@dataclass(frozen=True)
class Runtime:
    """Every definition of rnnc/runtime/, by name, and the names its modules import."""

    modules: tuple[str, ...]
    definitions: dict[str, Definition]
    imports: dict[str, str]    # a STANDINS name -> the rnnc module the runtime imports it from

    def resolve(self, name: str, where: str) -> str:
        """'def', 'external' or 'standin' for a global name read by `where` (InternalError if unbound)."""
        if name in self.definitions:
            return "def"
        if name in EXTERNAL:
            return "external"
        if name in self.imports:
            return "standin"
        raise InternalError(f"{where} reads '{name}', which neither it nor rnnc.runtime defines")


def free_names(source: str, filename: str = "<generated>") -> set[str]:
    """The global names a module's code reads and does not bind itself (builtins excluded)."""
    table = symtable.symtable(source, filename, "exec")
    read = {s.get_name() for s in table.get_symbols() if s.is_referenced()}
    for child in table.get_children():
        read |= _global_reads(child)
    return read - _bound_names(source, table) - _BUILTINS


def _bound_names(source: str, table: symtable.SymbolTable | None = None) -> set[str]:
    """The names a module binds at its top level (assignments, imports, defs and classes)."""
    table = table or symtable.symtable(source, "<generated>", "exec")
    return {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}


def _global_reads(table: symtable.SymbolTable) -> set[str]:
    """The global names a function or class scope reads, its nested scopes included."""
    names = {s.get_name() for s in table.get_symbols() if s.is_referenced() and s.is_global()}
    for child in table.get_children():
        names |= _global_reads(child)
    return names


def _module_scope_reads(node: ast.AST) -> set[str]:
    """Names a def or class reads when it is defined: decorators, defaults, annotations, bases."""
    parts: list[ast.AST] = list(getattr(node, "decorator_list", []))
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        a = node.args
        parts += a.defaults + [d for d in a.kw_defaults if d is not None]
        parts += [x.annotation for x in a.posonlyargs + a.args + a.kwonlyargs if x.annotation is not None]
        parts += [x.annotation for x in (a.vararg, a.kwarg) if x is not None and x.annotation is not None]
        parts += [node.returns] if node.returns is not None else []
    elif isinstance(node, ast.ClassDef):
        parts += node.bases + [k.value for k in node.keywords]
    return {n.id for p in parts for n in ast.walk(p) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _lines(text: list[str], node: ast.stmt) -> str:
    """The statement's lines, its decorators and the comment lines right above it included."""
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
    while first > 0 and text[first - 1].startswith("#"):
        first -= 1
    return "\n".join(text[first:node.end_lineno])


def _parse_module(module: str, path: Path) -> tuple[list[Definition], dict[str, str]]:
    """A runtime module's definitions and its imports from the rest of rnnc (STANDINS); InternalError for
    what a standalone file could not carry (an import from elsewhere, a statement that is not a
    definition) and for a global it reads but does not bind (it would run vendored, not imported)."""
    source = path.read_text()
    tree = ast.parse(source, str(path))
    scopes = {(t.get_name(), t.get_lineno()): t for t in symtable.symtable(source, str(path), "exec").get_children()}
    text = source.splitlines()
    where = f"rnnc/runtime/{path.name}"
    defs: list[Definition] = []
    imports: dict[str, str] = {}
    bound: set[str] = set()
    for i, node in enumerate(tree.body):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and i == 0:
            continue  # the docstring
        if isinstance(node, ast.Import):
            for a in node.names:
                stmt = f"import {a.name}" + (f" as {a.asname}" if a.asname else "")
                if EXTERNAL.get(a.asname or a.name) != stmt:
                    raise InternalError(f"{where}: `{stmt}` is not one of a standalone file's imports")
                bound.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1 or (node.module or "").startswith("rnnc.runtime"):
                if any(a.asname for a in node.names):
                    raise InternalError(f"{where}: import runtime names without renaming them")
            elif all((node.module, a.name) in STANDINS and not a.asname for a in node.names):
                imports.update({a.name: node.module for a in node.names})
            else:
                raise InternalError(f"{where}: a standalone file could not import from {node.module}")
            bound.update(a.name for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            scope = scopes.get((node.name, node.lineno))
            if scope is None:
                raise InternalError(f"{where}: no scope found for {node.name}")
            reads = _global_reads(scope) | _module_scope_reads(node)
            defs.append(Definition(node.name, module, i, _lines(text, node), frozenset(reads - _BUILTINS)))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None and all(
                isinstance(t, ast.Name) for t in (node.targets if isinstance(node, ast.Assign) else [node.target])):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            reads = {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
            defs += [Definition(t.id, module, i, _lines(text, node), frozenset(reads - _BUILTINS)) for t in targets]
        else:
            raise InternalError(f"{where} line {node.lineno}: only imports, functions, classes and constants "
                                "may sit at the top level of a runtime module")
    bound |= {d.name for d in defs}
    for d in defs:
        if d.reads - bound:
            raise InternalError(f"{where}: {d.name} reads {', '.join(sorted(d.reads - bound))}, which the module "
                                "neither defines nor imports")
    return defs, imports


@functools.cache
def runtime() -> Runtime:
    """The runtime package, read from its files (not imported: compiling a cell imports neither torch nor
    triton). InternalError if a name is defined twice or a module is missing from MODULES."""
    import rnnc.runtime as package

    folder = Path(package.__file__).parent
    found = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    if found != set(package.MODULES):
        raise InternalError(f"rnnc.runtime.MODULES lists {sorted(package.MODULES)}, the folder holds {sorted(found)}")
    definitions: dict[str, Definition] = {}
    imports: dict[str, str] = {}
    for module in package.MODULES:
        defs, more = _parse_module(module, folder / f"{module}.py")
        imports.update(more)
        for d in defs:
            if d.name in definitions and definitions[d.name].module != module:
                raise InternalError(f"'{d.name}' is defined in rnnc/runtime/{definitions[d.name].module}.py "
                                    f"and in rnnc/runtime/{module}.py")
            definitions[d.name] = d
    return Runtime(tuple(package.MODULES), definitions, imports)


def _external_imports(names: set[str]) -> list[str]:
    """Import lines for the EXTERNAL names among `names`: the standard library, then torch and triton."""
    stdlib = [stmt for name, stmt in EXTERNAL.items() if name in names and name in ("math", "os")]
    third = [stmt for name, stmt in EXTERNAL.items() if name in names and name not in ("math", "os")]
    return stdlib + ([""] if stdlib and third else []) + third


def imports(code: str) -> str:
    """The header of a module that imports its runtime: the import lines for what `code` reads."""
    rt = runtime()
    names = free_names(code)
    kinds = {n: rt.resolve(n, "the generated code") for n in names}
    lines = _external_imports(names)
    lines += [""] if lines else []
    for name in sorted(n for n, k in kinds.items() if k == "standin"):
        lines.append(f"from {rt.imports[name]} import {name}")
    for module in rt.modules:
        used = sorted(n for n, k in kinds.items() if k == "def" and rt.definitions[n].module == module)
        if used:
            lines.append(_wrap(f"from rnnc.runtime.{module} import ", used))
    return "\n".join(lines)


def vendor(code: str, version: str) -> str:
    """The header of a standalone module: imports, then every runtime definition `code` reads,
    transitively, grouped by module in MODULES order and by source order within each."""
    rt = runtime()
    todo = sorted(free_names(code))
    shadowed = _bound_names(code) & set(rt.definitions)
    seen: set[str] = set()
    external: set[str] = set()
    standins: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        where = "the generated code" if name not in rt.definitions else f"rnnc.runtime.{rt.definitions[name].module}"
        kind = rt.resolve(name, where)
        if kind == "external":
            external.add(name)
        elif kind == "standin":
            standins.add(name)
        else:
            todo.extend(sorted(rt.definitions[name].reads - seen))
    if shadowed & seen:  # the runtime would read the generated definition, not its own, once vendored
        raise InternalError(f"the generated code redefines {', '.join(sorted(shadowed & seen))} of rnnc.runtime")
    lines = _external_imports(external)
    for name in sorted(standins):
        lines += ["", "", STANDINS[(rt.imports[name], name)]]
    for module in rt.modules:
        defs = sorted({d.position: d for n, d in rt.definitions.items() if n in seen and d.module == module}.values(),
                      key=lambda d: d.position)  # an `a = b = ...` statement once
        if not defs:
            continue
        lines += ["", "", f"# {'-' * 20} vendored from rnnc.runtime.{module} (rnnc {version}) {'-' * 20}"]
        for d in defs:
            lines += ["", "", d.source]
    return "\n".join(lines)


def _wrap(head: str, names: list[str], width: int = 110) -> str:
    """`head` and the names on one line, or one name a line in parentheses when that would be too long."""
    line = head + ", ".join(names)
    if len(line) <= width:
        return line
    return head + "(\n" + "".join(f"    {n},\n" for n in names) + ")"
