"""megatron-core's C++ dataset index helpers (``helpers_cpp``), built here when the install lacks them.

GPTDataset and BlendedDataset build their sample and blending indices with
``megatron.core.datasets.helpers_cpp``. megatron-core wheels ship it compiled (0.16.1 for CPython
3.11 on x86-64 Linux does), but a source install does not, and megatron-core's own
``compile_helpers()`` runs ``make`` in site-packages (no Makefile ships in the wheel, the directory
may be read-only) and exits the process on failure. So when the import fails we compile
``helpers.cpp`` with torch's extension builder into a per-user cache. torch's builder holds a file
lock, so ranks that start together wait for one build; later runs load the cached library.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Optional

from moc_megatron.errors import UserError

MODULE = "megatron.core.datasets.helpers_cpp"


def ensure_dataset_helpers(build_dir: Optional[str] = None) -> ModuleType:
    """Import megatron-core's helpers_cpp, compiling and registering it first if it is missing."""
    try:
        return importlib.import_module(MODULE)
    except ImportError:
        pass
    module = build_dataset_helpers(build_dir)
    sys.modules[MODULE] = module
    return module


def build_dataset_helpers(build_dir: Optional[str] = None) -> ModuleType:
    """Compile megatron-core's helpers.cpp (CPU, no CUDA) into ``build_dir`` and load it."""
    import megatron.core.datasets as datasets
    from megatron.core.package_info import __version__
    from torch.utils.cpp_extension import load

    source = os.path.join(os.path.dirname(datasets.__file__), "helpers.cpp")
    if build_dir is None:
        cache = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
        tag = f"megatron-core-{__version__}-py{sys.version_info.major}{sys.version_info.minor}"
        build_dir = os.path.join(cache, "moc_megatron", tag)
    os.makedirs(build_dir, exist_ok=True)
    try:
        # The module name must be helpers_cpp: it is the name compiled into helpers.cpp.
        return load(name="helpers_cpp", sources=[source], build_directory=build_dir,
                    extra_cflags=["-O3"], with_cuda=False, verbose=False)
    except Exception as e:  # noqa: BLE001 - compiler, ninja or linker failures all mean the same to the user
        raise UserError(f"megatron-core's dataset helpers (helpers_cpp) are not installed and could not be "
                        f"built in {build_dir}: {e}. Install a C++ compiler and ninja, or a megatron-core "
                        "wheel that includes helpers_cpp") from None
