# -*- test-case-name: tests.test_durability -*-
"""
Tests for the write durability modes: group commit (``--sync``), ``O_DIRECT`` (``--direct``).

Group commit is tested on the real ``AoEService`` over ``MemoryPacketSystem``
(as ``tests.test_server`` does), with backends that record when they are
synced and what the socket had sent by then.  Direct I/O is tested with the
backend contract suite of ``tests.test_backends`` on a real file (and, as
root, on a loop device with 4096-byte logical blocks).
"""

from __future__ import annotations

import errno
import os
from typing import Any

from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface import implementer

from aoe_twisted.backends import _fd
from aoe_twisted.backends.block import BlockDeviceBackend
from aoe_twisted.backends.file import FileBackend
from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.backendspec import open_backend
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import SECTOR_SIZE, ATAArg, ATACmdStatus, ATAError
from aoe_twisted.errors import BackendSpecError
from aoe_twisted.interfaces import IBlockBackend, IDataSyncBackend, IDirectIOFactory
from aoe_twisted.server import AoEProtocol
from aoe_twisted.tap import Options, makeService
from aoe_twisted.testing import ata_request, ethernet_frame
from tests.test_backends import SIZE, _losetup, _make_image, _PersistentBackendMixin, _sector
from tests.test_server import ServiceTestsMixin, decode

_DRDY = int(ATACmdStatus.READY_STATUS)
_ERR_DRDY = int(ATACmdStatus.ERR_STATUS) | _DRDY


# -- group commit ------------------------------------------------------------


@implementer(IDataSyncBackend)
class RecordingBackend:
    """
    A memory disk that records its syncs: how many, and what had been sent by each.

    ``sent`` is a callable returning how many frames the server has sent so
    far; each ``sync_data`` appends its value to ``syncs``.  With ``fail``
    set, ``sync_data`` raises ``EIO``.
    """

    def __init__(self, size: int = 64 * SECTOR_SIZE) -> None:
        self._disk = MemoryBackend(size)
        self.size = size
        self.read_only = False
        self.syncs: list[int] = []
        self.flushes = 0
        self.fail = False
        self.sent: Any = lambda: 0

    def read(self, offset: int, length: int) -> bytes:
        return self._disk.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self._disk.write(offset, data)

    def flush(self) -> None:
        self.flushes += 1

    def sync_data(self) -> None:
        self.syncs.append(self.sent())
        if self.fail:
            raise OSError(errno.EIO, "simulated sync failure")

    def close(self) -> None:
        pass


@implementer(IBlockBackend)
class FlushOnlyBackend:
    """A third-party style backend with no ``sync_data``: ``--sync`` must call ``flush``."""

    def __init__(self, size: int = 64 * SECTOR_SIZE) -> None:
        self._disk = MemoryBackend(size)
        self.size = size
        self.read_only = False
        self.flushes = 0

    def read(self, offset: int, length: int) -> bytes:
        return self._disk.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self._disk.write(offset, data)

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        pass


def write_frame(lba: int, fill: int, tag: int, shelf: int = 1, slot: int = 2) -> bytes:
    """A WRITE SECTORS EXT of one sector of ``fill`` bytes, as Linux sends it."""
    return ethernet_frame(ata_request(
        ATACmdStatus.WRITE_48BIT, lba=lba, data=bytes([fill]) * SECTOR_SIZE, tag=tag,
        shelf=shelf, slot=slot,
    ))


def read_frame(lba: int, tag: int, shelf: int = 1, slot: int = 2) -> bytes:
    """A READ SECTORS EXT of one sector."""
    return ethernet_frame(ata_request(lba=lba, tag=tag, shelf=shelf, slot=slot))


def flush_frame(tag: int, shelf: int = 1, slot: int = 2) -> bytes:
    """A FLUSH CACHE EXT."""
    return ethernet_frame(ata_request(ATACmdStatus.FLUSH_EXT, tag=tag, shelf=shelf, slot=slot))


def ata_reply(frame: bytes) -> tuple[int, ATAArg]:
    """Return the tag (as an int) and ATA argument of a reply frame."""
    header = decode(frame)[1]
    assert isinstance(header.arg, ATAArg)
    return int.from_bytes(header.tag, "big"), header.arg


