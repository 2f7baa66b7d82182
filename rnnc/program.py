"""A parsed program: a .rnn file with its imports resolved and every cell elaborated to IR."""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterable

from . import ast
from .elaborate import DefInfo, Elaborator
from .errors import Diagnostic, InternalError, Loc, Note, RnncError, RnncSyntaxError, SpecNotFoundError, raise_collected
from .ir import Cell
from .parser import parse_module
from .resources import specs_dir


class Program:
    """The cells of one file (name → ir.Cell, in file order) and the defs they can call; `warnings`
    lists what the checks found suspicious (names never used)."""

    def __init__(self, module: ast.Module, defs: dict[str, DefInfo], errors: list[RnncError] | None = None) -> None:
        """Elaborate every cell; each error is appended to `errors` when given (the caller reports them
        all together), else the first raises at once, carrying the rest."""
        self.module = module
        self.file = module.file
        self.source = module.source
        self.defs = defs
        self.cells: dict[str, Cell] = {}
        self.warnings: list[Diagnostic] = []
        found: list[RnncError] = [] if errors is None else errors
        first: dict[str, Loc] = {}
        for c in module.cells:
            if c.name in first:
                found.append(RnncError(f"cell '{c.name}' is defined twice", c.loc, "give each cell its own name",
                                       [Note(f"cell '{c.name}' is first defined here", first[c.name])]))
                continue
            first[c.name] = c.loc
            elaborator = Elaborator(c, defs, module.file)
            try:
                self.cells[c.name] = elaborator.run()
            except RnncError as e:
                found.append(e)
            self.warnings += elaborator.warnings
        self.warnings = sorted(self.warnings + unused_def_lets(module), key=Diagnostic.sort_key)
        if errors is None:
            raise_collected(found, self.warnings)

    def cell(self, name: str | None = None) -> Cell:
        """The cell called `name`; by default the only cell, or the one named like the file."""
        if name is not None:
            if name not in self.cells:
                raise SpecNotFoundError(f"{self.file} has no cell '{name}'",
                                        hint=f"its cells: {', '.join(self.cells) or 'none'}")
            return self.cells[name]
        if len(self.cells) == 1:
            return next(iter(self.cells.values()))
        stem = Path(self.file).stem
        if stem in self.cells:
            return self.cells[stem]
        if not self.cells:
            raise SpecNotFoundError(f"{self.file} defines no cell", hint="add `cell name(...) -> (...) { ... }`")
        raise SpecNotFoundError(f"{self.file} defines several cells ({', '.join(self.cells)})",
                                hint="choose one with cell=NAME (CLI: --cell NAME)")

    def __repr__(self) -> str:
        return f"<rnnc.Program {self.file}: cells {', '.join(self.cells)}>"


def unused_def_lets(module: ast.Module) -> list[Diagnostic]:
    """A warning for each `let` of a def or combine of `module` that neither a later let nor a return
    reads (names starting with '_' are unused on purpose)."""
    out = []
    for d in [*module.defs, *module.combines]:
        read: set[str] = set()
        body = [s.init if isinstance(s, ast.StateDecl) else s.value for s in d.lets]  # lets, states, assignments
        for e in [*body, *d.returns, *getattr(d, "defaults", {}).values()]:
            read |= _names_read(e)
        read |= {n for s in d.lets if isinstance(s, ast.StateDecl) for dim in s.shape for n in _dim_names(dim)}
        for let in d.lets:
            if not isinstance(let, ast.Let):
                continue
            for name, loc in zip(let.names, let.name_locs or [let.loc] * len(let.names)):
                if name not in read and not name.startswith("_"):
                    out.append(Diagnostic("warning", f"let '{name}' is never used", loc,
                                          f"remove it, or name it '_{name}' if it is unused on purpose",
                                          kind="unused-let"))
    return out


