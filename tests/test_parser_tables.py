"""The parser's LALR tables cached as JSON (rnnc/parser_tables.py): same trees, no trust in the file."""
from __future__ import annotations

import json

import lark
import pytest

from rnnc.parser_tables import load_parser
from rnnc.resources import grammar_file, specs_dir

OPTIONS = dict(propagate_positions=True, maybe_placeholders=True)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNC_CACHE_DIR", str(tmp_path))
    return tmp_path


def _positions(tree):
    return [(t.data, t.meta.line, t.meta.column) for t in tree.iter_subtrees() if not t.meta.empty]


def test_cached_tables_parse_like_fresh_ones(cache):
    grammar = grammar_file().read_text()
    fresh = lark.Lark(grammar, parser="lalr", **OPTIONS)
    load_parser(grammar, **OPTIONS)  # writes the tables
    (table,) = cache.glob("parser-*.json")
    cached = load_parser(grammar, **OPTIONS)
    for spec in sorted(specs_dir().glob("*.rnn")):
        text = spec.read_text()
        a, b = fresh.parse(text), cached.parse(text)
        assert a == b and _positions(a) == _positions(b), spec.name
    assert table.stat().st_size > 1000


@pytest.mark.parametrize("damage", ["truncate", "foreign key", "not json"])
def test_damaged_or_foreign_tables_are_rebuilt(cache, damage):
    grammar = grammar_file().read_text()
    load_parser(grammar, **OPTIONS)
    (table,) = cache.glob("parser-*.json")
    text = table.read_text()
    if damage == "truncate":
        table.write_text(text[: len(text) // 2])
    elif damage == "foreign key":
        stored = json.loads(text)
        stored["d"][0][1] = "someone-else"  # the "key" entry
        table.write_text(json.dumps(stored))
    else:
        table.write_bytes(b"\x80\x04\x95 a pickle, say")
    parser = load_parser(grammar, **OPTIONS)
    assert parser.parse("cell c(x: [2]) -> (y: [2]) { y = 3 * x }").data == "start"
    assert json.loads(table.read_text())["d"][0] == ["key", table.stem.removeprefix("parser-")]