class GroupCommitTests(ServiceTestsMixin, SynchronousTestCase):
    """``--sync``: the writes of one drain share one sync, made before any of them is answered."""

    def serve_recording(self, *backends: Any, sync: bool = True) -> list[Any]:
        """Serve one target per backend (1.2, 1.3, ...) in sync mode; return the backends."""
        backends = backends or (RecordingBackend(),)
        targets = [Target(1, 2 + i, backend) for i, backend in enumerate(backends)]
        self.serve(*targets, sync=sync)
        for backend in backends:
            backend.sent = lambda: len(self.sock.sent)
        return list(backends)

    def drain(self, *frames: bytes) -> list[bytes]:
        """Deliver ``frames`` and let the port read them in one drain; return the replies."""
        before = len(self.sock.sent)
        for frame in frames:
            self.interface.receive(frame)
        assert self.service.port is not None
        self.service.port.doRead()
        return list(self.sock.sent[before:])

    def test_one_sync_per_drain(self) -> None:
        """
        Eight writes in one drain cost one sync, made before any reply is
        sent; the replies then go out in arrival order, all successful.
        """
        (backend,) = self.serve_recording()
        sent_before = len(self.sock.sent)
        replies = self.drain(*(write_frame(i, i + 1, 100 + i) for i in range(8)))
        self.assertEqual(backend.syncs, [sent_before])
        self.assertEqual([ata_reply(r)[0] for r in replies], list(range(100, 108)))
        self.assertEqual({ata_reply(r)[1].cmd_status for r in replies}, {_DRDY})
        for i in range(8):
            self.assertEqual(backend.read(i * SECTOR_SIZE, SECTOR_SIZE),
                             bytes([i + 1]) * SECTOR_SIZE)
        protocol = self.service.protocol
        assert protocol is not None
        self.assertEqual((protocol.syncs, protocol.synced_writes), (1, 8))

    def test_sync_per_drain(self) -> None:
        """Each drain with writes has its own sync."""
        (backend,) = self.serve_recording()
        self.drain(write_frame(0, 1, 1), write_frame(1, 2, 2))
        self.drain(write_frame(2, 3, 3))
        self.assertEqual(len(backend.syncs), 2)

    def test_no_writes_no_sync(self) -> None:
        """A drain of reads, or of failed writes, syncs nothing and answers at once."""
        (backend,) = self.serve_recording()
        replies = self.drain(read_frame(0, 1), write_frame(10_000, 1, 2))
        self.assertEqual(backend.syncs, [])
        self.assertEqual([ata_reply(r)[0] for r in replies], [1, 2])
        self.assertEqual(ata_reply(replies[1])[1].err_feature, int(ATAError.IDNF))

    def test_sync_failure_aborts(self) -> None:
        """
        If the sync fails, every write of the drain is answered ERR|DRDY with
        ABRT: none is acknowledged, and the failure is logged.
        """
        (backend,) = self.serve_recording()
        backend.fail = True
        with capturedLogs() as events:
            replies = self.drain(write_frame(0, 1, 1), write_frame(1, 2, 2), read_frame(0, 3))
        self.assertEqual(len(backend.syncs), 1)
        tags_and_args = [ata_reply(r) for r in replies]
        self.assertEqual([tag for tag, _ in tags_and_args], [1, 2, 3])
        for _, arg in tags_and_args[:2]:
            self.assertEqual(arg.cmd_status, _ERR_DRDY)
            self.assertEqual(arg.err_feature, int(ATAError.ABRT))
            self.assertTrue(arg.flag_write)
        self.assertEqual(tags_and_args[2][1].cmd_status, _DRDY)
        protocol = self.service.protocol
        assert protocol is not None
        self.assertEqual((protocol.sync_failures, protocol.synced_writes), (2, 0))
        self.assertTrue(any("cannot make writes to e1.2 durable" in formatEvent(e)
                            for e in events))
        # The next drain, with a healthy disk, acknowledges again.
        backend.fail = False
        (reply,) = self.drain(write_frame(0, 1, 4))
        self.assertEqual(ata_reply(reply)[1].cmd_status, _DRDY)

    def test_order_kept(self) -> None:
        """
        A read before the drain's first write is answered before the sync;
        everything after the first write is held behind it, in arrival order.
        """
        (backend,) = self.serve_recording()
        sent_before = len(self.sock.sent)
        replies = self.drain(read_frame(5, 1), write_frame(5, 9, 2), read_frame(5, 3),
                             flush_frame(4))
        self.assertEqual(backend.syncs, [sent_before + 1])
        self.assertEqual([ata_reply(r)[0] for r in replies], [1, 2, 3, 4])
        self.assertEqual(ata_reply(replies[0])[1].data[:SECTOR_SIZE], bytes(SECTOR_SIZE))
        self.assertEqual(ata_reply(replies[2])[1].data[:SECTOR_SIZE], b"\x09" * SECTOR_SIZE)

    def test_each_written_disk_synced_once(self) -> None:
        """Two disks written in one drain get one sync each; an unwritten one gets none."""
        a, b, c = self.serve_recording(RecordingBackend(), RecordingBackend(), RecordingBackend())
        self.drain(write_frame(0, 1, 1, slot=2), write_frame(1, 1, 2, slot=3),
                   write_frame(2, 1, 3, slot=2), read_frame(0, 4, slot=4))
        self.assertEqual((len(a.syncs), len(b.syncs), len(c.syncs)), (1, 1, 0))

    def test_failure_only_on_failed_disk(self) -> None:
        """Only the writes to the disk whose sync failed are refused."""
        _, b = self.serve_recording(RecordingBackend(), RecordingBackend())
        b.fail = True
        replies = self.drain(write_frame(0, 1, 1, slot=2), write_frame(0, 1, 2, slot=3))
        statuses = [ata_reply(r)[1].cmd_status for r in replies]
        self.assertEqual(statuses, [_DRDY, _ERR_DRDY])

    def test_flush_fallback(self) -> None:
        """A backend without ``sync_data`` is made durable with ``flush``."""
        (backend,) = self.serve_recording(FlushOnlyBackend())
        (reply,) = self.drain(write_frame(0, 1, 1))
        self.assertEqual(backend.flushes, 1)
        self.assertEqual(ata_reply(reply)[1].cmd_status, _DRDY)

    def test_default_mode_does_not_sync(self) -> None:
        """Without --sync writes are answered at once and nothing is synced."""
        (backend,) = self.serve_recording(sync=False)
        replies = self.drain(write_frame(0, 1, 1), write_frame(1, 1, 2))
        self.assertEqual(backend.syncs, [])
        self.assertEqual(len(replies), 2)

    def test_without_drain_hook(self) -> None:
        """
        Frames handed to the protocol directly (no port drain) are still
        answered: a zero-delay call ends the drain.
        """
        (backend,) = self.serve_recording()
        protocol = self.service.protocol
        assert protocol is not None
        before = len(self.sock.sent)
        protocol.datagramReceived(write_frame(0, 1, 1))
        protocol.datagramReceived(write_frame(1, 1, 2))
        self.assertEqual(len(self.sock.sent), before)
        self.reactor.advance(0)
        self.assertEqual(len(backend.syncs), 1)
        self.assertEqual(len(self.sock.sent), before + 2)

    def test_summary_at_stop(self) -> None:
        """Stopping logs how many writes shared how many syncs."""
        self.serve_recording()
        self.drain(*(write_frame(i, 1, i) for i in range(6)))
        self.drain(*(write_frame(i, 1, 10 + i) for i in range(2)))
        with capturedLogs() as events:
            self.service.stopService()
            self.reactor.advance(0)
        lines = [formatEvent(e) for e in events]
        self.assertTrue(
            any("8 writes acknowledged after 2 syncs (4.0 writes per sync)" in line
                for line in lines),
            lines,
        )


