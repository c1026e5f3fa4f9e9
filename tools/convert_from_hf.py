"""Load an exported MoC model, or a Llama model, into a training checkpoint at any TP x PP x EP layout;
see moc_megatron/training/import_hf.py (also `moc-convert-from-hf`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from moc_megatron.training.import_hf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
