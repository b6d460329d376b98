"""
The ``nbd:`` backend (``aoe_twisted.backends.nbd``) against real NBD servers.

The servers are started by the tests on UNIX sockets in the tests' own
directories (``tests.nbdservers``): ``nbdkit memory``, ``nbdkit file`` (whose
data outlives a crash, for the tests that kill it), ``nbdkit`` with the
``delay`` filter (a server that does not answer in time), and ``qemu-nbd``
serving a qcow2 overlay over a raw base image.

Integrity runs keep 64 requests in flight at random, non-overlapping sector
ranges (reads, writes and flushes mixed) and check every byte read against a
model kept here; a write that failed leaves its sectors holding either the
old or the new bytes (the server may or may not have done it), never
anything else.  The spec parser and the factory's one-line errors need
nothing installed.

Without python3-libnbd (importable from this Python), nbdkit or qemu-nbd
the server tests skip, saying which is missing, or fail under
``AOE_TWISTED_REQUIRE_INTEROP=1``.
"""

from __future__ import annotations

import array
import errno
import fcntl
import hashlib
import random
import re
import socket
import sys
import termios
import threading
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from aoe_twisted.backends.nbd import (
    MISSING_LIBNBD,
    NBDAddress,
    NBDBackend,
    NBDBackendFactory,
    format_nbd_spec,
    parse_nbd_spec,
)
from aoe_twisted.errors import BackendSpecError
from aoe_twisted.interfaces import IAsyncBlockBackend, IBackendFactory
from tests.nbdservers import (
    NBDServer,
    free_tcp_port,
    nbdkit,
    qemu_nbd_overlay,
    require_nbd,
)
from tests.workload import ModelWorkload

Gen = Generator[defer.Deferred[Any], Any, None]

SECTOR = 512
MIB = 1 << 20
DEPTH = 64
#: Errors a request may fail with while the server is away.
AWAY_ERRNOS = {errno.ENOTCONN, errno.EIO, errno.ECONNRESET, errno.EPIPE}


class LogLines:
    """The backend's log lines, formatted, from while the test runs."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.lines: list[str] = []
        globalLogPublisher.addObserver(self)
        case.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "aoe_twisted.backends.nbd":
            self.lines.append(formatEvent(event))

    def matching(self, text: str) -> list[str]:
        """The lines holding ``text``."""
        return [line for line in self.lines if text in line]


@defer.inlineCallbacks
def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> Gen:
    """Poll ``predicate`` every 20 ms; fail the test if it is not true within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        yield task.deferLater(reactor, 0.02, lambda: None)


@defer.inlineCallbacks
def open_nbd(case: TestCase, spec: str, read_only: bool = False, **factory: Any) -> Gen:
    """Open ``nbd:spec`` through the reactor; ``case``'s cleanup closes it."""
    backend = yield NBDBackendFactory(**factory).open_async(spec, read_only=read_only)
    case.addCleanup(backend.close)
    return backend


def unix_spec(server: NBDServer, export: str = "") -> str:
    """The ``nbd:`` spec (after the colon) of ``server``'s socket."""
    return format_nbd_spec("unix", str(server.socket_path), export)


class Workload(ModelWorkload):
    """
    ``ModelWorkload`` on an ``nbd:`` backend, called directly.

    ``failures`` lists every ``OSError``; ``peak`` is the most requests the
    backend had in flight at once.
    """

    def __init__(
        self,
        backend: NBDBackend,
        model: bytearray,
        seed: int,
        depth: int = DEPTH,
        max_sectors: int = 128,
        writes: float = 0.5,
    ) -> None:
        super().__init__(model, seed, depth, max_sectors, writes)
        self.backend = backend
        self.failures: list[OSError] = []
        self.peak = 0

    def read(self, start: int, count: int) -> defer.Deferred[bytes]:
        return self.backend.read(start * SECTOR, count * SECTOR)

    def write(self, start: int, data: bytes) -> defer.Deferred[Any]:
        return self.backend.write(start * SECTOR, data)

    def flush(self) -> defer.Deferred[Any]:
        return self.backend.flush()

    def failed(self, error: BaseException) -> None:
        assert isinstance(error, OSError)
        self.failures.append(error)

    def started(self) -> None:
        self.peak = max(self.peak, self.backend.in_flight)


