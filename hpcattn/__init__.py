"""hpcattn: sparse attention over sequences sharded across MPI ranks."""
__version__ = "0.1.0"

from .api import attention, attention_backward  # noqa: E402
from .dist.comm import Comm  # noqa: E402
from .errors import HpcattnError  # noqa: E402
from .masks import parse as parse_mask  # noqa: E402

__all__ = ["attention", "attention_backward", "Comm", "HpcattnError", "parse_mask", "__version__"]
