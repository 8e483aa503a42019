"""``python -m neti.lab cleanup PREFIX``: remove a crashed lab's namespaces (make demo-down).

``python -m neti.lab list`` prints the namespaces that exist.
"""

from __future__ import annotations

import sys

from neti.errors import NetiError
from neti.lab import cleanup, netns


def main(argv: list[str]) -> int:
    try:
        if len(argv) == 2 and argv[0] == "cleanup":
            for ns in cleanup(argv[1]):
                print(f"deleted {ns}")
            return 0
        if argv == ["list"]:
            print("\n".join(netns.list_ns()))
            return 0
    except NetiError as exc:
        print(f"neti.lab: {exc}", file=sys.stderr)
        return exc.exit_code
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
