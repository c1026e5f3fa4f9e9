"""Chapter gather / scatter ops: the compiled extension (moc_megatron._C) or a pure-torch fallback.

    backend()                                   -> "cuda" | "cpp" | "torch"
    chapter_gather(table, index, weight=None)   (u, t, d), (b, n), (b, n) -> (b, n, t, d), differentiable
    chapter_scatter(grad_out, index, weight, num_rows)   its table gradient, deterministic
    chapter_weight_grad(grad_out, table, index)          its weight gradient
    chapter_attention(q, k, v, index, weight, valid=None)   -> out, lse: attention over selected chapters
    unique_chapters(chapters)                   (b, n) -> sorted unique ids (u,), inverse (b, n)
    used_rows(u, inverse, used)                 (u,) bool: rows that some used slot reads

MOC_OPS_BACKEND=torch|cpp forces a path (default auto); see _backend.py.
"""

from moc_megatron.ops._backend import backend
from moc_megatron.ops.attention import chapter_attention
from moc_megatron.ops.chapter_ops import chapter_gather, chapter_scatter, chapter_weight_grad
from moc_megatron.ops.unique import unique_chapters, used_rows

__all__ = ["backend", "chapter_attention", "chapter_gather", "chapter_scatter", "chapter_weight_grad", "unique_chapters", "used_rows"]
