"""Merge a checkpoint of any TP x PP x EP layout and export it to Hugging Face; see
moc_megatron/training/export.py (also `moc-convert-hf`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from moc_megatron.training.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
