"""The agent's logging: stderr always (journald adds timestamps), ``log_file`` too if set."""

from __future__ import annotations

import logging

from neti import files
from neti.config import Config

log = logging.getLogger("neti.agent")


def setup_logging(cfg: Config, verbose: bool = False) -> None:
    """stderr at cfg.log_level, plus cfg.log_file if set; again on SIGHUP (no doubles)."""
    root = logging.getLogger()
    level = logging.DEBUG if verbose else getattr(logging, cfg.log_level)
    root.setLevel(level)
    for h in list(root.handlers):
        if getattr(h, "_neti_file", False):
            root.removeHandler(h)
            h.close()
    if not root.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("neti: %(levelname)s %(name)s: %(message)s"))
        root.addHandler(h)
    if cfg.log_file:
        try:
            files.check_writable_target(cfg.log_file)  # a FIFO would block the open
            fh = logging.FileHandler(cfg.log_file)
        except OSError as exc:
            log.error("log_file %s: %s; logging to stderr only", cfg.log_file, exc.strerror)
        else:
            fh.setFormatter(
                logging.Formatter(
                    "%(asctime)s neti[%(process)d] %(levelname)s %(name)s: %(message)s"
                )
            )
            fh._neti_file = True  # type: ignore[attr-defined]
            root.addHandler(fh)
    # kazoo logs every dropped connection; the agent reports state changes itself.
    kz = logging.DEBUG if verbose or cfg.log_level == "DEBUG" else logging.ERROR
    logging.getLogger("kazoo").setLevel(kz)
