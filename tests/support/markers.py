"""The ``zk``, ``root`` and ``slow`` markers, enforced: the fast tier (``make test-fast``:
``-m "not zk and not root and not chaos and not slow"``) may only leave out what says it
needs more, and never runs what needs ZooKeeper or root.

Two checks, both naming the marker to add:

* at collection, every test whose fixtures include one declared with ``@needs(...)`` (a real
  ZooKeeper, network namespaces, moto), directly or through other fixtures, must carry
  those markers; otherwise the run stops with a usage error listing every such test (this
  runs before ``-m`` deselects anything, so ``pytest --collect-only`` lists them all);
* at run time, helpers that start a ZooKeeper or need root call ``require(...)``, which
  fails the running test when it lacks the marker (for helpers called from a test's body);
  so does making a network namespace with neti.lab (``watch_namespaces``).

tests/conftest.py imports the hooks below; tests/test_markers.py checks the checks.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from typing import Any, TypeVar

import pytest

from neti.lab import netns

F = TypeVar("F", bound=Callable[..., Any])

ATTR = "_neti_needs"
WHY = {
    "zk": "starts or uses a real ZooKeeper",
    "root": "needs root (network namespaces, netfilter)",
    "slow": "starts a server or a child process (moto, Ruby, the neti CLI)",
}

_current: list[pytest.Item] = []


def needs(*markers: str) -> Callable[[F], F]:
    """Declare what a fixture needs; put it under ``@pytest.fixture``::

        @pytest.fixture(scope="session")
        @needs("zk")
        def zk_server(): ...

    Every test using the fixture, also through other fixtures, must carry the markers.
    """
    unknown = set(markers) - set(WHY)
    if unknown:
        raise ValueError(f"unknown markers {sorted(unknown)} (known: {sorted(WHY)})")

    def mark(func: F) -> F:
        setattr(func, ATTR, (*getattr(func, ATTR, ()), *markers))
        return func

    return mark


def advice(nodeid: str, marker: str, via: str) -> str:
    """What to tell the author: the test, why, and exactly which marker to add."""
    return (
        f"{nodeid} {WHY[marker]} ({via}) but is not marked {marker!r}: "
        f"add @pytest.mark.{marker} to the test, or pytestmark = pytest.mark.{marker} "
        "to its module"
    )


def _declared(item: pytest.Item) -> Iterator[tuple[str, str]]:
    """(marker, fixture name) for every declared need among the item's fixtures."""
    # pytest's own record of which definition each fixture name resolves to for this item
    # (overrides included); public API offers the names only.
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return
    for name in getattr(item, "fixturenames", ()):
        for fixturedef in info.name2fixturedefs.get(name, ())[-1:]:
            for marker in getattr(fixturedef.func, ATTR, ()):
                yield marker, name


def missing(item: pytest.Item) -> list[str]:
    """Advice for each marker the item's fixtures need and the item lacks (one per marker)."""
    have = {m.name for m in item.iter_markers()}
    out: dict[str, str] = {}
    for marker, fixture in _declared(item):
        if marker not in have and marker not in out:
            out[marker] = advice(item.nodeid, marker, f"fixture {fixture!r}")
    return list(out.values())


def require(marker: str, what: str) -> None:
    """Fail the running test unless it carries ``marker``; ``what`` names the helper.

    Outside a pytest run (the lab, benchmarks) it does nothing.
    """
    if not _current:
        return
    item = _current[-1]
    if item.get_closest_marker(marker) is None:
        pytest.fail(advice(item.nodeid, marker, what), pytrace=False)


def watch_namespaces() -> None:
    """Make neti.lab's ``add_ns`` (every lab and scratch namespace) require ``root`` of the
    test that calls it, also from a test's body or a fixture not declared with ``needs``."""
    real = netns.add_ns
    if getattr(real, ATTR, None):
        return  # already watched

    def add_ns(ns: str) -> None:
        require("root", "neti.lab.netns.add_ns makes a network namespace")
        real(ns)

    setattr(add_ns, ATTR, ("root",))
    netns.add_ns = add_ns


# --- hooks (imported by tests/conftest.py) ---


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Runs before ``-m`` deselects anything, so every collected test is checked."""
    problems = [line for item in items for line in missing(item)]
    if problems:
        raise pytest.UsageError(
            f"tests lack the markers their fixtures need ({len(problems)}):\n  "
            + "\n  ".join(problems)
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    _current.append(item)
    try:
        return (yield)
    finally:
        _current.pop()
