"""moc-megatron: Mixture-of-Chapters training on megatron-core and DeepSpeed.

Install with ``pip install --no-build-isolation -e .`` into an environment that already has torch,
so the chapter ops extension (csrc/) is compiled against that torch. MOC_BUILD_CUDA=auto (default)
adds the CUDA kernels where torch has CUDA and nvcc is found, =1 insists on trying, =0 skips them.
A failed CUDA build falls back to the CPU extension alone, with a loud warning; without a working
compiler the package still installs and moc_megatron.ops falls back to its pure-torch path.
"""

import os
import sys

from setuptools import find_packages, setup

CPU_SOURCES = ["csrc/chapter_ops.cpp", "csrc/chapter_attention.cpp"]
CUDA_SOURCES = ["csrc/chapter_ops_cuda.cu"]
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # A100 and H100, PTX for newer GPUs

CPU_ONLY_WARNING = """################################################################################
# moc-megatron: the CUDA build of moc_megatron._C FAILED:
#     {error}
# Building the CPU extension alone instead. CUDA tensors will use the pure-torch
# path (slower). Fix the CUDA toolchain (nvcc matching torch.version.cuda) and
# reinstall to get the CUDA kernels, or set MOC_BUILD_CUDA=0 to silence this.
################################################################################"""


def _say(message: str) -> None:
    print(f"moc-megatron: {message}", file=sys.stderr)


def _warn_cpu_only(error: Exception) -> None:
    print(CPU_ONLY_WARNING.format(error=error), file=sys.stderr)


def want_cuda(torch_has_cuda: bool, environ=os.environ) -> bool:
    """MOC_BUILD_CUDA: 1 tries the CUDA build, 0 skips it, auto (default) tries it where torch has CUDA."""
    value = environ.get("MOC_BUILD_CUDA", "auto").strip().lower() or "auto"
    if value not in ("0", "1", "auto"):
        raise SystemExit(f"moc-megatron: MOC_BUILD_CUDA={value!r} is not one of 0, 1, auto")
    return value == "1" or (value == "auto" and torch_has_cuda)


def default_cuda_arch_list(gpu_visible: bool, environ=os.environ) -> None:
    """torch picks the CUDA archs from the visible GPUs and raises without one: give build hosts a default."""
    if environ.get("TORCH_CUDA_ARCH_LIST") or gpu_visible:
        return
    environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    _say(f"no GPU visible and TORCH_CUDA_ARCH_LIST unset: building for TORCH_CUDA_ARCH_LIST={DEFAULT_CUDA_ARCHS}")


def fallback_build(base, cpu_extension):
    """A build_ext class over `base` where a failed CUDA build retries with `cpu_extension()` and a failed
    CPU build is a warning (the package works on its torch path). torch's CUDA version check runs inside
    build_extensions, so it is caught too."""

    class OptionalBuild(base):
        def build_extensions(self):
            compiler_state = dict(vars(self.compiler)) if getattr(self, "compiler", None) is not None else None
            try:
                return super().build_extensions()
            except Exception as e:  # noqa: BLE001 - any compiler or toolchain failure
                error = e
            if any(src.endswith(".cu") for ext in self.extensions for src in ext.sources):
                _warn_cpu_only(error)
                if compiler_state is not None:  # torch's build_extensions wraps the compiler in place
                    vars(self.compiler).clear()
                    vars(self.compiler).update(compiler_state)
                self.extensions = [cpu_extension()]
                try:
                    return super().build_extensions()
                except Exception as e:  # noqa: BLE001
                    error = e
            _say(f"could not build moc_megatron._C ({error}); moc_megatron.ops will use the pure-torch path")
            self.extensions = []

    return OptionalBuild


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _say("torch is not importable at build time; skipping the C++ extension "
             "(install torch first and use --no-build-isolation)")
        return [], {}
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # no FMA contraction: the kernels promise the torch fallback's rounding, bitwise (csrc/chapter_ops.cpp)
    cxx = ["-O3", "-std=c++17", "-ffp-contract=off"] + openmp

    def cpu_extension():
        return CppExtension("moc_megatron._C", CPU_SOURCES, extra_compile_args={"cxx": cxx},
                            extra_link_args=openmp)

    ext = cpu_extension()
    if want_cuda(torch.version.cuda is not None and CUDA_HOME is not None):
        default_cuda_arch_list(torch.cuda.is_available() and torch.cuda.device_count() > 0)
        try:
            ext = CUDAExtension("moc_megatron._C", CPU_SOURCES + CUDA_SOURCES, define_macros=[("MOC_WITH_CUDA", None)],
                                extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},  # no fast-math: flushes denormals
                                extra_link_args=openmp)
        except Exception as e:  # noqa: BLE001 - e.g. no CUDA_HOME under MOC_BUILD_CUDA=1
            _warn_cpu_only(e)
    build = fallback_build(BuildExtension, cpu_extension)
    return [ext], {"build_ext": build.with_options(use_ninja=True)}


if __name__ == "__main__":  # pip and `python setup.py` run it as __main__; tests import the helpers
    ext_modules, cmdclass = _extensions()
    setup(
        name="moc-megatron",
        version="0.1.0",
        description="Mixture-of-Chapters memory-augmented transformers on megatron-core and DeepSpeed",
        packages=find_packages(include=["moc_megatron", "moc_megatron.*"]),
        python_requires=">=3.10",
        install_requires=[
            "torch>=2.4",
            "megatron-core>=0.14",
            "deepspeed>=0.16",
            "numpy",
            "pyyaml",
            "sentencepiece",
            "safetensors",
            "transformers>=4.45",
            "tensorboard",
            "tqdm",
        ],
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        entry_points={"console_scripts": [
            "moc-train = moc_megatron.train:main",
            "moc-preprocess = moc_megatron.data.preprocess:main",
            "moc-convert-hf = moc_megatron.training.export:main",
            "moc-convert-from-hf = moc_megatron.training.import_hf:main",
            "moc-eval = moc_megatron.eval.run:main",
        ]},
        extras_require={"eval": ["lm_eval[hf]>=0.4.13,<0.5"]},
        zip_safe=False,
    )
