"""Give the memory a full apply freed back to the system, and pace the cycle collector.

A full apply at tens of thousands of members builds large values that live only for the
apply (the whole desired state, the kernel payloads and read-backs, the registry's lists);
glibc keeps the pages they freed in its heap, so the agent's resident size would stay at
its high-water mark. ``malloc_trim`` returns them (in-process at 64,000 members: 13–21 MB
after each full apply, docs/performance.md). Where there is no such call (musl), nothing.

The agent's data has no reference cycles worth hunting often: a fleet is a million small
long-lived objects (names, addresses, entries) freed by reference counting. CPython's default
thresholds run a young collection every 700 allocations and full ones as the heap grows, which
in a cold read of 32,000 members was ~620 collections and 8 % of the CPU
(docs/performance.md, "Cold start").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
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


# Young collections every 20,000 net allocations (CPython: 700); the older generations keep
# their default ratios, so full collections still run, ~30 times less often.
GC_THRESHOLDS = (20_000, 10, 10)


def pace_collector() -> None:
    """Set the cycle collector's thresholds for an agent (once, at start)."""
    gc.set_threshold(*GC_THRESHOLDS)
