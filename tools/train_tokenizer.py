"""Train a sentencepiece tokenizer from JSONL/text; see moc_megatron/data/train_tokenizer.py."""

import sys
from pathlib import Path

try:
    import moc_megatron  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moc_megatron.data.train_tokenizer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