@defer.inlineCallbacks
def md5_of(backend: NBDBackend, chunk: int = 64 * 1024) -> Gen:
    """Return the md5 of the whole disk, read ``DEPTH`` chunks at a time."""
    limit = defer.DeferredSemaphore(DEPTH)
    chunks = yield defer.gatherResults(
        [limit.run(backend.read, offset, chunk) for offset in range(0, backend.size, chunk)],
        consumeErrors=True,
    )
    return hashlib.md5(b"".join(chunks)).hexdigest()


# -- the spec and the factory, nothing installed needed ------------------------------------------


class SpecTests(SynchronousTestCase):
    """``parse_nbd_spec``: what follows ``nbd:``."""

    GOOD = (
        ("unix:/run/disk.sock", ("unix", "/run/disk.sock", "")),
        ("unix:/run/disk.sock:disk0", ("unix", "/run/disk.sock", "disk0")),
        ("unix:/run/disk.sock:a:b", ("unix", "/run/disk.sock", "a:b")),
        ("unix:disk.sock:", ("unix", "disk.sock", "")),
        ("storage1:10809", ("tcp", ("storage1", 10809), "")),
        ("st1.example.org:10809:vm/disk0", ("tcp", ("st1.example.org", 10809), "vm/disk0")),
        ("10.0.0.1:1", ("tcp", ("10.0.0.1", 1), "")),
        ("[::1]:10809", ("tcp", ("::1", 10809), "")),
        ("[fe80::1%eth0]:65535:x", ("tcp", ("fe80::1%eth0", 65535), "x")),
    )

    BAD = (
        ("unix:", "no socket path after unix:"),
        ("unix::disk0", "no socket path after unix:"),
        ("storage1", "no :PORT after 'storage1'"),
        ("storage1:", "port '' is not a number from 1 to 65535"),
        ("storage1:0", "port '0' is not a number"),
        ("storage1:65536", "port '65536' is not a number"),
        ("storage1:nbd", "port 'nbd' is not a number"),
        ("storage1:+80", "port '+80' is not a number"),
        (":10809", "no host before the port"),
        ("::1:10809", "an IPv6 address goes in brackets"),
        ("fe80::1:10809", "an IPv6 address goes in brackets"),
        ("[::1:10809", "'[' without a closing ']'"),
        ("[storage1]:10809", "'storage1' in brackets is not an IPv6 address"),
        ("[::1]10809", "no :PORT after [::1]"),
        ("[::1]", "no :PORT after [::1]"),
        ("stor age:10809", "'stor age' is not a host name or IPv4 address"),
        ("unix:/s.sock:" + "x" * 4097, "the export name is longer than 4096 bytes"),
        ("unix:/s.sock:a\0b", "the export name holds a NUL character"),
        ("unix:/s.sock:\udcff", "the export name is not valid UTF-8"),
        ("unix:/s\udcff.sock", "the socket path is not valid UTF-8"),
    )

    def test_good(self) -> None:
        """Each form parses to its kind, address and export."""
        for spec, expected in self.GOOD:
            self.assertEqual(parse_nbd_spec(spec), expected, spec)
            self.assertEqual(NBDAddress.parse(spec), NBDAddress(*expected), spec)

    def test_bad(self) -> None:
        """Each mistake is one line naming the spec, the problem and the forms expected."""
        for spec, problem in self.BAD:
            e = self.assertRaises(BackendSpecError, parse_nbd_spec, spec)
            message = str(e)
            self.assertIn(problem, message, spec)
            shown = spec.encode("utf-8", "backslashreplace").decode()
            self.assertTrue(message.startswith(f"nbd:{shown[:20]}"), message)
            message.encode("utf-8")  # printable as it is
            self.assertIn("expected nbd:unix:PATH[:EXPORT] or nbd:HOST:PORT[:EXPORT]", message)
            self.assertNotIn("\n", message)

    @given(
        st.one_of(
            st.tuples(
                st.just("unix"),
                st.text(
                    st.characters(blacklist_characters=":\0", blacklist_categories=("Cs",)),
                    min_size=1,
                    max_size=40,
                ),
            ),
            st.tuples(
                st.just("tcp"),
                st.tuples(
                    st.one_of(
                        st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,20}[a-z0-9])?", fullmatch=True),
                        st.ip_addresses().map(str),
                    ),
                    st.integers(1, 65535),
                ),
            ),
        ),
        st.text(
            st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=40
        ),
    )
    def test_round_trip(self, kind_address: tuple[str, Any], export: str) -> None:
        """``format_nbd_spec`` writes what ``parse_nbd_spec`` reads back, brackets and all."""
        kind, address = kind_address
        spec = format_nbd_spec(kind, address, export)
        self.assertEqual(parse_nbd_spec(spec), (kind, address, export))
        self.assertEqual(str(NBDAddress(kind, address, export)), spec)


