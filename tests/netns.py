# -*- test-case-name: tests.test_e2e -*-
"""
Private network namespaces joined by a veth pair, for tests that use real Ethernet frames.

``VethPair.create(case)`` makes two namespaces (``aoe-t-<pid>-<n>-srv`` and
``-cli``) with one end of a new veth pair in each, brings both ends up and
registers a cleanup on ``case`` that deletes both namespaces, and the veth
pair with them.  Nothing outside these namespaces is touched: the ends are
created directly inside them, so their names cannot clash with the host's.

Everything here needs root.  ``require(case)`` skips a test when a
prerequisite is missing, or fails it if ``AOE_TWISTED_REQUIRE_INTEROP=1``
says the run must not skip.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import time

from attrs import frozen
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from aoe_twisted.net.netns import NETNS_RUN_DIR

__all__ = ["REQUIRE_ENV", "VethPair", "leftover_namespaces", "require", "run", "skip_reason"]

REQUIRE_ENV = "AOE_TWISTED_REQUIRE_INTEROP"
"""Set to ``1`` to make a missing prerequisite a failure instead of a skip."""

_counter = itertools.count(1)
#: Capabilities the tests use: veth pairs and namespaces, raw sockets, setns().
_CAPABILITIES = {12: "CAP_NET_ADMIN", 13: "CAP_NET_RAW", 21: "CAP_SYS_ADMIN"}
_UP_TIMEOUT = 5.0


def run(*argv: str) -> str:
    """Run a command; return its output, or raise ``RuntimeError`` quoting its error output."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}"
        )
    return result.stdout


def _missing_capabilities() -> list[str]:
    """Return the names of the capabilities the tests need that this process lacks."""
    try:
        with open("/proc/self/status") as f:
            status = f.read()
    except OSError:
        return []
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            effective = int(line.split()[1], 16)
            return [name for bit, name in _CAPABILITIES.items() if not effective >> bit & 1]
    return []


def skip_reason() -> str | None:
    """Return why namespace tests cannot run here, or ``None`` if they can."""
    if not sys.platform.startswith("linux"):
        return "needs Linux (AF_PACKET sockets and network namespaces)"
    if os.geteuid() != 0:
        return "needs root (creates network namespaces and raw sockets)"
    missing = _missing_capabilities()
    if missing:
        return f"needs {', '.join(missing)} (root without them, as in some containers)"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2)"
    if not os.path.exists("/proc/thread-self/ns/net"):
        return "needs network namespace support (/proc/thread-self/ns/net)"
    return None


def require(case: SynchronousTestCase, reason: str | None = None) -> None:
    """
    Skip ``case`` (or fail it, under ``AOE_TWISTED_REQUIRE_INTEROP=1``) if it cannot run.

    ``reason`` defaults to ``skip_reason()``; pass another to check another
    prerequisite the same way.
    """
    if reason is None:
        reason = skip_reason()
    if reason is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        case.fail(f"{reason} (and {REQUIRE_ENV}=1)")
    raise SkipTest(reason)


def _delete_namespace(name: str) -> None:
    """Delete namespace ``name`` if it still exists (with every interface in it)."""
    if os.path.exists(os.path.join(NETNS_RUN_DIR, name)):
        run("ip", "netns", "delete", name)


@frozen
class VethPair:
    """
    Two new namespaces and a veth pair between them.

    ``server_ns``/``server_if`` is one end, ``client_ns``/``client_if`` the
    other; both ends are up with MTU ``mtu``.
    """

    server_ns: str
    client_ns: str
    server_if: str
    client_if: str
    mtu: int

    @classmethod
    def create(cls, case: SynchronousTestCase, mtu: int = 1500) -> VethPair:
        """Create the namespaces and the pair; ``case``'s cleanup removes them."""
        require(case)
        n = next(_counter)
        base = f"aoe-t-{os.getpid()}-{n}"
        pair = cls(f"{base}-srv", f"{base}-cli", "aoesrv0", "aoecli0", mtu)
        for ns in (pair.server_ns, pair.client_ns):
            run("ip", "netns", "add", ns)
            case.addCleanup(_delete_namespace, ns)
        run(
            "ip", "link", "add", pair.server_if, "netns", pair.server_ns, "mtu", str(mtu),
            "type", "veth", "peer", "name", pair.client_if, "netns", pair.client_ns,
            "mtu", str(mtu),
        )
        for ns, interface in pair.ends():
            run("ip", "-n", ns, "link", "set", "dev", interface, "up")
        pair.wait_until_up()
        return pair

    def ends(self) -> tuple[tuple[str, str], tuple[str, str]]:
        """Return ``(namespace, interface)`` of the server end and of the client end."""
        return ((self.server_ns, self.server_if), (self.client_ns, self.client_if))

    def wait_until_up(self) -> None:
        """
        Wait until both ends report ``state UP``.

        Until the kernel has seen the carrier come up it can still be dropping
        frames, and the first discovery of a test would vanish.
        """
        deadline = time.monotonic() + _UP_TIMEOUT
        while True:
            states = [
                run("ip", "-n", ns, "-o", "link", "show", "dev", interface)
                for ns, interface in self.ends()
            ]
            if all(" state UP " in state for state in states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"veth pair did not come up: {states}")
            time.sleep(0.01)

    def remove(self) -> None:
        """Delete both namespaces now (the cleanup does it too; twice is harmless)."""
        for ns in (self.server_ns, self.client_ns):
            _delete_namespace(ns)


def leftover_namespaces() -> list[str]:
    """Return the namespaces this process made that still exist (for checks after a run)."""
    prefix = f"aoe-t-{os.getpid()}-"
    try:
        names = os.listdir(NETNS_RUN_DIR)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if name.startswith(prefix))
