"""Generated source → live module: written to a cache file named by its content hash, imported.

(The code such modules call at run time is the package rnnc.runtime.)

Triton (and debuggers, tracebacks, inspect) need real files, so generated code is never exec'd
from a string. The cache directory is $RNNC_CACHE_DIR, else ~/.cache/rnnc.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

_loaded: dict[str, ModuleType] = {}


def cache_dir() -> Path:
    base = os.environ.get("RNNC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rnnc")
    path = Path(base)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        path = Path(tempfile.gettempdir()) / "rnnc-cache"
        path.mkdir(parents=True, exist_ok=True)
    return path


def load_source(source: str, stem: str) -> ModuleType:
    """Import `source` as a module (one file per distinct source text; reused across calls)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    if digest in _loaded:
        return _loaded[digest]
    name = f"rnnc_gen_{stem}_{digest}"
    path = cache_dir() / f"{name}.py"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    _loaded[digest] = module
    return module
