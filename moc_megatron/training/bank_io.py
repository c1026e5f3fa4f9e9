"""Bank shards of checkpoints in the earlier DeepSpeed format, by global chapter id, and this rank's banks.

That format (before dist_state) kept the banks out of DeepSpeed's files, which hold data-parallel
rank 0's copy only (the routed chapters of other chapter-parallel ranks would be lost):

    {checkpoint}/bank/bank{j}.shared.pt              (n_shared, t, d)
    {checkpoint}/bank/bank{j}.routed.{a}-{b}.pt      global chapters a .. b-1

read back at any EP size by chapter id. The current format stores the bank as one global tensor.
"""

from __future__ import annotations

import os
import re

import torch

from moc_megatron.errors import UserError

ROUTED = re.compile(r"^bank(\d+)\.routed\.(\d+)-(\d+)\.pt$")


def read_full_bank(path: str, j: int, chapters: int, n_shared: int) -> torch.Tensor:
    """The whole bank j (chapters, t, d) in global chapter order, from whatever EP layout wrote it."""
    folder = os.path.join(path, "bank")
    shards = sorted((int(m[2]), int(m[3]), name) for name in _listdir(folder)
                    if (m := ROUTED.match(name)) and int(m[1]) == j)
    parts, expected = [], n_shared
    for first, last, name in shards:
        if first != expected:
            raise UserError(f"{folder}: bank {j} chapters {expected}..{first - 1} are missing "
                            f"(have {[f'{a}-{b}' for a, b, _ in shards]})")
        parts.append(torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True))
        expected = last
    if expected != chapters:
        raise UserError(f"{folder}: bank {j} ends at chapter {expected}, the config has {chapters}")
    if n_shared:
        shared_file = os.path.join(folder, f"bank{j}.shared.pt")
        if not os.path.exists(shared_file):
            raise UserError(f"{shared_file} is missing")
        parts.insert(0, torch.load(shared_file, map_location="cpu", weights_only=True))
    return torch.cat(parts)


def load_banks(banks: dict[int, torch.nn.Module], path: str, chapters: int) -> None:
    """Fill this rank's shards from a checkpoint written at any EP size."""
    for j, bank in banks.items():
        full = read_full_bank(path, j, chapters, bank.n_shared)
        with torch.no_grad():
            first = bank.first_routed
            bank.routed.copy_(full[first : first + bank.routed.shape[0]])
            if bank.shared is not None:
                bank.shared.copy_(full[: bank.n_shared])


def has_bank_files(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "bank"))


def _listdir(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise UserError(f"{folder} does not exist: the checkpoint has no bank files")
    return os.listdir(folder)


def local_banks(module: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Bank index -> this rank's bank module, for a MoCModel or a pipeline stage."""
    if hasattr(module, "tied_modules"):
        return {int(k[4:]): m for k, m in module.tied_modules.items() if k.startswith("bank")}
    return dict(enumerate(getattr(module, "banks", [])))