class FactoryTests(SynchronousTestCase):
    """``NBDBackendFactory`` as a plugin, and its one-line errors."""

    def test_plugin(self) -> None:
        """It is an ``IBackendFactory`` for the scheme ``nbd``, with its help texts."""
        factory = NBDBackendFactory()
        self.assertTrue(verifyObject(IBackendFactory, factory))
        self.assertEqual(factory.scheme, "nbd")
        self.assertEqual(factory.spec_format, "unix:PATH[:EXPORT] or HOST:PORT[:EXPORT]")
        self.assertIn("NBD", factory.description)

    def test_plugin_scan_imports_nothing_heavy(self) -> None:
        """Importing the module (as a plugin scan would) imports neither libnbd nor the reactor."""
        import subprocess

        code = (
            "import sys; import aoe_twisted.backends.nbd; "
            "print('nbd' in sys.modules, 'twisted.internet.reactor' in sys.modules)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        self.assertEqual(out.split(), ["False", "False"])

    def hide_libnbd(self) -> None:
        saved = sys.modules.get("nbd")
        sys.modules["nbd"] = None  # type: ignore[assignment]  # import nbd -> ImportError

        def restore() -> None:
            if saved is None:
                del sys.modules["nbd"]
            else:
                sys.modules["nbd"] = saved

        self.addCleanup(restore)

    def test_missing_libnbd(self) -> None:
        """Without python3-libnbd, opening says so in the one agreed line."""
        self.hide_libnbd()
        factory = NBDBackendFactory()
        e = self.assertRaises(BackendSpecError, factory.open, "unix:/run/disk.sock")
        self.assertEqual(str(e), MISSING_LIBNBD)
        f = self.failureResultOf(factory.open_async("unix:/run/disk.sock"), BackendSpecError)
        self.assertEqual(str(f.value), MISSING_LIBNBD)

    def test_bad_spec_before_libnbd(self) -> None:
        """A bad spec is reported as such, with or without libnbd."""
        self.hide_libnbd()
        factory = NBDBackendFactory()
        e = self.assertRaises(BackendSpecError, factory.open, "storage1")
        self.assertIn("no :PORT", str(e))
        f = self.failureResultOf(factory.open_async("storage1"), BackendSpecError)
        self.assertIn("no :PORT", str(f.value))


# -- against real servers -------------------------------------------------------------------------


class ConnectTests(TestCase):
    """Opening: the size, read-only, and what a failed connection says."""

    timeout = 30

    def setUp(self) -> None:
        require_nbd(self, "nbdkit")

    @defer.inlineCallbacks
    def test_size_interface_and_sync_open(self) -> Gen:
        """The size comes from the server; blocking ``open`` gives the same asynchronous disk."""
        server = nbdkit(self, "memory", "48M")
        backend = yield open_nbd(self, unix_spec(server))
        self.assertTrue(verifyObject(IAsyncBlockBackend, backend))
        self.assertEqual(
            (backend.size, backend.read_only, backend.state), (48 * MIB, False, "connected")
        )
        blocking = NBDBackendFactory().open(unix_spec(server))
        self.addCleanup(blocking.close)
        self.assertEqual(blocking.size, 48 * MIB)
        yield blocking.write(4096, b"\x5a" * 4096)
        self.assertEqual((yield backend.read(4096, 4096)), b"\x5a" * 4096)

    @defer.inlineCallbacks
    def test_read_only(self) -> Gen:
        """Asked read-only, or exported read-only: writes fail with ``EROFS``, reads work."""
        server = nbdkit(self, "memory", "1M")
        asked = yield open_nbd(self, unix_spec(server), read_only=True)
        ro_server = nbdkit(self, "memory", "1M", options=("--readonly",))
        exported = yield open_nbd(self, unix_spec(ro_server))
        for backend in (asked, exported):
            self.assertTrue(backend.read_only)
            f = yield self.assertFailure(backend.write(0, b"x" * 512), OSError)
            self.assertEqual(f.errno, errno.EROFS)
            self.assertEqual((yield backend.read(0, 512)), bytes(512))

    @defer.inlineCallbacks
    def test_out_of_range(self) -> Gen:
        """A range off the disk fails with ``EINVAL`` before the server; an empty one succeeds."""
        server = nbdkit(self, "memory", "1M")
        backend = yield open_nbd(self, unix_spec(server))
        f = yield self.assertFailure(backend.read(MIB - 512, 1024), OSError)
        self.assertEqual(f.errno, errno.EINVAL)
        f = yield self.assertFailure(backend.write(MIB, b"x" * 512), OSError)
        self.assertEqual(f.errno, errno.EINVAL)
        self.assertEqual((yield backend.read(MIB, 0)), b"")
        self.assertEqual(backend.state, "connected")

    @defer.inlineCallbacks
    def test_server_errors(self) -> Gen:
        """The server's answer ``EIO`` is the request's ``OSError``; the connection stays."""
        server = nbdkit(
            self, "memory", "1M", "error-pread=EIO", "error-pread-rate=100%", filters=("error",)
        )
        backend = yield open_nbd(self, unix_spec(server))
        f = yield self.assertFailure(backend.read(0, 512), OSError)
        self.assertEqual(f.errno, errno.EIO)
        yield backend.write(0, b"x" * 512)
        self.assertEqual(backend.state, "connected")

    @defer.inlineCallbacks
    def test_large_blocks(self) -> Gen:
        """A server that takes nothing under 4096 bytes cannot serve AoE's sectors: one line."""
        server = nbdkit(
            self, "memory", "1M", "blocksize-minimum=4096", filters=("blocksize-policy",)
        )
        f = yield self.assertFailure(
            NBDBackendFactory().open_async(unix_spec(server)), BackendSpecError
        )
        self.assertEqual(
            str(f),
            f"nbd:{unix_spec(server)}: the server takes nothing smaller than 4096 bytes; "
            "AoE reads and writes 512-byte sectors",
        )

    @defer.inlineCallbacks
    def test_export_name(self) -> Gen:
        """``unix:PATH:EXPORT`` asks for that export; one the server lacks is one line."""
        require_nbd(self, "qemu-nbd", "qemu-img")
        server, _, _ = qemu_nbd_overlay(self, b"e" * MIB, export="disk0")
        backend = yield open_nbd(self, unix_spec(server, "disk0"))
        self.assertEqual((yield backend.read(0, 512)), b"e" * 512)
        f = yield self.assertFailure(
            NBDBackendFactory().open_async(unix_spec(server, "nope")), BackendSpecError
        )
        message = str(f)
        self.assertTrue(message.startswith(f"nbd:{unix_spec(server, 'nope')}: cannot connect: "))
        self.assertIn("nope", message.split("cannot connect: ")[1])
        self.assertNotIn("\n", message)

    @defer.inlineCallbacks
    def test_no_server(self) -> Gen:
        """No socket: one line saying the connection failed and why."""
        path = Path(self.mktemp())
        f = yield self.assertFailure(
            NBDBackendFactory().open_async(f"unix:{path}"), BackendSpecError
        )
        self.assertEqual(
            str(f), f"nbd:unix:{path}: cannot connect: connect: No such file or directory"
        )
        e = self.assertRaises(BackendSpecError, NBDBackendFactory().open, f"unix:{path}")
        self.assertEqual(str(e), str(f))

    @defer.inlineCallbacks
    def test_silent_server(self) -> Gen:
        """A socket that accepts but never does the NBD handshake: ``ETIMEDOUT`` after the limit."""
        path = Path(self.mktemp())
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(str(path))
        listener.listen(8)
        factory = NBDBackendFactory(connect_timeout=0.3)
        started = time.monotonic()
        f = yield self.assertFailure(factory.open_async(f"unix:{path}"), BackendSpecError)
        self.assertGreaterEqual(time.monotonic() - started, 0.3)
        self.assertEqual(str(f), f"nbd:unix:{path}: cannot connect: no NBD handshake in 0.3 s")
        e = self.assertRaises(BackendSpecError, factory.open, f"unix:{path}")
        self.assertEqual(str(e), str(f))

    @defer.inlineCallbacks
    def test_tcp(self) -> Gen:
        """``HOST:PORT`` by address and by name (resolved by the reactor), and ``[::1]:PORT``."""
        port = free_tcp_port()
        nbdkit(self, "memory", "1M", tcp=("127.0.0.1", port))
        for spec in (f"127.0.0.1:{port}", f"localhost:{port}"):
            backend = yield open_nbd(self, spec)
            yield backend.write(0, spec.encode().ljust(512, b"\0"))
            self.assertEqual((yield backend.read(0, 512)).rstrip(b"\0"), spec.encode())
        try:
            port6 = free_tcp_port("::1")
        except OSError:
            return  # no IPv6 loopback here
        nbdkit(self, "memory", "1M", tcp=("::1", port6))
        backend = yield open_nbd(self, f"[::1]:{port6}")
        self.assertEqual(backend.size, MIB)


def unread(fd: int) -> int:
    """How many bytes wait to be read on the socket ``fd`` (``FIONREAD``)."""
    count = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, count, True)
    return count[0]


