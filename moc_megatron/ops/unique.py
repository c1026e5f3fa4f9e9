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
