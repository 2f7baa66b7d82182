"""Lark's LALR tables for the grammar, kept as JSON in the cache directory.

Building the tables costs about 0.15 s in every fresh process; loading them costs about 0.02 s.
The file is plain JSON (never a pickle, which Lark's own `cache=` option writes), named by a hash
of the grammar, the options and Lark's version, so it cannot go stale and reading one that someone
else wrote cannot run code: a damaged or foreign file is ignored and rebuilt.
"""
from __future__ import annotations

import hashlib
import json

import lark
from lark.grammar import Rule
from lark.lexer import TerminalDef


def load_parser(grammar: str, **options) -> lark.Lark:
    """A Lark LALR parser for `grammar`, from the tables cache when it holds them."""
    key = hashlib.sha256(repr((grammar, sorted(options.items()), lark.__version__)).encode()).hexdigest()[:24]
    path = _path(key)
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                stored = json.load(f, object_hook=_decode)
            if stored.get("key") == key:
                return lark.Lark._load_from_dict(stored["data"], stored["memo"], **_load_options(options))
        except Exception:  # missing, damaged or foreign: rebuilt below
            pass
    parser = lark.Lark(grammar, parser="lalr", **options)
    if path is not None:
        from .errors import BuildError
        from .loader import write_cached

        data, memo = parser.memo_serialize([TerminalDef, Rule])
        try:
            write_cached(path.parent, path.name, json.dumps(_encode({"key": key, "data": data, "memo": memo}),
                                                            separators=(",", ":")))
        except BuildError:  # an unwritable cache: the tables are built again next time
            pass
    return parser


def _load_options(options: dict) -> dict:
    # Lark accepts only these when loading serialized tables; the rest are baked into them.
    return {k: v for k, v in options.items() if k in lark.lark._LOAD_ALLOWED_OPTIONS}


def _path(key: str):
    from .loader import cache_dir

    try:
        return cache_dir() / f"parser-{key}.json"
    except Exception:  # no usable cache directory: build the tables every time
        return None


# JSON keeps neither integer dict keys nor tuples, and Lark's tables use both: every dict is
# written as {"d": [[key, value], ...]} and every tuple as {"t": [...]}.
def _encode(x):
    if isinstance(x, dict):
        return {"d": [[_encode(k), _encode(v)] for k, v in x.items()]}
    if isinstance(x, tuple):
        return {"t": [_encode(v) for v in x]}
    if isinstance(x, list):
        return [_encode(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"unexpected {type(x).__name__} in Lark's tables")


def _decode(obj: dict):
    if "d" in obj:
        return {k: v for k, v in obj["d"]}
    return tuple(obj["t"])
