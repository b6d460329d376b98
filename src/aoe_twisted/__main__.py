# -*- test-case-name: tests.test_cli -*-
"""``python -m aoe_twisted``: the ``aoe-twisted`` command line (see ``aoe_twisted.cli``)."""

from aoe_twisted.cli import main

if __name__ == "__main__":
    main()