class IdempotentWriteTests(ServiceTestsMixin, SynchronousTestCase):
    """
    The initiator retransmits a write with a new tag: writes apply in arrival
    order, and the same write twice leaves what it leaves once.
    """

    def check(self, sync: bool) -> None:
        backend = RecordingBackend()
        self.serve(Target(1, 2, backend), sync=sync)
        for frames in ([write_frame(3, 7, 1)], [write_frame(3, 7, 2)]):
            for frame in frames:
                self.interface.receive(frame)
            assert self.service.port is not None
            self.service.port.doRead()
        self.assertEqual(backend.read(3 * SECTOR_SIZE, SECTOR_SIZE), b"\x07" * SECTOR_SIZE)
        # A retransmitted old write arriving after a newer one wins: arrival order.
        for frame in (write_frame(4, 1, 3), write_frame(4, 2, 4), write_frame(4, 1, 5)):
            self.interface.receive(frame)
        assert self.service.port is not None
        self.service.port.doRead()
        self.assertEqual(backend.read(4 * SECTOR_SIZE, SECTOR_SIZE), b"\x01" * SECTOR_SIZE)
        tags = [ata_reply(frame)[0] for frame in self.sock.sent if decode(frame)[1].command == 0]
        self.assertEqual(tags, [1, 2, 3, 4, 5])

    def test_default(self) -> None:
        """In the default mode."""
        self.check(sync=False)

    def test_sync(self) -> None:
        """In --sync mode."""
        self.check(sync=True)