class BurstTests(TestCase):
    """What one readiness event of the socket costs: the answers waiting, read together."""

    timeout = 30

    def setUp(self) -> None:
        require_nbd(self, "nbdkit")

    @defer.inlineCallbacks
    def test_answers_waiting_take_one_turn(self) -> Gen:
        """
        64 answers already on the socket are read in one reactor turn (libnbd reads one per
        ``aio_notify_read``; one turn each would cost an ``epoll_wait`` and a dispatch per
        answer), every byte right, and no call finds the socket empty.
        """
        server = nbdkit(self, "memory", "1M")
        backend = yield open_nbd(self, unix_spec(server))
        data = random.Random(5).randbytes(DEPTH * SECTOR)
        yield backend.write(0, data)
        link = backend._link
        handle = backend._handle
        turns: list[int] = []
        empty: list[int] = []
        read_turn = link.doRead
        notify = handle.aio_notify_read

        def counted_turn() -> None:
            turns.append(1)
            read_turn()

        def checked_notify() -> None:
            if not unread(link.fileno()):
                empty.append(1)
            notify()

        link.doRead = counted_turn  # the reactor looks it up on the instance
        handle.aio_notify_read = checked_notify
        reads = [backend.read(i * SECTOR, SECTOR) for i in range(DEPTH)]
        time.sleep(0.3)  # the reactor waits; the server answers all 64 meanwhile
        self.assertGreater(unread(link.fileno()), 0)
        got = yield defer.gatherResults(reads)
        self.assertEqual(b"".join(got), data)
        self.assertLessEqual(len(turns), 2, "one reactor turn per answer")
        self.assertEqual(empty, [], "aio_notify_read called on an empty socket")

    @defer.inlineCallbacks
    def test_simple_replies(self) -> Gen:
        """
        The backend asks for simple replies: a read's answer is a header and the data (two
        system calls), not structured chunks (four); it uses nothing they add.
        """
        server = nbdkit(self, "memory", "1M")
        backend = yield open_nbd(self, unix_spec(server))
        self.assertFalse(backend._handle.get_structured_replies_negotiated())
        blocking = NBDBackendFactory().open(unix_spec(server))
        self.addCleanup(blocking.close)
        self.assertFalse(blocking._handle.get_structured_replies_negotiated())


