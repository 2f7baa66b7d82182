"""The docs site's pages of the spec library, generated from the specs themselves.

One Markdown page per library spec: its header comment (citation, equations), its source, and for
each cell the backends that can run it (with why the others cannot), the analysis `rnnc analyze`
prints and a drawing of its IR; plus an index. The docs build (docs/hooks.py) adds them to the site;
`python -m rnnc.docs_pages OUTDIR` writes them to a folder.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

from . import api, schedule
from .analysis import Report
from .program import Program
from .resources import specs_dir

#: where the pages go, relative to the site's root
FOLDER = "cells"


def split_header(text: str) -> tuple[str, str]:
    """(the leading comment block without its '#' marks, the rest of the file)."""
    lines = text.splitlines()
    n = 0
    while n < len(lines) and (lines[n].startswith("#") or (not lines[n].strip() and n + 1 < len(lines)
                                                            and lines[n + 1].startswith("#"))):
        n += 1
    header = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines[:n])
    return header.rstrip(), "\n".join(lines[n:]).strip("\n") + "\n"


def title(text: str) -> str:
    """The spec's first comment line, as `rnnc list` shows it."""
    header, _ = split_header(text)
    return header.splitlines()[0].strip() if header else ""


def relative_paths(text: str) -> str:
    """Analysis text with this machine's spec folder written as `specs/`, so pages do not depend on it."""
    return text.replace(f"{specs_dir()}{os.sep}", "specs/")


def svg_name(spec: str, cell: str) -> str:
    return f"{spec}.svg" if cell == spec else f"{spec}.{cell}.svg"


def _fence(lang: str, body: str) -> str:
    ticks = "````" if "```" in body else "```"
    return f"{ticks}{lang}\n{body.rstrip()}\n{ticks}\n"


def backends_section(prog: Program, cell: str, report: Report) -> str:
    """Which backends can lower the cell, what `auto` picks (`report`: `rnnc.analyze`'s), and why each
    other one cannot."""
    available = api.backends_for(prog, cell=cell)
    lines = [f"Backends that can run it: {', '.join(f'`{b}`' for b in available)}; "
             f"`backend=\"auto\"` picks `{report.backend}` on the CPU"
             + (" (`triton` runs on a CUDA GPU, or on the CPU in Triton's interpreter)." if "triton" in available
                else "."), ""]
    for backend in schedule.BACKENDS:
        if backend not in available:
            lines.append(f"- not `{backend}`: {markdown_text(schedule.why_not(backend, report))}")
    return "\n".join(lines) + "\n"


def markdown_text(text: str) -> str:
    """Plain text safe in a Markdown paragraph: `*`, `_` and `<` outside code spans escaped."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("\\", "\\\\").replace("*", "\\*").replace("_", "\\_").replace("<", "&lt;")
    return "`".join(parts)


def spec_page(name: str) -> dict[str, str]:
    """The files of one library spec's page: `{name}.md` and one IR drawing per cell."""
    text = (specs_dir() / f"{name}.rnn").read_text(encoding="utf-8")
    header, body = split_header(text)
    prog = api.load(name)
    files: dict[str, str] = {}
    parts = [f"# `{name}`: {title(text)}\n" if title(text) else f"# `{name}`\n",
             f"`specs/{name}.rnn`, built with `rnnc.build(\"{name}\")`"
             + ("" if len(prog.cells) == 1 else f" (or `cell=\"...\"`: {', '.join(prog.cells)})") + ".\n",
             "## From the spec's header\n", _fence("text", header),
             "## The spec\n", _fence("rnn", body)]
    for cell in prog.cells:
        level = "##" if len(prog.cells) == 1 else "###"
        if len(prog.cells) > 1:
            parts.append(f"## Cell `{cell}`\n")
        svg = svg_name(name, cell)
        files[svg] = api.graph_svg(prog, cell=cell)
        report = api.analyze(prog, cell=cell)
        parts += [f"{level} Backends\n", backends_section(prog, cell, report),
                  f"{level} Analysis\n",
                  f"`rnnc analyze {name}{'' if len(prog.cells) == 1 else f' --cell {cell}'}` prints:\n",
                  _fence("text", relative_paths(str(report))),
                  f"{level} IR\n",
                  "Grey: constant, blue: hoisted out of the recurrence (all steps at once), orange: per step; "
                  f"dashed red edges carry a state to the next step (`rnnc graph {name}"
                  f"{'' if len(prog.cells) == 1 else f' --cell {cell}'} -o {cell}.svg`).\n",
                  f"![IR graph of {cell}]({svg})\n"]
    files[f"{name}.md"] = "\n".join(parts)
    return files


def index_page(names: Sequence[str]) -> str:
    rows = [f"| [`{n}`]({n}.md) | {title((specs_dir() / f'{n}.rnn').read_text(encoding='utf-8'))} |"
            for n in names]
    return "\n".join(["# The spec library\n",
                      "Every page is generated from the spec in `specs/`: its header (citation and equations), "
                      "its source, the backends that can run it, what `rnnc analyze` finds and its IR.\n",
                      "| name | cell |", "|---|---|", *rows]) + "\n"


def pages(names: Sequence[str] | None = None) -> dict[str, str]:
    """Every generated file, by its path relative to the site's root (`cells/gla.md`, ...)."""
    names = list(api.library() if names is None else names)
    files = {f"{FOLDER}/index.md": index_page(names)}
    for name in names:
        files.update({f"{FOLDER}/{path}": content for path, content in spec_page(name).items()})
    return files


def write_pages(outdir: Path, names: Sequence[str] | None = None) -> list[Path]:
    written = []
    for rel, content in pages(names).items():
        path = Path(outdir) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rnnc.docs_pages",
                                     description="Write the docs site's pages of the spec library.")
    parser.add_argument("outdir", type=Path, help=f"folder to write them in (under {FOLDER}/)")
    parser.add_argument("names", nargs="*", help="library specs (default: all)")
    args = parser.parse_args(argv)
    written = write_pages(args.outdir, args.names or None)
    print(f"wrote {len(written)} files under {args.outdir / FOLDER}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