class DrainHookTests(ServiceTestsMixin, SynchronousTestCase):
    """The port calls ``drainFinished`` once per ``doRead`` that delivered frames."""

    def setUp(self) -> None:
        super().setUp()
        self.calls = 0
        self.serve()
        protocol = self.service.protocol
        assert protocol is not None
        protocol.drainFinished = self.count  # type: ignore[method-assign]

    def count(self) -> None:
        self.calls += 1

    def test_once_per_drain(self) -> None:
        """Three frames in one read: one call; an empty read: none."""
        assert self.service.port is not None
        for i in range(3):
            self.interface.receive(read_frame(0, i))
        self.service.port.doRead()
        self.assertEqual(self.calls, 1)
        self.service.port.doRead()
        self.assertEqual(self.calls, 1)

    def test_exception_logged(self) -> None:
        """An exception from ``drainFinished`` is logged, not raised."""
        protocol = self.service.protocol
        assert protocol is not None

        def fail() -> None:
            raise RuntimeError("boom")

        protocol.drainFinished = fail  # type: ignore[method-assign]
        self.interface.receive(read_frame(0, 1))
        assert self.service.port is not None
        self.service.port.doRead()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ProtocolDefaultsTests(SynchronousTestCase):
    """``AoEProtocol`` stays in the default mode unless asked."""

    def test_default_not_sync(self) -> None:
        """Without ``sync`` the protocol does not group commit."""
        self.assertFalse(AoEProtocol([]).sync)


# -- sync_data on the built-in backends -------------------------------------------


class SyncDataTests(SynchronousTestCase):
    """``sync_data``: ``fdatasync`` for files, nothing for memory."""

    def test_file_fdatasync(self) -> None:
        """``FileBackend.sync_data`` calls ``fdatasync`` on its descriptor."""
        backend = FileBackend.open(_make_image(self))
        self.addCleanup(backend.close)
        calls: list[int] = []
        real = os.fdatasync
        self.patch(os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])
        backend.write(0, _sector(1))
        backend.sync_data()
        self.assertEqual(len(calls), 1)

    def test_memory_noop(self) -> None:
        """``MemoryBackend.sync_data`` does nothing and does not fail."""
        MemoryBackend(SECTOR_SIZE).sync_data()


# -- O_DIRECT ------------------------------------------------------------------


def _open_direct(case: SynchronousTestCase, path: str, read_only: bool = False) -> FileBackend:
    """Open ``path`` with ``direct``, skipping the test if the filesystem refuses O_DIRECT."""
    try:
        return FileBackend.open(path, read_only=read_only, direct=True)
    except BackendSpecError as e:
        if "direct I/O" in str(e):
            raise SkipTest(f"the test directory's filesystem refuses O_DIRECT: {e}") from None
        raise


