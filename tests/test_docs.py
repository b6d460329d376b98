# -*- test-case-name: tests.test_docs -*-
"""The documentation shows code that the tests run, so it cannot rot."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

_ROOT = Path(__file__).resolve().parent.parent


class BackendTutorialTests(SynchronousTestCase):
    """docs/writing-a-backend.md quotes the example plugin the tests load."""

    def test_quotes_example_plugin(self) -> None:
        """The tutorial's Python block is exactly tests/plugins/aoe_twisted_example_backend.py."""
        doc = (_ROOT / "docs" / "writing-a-backend.md").read_text()
        plugin = (_ROOT / "tests" / "plugins" / "aoe_twisted_example_backend.py").read_text()
        block = doc.split("```python\n", 1)[1].split("```", 1)[0]
        self.assertEqual(block, plugin)

    def test_quotes_async_example_plugin(self) -> None:
        """The "Disks that answer later" block is tests/plugins/aoe_twisted_async_example.py."""
        doc = (_ROOT / "docs" / "writing-a-backend.md").read_text()
        plugin = (_ROOT / "tests" / "plugins" / "aoe_twisted_async_example.py").read_text()
        section = doc.split("## Disks that answer later\n", 1)[1]
        self.assertEqual(section.split("```python\n", 1)[1].split("```", 1)[0], plugin)
