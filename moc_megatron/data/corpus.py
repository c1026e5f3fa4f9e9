"""A real English corpus with no download: the documentation inside the Python interpreter.

Sources: the language-reference topics of pydoc (``pydoc_data.topics``) and the docstrings of the
standard library. Docstrings are read from the ``.py`` sources with ``ast``; nothing is imported, so
no module's import-time side effects can run (antigravity opens a browser, ``this`` prints, tkinter
and idlelib want a display, test.* modules run things). Only a fixed list of compiled modules with
no source and no side effects (``COMPILED_MODULES``) is imported. Tests, demos, private modules and
private names are left out; texts are cleaned and deduplicated, and everything is sorted, so one
interpreter always produces the same bytes.

Outputs (JSONL): a corpus of ``{"text": ...}`` documents, one per module or topic, and a chat set of
``{"messages": [...]}`` asking about a module, class, function or topic and answering with the
summary paragraph of its documentation.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import os
import re
import sys
import sysconfig
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional

from moc_megatron.errors import UserError

COMPILED_MODULES = ("array", "binascii", "builtins", "cmath", "errno", "gc", "itertools", "marshal", "math",
                    "select", "sys", "time", "unicodedata", "zlib")
SKIP_DIRS = {"test", "tests", "idlelib", "turtledemo", "site-packages", "dist-packages", "__pycache__"}
MIN_WORDS = 4
VERSION_NOTE = re.compile(r"(New|Changed|Deprecated) in version|Added in version|Deprecated since")
SYSTEM_PROMPT = "You answer questions about the Python standard library briefly and precisely."
QUESTIONS = ("Explain {obj} in Python.", "What does {obj} do?", "Describe {obj}.",
             "What is {obj} for? Answer briefly.")


@dataclass(frozen=True)
class Entry:
    """One documented object: ``name`` is '' for the module itself."""

    module: str
    name: str
    signature: str
    doc: str


def clean(doc: Optional[str]) -> str:
    """Dedented, trailing spaces and control characters removed, at most one blank line in a row."""
    if not doc:
        return ""
    text = re.sub(r"[^\S\n]", " ", inspect.cleandoc(doc))
    text = re.sub(r"[\x00-\x09\x0b-\x1f\x7f]", "", text)
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def summary(doc: str) -> str:
    """The first paragraph that says something (not a version note), on one line."""
    for paragraph in doc.split("\n\n"):
        if any(line.strip() and set(line.strip()) <= set("=-*~^") for line in paragraph.splitlines()):
            continue  # a heading
        text = " ".join(paragraph.split())
        if len(text.split()) >= MIN_WORDS and not VERSION_NOTE.match(text):
            return text
    return ""


# ---------------------------------------------------------------- standard-library sources (never imported)


def source_modules(root: str) -> Iterator[tuple[str, str]]:
    """(dotted module name, path) of every public .py module under ``root``, sorted."""
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and d.isidentifier() and not d.startswith("_"))
        rel = os.path.relpath(directory, root)
        package = [] if rel == "." else rel.split(os.sep)
        if package and not os.path.exists(os.path.join(directory, "__init__.py")):
            dirs[:] = []
            continue
        for name in sorted(files):
            stem = name[:-3]
            if name.endswith(".py") and (stem == "__init__" or (stem.isidentifier() and not stem.startswith("_"))):
                parts = package if stem == "__init__" else package + [stem]
                if parts:
                    yield ".".join(parts), os.path.join(directory, name)


def source_entries(module: str, path: str) -> list[Entry]:
    """The module's docstring and those of its public functions, classes and methods, by parsing."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, ValueError, OSError):
        return []
    entries = [Entry(module, "", "", clean(ast.get_docstring(tree, clean=False)))]
    for node in tree.body:
        entries.extend(_definition_entries(module, node, prefix=""))
    return entries


def _definition_entries(module: str, node: ast.AST, prefix: str) -> list[Entry]:
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
        return []
    name = prefix + node.name
    doc = clean(ast.get_docstring(node, clean=False))
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in node.bases)
        entries = [Entry(module, name, f"class {module}.{name}" + (f"({bases})" if bases else ""), doc)]
        for child in node.body:
            entries.extend(_definition_entries(module, child, prefix=name + "."))
        return entries
    return [Entry(module, name, f"{module}.{name}({ast.unparse(node.args)})", doc)]


# ---------------------------------------------------------------- compiled modules (imported: no source)


def compiled_entries(module_name: str) -> list[Entry]:
    """Docstrings of a compiled module's public functions, classes and methods."""
    module = importlib.import_module(module_name)
    entries = [Entry(module_name, "", "", clean(module.__doc__))]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", module_name) != module_name:
            continue
        if inspect.isclass(obj):
            entries.append(Entry(module_name, name, f"class {module_name}.{name}", clean(obj.__doc__)))
            for member, value in sorted(vars(obj).items()):
                if not member.startswith("_") and callable(value):
                    qualified = f"{module_name}.{name}.{member}"
                    entries.append(Entry(module_name, f"{name}.{member}", _signature(qualified, value),
                                         clean(value.__doc__)))
        elif callable(obj):
            entries.append(Entry(module_name, name, _signature(f"{module_name}.{name}", obj), clean(obj.__doc__)))
    return entries


