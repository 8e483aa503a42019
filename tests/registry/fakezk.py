"""A tiny stand-in for the part of KazooClient the verifier uses (unit tests of pure logic)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kazoo.exceptions import NoAuthError, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.security import ACL, Id

WORLD_READ = ACL(1, Id("world", "anyone"))


def owned(owner: str, *operators: str) -> list[ACL]:
    """The ACL Neti gives a host's node: world READ, ``owner`` ALL, operators ALL."""
    out = [WORLD_READ]
    for zk_id in (owner, *operators):
        scheme, _, ident = zk_id.partition(":")
        out.append(ACL(31, Id(scheme, ident)))
    return out


@dataclass
class Stat:
    ephemeralOwner: int = 0x1234  # noqa: N815 - kazoo's ZnodeStat field name
    dataLength: int = 0  # noqa: N815
    version: int = 0
    aversion: int = 0


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
    """Nodes as {path: (data, ephemeral)}, with optional ACLs and nodes refused to us
    (NoAuth); counts get_async calls per path."""

    def __init__(self) -> None:
        self.nodes: dict[str, tuple[bytes, bool]] = {}
        self.acls: dict[str, list[ACL]] = {}
        self.owners: dict[str, int] = {}  # ephemeralOwner per path (default 0x99)
        self.denied: set[str] = set()
        self.gets: dict[str, int] = {}
        self.hang = False
        self.issued: list[Result] = []

    def put(
        self,
        path: str,
        data: bytes = b"",
        ephemeral: bool = True,
        acl: list[ACL] | None = None,
        denied: bool = False,
        owner: int | None = None,
    ) -> None:
        self.nodes[path] = (data, ephemeral)
        if acl is not None:
            self.acls[path] = acl
        if owner is not None:
            self.owners[path] = owner
        (self.denied.add if denied else self.denied.discard)(path)

    def _stat(self, path: str) -> Stat:
        data, eph = self.nodes[path]
        owner = self.owners.get(path, 0x99) if eph else 0
        return Stat(owner, len(data))

    def _answer(self, path: str, value: Any) -> Result:
        if self.hang:
            r = Result(hang=True)
        elif path not in self.nodes:
            r = Result(error=NoNodeError())
        elif path in self.denied:
            r = Result(error=NoAuthError())
        else:
            r = Result(value(path))
        self.issued.append(r)
        return r

    def get_async(self, path: str) -> Result:
        self.gets[path] = self.gets.get(path, 0) + 1
        return self._answer(path, lambda p: (self.nodes[p][0], self._stat(p)))

    def get_acls_async(self, path: str) -> Result:
        return self._answer(
            path, lambda p: (self.acls.get(p, [ACL(31, Id("world", "anyone"))]), self._stat(p))
        )

    def total_gets(self) -> int:
        return sum(self.gets.values())


class _Handler:
    @staticmethod
    def async_result() -> Result:
        return Result()


class MultiFakeClient(FakeClient):
    """FakeClient that also answers kazooext.multi_read (a multiRead of getData): one Result
    holding, per path, (data, Stat) or the read's NoNodeError / NoAuthError."""

    chroot = ""
    handler = _Handler()

    def __init__(self) -> None:
        super().__init__()
        self.multi_requests: list[list[str]] = []

    def _call(self, request: Any, result: Result) -> bool:
        paths = list(request.paths)
        self.multi_requests.append(paths)
        out: list[Any] = []
        for path in paths:
            self.gets[path] = self.gets.get(path, 0) + 1
            if path not in self.nodes:
                out.append(NoNodeError())
            elif path in self.denied:
                out.append(NoAuthError())
            else:
                out.append((self.nodes[path][0], self._stat(path)))
        result.value, result.hang = out, self.hang
        self.issued.append(result)
        return True
