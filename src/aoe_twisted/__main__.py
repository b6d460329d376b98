# -*- test-case-name: tests.test_cli -*-
"""``python -m aoe_twisted``: the ``aoe-twisted`` command (``aoe_twisted.initiator.cli``)."""

from aoe_twisted.initiator.cli import main

if __name__ == "__main__":
    main()
