"""Which kernels run: the compiled extension moc_megatron._C or the pure-torch path.

MOC_OPS_BACKEND=auto (default) uses the extension where it has a kernel for the tensors' device (and,
for chapter attention on GPUs, the Triton kernel); =torch forces the torch path; =cpp forces the
extension and fails if it cannot serve the call; =triton forces the Triton chapter-attention kernel
(on CPU tensors under TRITON_INTERPRET=1, for tests).
"""

import os
import warnings
from types import ModuleType

import torch

from moc_megatron.errors import UserError
from moc_megatron.ops import torch_impl

ENV_VAR = "MOC_OPS_BACKEND"
_MODES = ("auto", "torch", "cpp", "triton")
_BUILD_HINT = "build it with `pip install --no-build-isolation --no-deps -e .` in the repository root"


def _load_extension() -> ModuleType | None:
    try:
        from moc_megatron import _C
    except ModuleNotFoundError:
        return None
    except ImportError as e:  # built against another torch: warn, keep working on the torch path
        warnings.warn(f"moc_megatron._C failed to load ({e}); using the torch path; {_BUILD_HINT}")
        return None
    return _C


EXTENSION = _load_extension()


def mode() -> str:
    """The requested path from MOC_OPS_BACKEND, read on every call so tests and launchers can set it."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in _MODES:
        raise UserError(f"{ENV_VAR}={value!r} is not one of {', '.join(_MODES)}")
    return value


def _compiled_for(device: torch.device) -> bool:
    if EXTENSION is None:
        return False
    return device.type == "cpu" or (device.type == "cuda" and bool(EXTENSION.with_cuda))


def kernels_for(device: torch.device) -> ModuleType:
    """The module (moc_megatron._C or torch_impl) whose chapter_* functions serve tensors on `device`."""
    requested = mode()
    if requested == "torch":
        return torch_impl
    if _compiled_for(device):
        return EXTENSION
    if requested == "cpp":
        built = "is not built" if EXTENSION is None else f"has no kernel for {device.type} tensors"
        raise UserError(f"{ENV_VAR}=cpp but moc_megatron._C {built}; {_BUILD_HINT}, or unset {ENV_VAR}")
    _warn_fallback(device, "chapter gather/scatter")
    return torch_impl


def _triton():
    try:
        from moc_megatron.ops import triton_attention
    except ModuleNotFoundError:
        return None
    return triton_attention if triton_attention.AVAILABLE else None


def attention_kernels(device: torch.device):
    """What serves chapter attention on `device`: an object with chapter_attention_fwd / _bwd.

    CPU: the extension's kernel; GPU: the Triton kernel; otherwise the torch reference."""
    from moc_megatron.ops.attention import REFERENCE

    requested = mode()
    if requested == "torch":
        return REFERENCE
    if requested == "triton" or device.type == "cuda":
        kernel = _triton()
        if kernel is not None:
            return kernel
        if requested == "triton":
            raise UserError(f"{ENV_VAR}=triton but triton is not importable; pip install triton, or unset {ENV_VAR}")
    if device.type == "cpu" and EXTENSION is not None and hasattr(EXTENSION, "chapter_attention_fwd"):
        return EXTENSION
    if requested == "cpp":
        raise UserError(f"{ENV_VAR}=cpp but moc_megatron._C has no chapter attention for {device.type} tensors; "
                        f"{_BUILD_HINT}, or unset {ENV_VAR}")
    _warn_fallback(device, "chapter attention")
    return REFERENCE


_WARNED: set = set()


def _warn_fallback(device: torch.device, what: str) -> None:
    """Once per op family: GPU tensors on the pure-torch path are correct but slow."""
    if device.type != "cpu" and what not in _WARNED:
        _WARNED.add(what)
        warnings.warn(f"moc_megatron: {what} on {device.type} tensors takes the pure-torch path (slow): "
                      f"moc_megatron._C was built without CUDA or triton is missing; {_BUILD_HINT} on a machine "
                      f"with nvcc, or pip install triton", RuntimeWarning, stacklevel=3)


def backend() -> str:
    """'cuda' (extension with CUDA and a GPU), 'cpp' (extension loaded) or 'torch'."""
    requested = mode()
    if requested == "torch":
        return "torch"
    if EXTENSION is None:
        if requested == "cpp":
            raise UserError(f"{ENV_VAR}=cpp but moc_megatron._C is not built; {_BUILD_HINT}, or unset {ENV_VAR}")
        return "torch"
    if EXTENSION.with_cuda and torch.cuda.is_available():
        return "cuda"
    return "cpp"
