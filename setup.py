"""Build of emalora-fast: the Python package, its Triton kernels and the `_C` extension.

The build never looks at the machine's GPU: the C++ CPU ops are always built, and `MAX_JOBS`
bounds ninja's parallelism as usual for torch extensions.
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    extra = ["-O3", "-std=c++17", "-fopenmp"]
    if os.environ.get("EMALORA_NATIVE", "0") == "1":  # opt-in, never decided by sniffing
        extra.append("-march=native")
    return [
        CppExtension(
            name="emalora_fast._C",
            sources=sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": extra},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    packages=[
        "emalora_fast",
        "emalora_fast.averaging",
        "emalora_fast.distill",
        "emalora_fast.experiments",
        "emalora_fast.integrations",
        # The top-level kernels/ folder, reached through the link emalora_fast/kernels; it has no
        # __init__.py so that it never shadows Hugging Face's `kernels` (see kernels/README.md).
        "emalora_fast.kernels",
        "emalora_fast.experiments.data",
    ],
    package_data={"emalora_fast.experiments.data": ["*.txt", "*.gz"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
