"""unique_chapters: the chapters a micro-batch selected, so K/V are projected once per chapter."""

import torch

from moc_megatron.ops import torch_impl
from moc_megatron.ops._backend import kernels_for


def unique_chapters(chapters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """chapters (b, n) int64 -> unique sorted ids (u,) int64, inverse (b, n) with unique[inverse] == chapters.

    CPU tensors use the extension's lookup-table kernel (several times faster than torch.unique at
    chapter-id ranges); other devices use torch.unique.
    """
    if chapters.dtype != torch.int64:
        raise TypeError(f"unique_chapters: chapters must be int64, got {chapters.dtype}")
    kernels = kernels_for(chapters.device)
    if chapters.device.type == "cpu" and kernels is not torch_impl:
        return kernels.unique_chapters(chapters)
    return torch_impl.unique_chapters(chapters)


def used_rows(num_rows: int, inverse: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """(u,) bool: the rows of a unique table that some used slot reads; inverse, used (b, n).

    Rows that only unused slots name (units that route to nothing, padding) stay out of a sparse bank
    gradient. No host sync: a max-scatter rather than a boolean mask."""
    hits = torch.zeros(num_rows, dtype=torch.int8, device=inverse.device)
    return hits.scatter_reduce(0, inverse.reshape(-1), used.reshape(-1).to(torch.int8), "amax").bool()
