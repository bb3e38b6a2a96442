"""The array module (numpy or cupy) of an array, decided from the array itself."""
import numpy as np


def array_module(x):
    """numpy for host arrays, cupy for device arrays (without importing cupy otherwise)."""
    if type(x).__module__.startswith("cupy"):
        import cupy
        return cupy
    return np


def backend_name(x):
    return array_module(x).__name__
