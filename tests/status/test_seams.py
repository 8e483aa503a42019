"""The agent <-> status cycle stays broken: status reads the neutral neti.state and the one
conntrack reader (neti.dataplane.conntrack), in the dataplane's namespace; no root needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from neti import config, dataplane, status
from neti import state as state_mod
from neti.agent import core
from neti.dataplane.nftables import NftablesBackend
from neti.errors import DataplaneError
from tests.support.fakesystem import FakeSystem

CFG = {"zk_hosts": {"default": ["127.0.0.1:1"]}, "backend": "nftables"}


@pytest.mark.slow
def test_status_imports_nothing_of_the_agent() -> None:
    code = (
        "import sys, neti.status, neti.status.kernel, neti.status.report\n"
        "bad = sorted(m for m in sys.modules if m.startswith('neti.agent'))\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_the_agent_reads_nothing_of_status() -> None:
    for module in Path(core.__file__).parent.glob("*.py"):
        assert "neti.status" not in module.read_text(), module.name
    assert not hasattr(status, "read_conntrack")  # one reader: neti.dataplane.conntrack


def test_the_state_lives_on_neutral_ground() -> None:
    assert not (Path(core.__file__).parent / "state.py").exists()  # no second home
    assert state_mod.__name__ == "neti.state"


def test_conntrack_is_read_in_the_backends_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    system = FakeSystem()
    system.sysctls["net.netfilter.nf_conntrack_count"] = "4321"
    system.sysctls["net.netfilter.nf_conntrack_max"] = "8765"
    monkeypatch.setattr(dataplane, "select", lambda *a, **k: NftablesBackend(system))
    view = status.kernel_view(config.parse(CFG), None)
    assert (view.conntrack_count, view.conntrack_max) == (4321, 8765)
    assert ["sysctl"] not in [c[:1] for c in system.argvs()]  # read, never written


def test_a_backend_that_cannot_be_selected_is_one_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: object, **k: object) -> None:
        raise DataplaneError("nftables backend: nft not found")

    monkeypatch.setattr(dataplane, "select", refuse)
    view = status.kernel_view(config.parse(CFG), None)
    assert view.error == "nftables backend: nft not found"
