from tests.lab.fixtures import lab, netns_guard  # noqa: F401 - fixtures