class IntegrityTests(TestCase):
    """64 requests in flight at random offsets, every byte checked."""

    timeout = 120

    @defer.inlineCallbacks
    def test_nbdkit_memory(self) -> Gen:
        """``nbdkit memory 64M``: reads, writes and flushes, 64 in flight; the md5 of it all."""
        require_nbd(self, "nbdkit")
        server = nbdkit(self, "memory", "64M")
        backend = yield open_nbd(self, unix_spec(server))
        threads = threading.active_count()
        model = bytearray(backend.size)
        work = Workload(backend, model, seed=1)
        yield work.run(3000)
        self.assertEqual((work.wrong, work.failures), ([], []))
        self.assertEqual(work.peak, DEPTH)
        self.assertEqual(backend.in_flight, 0)
        self.assertEqual((yield md5_of(backend)), hashlib.md5(model).hexdigest())
        self.assertEqual(threading.active_count(), threads, "the backend started threads")

    @defer.inlineCallbacks
    def test_qemu_nbd_overlay(self) -> Gen:
        """qemu-nbd on a qcow2 overlay: the overlay holds the writes, the base is unchanged."""
        require_nbd(self, "qemu-nbd", "qemu-img")
        base_contents = random.Random(2).randbytes(16 * MIB)
        server, base, _ = qemu_nbd_overlay(self, base_contents)
        backend = yield open_nbd(self, unix_spec(server))
        self.assertEqual(backend.size, 16 * MIB)
        model = bytearray(base_contents)
        work = Workload(backend, model, seed=3)
        yield work.run(1500)
        self.assertEqual((work.wrong, work.failures), ([], []))
        self.assertEqual(work.peak, DEPTH)
        self.assertNotEqual(bytes(model), base_contents)
        expected = hashlib.md5(model).hexdigest()
        self.assertEqual((yield md5_of(backend)), expected)
        yield backend.flush()
        yield backend.close()
        server.stop()
        self.assertEqual(base.read_bytes(), base_contents)
        server.start()  # a new qemu-nbd on the same overlay: the writes are in it
        again = yield open_nbd(self, unix_spec(server))
        self.assertEqual((yield md5_of(again)), expected)


