"""Give the memory a full apply freed back to the system, keep glibc to one heap, and keep
the cyclic collector out of whole-fleet work.

A full apply at tens of thousands of members builds large values that live only for the
apply (the whole desired state, the kernel payloads and read-backs, the registry's lists);
glibc keeps the pages they freed in its heap, so the agent's resident size would stay at
its high-water mark. ``malloc_trim`` returns them (in-process at 64,000 members: 13–21 MB
after each full apply, docs/performance.md). Where there is no such call (musl), nothing.

glibc gives each thread that allocates its own heap ("arena", up to 8 per core): kazoo's
threads build the registry's replies in theirs, and each keeps its high-water mark apart
from the main one (10–18 MB at 64,000 members). ``one_arena`` limits the process to the main
heap; the agent's threads only hand replies over, so they do not contend for it. It must
run before any thread exists (arenas already made stay).

CPython's cyclic collector runs after every few hundred allocations, and a full pass over
every live object each time the heap has grown by a quarter: a cold start that builds the
fleet's millions of objects (none of them in a reference cycle) pays for ~7 full passes
over a growing heap, ~0.8 s at 64,000 members. ``collector_paused`` holds it off for one
reconcile (seconds at most); what the reconcile left is looked at by the collector's next
passes, as usual.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
from collections.abc import Callable, Iterator


def _libc(name: str) -> Callable[..., int] | None:
    """The C library's function ``name``, or None where there is none (not glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn: Callable[..., int] = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    return fn


_TRIM = _libc("malloc_trim")
_MALLOPT = _libc("mallopt")
M_ARENA_MAX = -8  # glibc's malloc.h


def one_arena(mallopt: Callable[..., int] | None = _MALLOPT) -> bool:
    """Keep every thread's allocations in the main heap (module docstring); at the
    process's start, before any thread. False where the C library has no such knob."""
    if mallopt is None:
        return False
    return bool(mallopt(M_ARENA_MAX, 1) == 1)


def trim() -> None:
    """Return the heap's free pages to the system (a few ms; after full applies only)."""
    if _TRIM is not None:
        _TRIM(0)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No automatic cyclic collection inside (module docstring); as it was after."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
