"""Agent logging: stderr always, cfg.log_file too, kazoo kept quiet; reload does not stack."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from neti.agent.logs import setup_logging
from neti.config import parse


def ours(d: Path) -> list[logging.FileHandler]:
    return [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.FileHandler) and h.baseFilename.startswith(str(d))
    ]


@pytest.fixture
def clean_root() -> Iterator[None]:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("kazoo").level)
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in saved[1]:
                root.removeHandler(h)
                h.close()
        root.setLevel(saved[0])
        logging.getLogger("kazoo").setLevel(saved[2])


def test_log_file_level_and_reload(tmp_path: Path, clean_root: None) -> None:
    logfile = tmp_path / "neti.log"
    cfg = parse({"zk_hosts": {"a": ["h:1"]}, "log_file": str(logfile), "log_level": "WARNING"})
    setup_logging(cfg)
    setup_logging(cfg)  # SIGHUP: the file handler is replaced, not added twice
    files = ours(tmp_path)
    assert len(files) == 1
    logging.getLogger("neti.agent").info("hidden")
    logging.getLogger("neti.agent").warning("shown")
    files[0].flush()
    text = logfile.read_text()
    assert "shown" in text and "hidden" not in text
    assert logging.getLogger("kazoo").level == logging.ERROR


def test_unwritable_log_file_falls_back_to_stderr(tmp_path: Path, clean_root: None) -> None:
    cfg = parse({"zk_hosts": {"a": ["h:1"]}, "log_file": str(tmp_path / "no" / "dir.log")})
    setup_logging(cfg)  # logs an error, does not raise
    assert not ours(tmp_path)
