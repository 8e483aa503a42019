"""The marker check (tests/support/markers.py): a test that uses a ZooKeeper, root or a
slow server without saying so is stopped with advice naming the marker to add.

Each case runs a small pytest session of its own (pytester), with the hooks tests/conftest.py
installs.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tests.support import markers

pytest_plugins = ("pytester",)

CONFTEST = """
import pytest
from tests.support.markers import needs, require
from tests.support.markers import pytest_collection_modifyitems, pytest_runtest_protocol


@pytest.fixture(scope="session")
@needs("zk")
def server():
    return "zk"


@pytest.fixture
def registry(server):
    return server


def helper():
    require("root", "helper() makes a namespace")
"""

INI = """
[pytest]
markers =
    zk: zk
    root: root
    slow: slow
"""


@pytest.fixture
def run(pytester: pytest.Pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makeini(INI)

    def go(source: str, *args: str) -> pytest.RunResult:
        pytester.makepyfile(test_it=source)
        return pytester.runpytest_inprocess("-p", "no:cacheprovider", *args)

    return go


def test_a_declared_fixture_without_its_marker_stops_the_run(run) -> None:
    r = run("def test_a(server): pass\n")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    r.stderr.fnmatch_lines(
        [
            "*tests lack the markers their fixtures need (1):",
            "*test_it.py::test_a starts or uses a real ZooKeeper (fixture 'server') but is not"
            " marked 'zk': add @pytest.mark.zk to the test, or pytestmark = pytest.mark.zk"
            " to its module",
        ]
    )


def test_a_fixture_built_on_one_needs_the_marker_too(run) -> None:
    r = run("def test_a(registry): pass\n\ndef test_b(tmp_path): pass\n")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    r.stderr.fnmatch_lines(["*test_it.py::test_a *(fixture 'server')*add @pytest.mark.zk*"])
    assert "test_b" not in r.stderr.str()


def test_the_marker_on_the_test_or_its_module_is_enough(run) -> None:
    r = run(
        "import pytest\n\npytestmark = pytest.mark.zk\n\n"
        "def test_a(registry): pass\n\n"
        "@pytest.mark.root\ndef test_b(server): pass\n"
    )
    r.assert_outcomes(passed=2)


def test_the_check_sees_tests_that_a_marker_expression_leaves_out(run) -> None:
    """``make test-fast`` deselects by marker: a test missing one must not slip through,
    and one that has it is left out without a complaint."""
    fast = ("-m", "not zk and not root and not slow")
    r = run("def test_a(server): pass\n", *fast)
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    r = run("import pytest\n\n@pytest.mark.zk\ndef test_a(server): pass\n", *fast)
    assert r.ret == pytest.ExitCode.NO_TESTS_COLLECTED


def test_a_helper_fails_the_running_test_without_its_marker(run) -> None:
    r = run(
        "import pytest\nfrom conftest import helper\n\n"
        "def test_unmarked(): helper()\n\n"
        "@pytest.mark.root\ndef test_marked(): helper()\n"
    )
    r.assert_outcomes(passed=1, failed=1)
    r.stdout.fnmatch_lines(
        [
            "*test_it.py::test_unmarked needs root (network namespaces, netfilter)"
            " (helper() makes a namespace) but is not marked 'root': add @pytest.mark.root*"
        ]
    )


def test_making_a_namespace_needs_the_root_marker(run) -> None:
    """tests/conftest.py watches neti.lab's namespaces (in this process, for the inner run)."""
    # An empty name: were the check to let it through, neti.lab refuses it and makes nothing.
    r = run("from neti.lab import netns\n\ndef test_a(): netns.add_ns('')\n")
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*test_a needs root*(neti.lab.netns.add_ns*add @pytest.mark.root*"])


def test_outside_a_test_a_helper_is_not_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(markers, "_current", [])
    markers.require("zk", "the lab, a benchmark")  # does not fail


def test_needs_names_only_known_markers() -> None:
    with pytest.raises(ValueError, match="unknown markers"):
        markers.needs("zookeeper")


def test_every_checked_marker_is_registered() -> None:
    cfg = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    registered = {m.split(":")[0] for m in cfg["tool"]["pytest"]["ini_options"]["markers"]}
    assert set(markers.WHY) <= registered
