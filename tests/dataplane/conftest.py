from tests.dataplane.helpers import any_backends, backends  # noqa: F401 - fixtures
from tests.lab.fixtures import lab, netns_guard  # noqa: F401 - fixtures