class ServerLossTests(TestCase):
    """A server that goes away: errors, never a wrong byte; service back when it is."""

    timeout = 60

    def setUp(self) -> None:
        require_nbd(self, "nbdkit")

    def file_server(self, size: int) -> tuple[NBDServer, Path]:
        image = Path(self.mktemp())
        image.write_bytes(bytes(size))
        return nbdkit(self, "file", str(image)), image

    @defer.inlineCallbacks
    def test_killed_mid_run_and_back(self) -> Gen:
        """
        Killed with 64 requests in flight: each fails with ``OSError`` or is right; after
        a restart the same backend serves again, with what every acknowledged write wrote.
        """
        logs = LogLines(self)
        server, _ = self.file_server(16 * MIB)
        backend = yield open_nbd(self, unix_spec(server))
        model = bytearray(backend.size)
        work = Workload(backend, model, seed=4)

        def kill_at(completed: int) -> None:
            if completed == 600:
                server.kill()

        work.on_complete = kill_at
        yield work.run(2000)
        self.assertFalse(server.running)
        self.assertEqual(work.wrong, [])
        self.assertGreater(len(work.failures), 0)
        self.assertEqual({e.errno for e in work.failures} - AWAY_ERRNOS, set())
        self.assertEqual(backend.state, "reconnecting")
        self.assertEqual(backend.in_flight, 0)
        lost = logs.matching("connection lost")
        self.assertEqual(len(lost), 1, logs.lines)
        failed_in_flight = int(re.search(r"; (\d+) requests in flight failed", lost[0]).group(1))
        self.assertGreater(failed_in_flight, 0, lost[0])

        server.start()
        yield wait_for(lambda: backend.state == "connected", 10, "reconnected")
        work.failures.clear()
        yield work.run(1000)
        self.assertEqual((work.wrong, work.failures), ([], []))
        yield work.check_all()
        self.assertEqual(work.wrong, [])
        self.assertEqual(len(logs.matching("reconnecting")), 1, logs.lines)
        self.assertEqual(len(logs.matching("reconnected after")), 1, logs.lines)
        self.assertEqual(len(logs.lines), 4, logs.lines)  # connected, lost, reconnecting, back

    @defer.inlineCallbacks
    def test_back_with_another_size(self) -> Gen:
        """A server back with another size: logged once, and the disk stays failed (``EIO``)."""
        logs = LogLines(self)
        server = nbdkit(self, "memory", "4M")
        backend = yield open_nbd(self, unix_spec(server))
        server.kill()
        yield wait_for(lambda: backend.state == "reconnecting", 5, "lost")
        f = yield self.assertFailure(backend.read(0, 512), OSError)
        self.assertEqual(f.errno, errno.ENOTCONN)
        server.argv[-1] = "8M"
        server.start()
        yield wait_for(lambda: backend.state == "failed", 10, "failed")
        f = yield self.assertFailure(backend.read(0, 512), OSError)
        self.assertEqual(f.errno, errno.EIO)
        self.assertEqual(
            logs.matching("came back"),
            [f"nbd:{unix_spec(server)}: the server came back with 8388608 bytes instead of "
             "4194304; the disk stays failed"],
        )
        yield task.deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(backend.state, "failed")  # no more attempts

    @defer.inlineCallbacks
    def test_close_while_away(self) -> Gen:
        """Closing while the server is away stops the attempts at once."""
        server = nbdkit(self, "memory", "1M")
        backend = yield open_nbd(self, unix_spec(server))
        server.kill()
        yield wait_for(lambda: backend.state == "reconnecting", 5, "lost")
        yield task.deferLater(reactor, 0.35, lambda: None)  # an attempt or two have failed
        yield backend.close()
        self.assertEqual(backend.state, "closed")
        f = yield self.assertFailure(backend.read(0, 512), OSError)
        self.assertEqual(f.errno, errno.ENOTCONN)


class DeadlineTests(TestCase):
    """A request the server does not answer in time fails with ``ETIMEDOUT``."""

    timeout = 30

    def setUp(self) -> None:
        require_nbd(self, "nbdkit")

    def keep_answering(self, backend: NBDBackend) -> None:
        """Write a sector every 50 ms until the test ends: the server keeps answering something."""
        loop = task.LoopingCall(lambda: backend.write(MIB, b"a" * 512).addErrback(lambda f: None))
        loop.start(0.05, now=False)
        self.addCleanup(loop.stop)

    @defer.inlineCallbacks
    def test_nothing_answered(self) -> Gen:
        """
        Reads delayed 100 s with a 0.3 s deadline: ``ETIMEDOUT`` after 0.3 s, one log line for
        all of them; the server answered nothing since, so the connection is dropped (and
        the buffers with it) and made again.
        """
        logs = LogLines(self)
        server = nbdkit(self, "memory", "64M", "rdelay=100", filters=("delay",))
        backend = yield open_nbd(self, unix_spec(server), timeout=0.3)
        started = time.monotonic()
        reads = [backend.read(i * 4096, 4096) for i in range(5)]
        for d in reads:
            f = yield self.assertFailure(d, OSError)
            self.assertEqual(f.errno, errno.ETIMEDOUT)
        self.assertGreaterEqual(time.monotonic() - started, 0.3)
        self.assertEqual(backend.in_flight, 0)  # dropped with the connection
        self.assertEqual(len(logs.matching("not answered in 0.3 s")), 1, logs.lines)
        self.assertEqual(len(logs.matching("connection lost (nothing answered in 0.3 s)")), 1)
        try:
            yield wait_for(lambda: backend.state == "connected", 3, "reconnected")
        except AssertionError:
            if server.running:
                raise
            # nbdkit 1.32 may abort when a connection closes with delayed replies
            # pending ("raw_send_socket: Assertion `sock >= 0' failed"): the
            # backend then reconnects to a new one on the same socket.
            server.start()
            yield wait_for(lambda: backend.state == "connected", 10, "reconnected")
        yield backend.write(0, b"w" * 4096)
        started = time.monotonic()
        yield backend.close()
        self.assertLess(time.monotonic() - started, 2)
        self.assertEqual((backend.in_flight, backend.state), (0, "closed"))

    @defer.inlineCallbacks
    def test_answered_late(self) -> Gen:
        """
        While the server answers other requests, an expired one keeps its buffer until its
        own late answer (which is dropped); the connection stays.
        """
        logs = LogLines(self)
        server = nbdkit(self, "memory", "2M", "rdelay=1", filters=("delay",))
        backend = yield open_nbd(self, unix_spec(server), timeout=0.3)
        read = backend.read(0, 4096)
        self.keep_answering(backend)
        f = yield self.assertFailure(read, OSError)
        self.assertEqual(f.errno, errno.ETIMEDOUT)
        self.assertGreaterEqual(backend.in_flight, 1)
        yield wait_for(lambda: backend.in_flight == 0, 5, "the late answer")
        self.assertEqual(backend.state, "connected")
        self.assertEqual(logs.matching("connection lost"), [])
        yield backend.write(0, b"w" * 512)

    @defer.inlineCallbacks
    def test_too_many_unanswered(self) -> Gen:
        """More than ``max_expired`` expired requests held: the connection is dropped."""
        logs = LogLines(self)
        server = nbdkit(self, "memory", "2M", "rdelay=100", filters=("delay",))
        backend = yield open_nbd(self, unix_spec(server), timeout=0.3)
        backend.max_expired = 3
        reads = [backend.read(i * 4096, 4096) for i in range(5)]
        self.keep_answering(backend)
        for d in reads:
            f = yield self.assertFailure(d, OSError)
            self.assertEqual(f.errno, errno.ETIMEDOUT)
        self.assertEqual(backend.in_flight, 0)
        self.assertEqual(
            len(logs.matching("connection lost (5 requests the server left unanswered)")),
            1,
            logs.lines,
        )
