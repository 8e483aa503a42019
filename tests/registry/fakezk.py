"""A tiny stand-in for the part of KazooClient the verifier uses (unit tests of pure logic)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kazoo.exceptions import NoNodeError
from kazoo.handlers.threading import KazooTimeoutError


@dataclass
class Stat:
    ephemeralOwner: int = 0x1234  # noqa: N815 - kazoo's ZnodeStat field name


class Result:
    def __init__(self, value: Any = None, error: Exception | None = None, hang: bool = False):
        self.value, self.error, self.hang = value, error, hang
        self.timeouts: list[float | None] = []

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        self.timeouts.append(timeout)
        if self.hang:
            raise KazooTimeoutError("no answer")
        if self.error is not None:
            raise self.error
        return self.value


class FakeClient:
    """Nodes as {path: (data, ephemeral)}; counts get_async calls per path."""

    def __init__(self) -> None:
        self.nodes: dict[str, tuple[bytes, bool]] = {}
        self.gets: dict[str, int] = {}
        self.hang = False
        self.issued: list[Result] = []

    def put(self, path: str, data: bytes = b"", ephemeral: bool = True) -> None:
        self.nodes[path] = (data, ephemeral)

    def get_async(self, path: str) -> Result:
        self.gets[path] = self.gets.get(path, 0) + 1
        if self.hang:
            r = Result(hang=True)
        elif path in self.nodes:
            data, eph = self.nodes[path]
            r = Result((data, Stat(0x99 if eph else 0)))
        else:
            r = Result(error=NoNodeError())
        self.issued.append(r)
        return r

    def total_gets(self) -> int:
        return sum(self.gets.values())
