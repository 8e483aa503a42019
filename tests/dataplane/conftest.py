from collections.abc import Iterator

import pytest

from neti.lab import netns
from neti.lab.topology import new_prefix
from tests.dataplane.helpers import any_backends, backends  # noqa: F401 - fixtures
from tests.lab.fixtures import lab, netns_safety  # noqa: F401 - fixtures


@pytest.fixture
def scratch_ns(netns_safety: None) -> Iterator[str]:  # noqa: F811
    """One empty network namespace of the test's own (unique name, removed even on failure)."""
    name = f"{new_prefix('nd')}x"
    netns.add_ns(name)
    try:
        yield name
    finally:
        netns.del_ns(name)
