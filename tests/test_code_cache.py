"""The code cache (rnnc/loader.py): atomic under threads and processes, verified, private, bounded."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

import rnnc
from rnnc import loader
from rnnc.errors import BuildError

ROOT = Path(__file__).resolve().parent.parent


def _spec(tag: str) -> str:
    """A cell whose generated source no other test produces (a new cache file)."""
    return f"cell c_{tag}(x: [3]) -> (y: [3]) {{\n  state h: [3] = 0\n  h = tanh(h + x)\n  y = h\n}}\n"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("RNNC_CACHE_DIR", str(d))
    monkeypatch.setattr(loader, "_loaded", {})
    return d


def _files(d: Path) -> list[Path]:
    return sorted(d.glob(f"{loader.PREFIX}*.py"))


def test_eight_threads_building_the_same_new_spec(cache):
    """Bug: the temporary name was per process, so threads renamed each other's files away (up to
    19 of 24 builds failed with FileNotFoundError)."""
    errors, modules = [], []
    barrier = threading.Barrier(8)

    def build(i):
        try:
            barrier.wait()
            modules.append(rnnc.build(_spec("threads"), backend="loop"))
            for _ in range(3):  # and the write itself, each time as a fresh process would
                loader.write_cached(cache, "rnnc_gen_race.py", loader.file_text(f"X = {i}\n"))
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(e)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(modules) == 8
    files = _files(cache)
    assert len(files) == 2 and all(loader.verified(f.read_text()) is not None for f in files)
    assert not list(cache.glob("*.tmp"))
    x = torch.randn(2, 4, 3)
    torch.testing.assert_close(modules[0](x)[0], modules[-1](x)[0])


WRITER = """
import sys, threading
from rnnc import loader
def run():
    for i in range(200):
        loader._loaded.clear()
        assert loader.load_source("VALUE = 7\\n" * 50, "race").VALUE == 7
threads = [threading.Thread(target=run) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print("ok")
"""

BUILDER = """
import sys, torch, rnnc
cell = rnnc.build(sys.argv[1], backend="loop")
y, _ = cell(torch.ones(1, 2, 3))
print(float(y.sum()))
"""


def _race(cache: Path, script: str, *args: str, count: int) -> list[str]:
    env = dict(os.environ, RNNC_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", script, *args], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(count)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * count, [err for _, err in results]
    return [out for out, _ in results]


def test_processes_and_threads_writing_the_same_module(cache):
    """Two processes × four threads each load (write, verify, compile) the same module 200 times."""
    assert _race(cache, WRITER, count=2) == ["ok\n"] * 2
    files = _files(cache)
    assert len(files) == 1 and loader.verified(files[0].read_text()) == "VALUE = 7\n" * 50
    assert not list(cache.glob("*.tmp"))


@pytest.mark.slow
def test_processes_building_the_same_new_spec(cache):
    """Four processes build and run the same new cell at once (each imports torch: slow)."""
    assert len(set(_race(cache, BUILDER, _spec("procs"), count=4))) == 1
    files = _files(cache)
    assert len(files) == 1 and loader.verified(files[0].read_text()) is not None


def test_a_truncated_file_is_rebuilt(cache):
    """Bug: a truncated cached .pyc failed forever (EOFError: marshal data too short)."""
    rnnc.build(_spec("trunc"), backend="loop")
    (path,) = _files(cache)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    loader._loaded.clear()
    cell = rnnc.build(_spec("trunc"), backend="loop")
    assert path.read_text() == text
    assert cell(torch.ones(1, 2, 3))[0].shape == (1, 2, 3)


def test_a_planted_file_is_never_run(cache):
    """Bug: a planted file (a .pyc with a matching header) was imported. Modules are compiled from
    the source in memory; a file that differs from it is replaced, and nothing in it runs."""
    rnnc.build(_spec("plant"), backend="loop")
    (path,) = _files(cache)
    marker = cache / "PWNED"
    planted = f"open({str(marker)!r}, 'w').write('1')\n"
    path.write_text(loader.file_text(planted))  # even with a valid hash trailer
    pycache = cache / "__pycache__"
    pycache.mkdir()
    (pycache / (path.stem + ".cpython-311.pyc")).write_bytes(b"\x00" * 64)
    loader._loaded.clear()
    cell = rnnc.build(_spec("plant"), backend="loop")
    assert not marker.exists()
    assert loader.verified(path.read_text()) == loader.verified(loader.file_text(cell.source))
    import inspect
    assert inspect.getsource(type(cell).forward) in cell.source


def test_an_unwritable_rnnc_cache_dir_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("RNNC_CACHE_DIR", str(blocker / "sub"))
    monkeypatch.setattr(loader, "_loaded", {})
    with pytest.raises(BuildError, match="RNNC_CACHE_DIR"):
        rnnc.build(_spec("unwritable"), backend="loop")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # writable by every user: not private
    monkeypatch.setenv("RNNC_CACHE_DIR", str(shared))
    with pytest.raises(BuildError, match="other users can write"):
        rnnc.build(_spec("unwritable"), backend="loop")


def test_an_unusable_default_dir_falls_back_to_a_private_one(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".cache").mkdir(parents=True)
    (home / ".cache" / "rnnc").write_text("not a directory")
    monkeypatch.delenv("RNNC_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(loader, "_loaded", {})
    monkeypatch.setattr(loader, "_private", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cell = rnnc.build(_spec("fallback"), backend="loop")
    assert any("private directory" in str(w.message) for w in caught)
    private = loader._private
    assert private is not None and (private.stat().st_mode & 0o077) == 0
    assert Path(type(cell).forward.__code__.co_filename).parent == private
    assert cell(torch.ones(1, 2, 3))[0].shape == (1, 2, 3)


def test_the_size_cap_evicts_the_least_recently_used(cache):
    for i in range(4):
        rnnc.build(_spec(f"evict{i}"), backend="loop")
    files = _files(cache)
    assert len(files) == 4
    for age, path in enumerate(sorted(files, key=lambda p: p.name)):
        os.utime(path, (1000 + age, 1000 + age))
    loader._loaded.clear()  # none of them in use
    size = files[0].stat().st_size
    oldest = sorted(files, key=lambda p: p.stat().st_mtime)
    removed = loader.evict(cache, limit=2 * max(p.stat().st_size for p in files))
    assert sorted(removed) == sorted(oldest[:2])
    assert sorted(_files(cache)) == sorted(oldest[2:])
    assert size > 0


def test_a_loose_default_dir_is_made_private(tmp_path, monkeypatch):
    """~/.cache/rnnc made under a loose umask (group- or world-writable) is rnnc's own: tightened to 0700."""
    home = tmp_path / "home"
    default = home / ".cache" / "rnnc"
    default.mkdir(parents=True)
    default.chmod(0o777)
    monkeypatch.delenv("RNNC_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(home))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loader.cache_dir() == default
    assert default.stat().st_mode & 0o777 == 0o700
