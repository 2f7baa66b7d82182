"""Generated source → live module, with a file per module in a private, bounded code cache.

(The code such modules call at run time is the package rnnc.runtime.)

Triton (and debuggers, tracebacks, inspect) read a module's source by its file name, so every
generated module has a file: `rnnc_gen_<cell>_<hash>.py` in the cache directory, $RNNC_CACHE_DIR,
else ~/.cache/rnnc. What is guaranteed:

- Nothing on disk is trusted. The module is compiled from the source text in memory (never from
  the file, never from a `.pyc`: none is read or written), and `linecache` holds that same text,
  so inspect and Triton read what was compiled even if the file is changed afterwards.
- Each file ends with a line `# rnnc-sha256: <hash of the text above it>`; a file that does not
  match the source (truncated, edited, planted) is rewritten.
- Writes are atomic and safe across threads and processes: a temporary file with a unique name
  (tempfile.mkstemp, mode 0600) in the same directory, then os.replace.
- The directory: $RNNC_CACHE_DIR must be a directory this user can create and write, else a
  BuildError says so. The default directory is made private (mode 0700) if others can write it;
  when unusable (read-only home, owned by another user, not a directory), it is replaced by a private directory made for this process
  (tempfile.mkdtemp, mode 0700) with a warning: never a shared, world-writable one.
- A size cap: after each new file, the oldest files (by last use) are deleted until the cache's
  `.py` files total at most $RNNC_CACHE_MAX_MB megabytes (default 256).
"""
from __future__ import annotations

import hashlib
import linecache
import os
import stat
import sys
import tempfile
import threading
import time
import warnings
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

from .errors import BuildError

DEFAULT_MAX_MB = 256
TRAILER = "# rnnc-sha256: "
PREFIX = "rnnc_gen_"
STALE_TEMP_SECONDS = 3600  # a temporary file older than this was left by a writer that died

_loaded: dict[str, ModuleType] = {}
_lock = threading.RLock()
_private: Path | None = None  # this process's fallback directory, once made


def cache_dir() -> Path:
    """The directory generated modules are written to (see the module docstring)."""
    global _private
    chosen = os.environ.get("RNNC_CACHE_DIR")
    if chosen:
        problem = _unusable(Path(chosen))
        if problem:
            raise BuildError(f"RNNC_CACHE_DIR={chosen} cannot hold rnnc's code cache: {problem}",
                             hint="point RNNC_CACHE_DIR at a directory you own and can write, or unset it")
        return Path(chosen)
    default = Path(os.path.expanduser("~")) / ".cache" / "rnnc"
    problem = _unusable(default)
    if problem == "other users can write to it":  # rnnc's own directory, made under a loose umask
        try:
            default.chmod(0o700)
            problem = _unusable(default)
        except OSError:
            pass
    if not problem:
        return default
    with _lock:
        if _private is None or _unusable(_private):
            _private = Path(tempfile.mkdtemp(prefix="rnnc-cache-"))
            warnings.warn(f"rnnc: the code cache {default} is unusable ({problem}); using the private "
                          f"directory {_private} for this process (set RNNC_CACHE_DIR to choose one)",
                          RuntimeWarning, stacklevel=3)
        return _private


def _unusable(path: Path) -> str | None:
    """Why `path` cannot be this user's private cache directory (None when it can: created if need be)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
    except OSError as e:
        return e.strerror or str(e)
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a directory"
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return "it belongs to another user"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "other users can write to it"
    if not os.access(path, os.W_OK | os.X_OK):
        return "it is not writable"
    return None


def file_text(source: str) -> str:
    """What the cache file holds: the source, then the hash of the source."""
    body = source if source.endswith("\n") else source + "\n"
    return f"{body}{TRAILER}{hashlib.sha256(body.encode()).hexdigest()}\n"


def verified(text: str) -> str | None:
    """The source a cache file's text holds, when its trailing hash matches (None otherwise)."""
    body, sep, tail = text.rpartition(TRAILER)
    if not sep or tail.strip() != hashlib.sha256(body.encode()).hexdigest():
        return None
    return body


def load_source(source: str, stem: str) -> ModuleType:
    """Import `source` as a module (one file per distinct source text; reused across calls)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    with _lock:
        if digest in _loaded:
            return _loaded[digest]
        name = f"{PREFIX}{stem}_{digest}"
        text = file_text(source)
        path = write_cached(cache_dir(), f"{name}.py", text)
        linecache.cache[str(path)] = (len(text), None, text.splitlines(True), str(path))
        module = ModuleType(name)
        module.__file__ = str(path)
        module.__spec__ = ModuleSpec(name, None, origin=str(path))
        code = compile(text, str(path), "exec")  # the text in memory, never the file's
        sys.modules[name] = module
        try:
            exec(code, module.__dict__)  # noqa: S102 - rnnc's own generated code
        except BaseException:
            sys.modules.pop(name, None)
            raise
        _loaded[digest] = module
        return module


def write_cached(directory: Path, filename: str, text: str) -> Path:
    """The file `filename` in `directory` holding exactly `text` (written atomically when it does not)."""
    path = directory / filename
    try:
        current = path.read_text()
    except (OSError, UnicodeDecodeError):
        current = None
    if current == text:
        try:
            os.utime(path)  # last use, for eviction
        except OSError:
            pass
        return path
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{filename}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as e:
        raise BuildError(f"cannot write the generated module {path}: {e.strerror or e}",
                         hint="make the cache directory writable, or set RNNC_CACHE_DIR to one that is") from None
    evict(directory)
    return path


def max_bytes() -> int:
    """The cache's size cap: $RNNC_CACHE_MAX_MB megabytes (default DEFAULT_MAX_MB)."""
    raw = os.environ.get("RNNC_CACHE_MAX_MB")
    try:
        mb = float(raw) if raw else DEFAULT_MAX_MB
    except ValueError:
        raise BuildError(f"RNNC_CACHE_MAX_MB={raw!r} is not a number", hint="e.g. RNNC_CACHE_MAX_MB=256") from None
    return max(int(mb * 2**20), 0)


def evict(directory: Path, limit: int | None = None) -> list[Path]:
    """Delete the least recently used generated files until they total at most `limit` bytes (and
    temporary files left by dead writers); the paths deleted. Files of this process's modules are
    kept (their text is in memory; Triton and tracebacks read them by name)."""
    limit = max_bytes() if limit is None else limit
    files, now = [], time.time()
    removed = []
    for entry in os.scandir(directory):
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        if entry.name.endswith(".tmp") and now - info.st_mtime > STALE_TEMP_SECONDS:
            if _unlink(Path(entry.path)):
                removed.append(Path(entry.path))
        elif entry.name.startswith(PREFIX) and entry.name.endswith(".py"):
            files.append((info.st_mtime, info.st_size, Path(entry.path)))
    total = sum(size for _, size, _ in files)
    mine = {m.__file__ for m in _loaded.values()}
    for _, size, path in sorted(files):
        if total <= limit:
            break
        if str(path) in mine:
            continue
        if _unlink(path):
            removed.append(path)
            total -= size
    return removed


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except OSError:
        return False
