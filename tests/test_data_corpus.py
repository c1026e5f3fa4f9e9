"""tools/make_corpus.py: documentation corpus and chat set, built without importing the modules it reads."""

import json
import sys
import textwrap

import pytest

from moc_megatron.data.corpus import COMPILED_MODULES, collect_entries, make_corpus


@pytest.fixture
def fake_stdlib(tmp_path):
    """A tiny 'standard library' whose modules would leave a marker file (or exit) if imported."""
    root = tmp_path / "lib"
    marker = tmp_path / "imported"
    bomb = f"open({str(marker)!r}, 'w').close()\nraise SystemExit('imported!')\n"
    files = {
        "boom.py": f'"""Boom explains how explosions are avoided here."""\n{bomb}'
                   'def detonate(when, *, force=1):\n    """Detonate the charge at the given time, loudly."""\n',
        "pkg/__init__.py": '"""The package gathers several helpful tools together."""\n' + bomb,
        "pkg/sub.py": textwrap.dedent('''\
            class Widget(Base):
                """A widget draws itself on the screen when asked."""
                def draw(self, colour="red"):
                    """Draw the widget using the given colour please."""
                def _hidden(self):
                    """Private helpers stay out of the corpus entirely."""
            def twin():
                """Boom explains how explosions are avoided here."""
            '''),
        "test/test_boom.py": '"""Tests are not documentation for anyone reading."""\n',
        "idlelib/__init__.py": '"""The IDLE editor package is skipped on purpose."""\n',
        "_private.py": '"""Private modules are skipped as well, always."""\n',
        "notpkg/mod.py": '"""A directory without __init__ is not a package."""\n',
        "broken.py": 'def f(:\n    """Unparsable source is skipped quietly."""\n',
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root, marker


def test_sources_are_parsed_never_imported_and_docstrings_kept_once(fake_stdlib):
    root, marker = fake_stdlib
    entries = [e for e in collect_entries(str(root)) if e.module not in COMPILED_MODULES]
    assert not marker.exists()
    assert {(e.module, e.name) for e in entries} == {
        ("boom", ""), ("boom", "detonate"), ("pkg", ""), ("pkg.sub", "Widget"), ("pkg.sub", "Widget.draw")}
    signatures = {e.name: e.signature for e in entries}
    assert signatures["detonate"] == "boom.detonate(when, *, force=1)"
    assert signatures["Widget"] == "class pkg.sub.Widget(Base)"


def test_corpus_and_chat_files_are_deterministic_jsonl(fake_stdlib, tmp_path):
    root, _ = fake_stdlib
    outputs = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        corpus, chat = make_corpus(str(tmp_path / name), stdlib_root=str(root))
        outputs.append((open(corpus, "rb").read(), open(chat, "rb").read()))
    assert outputs[0] == outputs[1]
    docs = [json.loads(line)["text"] for line in outputs[0][0].decode().splitlines()]
    boom = next(d for d in docs if d.startswith("Module boom\n"))
    assert "boom.detonate(when, *, force=1)\nDetonate the charge at the given time, loudly." in boom
    assert len(docs) == len(set(docs))
    chats = [json.loads(line)["messages"] for line in outputs[0][1].decode().splitlines()]
    widget = next(c for c in chats if "`pkg.sub.Widget`" in c[-1]["content"] or "`pkg.sub.Widget`" in
                  next(m["content"] for m in c if m["role"] == "user"))
    assert widget[[m["role"] for m in widget].index("assistant")]["content"] == \
        "A widget draws itself on the screen when asked."
    for messages in chats:
        assert [m["role"] for m in messages if m["role"] != "system"][:2] == ["user", "assistant"]


def test_real_interpreter_corpus_imports_only_the_listed_compiled_modules(tmp_path):
    before = set(sys.modules)
    corpus, chat = make_corpus(str(tmp_path))
    new = {name.split(".")[0] for name in set(sys.modules) - before if not name.startswith("_sysconfigdata")}
    assert new <= set(COMPILED_MODULES) | {"pydoc_data"}  # sysconfig's data module aside
    docs = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    assert len(docs) > 300 and sum(map(len, docs)) > 1_000_000
    assert any(d.startswith("Module json\n") for d in docs)
    assert sum(1 for _ in open(chat, encoding="utf-8")) > 2000
