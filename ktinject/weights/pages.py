"""Give pages of a memory-mapped weight file back to the OS once their data has been copied.

Reading a mapped file makes its pages count in the process's RSS until the mapping goes away. A loader that
copies (or dequantizes) every tensor out of the mapping would otherwise peak at "file + copies". After a
chunk has been consumed we ``madvise(MADV_DONTNEED)`` its pages: for a file-backed mapping that only drops
them from this process (they stay in the page cache, and a later access reads them again), so views handed
out earlier stay valid. Anonymous memory would be zeroed instead, so callers must only pass file-backed
ranges (:func:`is_file_backed` checks a mapping once).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from functools import lru_cache

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4  # Linux


@lru_cache(maxsize=1)
def _madvise():
    if not hasattr(os, "sched_getaffinity"):  # not Linux: nothing to do
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def drop_pages(address: int, length: int) -> None:
    """Drop the pages covering ``[address, address + length)`` of a file-backed mapping from RSS."""
    fn = _madvise()
    if fn is None or length <= 0:
        return
    start = address - address % _PAGE
    end = address + length
    fn(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def is_file_backed(address: int, path: str | os.PathLike[str]) -> bool:
    """True when ``address`` lies in a mapping of the file ``path`` (read from /proc/self/maps)."""
    try:
        target = os.stat(path)
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= address < hi:
                    if len(fields) < 6:
                        return False
                    mapped = fields[5].strip()
                    st = os.stat(mapped)
                    return (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino)
    except (OSError, ValueError):
        return False
    return False