def _dim_names(d) -> set[str]:
    """The names a shape's dim expression reads (a def's size argument in `state s: [n + 1]`)."""
    if isinstance(d, ast.DimName):
        return {d.name}
    if isinstance(d, ast.DimBin):
        return _dim_names(d.left) | _dim_names(d.right)
    return set()


def _names_read(e) -> set[str]:
    """The names an expression reads (iteratively: a long sum is a deep tree)."""
    out, todo = set(), [e]
    while todo:
        x = todo.pop()
        if isinstance(x, ast.Name):
            out.add(x.id)
        elif isinstance(x, ast.Call):
            todo += [*x.args, *x.kwargs.values()]
        elif isinstance(x, ast.BinOp):
            todo += [x.left, x.right]
        elif isinstance(x, ast.UnaryOp):
            todo.append(x.operand)
        elif isinstance(x, ast.Index):
            todo += [x.value, *x.items]
        elif isinstance(x, ast.Slice):
            todo += [b for b in (x.lo, x.hi) if b is not None]
        elif isinstance(x, (ast.Literal, ast.Tuple)):
            todo += x.items
    return out


def parse_program(text: str, filename: str = "<string>", import_roots: Iterable[str | Path] = ()) -> Program:
    """Parse and check a program; its `import "..."` files must lie in `allowed_roots(filename, import_roots)`."""
    try:
        module = parse_module(text, filename)
        defs: dict[str, DefInfo] = {}
        errors: list[RnncError] = []
        _collect_defs(module, defs, {_key(filename)}, allowed_roots(filename, import_roots), 0, errors)
        program = Program(module, defs, errors)
        raise_collected(errors, program.warnings)
        return program
    except RecursionError:
        raise RnncError("program nested too deeply", Loc(filename, 1, 1),
                        "split deep expressions into several `let` bindings") from None
    except RnncError:
        raise
    except Exception as e:  # a compiler bug: still an RnncError, never a traceback at the CLI
        raise InternalError(f"internal compiler error while checking {filename}: {e.__class__.__name__}: {e}",
                            hint="please report this with the spec that triggered it") from e


#: How long a chain of imports may be (a file importing one importing one ...), and how large an imported file.
MAX_IMPORT_DEPTH = 32
MAX_IMPORT_BYTES = 1 << 20
#: Folders (separated by os.pathsep) that `import "..."` may read besides the importing spec's own folder.
IMPORT_PATH_ENV = "RNNC_IMPORT_PATH"


def allowed_roots(filename: str, extra: Iterable[str | Path] = ()) -> tuple[Path, ...]:
    """The folders whose .rnn files a program may import by path: the folder of the spec file (none for
    source text), the spec library's, those in $RNNC_IMPORT_PATH and `extra`, symlinks resolved."""
    roots = [] if filename.startswith("<") else [Path(filename).parent]
    roots.append(specs_dir())
    roots += [Path(p) for p in os.environ.get(IMPORT_PATH_ENV, "").split(os.pathsep) if p]
    roots += [Path(p) for p in extra]
    return tuple(dict.fromkeys(Path(os.path.realpath(r)) for r in roots))


def _key(filename: str) -> str:
    try:
        return str(Path(filename).resolve())
    except (OSError, ValueError):
        return filename


def _collect_defs(module: ast.Module, defs: dict[str, DefInfo], seen: set[str], roots: tuple[Path, ...],
                  depth: int, errors: list[RnncError]) -> None:
    """Read the defs and combines of `module` and what it imports into `defs`; a name defined twice is
    appended to `errors` (the first definition kept); an import that fails raises."""
    for imp in module.imports:
        if depth >= MAX_IMPORT_DEPTH:
            raise SpecNotFoundError(f"imports nested more than {MAX_IMPORT_DEPTH} files deep", imp.loc,
                                    "import the files you need from fewer levels")
        path = resolve_import(imp, module.file, roots)
        key = str(path)
        if key in seen:
            continue  # already imported (or an import cycle): its defs are in already
        seen.add(key)
        _collect_defs(_parse_imported(path, imp), defs, seen, roots, depth + 1, errors)
    for d in [*module.defs, *module.combines]:
        if d.name in defs:
            prev = defs[d.name].node.loc
            what = "combine" if isinstance(d, ast.Combine) else "def"
            errors.append(RnncError(f"{what} '{d.name}' is defined twice (first at {prev})", d.loc,
                                    "rename one of them", [Note(f"'{d.name}' is first defined here", prev)]))
            continue
        defs[d.name] = DefInfo(d, module.file)


