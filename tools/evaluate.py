"""Run lm-evaluation-harness on an exported model or a training checkpoint; see moc_megatron/eval/run.py
(also `moc-eval`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from moc_megatron.eval.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
