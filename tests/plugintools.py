"""
Make the test-only plugins in ``tests/plugins/`` visible to ``getPlugins``.

Like tahoe-lafs's ``UseTestPlugins``: the directory is added to
``twisted.plugins.__path__`` only for the length of one test, so installed
code never sees it.  ``tests/plugins/`` has no ``__init__.py``; its modules
load as ``twisted.plugins.<name>``.
"""

from __future__ import annotations

from pathlib import Path

import twisted.plugins
from twisted.trial.unittest import SynchronousTestCase

__all__ = ["TEST_PLUGINS", "use_test_plugins"]

TEST_PLUGINS = str(Path(__file__).resolve().parent / "plugins")
"""The directory holding the test-only plugin modules."""


def use_test_plugins(case: SynchronousTestCase) -> None:
    """
    Add ``TEST_PLUGINS`` to ``twisted.plugins.__path__`` until ``case`` ends.

    Call it from a test or ``setUp``; the cleanup it registers removes the
    directory again.
    """
    path: list[str] = twisted.plugins.__path__
    path.append(TEST_PLUGINS)
    case.addCleanup(path.remove, TEST_PLUGINS)
