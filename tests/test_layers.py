"""The layers the package's tree shows: the sans-IO core imports no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import aoe_twisted.core

CORE = Path(aoe_twisted.core.__file__).parent

#: What a core module must not import: the reactor's world, and sockets.
FORBIDDEN = ("twisted", "socket", "select", "selectors", "asyncio", "threading")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Return ``(line, module)`` for every module ``path`` imports, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
    return found


def forbidden_imports(path: Path) -> list[str]:
    """Return ``"file:line module"`` for each import in ``path`` the core may not make."""
    return [
        f"{path.name}:{line} {module}"
        for line, module in imported_modules(path)
        if module.split(".")[0] in FORBIDDEN
    ]


class CoreLayerTests(SynchronousTestCase):
    """``aoe_twisted.core`` is sans-IO: no Twisted, no sockets, no threads."""

    def test_core_imports_no_io(self) -> None:
        """No module of the core imports Twisted, ``socket`` or a concurrency module."""
        modules = sorted(CORE.rglob("*.py"))
        self.assertGreater(len(modules), 10)
        offenders = [line for path in modules for line in forbidden_imports(path)]
        self.assertEqual(offenders, [])

    def test_check_catches_an_import(self) -> None:
        """The check itself finds a forbidden import, however it is written."""
        path = Path(self.mktemp())
        path.write_text(
            "import os\n"
            "def f():\n"
            "    from twisted.internet import reactor\n"
            "    import socket as s\n"
        )
        self.assertEqual(
            forbidden_imports(path),
            [f"{path.name}:3 twisted.internet", f"{path.name}:4 socket"],
        )