class DirectFileBackendTests(_PersistentBackendMixin, SynchronousTestCase):
    """The backend contract, for ``FileBackend`` opened ``O_DIRECT``."""

    alignment: int | None = None

    def setUp(self) -> None:
        self.path = _make_image(self)

    def make_backend(self, read_only: bool = False) -> IBlockBackend:
        backend = _open_direct(self, self.path, read_only)
        if self.alignment is not None:
            backend.alignment = self.alignment
        return backend

    def test_direct(self) -> None:
        """The descriptor is O_DIRECT and the alignment is a power of two from 512."""
        backend = self.backend()
        assert isinstance(backend, FileBackend)
        self.assertTrue(backend.direct)
        flags = int(_fcntl_flags(backend))
        self.assertTrue(flags & os.O_DIRECT)
        self.assertGreaterEqual(backend.alignment, SECTOR_SIZE)
        self.assertEqual(backend.alignment & (backend.alignment - 1), 0)

    def test_file_bytes(self) -> None:
        """Writes of odd sizes at odd sectors are in the file; their neighbours are kept."""
        backend = self.backend()
        expected = bytearray(SIZE)
        for offset, count, fill in ((0, 1, 1), (3, 2, 2), (7, 9, 3), (8, 1, 4), (255, 1, 5)):
            data = _sector(fill) * count
            backend.write(offset * SECTOR_SIZE, data)
            expected[offset * SECTOR_SIZE : offset * SECTOR_SIZE + len(data)] = data
        backend.sync_data()
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), bytes(expected))
        self.assertEqual(backend.read(0, SIZE), bytes(expected))


class DirectFile4096Tests(DirectFileBackendTests):
    """
    The contract again with 4096-byte direct I/O blocks, as on a 4Kn disk:
    512-byte requests go through read-modify-write.
    """

    alignment = 4096


class DirectBlock4KnTests(_PersistentBackendMixin, SynchronousTestCase):
    """The contract on a loop device with 4096-byte logical blocks (root only)."""

    def setUp(self) -> None:
        self.image = _make_image(self)
        self.device = _losetup(self, self.image, "--sector-size", "4096", "--direct-io=on")

    def make_backend(self, read_only: bool = False) -> IBlockBackend:
        return BlockDeviceBackend.open(self.device, read_only=read_only, direct=True)

    def test_alignment(self) -> None:
        """The device's logical block size (BLKSSZGET) is the alignment."""
        backend = self.backend()
        assert isinstance(backend, BlockDeviceBackend)
        self.assertEqual(backend.alignment, 4096)

    def test_sector_write_keeps_neighbours(self) -> None:
        """A one-sector write inside a 4096-byte block leaves the other seven as they were."""
        backend = self.backend()
        backend.write(0, _sector(1) * 8)
        backend.write(3 * SECTOR_SIZE, _sector(9))
        backend.sync_data()
        expected = _sector(1) * 3 + _sector(9) + _sector(1) * 4
        self.assertEqual(backend.read(0, 8 * SECTOR_SIZE), expected)
        with open(self.image, "rb") as f:
            self.assertEqual(f.read(8 * SECTOR_SIZE), expected)


def _fcntl_flags(backend: FileBackend) -> int:
    import fcntl

    return fcntl.fcntl(backend._fd, fcntl.F_GETFL)


