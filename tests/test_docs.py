"""The docs show commands that exist: every ``neti ...`` line parses with the real CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from neti.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "cookbook" / "README.md", *ROOT.glob("docs/*.md")])
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`(neti [^`]+)`")


def commands(text: str) -> list[str]:
    """``neti`` invocations: lines of fenced blocks and whole inline code spans."""
    found = []
    for block in FENCE.findall(text):
        for line in block.splitlines():
            line = line.strip().removeprefix("$ ").removeprefix("# ")
            if line.startswith("neti ") or line.startswith(".venv/bin/neti "):
                found.append(line)
    found += INLINE.findall(text)
    return found


def argv_of(command: str) -> list[str]:
    command = command.split(" #")[0].split(" |")[0].split(" &&")[0].split(" >")[0]
    command = re.sub(r"\[[^\]]*\]", "", command)  # optional parts
    command = re.sub(r"<[^>]+>|\.\.\.", "1", command)  # placeholders
    return shlex.split(command)[1:]


CASES = [(doc.relative_to(ROOT), c) for doc in DOCS for c in commands(doc.read_text())]


def test_docs_show_commands() -> None:
    assert len(CASES) > 30


@pytest.mark.parametrize(("doc", "command"), CASES, ids=[f"{d}:{c}" for d, c in CASES])
def test_documented_command_parses(
    doc: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = build_parser()
    argv = argv_of(command)
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0:  # --help / --version
            return
        # A bare command group (`neti fleet`) is a name, not an invocation. Only that error
        # may fall back to --help: `--help` would also hide an unknown option.
        if "the following arguments are required: SUBCOMMAND" not in capsys.readouterr().err:
            raise AssertionError(f"{doc}: `{command}` is not a valid neti command line") from None
        try:
            parser.parse_args([*argv, "--help"])
        except SystemExit as again:
            assert again.code == 0, f"{doc}: `{command}` is not a valid neti command line"
            return
        raise AssertionError(f"{doc}: `{command}` is not a valid neti command line") from None
