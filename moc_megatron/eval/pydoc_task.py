"""The local lm-eval task ``moc_pydoc_mc``: which sentence documents this standard-library function?

Derived deterministically from the facts of the embedded corpus (moc_megatron/data/corpus.py): the
corpus holds each compiled module's functions as ``signature\\ndocstring``, so a question is a signature
and its choices are four docstring summaries, the function's own and three others'. Functions, distractors
and the answer's place are chosen by crc32 hashes, so one interpreter always writes the same file.

    python -m moc_megatron.eval.pydoc_task [--output tools/eval_tasks/moc_pydoc_mc.jsonl] [--questions 40]
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path

from moc_megatron.data.corpus import compiled_entries, summary

MODULES = ("math", "cmath", "gc", "zlib", "binascii", "marshal", "itertools")  # not sys: its hooks are replaceable
CHOICES, MAX_WORDS = 4, 16
DEFAULT_OUTPUT = Path(__file__).resolve().parents[2] / "tools" / "eval_tasks" / "moc_pydoc_mc.jsonl"


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def facts() -> list[tuple[str, str]]:
    """(signature, summary) of each module-level function (or class) with a one-line signature and a
    short, unique summary, in module and name order."""
    found, seen = [], set()
    for module in MODULES:
        for e in compiled_entries(module):
            text = summary(e.doc)
            if (not e.name or "." in e.name or e.signature.endswith("(...)") or "\n" in e.signature
                    or not 3 <= len(text.split()) <= MAX_WORDS or text in seen):
                continue
            seen.add(text)
            found.append((e.signature, text))
    return found


def questions(n: int = 40) -> list[dict]:
    """n questions: {id, signature, choices (4 summaries), label (index of the right one)}."""
    pool = facts()
    if n > len(pool):
        raise ValueError(f"--questions {n}: the corpus has only {len(pool)} eligible functions")
    rows = []
    for signature, answer in sorted(pool, key=lambda f: _crc(f[0]))[:n]:
        others = sorted((s for s in pool if s[0] != signature), key=lambda o: _crc(signature + "|" + o[0]))
        choices = [text for _, text in others[:CHOICES - 1]]
        label = _crc(signature) % CHOICES
        choices.insert(label, answer)
        name = signature.removeprefix("class ").split("(")[0]
        rows.append({"id": name, "signature": signature, "choices": choices, "label": label})
    return sorted(rows, key=lambda r: r["id"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pydoc_task", description=__doc__.split("\n")[0])
    p.add_argument("--output", default=str(DEFAULT_OUTPUT))
    p.add_argument("--questions", type=int, default=40)
    args = p.parse_args(argv)
    rows = questions(args.questions)
    Path(args.output).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} questions to {args.output} (Python {sys.version_info.major}.{sys.version_info.minor})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