def _signature(name: str, obj) -> str:
    text = getattr(obj, "__text_signature__", None) or "(...)"
    text = re.sub(r"\(\$\w+,?\s*", "(", text)
    return f"{name}{text}"


# ---------------------------------------------------------------- pydoc topics


def topic_documents() -> list[tuple[str, str, str]]:
    """(topic key, title, body) of each pydoc language-reference topic."""
    from pydoc_data.topics import topics

    found = []
    for key in sorted(topics):
        text = clean(topics[key])
        title, _, body = text.partition("\n")
        body = body.lstrip("*\n ").strip()
        if len(body.split()) >= MIN_WORDS:
            found.append((key, title.strip(), body))
    return found


# ---------------------------------------------------------------- assembling the outputs


def collect_entries(stdlib_root: str) -> list[Entry]:
    """All documented objects, sorted, each docstring kept once (its first occurrence)."""
    entries = [e for m, p in source_modules(stdlib_root) for e in source_entries(m, p)]
    entries += [e for m in COMPILED_MODULES for e in compiled_entries(m)]
    entries.sort(key=lambda e: (e.module, e.name))
    seen, unique = set(), []
    for entry in entries:
        if len(entry.doc.split()) < MIN_WORDS or entry.doc in seen:
            continue
        seen.add(entry.doc)
        unique.append(entry)
    return unique


def corpus_documents(entries: list[Entry], topics: list[tuple[str, str, str]]) -> list[str]:
    """One document per topic and per module, deduplicated, in a stable order."""
    by_module: dict[str, list[Entry]] = {}
    for entry in entries:
        by_module.setdefault(entry.module, []).append(entry)
    documents = [f"{title}\n\n{body}" for _, title, body in topics]
    for module, items in sorted(by_module.items()):
        parts = [f"Module {module}"]
        for entry in items:
            parts.append(entry.doc if not entry.name else f"{entry.signature}\n{entry.doc}")
        documents.append("\n\n".join(parts))
    return list(dict.fromkeys(documents))


def chat_conversations(entries: list[Entry], topics: list[tuple[str, str, str]]) -> list[dict]:
    """Questions about documented objects answered by their documentation's summary."""
    conversations = []
    for key, title, body in topics:
        answer = summary(body)
        if answer:
            conversations.append(_conversation(key, f"Summarise the Python reference section on {title}.",
                                               answer, None))
    for entry in entries:
        answer = summary(entry.doc)
        if not answer:
            continue
        target = f"the Python module `{entry.module}`" if not entry.name else f"`{entry.module}.{entry.name}`"
        question = QUESTIONS[zlib.crc32(target.encode()) % len(QUESTIONS)].format(obj=target)
        follow_up = entry.signature if entry.name and not entry.signature.endswith("(...)") else None
        conversations.append(_conversation(target, question, answer, follow_up))
    return conversations


def _conversation(key: str, question: str, answer: str, signature: Optional[str]) -> dict:
    """A user/assistant exchange; some open with a system prompt, some ask for the signature next."""
    salt = zlib.crc32(key.encode())
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if salt % 4 == 0 else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if signature and salt % 3 == 0:
        messages += [{"role": "user", "content": "What is its signature?"},
                     {"role": "assistant", "content": f"`{signature}`"}]
    return {"messages": messages}


def write_jsonl(path: str, rows: list[dict]) -> None:
    """Write rows as JSON lines under a temporary name, then rename."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def make_corpus(output_dir: str, stdlib_root: Optional[str] = None) -> tuple[str, str]:
    """Write ``pydoc_corpus.jsonl`` and ``pydoc_chat.jsonl`` into ``output_dir``; returns their paths."""
    if not os.path.isdir(output_dir):
        raise UserError(f"--output-dir {output_dir}: no such directory")
    root = stdlib_root or sysconfig.get_paths()["stdlib"]
    entries, topics = collect_entries(root), topic_documents()
    corpus, chat = os.path.join(output_dir, "pydoc_corpus.jsonl"), os.path.join(output_dir, "pydoc_chat.jsonl")
    write_jsonl(corpus, [{"text": t} for t in corpus_documents(entries, topics)])
    write_jsonl(chat, chat_conversations(entries, topics))
    return corpus, chat


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="make_corpus", description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True, help="Directory for pydoc_corpus.jsonl and pydoc_chat.jsonl.")
    args = p.parse_args(argv)
    try:
        paths = make_corpus(args.output_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
