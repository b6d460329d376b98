# -*- test-case-name: tests.test_twistd -*-
"""
``twistd aoe`` run as a user runs it: a subprocess, stopped with SIGTERM.

The server runs in the server namespace of a fresh veth pair
(``ip netns exec``); this process talks to it from the client namespace with
``tests.peer.Peer``.  One target is served by a backend plugin that exists
only in a temporary ``twisted/plugins/`` directory on ``PYTHONPATH``, as a
third party would ship one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aoe_twisted.core.wire import SECTOR_SIZE, ATACmdStatus
from aoe_twisted.initiator.cli import twistd_argv
from tests.netns import VethPair, require
from tests.peer import Peer

_ROOT = Path(__file__).resolve().parent.parent

#: A third-party backend plugin: a read-only disk whose bytes are all 0x5A.
_PLUGIN = textwrap.dedent(
    '''
    """A test-only backend plugin: ``fives:SIZE``, a read-only disk of 0x5A bytes."""
    import errno

    from zope.interface import implementer

    from aoe_twisted.interfaces import IBackendFactory, IBlockBackend
    from aoe_twisted.units import parse_size


    @implementer(IBlockBackend)
    class FivesBackend:
        read_only = True

        def __init__(self, size):
            self.size = size

        def read(self, offset, length):
            return b"\\x5a" * length

        def write(self, offset, data):
            raise OSError(errno.EROFS, "read-only")

        def flush(self):
            pass

        def close(self):
            pass


    @implementer(IBackendFactory)
    class FivesFactory:
        scheme = "fives"
        spec_format = "SIZE"
        description = "a read-only disk of 0x5A bytes"

        def open(self, spec, read_only=False):
            return FivesBackend(parse_size(spec))


    fives = FivesFactory()
    '''
)


#: How to run twistd with this interpreter (``python -m twisted.scripts.twistd`` runs nothing).
TWISTD = twistd_argv()


def _twistd(*args: str, netns: str | None = None, pythonpath: str | None = None,
            cwd: str | None = None) -> subprocess.Popen[str]:
    """Start ``twistd -n --pidfile= ARGS`` (in ``netns``), output to a pipe."""
    argv = [*TWISTD, "-n", "--pidfile=", *args]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd
    )


class CommandLineErrorTests(SynchronousTestCase):
    """Bad input to ``twistd aoe`` is one line of output and exit status 1."""

    def run_twistd(self, *args: str) -> tuple[int, str]:
        """Run twistd to completion; return its exit status and output."""
        proc = _twistd(*args, cwd=self.mktemp_dir())
        out, _ = proc.communicate(timeout=60)
        return proc.returncode, out

    def mktemp_dir(self) -> str:
        """A fresh working directory, so twistd leaves nothing in the checkout."""
        path = self.mktemp()
        os.makedirs(path)
        return path

    def test_bad_option(self) -> None:
        """An out-of-range --slot exits 1 with one line naming --slot."""
        code, out = self.run_twistd("aoe", "--iface", "lo", "--backend", "memory:1M",
                                    "--slot", "300")
        self.assertEqual(code, 1)
        self.assertEqual(out.strip().splitlines(), ["twistd aoe: --slot: must be 0..254, not 300"])

    def test_bad_backend(self) -> None:
        """A backend file that does not exist exits 1 with one line naming it."""
        missing = os.path.join(self.mktemp_dir(), "missing.img")
        code, out = self.run_twistd("aoe", "--iface", "lo", "--backend", f"file:{missing}")
        self.assertEqual(code, 1)
        lines = out.strip().splitlines()
        self.assertEqual(len(lines), 1, out)
        self.assertIn(missing, lines[0])

    def test_missing_interface(self) -> None:
        """An interface that does not exist exits 1 with one line naming it."""
        require(self)
        code, out = self.run_twistd("aoe", "--iface", "nosuch0", "--backend", "memory:1M")
        self.assertEqual(code, 1)
        errors = [line for line in out.splitlines() if "nosuch0" in line]
        self.assertTrue(errors, out)
        self.assertNotIn("Traceback", out)

    def test_repeated_option(self) -> None:
        """
        Each option that holds one value, given twice, exits 1 with one line
        naming it: ``twistd`` does not serve whichever came last.
        """
        from aoe_twisted.tap import Options

        for long, *_ in Options.optParameters:
            first, second = ("memory:1M", "memory:2M") if long == "backend" else ("1", "2")
            argv = ["aoe", "--iface", "nosuch0", "--backend", "memory:1M"]
            if long == "backend":
                argv = argv[:3]
            with self.subTest(option=long):
                code, out = self.run_twistd(*argv, f"--{long}", first, f"--{long}", second)
                self.assertEqual(code, 1, out)
                lines = out.strip().splitlines()
                self.assertEqual(len(lines), 1, out)
                self.assertTrue(lines[0].startswith(f"twistd aoe: --{long}: given twice"), out)

    def test_help(self) -> None:
        """``twistd aoe --help`` lists every option."""
        code, out = self.run_twistd("aoe", "--help")
        self.assertEqual(code, 0)
        for option in ("--iface", "--backend", "--shelf", "--slot", "--read-only",
                       "--config-string", "--mask", "--buffer-count", "--target",
                       "--max-sectors", "--help-backends"):
            self.assertIn(option, out)

    def test_help_backends(self) -> None:
        """``--help-backends`` lists the built-in schemes."""
        code, out = self.run_twistd("aoe", "--help-backends")
        self.assertEqual(code, 0)
        for scheme in ("memory:", "file:", "block:"):
            self.assertIn(scheme, out)


def child_pids(pid: int) -> list[int]:
    """Return the PIDs of the processes whose parent is ``pid`` (a server's workers)."""
    out = subprocess.run(
        ["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False
    ).stdout
    return [int(child) for child in out.split()]


class TwistdProcessMixin:
    """Waiting for a ``twistd`` subprocess to exit, and making sure it (and its workers) did."""

    @defer.inlineCallbacks
    def _exit_status(
        self, proc: subprocess.Popen[str]
    ) -> defer.Generator[defer.Deferred[object], object, int]:
        """Wait (without blocking the reactor) for ``proc`` to exit; return its status."""
        for _ in range(400):
            if proc.poll() is not None:
                return proc.returncode
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.fail("twistd did not exit after SIGTERM")  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def stop_cleanly(
        self, proc: subprocess.Popen[str]
    ) -> defer.Generator[defer.Deferred[object], object, str]:
        """
        Stop ``proc`` with SIGTERM, check it stopped cleanly, return its whole output.

        twistd re-raises the signal it stopped on after a clean shutdown, so
        its status is 0 or -SIGTERM; a traceback anywhere is a failure.
        """
        proc.send_signal(signal.SIGTERM)
        code = yield self._exit_status(proc)
        out = proc.communicate()[0]
        self.assertIn(code, (0, -signal.SIGTERM), out)  # type: ignore[attr-defined]
        self.assertNotIn("Traceback", out)  # type: ignore[attr-defined]
        return out

    @staticmethod
    def _kill(proc: subprocess.Popen[str]) -> None:
        """Make sure the server and any worker processes of it are gone when the test ends."""
        if proc.poll() is None:
            for child in child_pids(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


class TwistdServeTests(TwistdProcessMixin, TestCase):
    """``twistd -n aoe`` serves targets over a veth pair and stops cleanly on SIGTERM."""

    timeout = 60

    @defer.inlineCallbacks
    def test_serve_and_sigterm(self) -> defer.Generator[defer.Deferred[object], object, None]:
        """
        A file target and a third-party plugin target are discovered and served;
        SIGTERM stops twistd cleanly and the written bytes are in the file.
        """
        require(self)
        pair = VethPair.create(self)
        work = Path(self.mktemp()).resolve()
        plugins = work / "thirdparty" / "twisted" / "plugins"
        plugins.mkdir(parents=True)
        (plugins / "aoe_test_fives.py").write_text(_PLUGIN)
        image = work / "disk.img"
        image.write_bytes(bytes(1 << 20))

        proc = _twistd(
            "aoe", "--iface", pair.server_if, "--backend", f"file:{image}",
            "--shelf", "3", "--slot", "1", "--target", "3.2=fives:64K",
            netns=pair.server_ns, pythonpath=str(work / "thirdparty"), cwd=str(work),
        )
        self.addCleanup(self._kill, proc)

        peer = Peer(pair.client_if, pair.client_ns)
        peer.start()
        self.addCleanup(peer.stop)

        found: dict[tuple[int, int], bytes] = {}
        deadline = time.monotonic() + 30
        while len(found) < 2 and time.monotonic() < deadline:
            replies = yield peer.discover(timeout=0.5)
            for reply in replies:
                found[(reply.header.major, reply.header.minor)] = reply.src
            if proc.poll() is not None:
                self.fail(f"twistd exited early: {proc.communicate()[0]}")
        self.assertEqual(sorted(found), [(3, 1), (3, 2)])
        server = found[(3, 1)]

        payload = bytes(range(256)) * 2
        replies = yield peer.write(server, 3, 1, 2047, payload)
        self.assertEqual(replies[0].arg.cmd_status, ATACmdStatus.READY_STATUS)
        replies = yield peer.read(server, 3, 1, 2047)
        self.assertEqual(replies[0].arg.data[:SECTOR_SIZE], payload)

        replies = yield peer.read(server, 3, 2, 5, count=2)
        self.assertEqual(replies[0].arg.data[: 2 * SECTOR_SIZE], b"\x5a" * (2 * SECTOR_SIZE))

        out = yield self.stop_cleanly(proc)
        self.assertIn("Main loop terminated", out)
        self.assertEqual(image.read_bytes()[2047 * SECTOR_SIZE :], payload)
