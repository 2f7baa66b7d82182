"""A parsed program: a .rnn file with its imports resolved and every cell elaborated to IR."""
from __future__ import annotations

from pathlib import Path

from . import ast
from .elaborate import DefInfo, Elaborator
from .errors import InternalError, Loc, RnncError, SpecNotFoundError
from .ir import Cell
from .parser import parse_module
from .resources import specs_dir


class Program:
    """The cells of one file (name → ir.Cell, in file order) and the defs they can call."""

    def __init__(self, module: ast.Module, defs: dict[str, DefInfo]) -> None:
        self.module = module
        self.file = module.file
        self.source = module.source
        self.defs = defs
        self.cells: dict[str, Cell] = {}
        for c in module.cells:
            if c.name in self.cells:
                raise RnncError(f"cell '{c.name}' is defined twice", c.loc, "give each cell its own name")
            self.cells[c.name] = Elaborator(c, defs, module.file).run()

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


def parse_program(text: str, filename: str = "<string>") -> Program:
    try:
        module = parse_module(text, filename)
        defs: dict[str, DefInfo] = {}
        _collect_defs(module, defs, seen={_key(filename)})
        return Program(module, defs)
    except RecursionError:
        raise RnncError("program nested too deeply", Loc(filename, 1, 1),
                        "split deep expressions into several `let` bindings") from None
    except RnncError:
        raise
    except Exception as e:  # a compiler bug: still an RnncError, never a traceback at the CLI
        raise InternalError(f"internal compiler error while checking {filename}: {e.__class__.__name__}: {e}",
                            hint="please report this with the spec that triggered it") from e


def _key(filename: str) -> str:
    try:
        return str(Path(filename).resolve())
    except (OSError, ValueError):
        return filename


def _collect_defs(module: ast.Module, defs: dict[str, DefInfo], seen: set[str]) -> None:
    for imp in module.imports:
        path = resolve_import(imp, module.file)
        key = _key(str(path))
        if key in seen:
            continue  # already imported (or an import cycle): its defs are in already
        seen.add(key)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise SpecNotFoundError(f"cannot read imported file '{imp.target}': {e.__class__.__name__}", imp.loc,
                                    "check the path (relative to the importing file)") from None
        _collect_defs(parse_module(text, str(path)), defs, seen)
    for d in [*module.defs, *module.combines]:
        if d.name in defs:
            prev = defs[d.name].node.loc
            what = "combine" if isinstance(d, ast.Combine) else "def"
            raise RnncError(f"{what} '{d.name}' is defined twice (first at {prev})", d.loc, "rename one of them")
        defs[d.name] = DefInfo(d, module.file)


def resolve_import(imp: ast.Import, importer: str) -> Path:
    if imp.is_path:
        base = Path(importer).parent if not importer.startswith("<") else Path.cwd()
        path = (base / imp.target)
        if not path.is_file():
            raise SpecNotFoundError(f"imported file '{imp.target}' not found", imp.loc,
                                    f"looked for {path}; paths are relative to the importing file")
        return path
    path = specs_dir() / f"{imp.target}.rnn"
    if not path.is_file():
        raise SpecNotFoundError(f"no library file named '{imp.target}'", imp.loc,
                                "import a library spec by name, or a file with import \"path.rnn\"")
    return path