def _parse_imported(path: Path, imp: ast.Import) -> ast.Module:
    """An imported file, parsed. Its text appears in no error unless it is a well-formed program: a file
    that is not (a secret someone tries to read through an import) is reported by place alone."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_IMPORT_BYTES + 1)
    except OSError as e:
        raise SpecNotFoundError(f"cannot read imported file '{imp.target}': {e.strerror or e.__class__.__name__}",
                                imp.loc, "check the file's permissions") from None
    if len(data) > MAX_IMPORT_BYTES:
        raise SpecNotFoundError(f"imported file '{imp.target}' is larger than {MAX_IMPORT_BYTES >> 20} MiB", imp.loc,
                                "an imported .rnn file holds defs and combines; split it")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecNotFoundError(f"imported file '{imp.target}' is not UTF-8 text", imp.loc,
                                "import only .rnn source files") from None
    try:
        return parse_module(text, str(path))
    except RnncSyntaxError as e:
        where = Loc(e.loc.file, e.loc.line, e.loc.column) if e.loc else imp.loc
        raise RnncSyntaxError(f"imported file '{imp.target}' is not a valid rnnc program (its text is not shown)",
                              where, f"run `rnnc check {path.name}` to see the error") from None


def resolve_import(imp: ast.Import, importer: str, roots: tuple[Path, ...] = ()) -> Path:
    """The file an import names, symlinks resolved: a library spec by name, or a `.rnn` regular file
    that lies (after resolving `..` and symlinks) inside one of `roots` (see allowed_roots)."""
    if not imp.is_path:  # a library module (specs/lib: defs only), else a library cell's spec
        for path in (specs_dir() / "lib" / f"{imp.target}.rnn", specs_dir() / f"{imp.target}.rnn"):
            if path.is_file():
                return path
        raise SpecNotFoundError(f"no library file named '{imp.target}'", imp.loc,
                                "import a library module or spec by name (`import lsrl`), or a file with "
                                "import \"path.rnn\"")
    if not imp.target.endswith(".rnn"):
        raise SpecNotFoundError(f"cannot import '{imp.target}': only .rnn files can be imported", imp.loc,
                                "name a .rnn file")
    from_text = importer.startswith("<")
    library = Path(os.path.realpath(specs_dir()))
    bases = [r for r in roots if r != library] if from_text else [Path(importer).parent]
    if not bases:  # source text with no folders allowed: no path imports (the default)
        raise SpecNotFoundError(f"cannot import '{imp.target}' from source text: it has no folder of its own",
                                imp.loc, f"pass filename= (imports are relative to that file), or allow folders "
                                f"with import_roots= or ${IMPORT_PATH_ENV}")
    for base in bases:
        path = Path(os.path.realpath(base / imp.target))
        if not any(path == r or r in path.parents for r in roots):
            raise SpecNotFoundError(f"cannot import '{imp.target}': it is outside the folders imports may read",
                                    imp.loc, f"imports may read the importing spec's folder, the library and "
                                    f"${IMPORT_PATH_ENV}; add the folder there (or import_roots=)")
        try:
            mode = path.stat().st_mode
        except OSError:
            continue
        if not stat.S_ISREG(mode):
            raise SpecNotFoundError(f"cannot import '{imp.target}': not a regular file", imp.loc, "name a .rnn file")
        return path
    raise SpecNotFoundError(f"imported file '{imp.target}' not found", imp.loc,
                            "paths are relative to the importing file" if not from_text else
                            "paths are relative to the import roots")
