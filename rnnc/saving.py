"""Pickling built cells: a cell pickles as the recipe that rebuilds it, not as its generated class.

A cell from `rnnc.build` is an instance of a class that lives in a generated module
(`rnnc_gen_lstm_<hash>`), which a fresh process does not have. So the cell pickles as
`rebuild(recipe)` plus its attributes (parameters, dims, training flag, hooks): the recipe holds
the spec's text, its file name and the build arguments, all plain data. Unpickling parses that
text and regenerates the module through rnnc's own pipeline and loader (the content hash names
it), so nothing runs that rnnc did not generate from a spec; no generated source travels in the
pickle. The attributes then land on an uninitialised instance, exactly as pickled.

A spec that imports another file by path needs that file at the same place when loading.
"""
from __future__ import annotations

from typing import Any

#: Instance attributes that describe the generated code, not the cell's data: rebuilt, not carried.
_REGENERATED = ("source", "backend")

#: recipe key -> the rebuilt class and what describes it, so that loading many copies builds once.
_classes: dict[tuple, tuple[type, dict]] = {}


def recipe(program, cell: str | None, backend: str, backward: str, chunk_size: int | None, device,
           dims: dict[str, int]) -> dict[str, Any]:
    """What `rebuild` needs to regenerate a cell: plain data only (text, names, numbers)."""
    return {"version": 1, "text": program.source, "file": program.file, "cell": cell, "backend": backend,
            "backward": backward, "chunk_size": chunk_size,
            "device": None if device is None else str(device), "dims": dict(dims)}


def reduce_cell(self):
    """`__reduce__` of every class `rnnc.build` makes (installed on the generated class by build)."""
    state = {k: v for k, v in self.__dict__.items() if k not in _REGENERATED}
    return rebuild, (self._rnnc_recipe,), state


def rebuild(recipe: dict[str, Any]):
    """An uninitialised instance of the cell class regenerated from `recipe`; pickle then sets its
    attributes (the parameters and the rest of the pickled state)."""
    from .api import build
    from .program import parse_program  # not api.parse: its warnings were shown when the cell was built

    key = _key(recipe)
    if key not in _classes:
        if recipe.get("version") != 1:
            raise ValueError(f"this pickle holds an rnnc cell recipe of version {recipe.get('version')!r}; "
                             "this rnnc reads version 1")
        program = parse_program(recipe["text"], recipe["file"])
        built = build(program, cell=recipe["cell"], backend=recipe["backend"], backward=recipe["backward"],
                      chunk_size=recipe["chunk_size"], device=_available(recipe["device"]), **recipe["dims"])
        _classes[key] = type(built), {k: built.__dict__[k] for k in _REGENERATED}
    cls, described = _classes[key]
    obj = cls.__new__(cls)
    obj.__dict__.update(described)
    return obj


def _available(device: str | None) -> str | None:
    """The device the cell was built for, or None (the CPU's choice of lowering) where this machine has
    no such device: a cell trained on a GPU loads with map_location="cpu" on a machine without one."""
    import torch

    if device is None:
        return None
    kind = torch.device(device).type
    if kind == "cpu" or (kind == "cuda" and torch.cuda.is_available()):
        return device
    backend = getattr(torch, kind, None)
    return device if backend is not None and getattr(backend, "is_available", lambda: False)() else None


def _key(recipe: dict[str, Any]) -> tuple:
    return tuple((k, tuple(sorted(v.items())) if isinstance(v, dict) else v) for k, v in sorted(recipe.items()))
