"""The data of the moc_pydoc_mc task (lm-eval `custom_dataset`): moc_pydoc_mc.jsonl next to this file."""

import json
from pathlib import Path

import datasets

DATA = Path(__file__).with_name("moc_pydoc_mc.jsonl")


def load(**_metadata) -> datasets.DatasetDict:
    """The questions as a test split; lm-eval passes the task's metadata, which is not needed here."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
