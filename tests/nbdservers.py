# -*- test-case-name: tests.test_nbd -*-
"""
NBD servers for the ``nbd:`` backend's tests: ``nbdkit`` and ``qemu-nbd`` on UNIX sockets.

``NBDServer`` runs one server process on a socket in a new directory
(``socket_directory``: short, since a socket path holds at most 107
bytes; its output and images go in the test's own, ``case.mktemp()``),
waits until the socket accepts (both start in well under 0.1 s), and can be
killed (``SIGKILL``: the server "goes away") and started again on the same
socket.  ``nbdkit(case, ...)`` and
``qemu_nbd_overlay(case, ...)`` build the two kinds the tests use and
register the cleanup that stops them.

``require_nbd(case, *tools)`` skips a test when python3-libnbd or a server
program is missing, or fails it under ``AOE_TWISTED_REQUIRE_INTEROP=1``
(``tests.netns.require``): CI must run these tests, not skip them.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from attrs import define, field
from twisted.trial.unittest import SynchronousTestCase

from tests.netns import require

__all__ = [
    "NBDServer",
    "free_tcp_port",
    "libnbd_missing",
    "nbdkit",
    "qemu_nbd_overlay",
    "require_nbd",
    "socket_directory",
]

_START_TIMEOUT = 5.0
_STOP_TIMEOUT = 5.0
_PACKAGES = {"nbdkit": "nbdkit", "qemu-nbd": "qemu-utils", "qemu-img": "qemu-utils"}


def libnbd_missing() -> str | None:
    """Return why ``import nbd`` fails in this Python, or ``None`` if it works."""
    try:
        import nbd  # noqa: F401
    except ImportError:
        return (
            "needs python3-libnbd importable from this Python (apt-get install python3-libnbd; "
            "a venv made with --system-site-packages on /usr/bin/python3)"
        )
    return None


def require_nbd(case: SynchronousTestCase, *tools: str) -> None:
    """Skip ``case`` (fail under ``AOE_TWISTED_REQUIRE_INTEROP=1``) without libnbd or ``tools``."""
    require(case, libnbd_missing())
    for tool in tools:
        if shutil.which(tool) is None:
            require(case, f"needs {tool} (apt-get install {_PACKAGES.get(tool, tool)})")


def socket_directory(case: SynchronousTestCase) -> Path:
    """A new directory with a short path for UNIX sockets (at most 107 bytes); removed after."""
    directory = Path(tempfile.mkdtemp(prefix="aoe-nbd-"))
    case.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    return directory


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@define
class NBDServer:
    """
    One NBD server process listening on ``socket_path`` (or ``tcp``: ``(host, port)``).

    ``argv`` is the whole command line; ``log`` collects its output.
    """

    argv: list[str]
    socket_path: Path | None
    log: Path
    tcp: tuple[str, int] | None = None
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> NBDServer:
        """Start the server and return once its socket accepts connections."""
        if self.socket_path is not None and self.socket_path.exists():
            self.socket_path.unlink()  # left behind by a killed server
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._accepts():
            if self._process.poll() is not None:
                code = self._process.returncode
                raise RuntimeError(f"{self.argv[0]} exited {code}: {self.tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.argv[0]} did not listen in {_START_TIMEOUT} s")
            time.sleep(0.005)
        return self

    def _accepts(self) -> bool:
        if self.tcp is not None:
            family = socket.AF_INET6 if ":" in self.tcp[0] else socket.AF_INET
            target: object = self.tcp
        else:
            assert self.socket_path is not None
            family, target = socket.AF_UNIX, str(self.socket_path)
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.connect(target)
            except OSError:
                return False
        return True

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._process is not None and self._process.poll() is None

    def kill(self) -> None:
        """Kill the server at once (``SIGKILL``), as a crash would; wait for it."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait()

    def stop(self) -> None:
        """Stop the server politely (``SIGTERM``), killing it after a grace period."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, lines: int = 5) -> str:
        """The last lines of the server's output, on one line."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])


def nbdkit(
    case: SynchronousTestCase,
    *plugin: str,
    filters: tuple[str, ...] = (),
    options: tuple[str, ...] = (),
    tcp: tuple[str, int] | None = None,
) -> NBDServer:
    """
    Start ``nbdkit [--filter=F]... PLUGIN ARGS`` on a new UNIX socket (or on ``tcp``).

    ``options`` go before the plugin (``--readonly``).  Stopped by ``case``'s cleanup.
    """
    directory = Path(case.mktemp()).resolve()
    directory.mkdir(parents=True)
    sock = socket_directory(case) / "nbdkit.sock"
    listen = ["--unix", str(sock)] if tcp is None else ["-i", tcp[0], "-p", str(tcp[1])]
    argv = [
        "nbdkit",
        *listen,
        "--foreground",
        *[f"--filter={f}" for f in filters],
        *options,
        *plugin,
    ]
    server = NBDServer(argv, None if tcp else sock, directory / "nbdkit.log", tcp)
    case.addCleanup(server.stop)
    return server.start()


def qemu_nbd_overlay(
    case: SynchronousTestCase, base_contents: bytes, export: str | None = None
) -> tuple[NBDServer, Path, Path]:
    """
    Start ``qemu-nbd`` on a qcow2 overlay over a raw base image holding ``base_contents``.

    Returns ``(server, base, overlay)``.  ``--persistent`` keeps it serving
    after a client disconnects; ``--shared=4`` lets a second client in;
    ``export`` names the export (``-x``) instead of the default ``""``.
    """
    directory = Path(case.mktemp()).resolve()
    directory.mkdir(parents=True)
    base = directory / "base.raw"
    overlay = directory / "overlay.qcow2"
    base.write_bytes(base_contents)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay)],
        check=True,
        capture_output=True,
    )
    sock = socket_directory(case) / "qemu-nbd.sock"
    argv = [
        "qemu-nbd",
        "--socket",
        str(sock),
        "--persistent",
        "--shared=4",
        *(["-x", export] if export is not None else []),
        "-f",
        "qcow2",
        str(overlay),
    ]
    server = NBDServer(argv, sock, directory / "qemu-nbd.log")
    case.addCleanup(server.stop)
    return server.start(), base, overlay
