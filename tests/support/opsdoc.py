"""The commands of docs/operations.md, "An operator's day", for the tests that run them.

In the section's ``console`` blocks a line ``HOST$ neti ...`` is a command (``$ neti ...``: on
the operator's machine) and the lines after it, up to the next command, are its output.
Outputs are compared after normalising what differs from run to run (instance IDs, addresses,
column widths), as sorted lists of lines; an output line ``neti: ...`` (not a warning) means
the command fails.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
SECTION = "## An operator's day"
PROMPT_RE = re.compile(r"^(?P<host>[a-z0-9-]*)\$ (?P<cmd>neti( .*)?)$")


@dataclass(frozen=True)
class DocCommand:
    host: str  # "" for the operator's machine
    command: str
    output: tuple[str, ...]

    @property
    def fails(self) -> bool:
        return any(
            line.startswith("neti: ") and not line.startswith("neti: warning:")
            for line in self.output
        )


def section(text: str | None = None) -> str:
    text = DOC.read_text() if text is None else text
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start : end if end != -1 else len(text)]


def commands(text: str | None = None) -> list[DocCommand]:
    out: list[DocCommand] = []
    in_block = False
    current: tuple[str, str, list[str]] | None = None
    for line in section(text).splitlines():
        if line.startswith("```"):
            if not in_block and line.strip() == "```console":
                in_block = True
                continue
            if in_block:
                in_block = False
                if current:
                    out.append(DocCommand(current[0], current[1], tuple(current[2])))
                current = None
            continue
        if not in_block:
            continue
        m = PROMPT_RE.match(line)
        if m:
            if current:
                out.append(DocCommand(current[0], current[1], tuple(current[2])))
            current = (m["host"], m["cmd"], [])
        elif current is not None and line.strip():
            current[2].append(line)
    return out


def normalize(line: str) -> str:
    line = re.sub(r"\bi-[0-9a-f]{8,17}\b", "i-*", line)
    line = re.sub(r"\bvpc-[0-9a-f]+\b", "vpc-*", line)
    line = re.sub(r"\b\d{1,3}(\.\d{1,3}){3}\b", "IP", line)
    line = re.sub(r"\biptables(-nft|-legacy)?\b", "iptables", line)
    return " ".join(line.split())


def same_output(documented: tuple[str, ...] | list[str], actual: str) -> bool:
    want = sorted(normalize(x) for x in documented if x.strip())
    got = sorted(normalize(x) for x in actual.splitlines() if x.strip())
    return want == got


# Hosts named in the section's prompts -> the zkproxy lab's hosts (tests/zkproxy/conftest.py).
LAB_HOSTS = {"zkproxy-a": "px1", "zkproxy-b": "px2", "web7": "ec2a"}