class DirectOpenErrorTests(SynchronousTestCase):
    """``--direct`` that cannot work stops with one line naming the disk."""

    def test_filesystem_refuses(self) -> None:
        """
        A filesystem that refuses O_DIRECT (``EINVAL`` from ``open``, as
        tmpfs before Linux 6.6) is one line naming the path and --direct.
        """
        path = _make_image(self)
        real_open = os.open

        def fake_open(name: str, flags: int, *args: Any) -> int:
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), name)
            return real_open(name, flags, *args)

        self.patch(_fd.os, "open", fake_open)
        error = self.assertRaises(BackendSpecError, FileBackend.open, path, direct=True)
        self.assertIn(path, str(error))
        self.assertIn("--direct", str(error))
        self.assertNotIn("\n", str(error))

    def test_size_not_whole_blocks(self) -> None:
        """A file whose size is not a whole number of direct I/O blocks is refused."""
        path = _make_image(self, 3 * SECTOR_SIZE)
        self.patch(_fd, "_probe_alignment", lambda fd, size: 4096)
        error = self.assertRaises(BackendSpecError, FileBackend.open, path, direct=True)
        self.assertIn(path, str(error))
        self.assertIn("4096", str(error))

    def test_no_alignment_works(self) -> None:
        """If no aligned read works the file is refused as not doing direct I/O."""
        path = _make_image(self)
        self.patch(_fd, "_probe_alignment", lambda fd, size: None)
        error = self.assertRaises(BackendSpecError, FileBackend.open, path, direct=True)
        self.assertIn("direct I/O", str(error))

    def test_memory_refused(self) -> None:
        """``memory:`` does no direct I/O: --direct names the scheme."""
        error = self.assertRaises(BackendSpecError, open_backend, "memory:1M", direct=True)
        self.assertIn("'memory'", str(error))
        self.assertIn("--direct", str(error))

    def test_file_scheme(self) -> None:
        """``open_backend("file:...", direct=True)`` opens the file O_DIRECT."""
        path = _make_image(self)
        try:
            backend = open_backend(f"file:{path}", direct=True)
        except BackendSpecError as e:
            raise SkipTest(str(e)) from None
        self.addCleanup(backend.close)
        assert isinstance(backend, FileBackend)
        self.assertTrue(backend.direct)

    def test_plugin_without_direct(self) -> None:
        """
        A plugin whose factory does not provide ``IDirectIOFactory`` is refused
        under --direct and called as before without it; one providing it gets it.
        """
        from aoe_twisted import backendspec

        calls: list[dict[str, Any]] = []

        class Legacy:
            scheme = "legacy"

            def open(self, spec: str, read_only: bool = False) -> IBlockBackend:
                calls.append({"read_only": read_only})
                return MemoryBackend(SECTOR_SIZE)

        @implementer(IDirectIOFactory)
        class Flexible:
            scheme = "flexible"

            def open(self, spec: str, **options: Any) -> IBlockBackend:
                calls.append(options)
                return MemoryBackend(SECTOR_SIZE)

        self.patch(backendspec, "find_backend_factories",
                   lambda package=None: {"legacy": Legacy(), "flexible": Flexible()})
        error = self.assertRaises(BackendSpecError, open_backend, "legacy:x", direct=True)
        self.assertIn("'legacy'", str(error))
        self.assertIn("--direct", str(error))
        open_backend("legacy:x")
        open_backend("flexible:x", direct=True)
        self.assertEqual(calls, [{"read_only": False}, {"read_only": False, "direct": True}])


# -- twistd aoe --sync / --direct ------------------------------------------------


class TapTests(SynchronousTestCase):
    """The ``--sync`` and ``--direct`` options reach the service and the backends."""

    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(["--iface", "eth0", *argv])
        return options

    def test_defaults_off(self) -> None:
        """Neither is on by default."""
        options = self.parse("--backend", "memory:1M")
        self.assertFalse(options["sync"])
        self.assertFalse(options["direct"])
        service = makeService(options)
        (target,) = service.targets  # type: ignore[attr-defined]
        self.assertFalse(target.sync)

    def test_sync(self) -> None:
        """--sync makes every target group commit (any backend, memory too)."""
        service = makeService(self.parse("--backend", "memory:1M", "--sync"))
        (target,) = service.targets  # type: ignore[attr-defined]
        self.assertTrue(target.sync)

    def test_direct_file(self) -> None:
        """--direct opens file: disks O_DIRECT."""
        path = _make_image(self)
        try:
            service = makeService(self.parse("--backend", f"file:{path}", "--direct"))
        except SystemExit as e:
            raise SkipTest(str(e.code)) from None
        (target,) = service.targets  # type: ignore[attr-defined]
        self.addCleanup(target.backend.close)
        self.assertTrue(target.backend.direct)

    def test_direct_memory_refused(self) -> None:
        """--direct with memory: exits with one line naming the backend and --direct."""
        with self.assertRaises(SystemExit) as caught:
            makeService(self.parse("--backend", "memory:1M", "--direct"))
        message = str(caught.exception.code)
        self.assertNotIn("\n", message)
        self.assertIn("memory:1M", message)
        self.assertIn("--direct", message)
