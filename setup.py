"""moc-megatron: Mixture-of-Chapters training on megatron-core and DeepSpeed.

Install with ``pip install --no-build-isolation -e .`` into an environment that already has torch,
so the chapter gather/scatter extension (csrc/) is compiled against that torch. The CUDA kernels are
built only where torch has CUDA and nvcc is found; without a compiler the package still installs and
moc_megatron.ops falls back to its pure-torch path.
"""

import os
import sys

from setuptools import find_packages, setup


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("moc-megatron: torch is not importable at build time; skipping the C++ extension "
              "(install torch first and use --no-build-isolation)", file=sys.stderr)
        return [], {}
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # no FMA contraction: the kernels promise the torch fallback's rounding, bitwise (csrc/chapter_ops.cpp)
    cxx = ["-O3", "-std=c++17", "-ffp-contract=off"] + openmp
    sources = ["csrc/chapter_ops.cpp"]
    want_cuda = os.environ.get("MOC_BUILD_CUDA", "auto")
    has_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if want_cuda == "1" or (want_cuda == "auto" and has_cuda):
        ext = CUDAExtension("moc_megatron._C", sources + ["csrc/chapter_ops_cuda.cu"],
                            define_macros=[("MOC_WITH_CUDA", None)],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},  # no fast-math: flushes denormals
                            extra_link_args=openmp)
    else:
        ext = CppExtension("moc_megatron._C", sources, extra_compile_args={"cxx": cxx},
                           extra_link_args=openmp)

    class OptionalBuild(BuildExtension):
        """A failed compile is a warning: the package works on its torch fallback."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as e:  # noqa: BLE001 - any compiler failure
                print(f"moc-megatron: could not build {extension.name} ({e}); "
                      "moc_megatron.ops will use the pure-torch path", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuild.with_options(use_ninja=True)}


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
    ]},
    zip_safe=False,
)
