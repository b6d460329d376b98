# -*- test-case-name: tests.test_threaded -*-
"""
Tests for ``thread:[N:]SCHEME:SPEC`` (``aoe_twisted.backends.threaded``).

A synchronous disk run in a pool of threads, as an ``IAsyncBlockBackend``:
the spec's parsing, the calls going through the pool (many at once, with
the data intact), a disk that blocks leaving the reactor free, the disk's
identity, closing; and ``twistd aoe`` serving ``thread:file:PATH`` to the
user-space client (root only).
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from aoe_twisted.backends.file import FileBackend
from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.backends.threaded import DEFAULT_THREADS, ThreadedBackend, parse_threaded_spec
from aoe_twisted.backendspec import open_backend
from aoe_twisted.core.wire import SECTOR_SIZE
from aoe_twisted.errors import BackendSpecError
from aoe_twisted.initiator.client import AoEClient, RetryPolicy
from aoe_twisted.interfaces import IAsyncBlockBackend, IBlockBackend, IDiskIdentity
from tests.netns import VethPair, require
from tests.test_twistd import TwistdProcessMixin, _twistd

Gen = Generator[Deferred[Any], Any, None]

DISK_BYTES = 1 << 20


def pattern(size: int, seed: int = 1) -> bytes:
    """Return ``size`` reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


@implementer(IBlockBackend)
class RecordingDisk(MemoryBackend):
    """
    A memory disk that records the threads its calls run in and how many run at once.

    Each call takes at least ``pause`` seconds (``time.sleep``: it blocks
    whatever thread runs it), and waits for ``gate`` if one is set.
    """

    def __init__(self, size: int = DISK_BYTES, pause: float = 0.0) -> None:
        super().__init__(size)
        self.pause = pause
        self.gate: threading.Event | None = None
        self.started = threading.Event()
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.threads: set[str] = set()
        self.closed_while_running: int | None = None

    def _enter(self) -> None:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.threads.add(threading.current_thread().name)
        self.started.set()
        if self.gate is not None:
            self.gate.wait(2)
        if self.pause:
            time.sleep(self.pause)

    def _leave(self) -> None:
        with self.lock:
            self.running -= 1

    def read(self, offset: int, length: int) -> bytes:
        self._enter()
        try:
            return super().read(offset, length)
        finally:
            self._leave()

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._enter()
        try:
            super().write(offset, data)
        finally:
            self._leave()

    def close(self) -> None:
        with self.lock:
            self.closed_while_running = self.running
        super().close()


class ParseTests(SynchronousTestCase):
    """``thread:[N:]SCHEME:SPEC``: the thread count and the disk it wraps."""

    def test_default_count(self) -> None:
        """Without a count the pool has ``DEFAULT_THREADS`` (8); the rest is the wrapped disk."""
        self.assertEqual(DEFAULT_THREADS, 8)
        self.assertEqual(parse_threaded_spec("file:/srv/a.img"), (8, "file:/srv/a.img"))
        self.assertEqual(parse_threaded_spec("file:/srv/a:b.img"), (8, "file:/srv/a:b.img"))

    def test_count(self) -> None:
        """A leading number is the thread count, 1..256."""
        self.assertEqual(parse_threaded_spec("4:file:x"), (4, "file:x"))
        self.assertEqual(parse_threaded_spec("1:memory:1M"), (1, "memory:1M"))
        self.assertEqual(parse_threaded_spec("256:file:/a:b"), (256, "file:/a:b"))

    def test_bad_count(self) -> None:
        """A count out of range is one line naming the range and the count."""
        for count in ("0", "257", "99999"):
            error = self.assertRaises(ValueError, parse_threaded_spec, f"{count}:file:x")
            self.assertEqual(str(error), f"thread count must be 1..256, not {int(count)}")

    def test_nothing_to_wrap(self) -> None:
        """A spec with no ``SCHEME:SPEC`` to run is one line saying what was expected."""
        for spec in ("4", "4:", "file", "4:file"):
            error = self.assertRaises(ValueError, parse_threaded_spec, spec)
            self.assertIn("expected thread:[N:]SCHEME:SPEC", str(error))
            self.assertNotIn("\n", str(error))

    def test_nesting_refused(self) -> None:
        """A ``thread:`` disk inside another is refused."""
        for spec in ("thread:file:x", "4:thread:file:x", "thread:4:file:x"):
            error = self.assertRaises(ValueError, parse_threaded_spec, spec)
            self.assertEqual(str(error), "a thread: disk inside a thread: disk is pointless")

    def test_open_errors_one_line(self) -> None:
        """Through ``open_backend`` each mistake is a one-line ``BackendSpecError``."""
        cases = {
            "thread:0:memory:1M": "thread count must be 1..256, not 0",
            "thread:4": "expected thread:[N:]SCHEME:SPEC",
            "thread:thread:memory:1M": "a thread: disk inside a thread: disk is pointless",
            "thread:2:nosuch:x": "unknown backend scheme 'nosuch'",
            "thread:file:/nonexistent/disk.img": "/nonexistent/disk.img",
        }
        for spec, words in cases.items():
            with self.subTest(spec=spec):
                error = self.assertRaises(BackendSpecError, open_backend, spec)
                self.assertIn(words, str(error))
                self.assertNotIn("\n", str(error))


class ThreadedBackendTests(TestCase):
    """``ThreadedBackend`` over a real file disk, on the real reactor."""

    timeout = 20

    def setUp(self) -> None:
        self.path = Path(self.mktemp())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.original = pattern(DISK_BYTES)
        self.path.write_bytes(self.original)
        self.inner = FileBackend.open(str(self.path))
        self.disk = ThreadedBackend(self.inner, 4)
        self.addCleanup(self.close, self.disk)

    def close(self, disk: ThreadedBackend) -> Deferred[Any] | None:
        """Close ``disk`` unless already closed (a cleanup)."""
        if disk.pool.joined:
            return None
        return disk.close()

    def test_interface(self) -> None:
        """A ``ThreadedBackend`` is an ``IAsyncBlockBackend`` of the wrapped disk's size, mode."""
        self.assertTrue(verifyObject(IAsyncBlockBackend, self.disk))
        self.assertFalse(IBlockBackend.providedBy(self.disk))
        self.assertEqual((self.disk.size, self.disk.read_only), (DISK_BYTES, False))
        readonly = ThreadedBackend(FileBackend.open(str(self.path), read_only=True))
        self.addCleanup(self.close, readonly)
        self.assertTrue(readonly.read_only)

    def test_refuses_async(self) -> None:
        """Only a synchronous disk can be wrapped."""
        error = self.assertRaises(TypeError, ThreadedBackend, self.disk)
        self.assertIn("IBlockBackend", str(error))

    def test_identity(self) -> None:
        """The wrapped disk's identity is the threaded disk's; a disk without one gives none."""
        self.assertTrue(verifyObject(IDiskIdentity, self.disk))
        self.assertEqual(self.disk.disk_identity(), self.inner.disk_identity())
        memory = ThreadedBackend(MemoryBackend(4096))
        self.addCleanup(self.close, memory)
        self.assertFalse(IDiskIdentity.providedBy(memory))

    @defer.inlineCallbacks
    def test_read_write_flush(self) -> Gen:
        """Each call returns at once and fires later; a write lands in the file; flush fires."""
        data = pattern(8192, seed=2)
        write = self.disk.write(4096, data)
        self.assertNoResult(write)  # fired in the reactor thread, later
        self.assertIsNone((yield write))
        read = self.disk.read(4096 - 512, 8192 + 1024)
        self.assertNoResult(read)
        got = yield read
        self.assertEqual(got, self.original[3584:4096] + data + self.original[12288:12800])
        self.assertIsNone((yield self.disk.flush()))
        self.assertEqual(self.path.read_bytes()[4096:12288], data)

    @defer.inlineCallbacks
    def test_errors(self) -> Gen:
        """An ``OSError`` in the thread fails the ``Deferred`` with it (its errno kept)."""
        readonly = ThreadedBackend(FileBackend.open(str(self.path), read_only=True))
        self.addCleanup(self.close, readonly)
        try:
            yield readonly.write(0, bytes(512))
        except OSError as e:
            self.assertEqual(e.errno, errno.EROFS)
        else:
            self.fail("a write to a read-only disk succeeded")

    @defer.inlineCallbacks
    def test_many_in_flight(self) -> Gen:
        """
        64 writes, then 64 reads, all in flight at once, run in the pool's
        threads (no more at a time than asked for) and leave the data intact.
        """
        inner = RecordingDisk(pause=0.002)
        disk = ThreadedBackend(inner, 4)
        self.addCleanup(self.close, disk)
        rng = random.Random(3)
        blocks = rng.sample(range(DISK_BYTES // 4096), 64)
        chunks = {b: rng.randbytes(4096) for b in blocks}
        yield defer.gatherResults([disk.write(b * 4096, chunks[b]) for b in blocks])
        reads = yield defer.gatherResults([disk.read(b * 4096, 4096) for b in blocks])
        self.assertEqual(reads, [chunks[b] for b in blocks])
        self.assertEqual(inner.peak, 4)
        self.assertNotIn(threading.current_thread().name, inner.threads)
        self.assertEqual(len(inner.threads), 4)

    @defer.inlineCallbacks
    def test_blocking_disk_leaves_reactor_free(self) -> Gen:
        """A disk blocking 0.3 s in ``read`` does not stop the reactor: a timer keeps ticking."""
        disk = ThreadedBackend(RecordingDisk(pause=0.3), 2)
        self.addCleanup(self.close, disk)
        ticks: list[float] = []
        ticker = task.LoopingCall(lambda: ticks.append(time.monotonic()))
        ticker.start(0.01)
        try:
            data = yield disk.read(0, 4096)
        finally:
            ticker.stop()
        self.assertEqual(data, bytes(4096))
        self.assertGreaterEqual(len(ticks), 10)
        self.assertLess(max(b - a for a, b in itertools.pairwise(ticks)), 0.2)

    @defer.inlineCallbacks
    def test_close(self) -> Gen:
        """``close`` closes the wrapped disk (in the pool) and then stops the pool."""
        yield self.disk.read(0, 512)
        self.assertTrue(self.disk.pool.started)
        yield self.disk.close()
        self.assertTrue(self.disk.pool.joined)
        self.assertFalse(any(t.is_alive() for t in self.disk.pool.threads))
        self.assertRaises(OSError, self.inner.read, 0, 512)

    @defer.inlineCallbacks
    def test_close_waits_for_calls(self) -> Gen:
        """
        ``close`` waits for the calls still running: the wrapped disk is closed
        only once no thread uses it (a closed descriptor's number is reused by
        the next file opened, which a late ``pwrite`` would then write).
        """
        inner = RecordingDisk()
        inner.gate = threading.Event()
        disk = ThreadedBackend(inner, 2)
        read = disk.read(0, 512)
        for _ in range(200):
            if inner.started.is_set():
                break
            yield task.deferLater(reactor, 0.005, lambda: None)
        closed = disk.close()
        yield task.deferLater(reactor, 0.1, lambda: None)
        inner.gate.set()
        (read_ok, data), (closed_ok, _) = yield defer.DeferredList(
            [read, closed], consumeErrors=True
        )
        self.assertEqual(inner.closed_while_running, 0)
        self.assertTrue(read_ok, data)
        self.assertTrue(closed_ok)

    def test_pool_starts_with_first_call(self) -> None:
        """No thread before the first call (``twistd`` may fork after opening the disk)."""
        self.assertFalse(self.disk.pool.started)
        self.assertEqual(self.disk.pool.max, 4)


class FactoryTests(SynchronousTestCase):
    """``open_backend("thread:...")``."""

    def test_opens(self) -> None:
        """``thread:2:file:PATH`` is a ``ThreadedBackend`` of 2 threads over the file disk."""
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(8192))
        disk = open_backend(f"thread:2:file:{path}", read_only=True)
        self.addCleanup(disk.inner.close)
        self.assertIsInstance(disk, ThreadedBackend)
        self.assertIsInstance(disk.inner, FileBackend)
        self.assertEqual((disk.pool.max, disk.size, disk.read_only), (2, 8192, True))
        self.assertTrue(disk.inner.read_only)
        default = open_backend("thread:memory:4K")
        self.addCleanup(default.inner.close)
        self.assertEqual(default.pool.max, DEFAULT_THREADS)


class ThreadedTwistdTests(TwistdProcessMixin, TestCase):
    """``twistd aoe --target 1.0=thread:file:PATH`` serves the file to the user-space client."""

    timeout = 60

    @defer.inlineCallbacks
    def test_served(self) -> Gen:
        """What the client writes reads back and is in the file; SIGTERM stops twistd cleanly."""
        require(self)
        pair = VethPair.create(self)
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        image = work / "disk.img"
        original = pattern(DISK_BYTES, seed=4)
        image.write_bytes(original)
        proc = _twistd(
            "aoe", "--iface", pair.server_if, "--target", f"1.0=thread:4:file:{image}",
            netns=pair.server_ns, cwd=str(work),
        )
        self.addCleanup(self._kill, proc)
        client = AoEClient.listen(pair.client_if, reactor=reactor, netns=pair.client_ns,
                                  retry=RetryPolicy(0.25, 1.0, 40))
        self.addCleanup(client.close)
        disk = yield client.open(1, 0)
        self.assertEqual(disk.size, DISK_BYTES)
        self.assertEqual((yield disk.read(0, 128)), original[: 128 * SECTOR_SIZE])
        data = pattern(128 * 1024, seed=5)
        yield disk.write(1000, data)
        yield disk.flush()
        self.assertEqual((yield disk.read(1000, len(data) // SECTOR_SIZE)), data)
        out = yield self.stop_cleanly(proc)
        self.assertIn(f"serving e1.0 = thread:4:file:{image}", out)
        with open(image, "rb") as f:
            f.seek(1000 * SECTOR_SIZE)
            self.assertEqual(f.read(len(data)), data)
        self.assertEqual(os.path.getsize(image), DISK_BYTES)
