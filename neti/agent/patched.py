"""A mapping seen through a small patch, without copying it.

The agent's fleet is a dict of up to tens of thousands of members; one change touches a few.
``Patched(base, patch)`` is ``base`` with ``patch`` laid over it (a value of None: the key is
absent), built in O(len(patch)): the guard's decision and the fleet less revoked instances
are such views instead of copies. It stays right when the patch is later applied to ``base``
itself (the guard's commit), and is meant to be read before ``base`` changes otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Patched(Mapping[K, V]):
    __slots__ = ("_base", "_patch", "_len")

    def __init__(self, base: Mapping[K, V], patch: Mapping[K, V | None]):
        self._base = base
        self._patch = patch
        n = len(base)
        for k, v in patch.items():
            if v is None:
                n -= k in base
            else:
                n += k not in base
        self._len = n

    @property
    def patch(self) -> Mapping[K, V | None]:
        return self._patch

    def __getitem__(self, key: K) -> V:
        patch = self._patch
        if key in patch:
            v = patch[key]
            if v is None:
                raise KeyError(key)
            return v
        return self._base[key]

    def __contains__(self, key: object) -> bool:
        patch = self._patch
        if key in patch:
            return patch[key] is not None  # type: ignore[index]
        return key in self._base

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[K]:
        patch, base = self._patch, self._base
        for k in base:
            if k not in patch or patch[k] is not None:
                yield k
        for k, v in patch.items():
            if v is not None and k not in base:
                yield k
