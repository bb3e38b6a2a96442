"""hpcattn.arrays: host allocation helpers."""
import platform

from hpcattn.arrays import keep_freed_memory


def test_run_keeps_freed_memory_for_reuse_on_glibc():
    """`hpcattn run` asks glibc to keep freed blocks (no fresh page faults per chunk); elsewhere
    it says it could not."""
    glibc = platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc
