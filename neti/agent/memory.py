"""Give the memory a full apply freed back to the system.

A full apply at tens of thousands of members builds large values that live only for the
apply (the whole desired state, the kernel payloads and read-backs, the registry's lists);
glibc keeps the pages they freed in its heap, so the agent's resident size would stay at
its high-water mark. ``malloc_trim`` returns them (in-process at 64,000 members: 13–21 MB
after each full apply, docs/performance.md). Where there is no such call (musl), nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return fn


_TRIM = _malloc_trim()


def trim() -> None:
    """Return the heap's free pages to the system (a few ms; after full applies only)."""
    if _TRIM is not None:
        _TRIM(0)
