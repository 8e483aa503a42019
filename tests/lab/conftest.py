from tests.lab.fixtures import lab, netns_safety  # noqa: F401 - fixtures
