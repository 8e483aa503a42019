from tests.dataplane.helpers import backends  # noqa: F401 - fixtures
from tests.lab.fixtures import lab, netns_guard  # noqa: F401 - fixtures
