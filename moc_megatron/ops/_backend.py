"""Which kernels run: the compiled extension moc_megatron._C or the pure-torch path.

MOC_OPS_BACKEND=auto (default) uses the extension where it has a kernel for the tensors' device;
=torch forces the torch path; =cpp forces the extension and fails if it cannot serve the call.
"""

import os
import warnings
from types import ModuleType

import torch

from moc_megatron.errors import UserError
from moc_megatron.ops import torch_impl

ENV_VAR = "MOC_OPS_BACKEND"
_MODES = ("auto", "torch", "cpp")
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
    return torch_impl


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
