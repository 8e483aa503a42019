"""docs/operations.md, "An operator's day": every command is run, its output compared."""

from __future__ import annotations

import pytest

from tests.support import opsdoc


def test_every_documented_command_is_run_by_a_test():
    cmds = opsdoc.commands()
    assert len(cmds) >= 15
    for c in cmds:
        if c.host == "":
            assert c.command.startswith("neti fleet "), c  # run below
        else:
            assert c.host in opsdoc.LAB_HOSTS, c  # run by tests/zkproxy


@pytest.mark.zk
@pytest.mark.slow
def test_the_fleet_commands_do_what_the_doc_shows(fleet_world):
    for doc in [c for c in opsdoc.commands() if c.host == ""]:
        r = fleet_world.neti(doc.command)
        assert (r.rc != 0) == doc.fails, f"{doc.command}: exit {r.rc}\n{r.out}{r.err}"
        assert opsdoc.same_output(doc.output, r.out + r.err), (
            f"{doc.command}: the doc shows\n" + "\n".join(doc.output) + f"\nbut it printed\n"
            f"{r.out}{r.err}"
        )


def test_normalizing_keeps_what_matters():
    n = opsdoc.normalize
    assert n("web1    i-0a5e1f0c9d2b3a401  10.0.1.9 ") == n("web1 i-0123456789abcdef0 1.2.3.4")
    assert n("web1 i-0a5e1f0c9d2b3a401") != n("web2 i-0a5e1f0c9d2b3a401")
    doc = opsdoc.commands("## An operator's day\n```console\n$ neti x\nout\nneti: bad\n```\n")
    assert doc == [opsdoc.DocCommand("", "neti x", ("out", "neti: bad"))] and doc[0].fails
