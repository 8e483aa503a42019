"""Moved to :mod:`neti.state` (neutral ground: the agent and ``neti status`` both read it).

This alias keeps ``neti.agent.state`` imports working while callers move over: it is the
same module object, so monkeypatching either name patches both.
"""

import sys

from neti import state as _state
from neti.state import *  # noqa: F403  (for type checkers: the public names)

sys.modules[__name__] = _state
