"""Build an English corpus and a chat set from the interpreter's own documentation; see moc_megatron/data/corpus.py."""

import sys
from pathlib import Path

try:
    import moc_megatron  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moc_megatron.data.corpus import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
