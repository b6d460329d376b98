# -*- test-case-name: tests.test_async -*-
"""
Tests for disks that answer later (``IAsyncBlockBackend``, issue #13).

Most run the real ``AoEService`` over ``MemoryPacketSystem`` on a
``MemoryReactorClock``, serving ``ControlledDisk``: a disk in memory each of
whose operations waits until the test completes it (or fails it), or until
a delay on the clock has passed.  So a test can say exactly when the disk
answers and check what the server sent before and after.

The example plugin ``later:SIZE`` (``tests/plugins/aoe_twisted_async_example.py``)
is checked on its own, served by ``twistd`` end to end, and used for the
stalled-backend test: a disk that never answers one request does not slow
the other targets (real sockets in the tests' own namespaces; root only).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from attrs import define, field
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

import aoe_twisted.server
from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.backendspec import find_backend_factories, open_backend
from aoe_twisted.core.dispatch import Dispatcher
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import (
    SECTOR_SIZE,
    ATAArg,
    ATACmdStatus,
    ATAError,
    EthernetFrame,
    Header,
)
from aoe_twisted.errors import BackendSpecError
from aoe_twisted.initiator.client import AoEClient, RetryPolicy
from aoe_twisted.interfaces import IAsyncBlockBackend, IBackendFactory
from aoe_twisted.server import AoEProtocol, AoEService
from aoe_twisted.testing import (
    INITIATOR_MAC,
    OTHER_MAC,
    TARGET_MAC,
    MemoryPacketSystem,
    ata_request,
    ethernet_frame,
)
from tests.netns import VethPair, require
from tests.plugintools import TEST_PLUGINS, use_test_plugins
from tests.test_twistd import TwistdProcessMixin, _twistd

Gen = Generator[Deferred[Any], Any, None]

SECTORS = 64
SIZE = SECTORS * SECTOR_SIZE
SHELF, SLOT = 1, 0

_DRDY = int(ATACmdStatus.READY_STATUS)
_ERR_DRDY = int(ATACmdStatus.ERR_STATUS) | _DRDY


def pattern(size: int, seed: int = 1) -> bytes:
    """Return ``size`` reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


# -- a disk the test answers for ------------------------------------------------


@define(eq=False)
class Call:
    """One operation asked of a ``ControlledDisk``: what, where, and its ``Deferred``."""

    kind: str
    offset: int = 0
    length: int = 0
    data: bytes = b""
    deferred: Deferred[Any] = field(init=False)
    cancelled: bool = False


@implementer(IAsyncBlockBackend)
class ControlledDisk:
    """
    A disk in memory whose operations complete when the test says so.

    Every call is recorded in ``log``; one still waiting is in ``waiting``
    until ``complete`` (carry it out on the memory and fire its
    ``Deferred``) or ``fail`` (fail it with an ``OSError``).  A write reaches
    the memory only when it completes.  With ``answer_after`` each call
    completes by itself that many seconds later on ``clock``, except those
    ``stall`` picks, which wait for the test.  A ``Deferred`` cancelled by its
    caller is marked ``cancelled`` and never carried out.
    """

    def __init__(
        self,
        size: int = SIZE,
        read_only: bool = False,
        *,
        clock: Any = None,
        answer_after: float | None = None,
        stall: Callable[[Call], bool] | None = None,
    ) -> None:
        self.size = size
        self.read_only = read_only
        self.contents = bytearray(pattern(size))
        self.clock = clock
        self.answer_after = answer_after
        self.stall = stall
        self.log: list[Call] = []
        self.waiting: list[Call] = []
        self.closed = False

    def _call(self, kind: str, offset: int = 0, length: int = 0, data: bytes = b"") -> Any:
        call = Call(kind, offset, length, data)
        call.deferred = Deferred(lambda _: self._cancelled(call))
        self.log.append(call)
        if self.answer_after is not None and not (self.stall and self.stall(call)):
            self.clock.callLater(self.answer_after, self._answer, call)
        else:
            self.waiting.append(call)
        return call.deferred

    def _cancelled(self, call: Call) -> None:
        call.cancelled = True
        if call in self.waiting:
            self.waiting.remove(call)

    def _answer(self, call: Call) -> None:
        if not call.cancelled:
            self.complete(call)

    def read(self, offset: int, length: int) -> Any:
        return self._call("read", offset, length)

    def write(self, offset: int, data: bytes) -> Any:
        return self._call("write", offset, len(data), data)

    def flush(self) -> Any:
        return self._call("flush")

    def close(self) -> Any:
        return self._call("close")

    def one(self, kind: str) -> Call:
        """Return the one call of ``kind`` waiting (failing if there is not exactly one)."""
        calls = [c for c in self.waiting if c.kind == kind]
        if len(calls) != 1:
            raise AssertionError(f"expected one {kind} waiting, not {self.waiting!r}")
        return calls[0]

    def complete(self, call: Call) -> None:
        """Carry out ``call`` now and fire its ``Deferred`` with the result."""
        if call in self.waiting:
            self.waiting.remove(call)
        result: bytes | None = None
        if call.kind == "read":
            result = bytes(self.contents[call.offset : call.offset + call.length])
        elif call.kind == "write":
            self.contents[call.offset : call.offset + call.length] = call.data
        elif call.kind == "close":
            self.closed = True
        call.deferred.callback(result)

    def fail(self, call: Call, code: int = errno.EIO) -> None:
        """Fail ``call`` with ``OSError(code)``, leaving the memory as it was."""
        self.waiting.remove(call)
        call.deferred.errback(OSError(code, os.strerror(code)))

    def complete_all(self) -> None:
        """Complete every call still waiting, oldest first."""
        while self.waiting:
            self.complete(self.waiting[0])


# -- the server on a fake packet system -------------------------------------------


def read_frame(lba: int, count: int = 1, tag: int = 0x100, src: bytes = INITIATOR_MAC,
               slot: int = SLOT) -> bytes:
    """A READ SECTORS EXT request frame to ``SHELF``.``slot``."""
    return ethernet_frame(
        ata_request(ATACmdStatus.READ_48BIT, shelf=SHELF, slot=slot, lba=lba, count=count,
                    tag=tag),
        src=src,
    )


def write_frame(lba: int, data: bytes, tag: int = 0x200, slot: int = SLOT) -> bytes:
    """A WRITE SECTORS EXT request frame of ``data`` to ``SHELF``.``slot``."""
    return ethernet_frame(
        ata_request(ATACmdStatus.WRITE_48BIT, shelf=SHELF, slot=slot, lba=lba, data=data,
                    tag=tag)
    )


def flush_frame(tag: int = 0x300) -> bytes:
    """A FLUSH CACHE EXT request frame to ``SHELF``.``SLOT``."""
    return ethernet_frame(
        ata_request(ATACmdStatus.FLUSH_EXT, shelf=SHELF, slot=SLOT, tag=tag)
    )


def ata_reply(frame: bytes) -> tuple[int, ATAArg]:
    """Decode a reply frame: its tag (as an int) and its ATA argument."""
    header = Header.from_bytes(EthernetFrame.from_bytes(frame).payload)
    assert isinstance(header.arg, ATAArg), header
    assert header.flag_response and not header.flag_error, header
    return int.from_bytes(header.tag, "big"), header.arg


class Server:
    """``AoEService`` on ``eth0`` of a fresh ``MemoryPacketSystem``, on a ``MemoryReactorClock``."""

    def __init__(
        self, *targets: Target, rings: bool = False, reactor: Any = None, **kwargs: Any
    ) -> None:
        self.reactor = reactor if reactor is not None else MemoryReactorClock()
        self.system = MemoryPacketSystem(rings=rings)
        self.interface = self.system.add_interface("eth0", mac=TARGET_MAC)
        self.service = AoEService(
            "eth0", list(targets), reactor=self.reactor, system=self.system, **kwargs
        )
        self.service.privilegedStartService()
        self.service.startService()
        assert self.service.port is not None
        self.sock = self.system.socket_for(self.service.port)
        self._seen = len(self.sock.sent)  # the announcements

    @property
    def protocol(self) -> AoEProtocol:
        protocol = self.service.protocol
        assert protocol is not None
        return protocol

    def send(self, *frames: bytes) -> list[bytes]:
        """Deliver ``frames`` in one drain of the socket; return what was sent since last asked."""
        for frame in frames:
            self.interface.receive(frame)
        assert self.service.port is not None
        self.service.port.doRead()
        return self.sent()

    def sent(self) -> list[bytes]:
        """Return the frames the server sent since the last ``send`` or ``sent``."""
        frames = list(self.sock.sent[self._seen :])
        self._seen = len(self.sock.sent)
        return frames

    def stats(self, target: Target) -> dict[str, Any]:
        """Return ``target``'s entry in the service's snapshot."""
        (entry,) = [t for t in self.service.snapshot()["targets"]
                    if t["target"] == target.address]
        return entry


def async_target(disk: ControlledDisk | None = None, **kwargs: Any) -> Target:
    """A target at ``SHELF``.``SLOT`` on ``disk`` (a fresh ``ControlledDisk`` by default)."""
    return Target(SHELF, SLOT, disk if disk is not None else ControlledDisk(), **kwargs)


class AsyncCase(SynchronousTestCase):
    """A server with one target on a ``ControlledDisk``."""

    def serve(self, **kwargs: Any) -> Server:
        """Serve ``self.target`` (built by ``async_target`` from ``kwargs``)."""
        self.disk = ControlledDisk()
        target_options = {k: kwargs.pop(k) for k in ("sync", "buffer_count") if k in kwargs}
        self.target = async_target(self.disk, **target_options)
        self.server = Server(self.target, **kwargs)
        return self.server

    def assert_ok(self, frame: bytes, tag: int, data: bytes = b"") -> None:
        """``frame`` is a successful ATA reply (``DRDY``) to ``tag``, carrying ``data``."""
        got, arg = ata_reply(frame)
        self.assertEqual(got, tag)
        self.assertEqual(arg.cmd_status, _DRDY)
        if data:
            self.assertEqual(arg.data, data)

    def assert_failed(self, frame: bytes, tag: int, error: ATAError) -> None:
        """``frame`` is a failed ATA reply (``ERR|DRDY``, ``error``) to ``tag``, with no data."""
        got, arg = ata_reply(frame)
        self.assertEqual(got, tag)
        self.assertEqual((arg.cmd_status, arg.err_feature), (_ERR_DRDY, int(error)))
        self.assertEqual(arg.data.strip(b"\x00"), b"")


# -- the core: targets, the dispatcher -------------------------------------------


class CoreTests(SynchronousTestCase):
    """The sans-IO core learns which disks answer later and keeps them off the fast path."""

    def test_disk_provides_interface(self) -> None:
        """The test disk provides the interface it stands for (``verifyObject``)."""
        self.assertTrue(verifyObject(IAsyncBlockBackend, ControlledDisk()))

    def test_target_learns(self) -> None:
        """A target on an asynchronous disk says so, and learns again when its disk changes."""
        target = async_target()
        self.assertTrue(target.asynchronous)
        target.backend = MemoryBackend(SIZE)
        self.assertFalse(target.asynchronous)
        target.backend = ControlledDisk()
        self.assertTrue(target.asynchronous)
        self.assertFalse(Target(1, 1, MemoryBackend(SIZE)).asynchronous)

    def test_target_refuses_other(self) -> None:
        """Something that is neither kind of disk is refused, naming both interfaces."""
        error = self.assertRaises(TypeError, Target, 1, 1, object())
        self.assertIn("IBlockBackend or IAsyncBlockBackend", str(error))

    def test_fast_index(self) -> None:
        """The fast path's index holds the synchronous targets only, through every change."""
        sync, later = Target(1, 1, MemoryBackend(SIZE)), Target(1, 2, ControlledDisk())
        dispatcher = Dispatcher(TARGET_MAC, [sync, later])
        self.assertEqual(set(dispatcher.index), {(1, 1), (1, 2)})
        self.assertEqual(set(dispatcher.fast_index), {(1, 1)})
        dispatcher.add(Target(1, 3, ControlledDisk()))
        self.assertEqual(set(dispatcher.fast_index), {(1, 1)})
        dispatcher.replace(Target(1, 2, MemoryBackend(SIZE)))
        self.assertEqual(set(dispatcher.fast_index), {(1, 1), (1, 2)})
        dispatcher.replace(Target(1, 1, ControlledDisk()))
        self.assertEqual(set(dispatcher.fast_index), {(1, 2)})
        dispatcher.remove(1, 2)
        self.assertEqual(dispatcher.fast_index, {})

    def test_settle_refuses(self) -> None:
        """``settle`` (synchronous callers) refuses an asynchronous disk's operation."""
        disk = ControlledDisk()
        dispatcher = Dispatcher(TARGET_MAC, [async_target(disk)])
        error = self.assertRaises(TypeError, dispatcher.serve, read_frame(0))
        self.assertIn("e1.0", str(error))
        self.assertEqual(disk.log, [])


# -- the server: answered when the disk answers -----------------------------------


class AnswerLaterTests(AsyncCase):
    """Each request is answered when, and as, its disk operation completes."""

    def test_read(self) -> None:
        """A read is answered only once the disk answered, with the bytes it gave."""
        server = self.serve()
        self.assertEqual(server.send(read_frame(5, 2, tag=7)), [])
        call = self.disk.one("read")
        self.assertEqual((call.offset, call.length), (5 * SECTOR_SIZE, 2 * SECTOR_SIZE))
        server.reactor.advance(1)
        self.assertEqual(server.sent(), [])
        self.disk.complete(call)
        (reply,) = server.sent()
        self.assert_ok(reply, 7, bytes(self.disk.contents[5 * SECTOR_SIZE : 7 * SECTOR_SIZE]))

    def test_write(self) -> None:
        """A write is acknowledged only after its ``Deferred`` fired: nothing is sent before."""
        server = self.serve()
        data = pattern(2 * SECTOR_SIZE, seed=2)
        self.assertEqual(server.send(write_frame(9, data, tag=8)), [])
        call = self.disk.one("write")
        self.assertEqual((call.offset, call.data), (9 * SECTOR_SIZE, data))
        self.assertIsInstance(call.data, bytes)
        server.reactor.advance(1)
        self.assertEqual(server.sent(), [])
        self.disk.complete(call)
        (reply,) = server.sent()
        self.assert_ok(reply, 8)
        self.assertEqual(bytes(self.disk.contents[9 * SECTOR_SIZE : 11 * SECTOR_SIZE]), data)

    def test_write_from_ring(self) -> None:
        """A write read from a receive ring reaches the disk as ``bytes`` of its own."""
        server = self.serve(rings=True)
        data = pattern(SECTOR_SIZE, seed=3)
        server.send(write_frame(1, data, tag=8))
        # Later frames reuse the ring's slots: the disk must hold bytes of its own.
        server.send(read_frame(0, tag=9))
        call = self.disk.one("write")
        self.assertIs(type(call.data), bytes)
        self.assertEqual(call.data, data)

    def test_flush_command(self) -> None:
        """FLUSH CACHE EXT calls the disk's ``flush`` and is answered when it completes."""
        server = self.serve()
        self.assertEqual(server.send(flush_frame(tag=3)), [])
        self.disk.complete(self.disk.one("flush"))
        (reply,) = server.sent()
        self.assert_ok(reply, 3)

    @settings(max_examples=50, deadline=None)
    @given(st.permutations(range(6)))
    def test_any_order(self, order: list[int]) -> None:
        """
        Requests completing in any order are each answered as they complete, by
        tag, each read with its own sectors, the write among them acknowledged.
        """
        disk = ControlledDisk()
        server = Server(async_target(disk))
        before = bytes(disk.contents)
        frames = [read_frame(i * 3, 2, tag=0x10 + i) for i in range(5)]
        frames.append(write_frame(40, b"\xee" * SECTOR_SIZE, tag=0x20))
        self.assertEqual(server.send(*frames), [])
        calls = list(disk.waiting)
        self.assertEqual([c.kind for c in calls], ["read"] * 5 + ["write"])
        for i in order:
            disk.complete(calls[i])
            (reply,) = server.sent()
            if i == 5:
                self.assert_ok(reply, 0x20)
            else:
                start = i * 3 * SECTOR_SIZE
                self.assert_ok(reply, 0x10 + i, before[start : start + 2 * SECTOR_SIZE])
        self.assertEqual(disk.waiting, [])
        self.assertEqual(server.stats(disk_target(server))["in_flight"], 0)

    def test_failed_read(self) -> None:
        """A read that fails is answered ``ERR|DRDY``/``UNC`` with no data, counted by errno."""
        server = self.serve()
        server.send(read_frame(2, tag=4))
        self.disk.fail(self.disk.one("read"), errno.EIO)
        (reply,) = server.sent()
        self.assert_failed(reply, 4, ATAError.UNC)
        errors = server.stats(self.target)["errors"]
        self.assertEqual((errors["ata"], errors["backend_EIO"]), (1, 1))

    def test_failed_write(self) -> None:
        """A write that fails is refused ``ABRT``, never acknowledged, and not on the disk."""
        server = self.serve()
        before = bytes(self.disk.contents)
        server.send(write_frame(2, b"\x11" * SECTOR_SIZE, tag=5))
        self.disk.fail(self.disk.one("write"), errno.ENOSPC)
        (reply,) = server.sent()
        self.assert_failed(reply, 5, ATAError.ABRT)
        self.assertEqual(bytes(self.disk.contents), before)
        self.assertEqual(server.stats(self.target)["errors"]["backend_ENOSPC"], 1)

    def test_failed_flush_command(self) -> None:
        """A FLUSH CACHE whose disk flush fails is refused ``ABRT``."""
        server = self.serve()
        server.send(flush_frame(tag=6))
        self.disk.fail(self.disk.one("flush"), errno.ENOTCONN)
        (reply,) = server.sent()
        self.assert_failed(reply, 6, ATAError.ABRT)
        self.assertEqual(server.stats(self.target)["errors"]["backend_ENOTCONN"], 1)

    def test_unexpected_error(self) -> None:
        """
        A disk that fails with something other than ``OSError`` (a bug in it) is
        logged with its traceback and answered as an I/O error; serving goes on.
        """
        server = self.serve()
        server.send(read_frame(2, tag=4), write_frame(3, b"\x22" * SECTOR_SIZE, tag=5))
        with capturedLogs() as events:
            self.disk.waiting.pop(0).deferred.errback(ZeroDivisionError("oops"))
            self.disk.waiting.pop(0).deferred.errback(KeyError("oops"))
        first, second = server.sent()
        self.assert_failed(first, 4, ATAError.UNC)
        self.assert_failed(second, 5, ATAError.ABRT)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError, KeyError)), 2)
        self.assertTrue(any("bug in its backend" in e["log_format"] for e in events))
        self.assertEqual(server.stats(self.target)["errors"]["backend_EIO"], 2)
        server.send(read_frame(1, tag=6))
        self.disk.complete(self.disk.one("read"))
        self.assertEqual(len(server.sent()), 1)

    def test_raises_at_call(self) -> None:
        """A disk method that raises ``OSError`` instead of returning a ``Deferred``: answered."""
        server = self.serve()

        def broken(offset: int, length: int) -> Any:
            raise OSError(errno.EIO, "no connection")

        self.disk.read = broken  # type: ignore[method-assign]
        (reply,) = server.send(read_frame(2, tag=4))
        self.assert_failed(reply, 4, ATAError.UNC)


def disk_target(server: Server) -> Target:
    """The one target ``server`` serves."""
    (target,) = server.service.targets
    return target


class TimeoutTests(AsyncCase):
    """An operation the disk never completes is answered after ``backend_timeout``."""

    def test_read_times_out(self) -> None:
        """
        No answer within the timeout: ``UNC`` at the deadline (not before), the
        ``Deferred`` cancelled, ``backend_ETIMEDOUT`` counted, nothing in flight.
        """
        server = self.serve(backend_timeout=5.0)
        server.send(read_frame(2, tag=4))
        call = self.disk.one("read")
        self.assertEqual(server.stats(self.target)["in_flight"], 1)
        server.reactor.advance(4.9)
        self.assertEqual(server.sent(), [])
        self.assertFalse(call.cancelled)
        server.reactor.advance(0.1)
        (reply,) = server.sent()
        self.assert_failed(reply, 4, ATAError.UNC)
        self.assertTrue(call.cancelled)
        stats = server.stats(self.target)
        self.assertEqual(stats["errors"]["backend_ETIMEDOUT"], 1)
        self.assertEqual(stats["in_flight"], 0)

    def test_write_times_out(self) -> None:
        """A write that times out is refused ``ABRT``; cancelled, the disk never writes it."""
        server = self.serve()
        before = bytes(self.disk.contents)
        server.send(write_frame(2, b"\x33" * SECTOR_SIZE, tag=5))
        server.reactor.advance(aoe_twisted.server.BACKEND_TIMEOUT)
        (reply,) = server.sent()
        self.assert_failed(reply, 5, ATAError.ABRT)
        self.assertEqual(self.disk.waiting, [])
        self.assertEqual(bytes(self.disk.contents), before)

    def test_late_answer_ignored(self) -> None:
        """A disk that answers after the timeout (ignoring the cancel) changes nothing."""
        server = self.serve(backend_timeout=1.0)
        late: Deferred[bytes] = Deferred()  # no canceller: the disk does not hear of it
        self.disk.read = lambda offset, length: late  # type: ignore[method-assign]
        server.send(read_frame(2, tag=4))
        server.reactor.advance(1.0)
        self.assertEqual(len(server.sent()), 1)
        late.callback(b"\x00" * SECTOR_SIZE)
        self.assertEqual(server.sent(), [])
        self.assertEqual(server.stats(self.target)["in_flight"], 0)

    def test_others_answered_meanwhile(self) -> None:
        """While one request waits for its disk, others on the same disk are answered."""
        server = self.serve(backend_timeout=5.0)
        server.send(read_frame(2, tag=4))
        stuck = self.disk.one("read")
        for i in range(3):
            server.send(read_frame(10 + i, tag=0x40 + i))
            call = next(c for c in self.disk.waiting if c is not stuck)
            server.reactor.advance(1)
            self.disk.complete(call)
            (reply,) = server.sent()
            self.assert_ok(reply, 0x40 + i)
        self.assertIn(stuck, self.disk.waiting)


class WindowTests(AsyncCase):
    """An initiator gets at most its buffer count of requests in flight on a target."""

    def test_over_window_dropped(self) -> None:
        """
        The request over the window is dropped (not sent to the disk, not answered)
        and counted; another initiator has its own window; room comes back as
        requests complete.
        """
        server = self.serve(buffer_count=4)
        self.assertEqual(server.send(*[read_frame(i, tag=i) for i in range(5)]), [])
        self.assertEqual(len(self.disk.waiting), 4)
        self.assertEqual(server.protocol.over_window, 1)
        self.assertEqual(server.stats(self.target)["in_flight"], 4)
        server.send(read_frame(9, tag=9, src=OTHER_MAC))
        self.assertEqual(len(self.disk.waiting), 5)
        self.disk.complete(self.disk.waiting[0])
        self.assertEqual(len(server.sent()), 1)
        server.send(read_frame(4, tag=4))  # the retransmission now fits
        self.assertEqual(len(self.disk.waiting), 5)
        self.assertEqual(server.protocol.over_window, 1)
        self.disk.complete_all()
        self.assertEqual(sorted(ata_reply(f)[0] for f in server.sent()), [1, 2, 3, 4, 9])
        self.assertEqual(server.stats(self.target)["in_flight"], 0)

    def test_window_freed_by_timeout(self) -> None:
        """Requests that time out leave the window too."""
        server = self.serve(buffer_count=2, backend_timeout=1.0)
        server.send(read_frame(0, tag=0), read_frame(1, tag=1))
        server.reactor.advance(1.0)
        self.assertEqual(len(server.sent()), 2)
        server.send(read_frame(2, tag=2), read_frame(3, tag=3))
        self.assertEqual(server.protocol.over_window, 0)


class RetransmissionTests(AsyncCase):
    """A request sent again under a new tag while the first is under way joins it."""

    def test_read_sent_again(self) -> None:
        """One disk read for both copies; each tag gets its answer when it completes."""
        server = self.serve()
        server.send(read_frame(3, 2, tag=1))
        server.send(read_frame(3, 2, tag=2))
        self.assertEqual(len(self.disk.log), 1)
        self.disk.complete(self.disk.one("read"))
        data = bytes(self.disk.contents[3 * SECTOR_SIZE : 5 * SECTOR_SIZE])
        replies = server.sent()
        self.assertEqual(sorted(ata_reply(f)[0] for f in replies), [1, 2])
        for reply in replies:
            self.assertEqual(ata_reply(reply)[1].data, data)
        self.assertEqual(server.stats(self.target)["in_flight"], 0)

    def test_timeout_reaches_the_latest_tag(self) -> None:
        """A stalled disk's timeout is answered under every tag, the initiator's latest too."""
        server = self.serve(backend_timeout=2.0)
        server.send(read_frame(0, tag=10))
        server.reactor.advance(1.0)
        server.send(read_frame(0, tag=11))
        self.assertEqual(len(self.disk.log), 1)
        server.reactor.advance(1.0)
        replies = server.sent()
        self.assertEqual(sorted(ata_reply(f)[0] for f in replies), [10, 11])
        for reply in replies:
            self.assertEqual(ata_reply(reply)[1].err_feature, ATAError.UNC)

    def test_other_data_is_another_write(self) -> None:
        """Two writes to one place with different data are two operations, in order."""
        server = self.serve()
        server.send(write_frame(1, pattern(SECTOR_SIZE, seed=5), tag=1))
        server.send(write_frame(1, pattern(SECTOR_SIZE, seed=6), tag=2))
        self.assertEqual(len(self.disk.log), 2)
        server.send(read_frame(1, tag=3, src=OTHER_MAC))
        server.send(read_frame(1, tag=4))
        self.assertEqual(len(self.disk.log), 4, "another initiator's read is its own")


class StatsTests(AsyncCase):
    """In-flight count and service time of requests served later."""

    def test_in_flight_and_service_time(self) -> None:
        """
        ``in_flight`` counts the operations started and not complete; each
        completion's service time (start to completion) lands in its bucket.
        """
        server = self.serve()
        # Time the service measures: the memory reactor's clock.
        self.patch(aoe_twisted.server, "perf_counter", server.reactor.seconds)
        server.send(read_frame(0, tag=0), read_frame(1, tag=1), read_frame(2, tag=2))
        self.assertEqual(server.stats(self.target)["in_flight"], 3)
        server.reactor.advance(0.003)
        self.disk.complete(self.disk.waiting[0])
        self.assertEqual(server.stats(self.target)["in_flight"], 2)
        server.reactor.advance(0.5)
        self.disk.complete_all()
        stats = server.stats(self.target)
        self.assertEqual(stats["in_flight"], 0)
        self.assertEqual(stats["requests"]["read"], 3)
        self.assertEqual(stats["bytes"]["read"], 3 * SECTOR_SIZE)
        histogram = stats["service_seconds"]
        self.assertEqual(histogram["count"], 3)
        self.assertAlmostEqual(histogram["sum"], 0.003 + 2 * 0.503)
        below = {bound: count for bound, count in histogram["buckets"] if bound != "+Inf"}
        self.assertEqual(max(c for b, c in below.items() if b < 0.003), 0)
        self.assertEqual(min(c for b, c in below.items() if b >= 0.003), 1)
        self.assertEqual(min(c for b, c in below.items() if b >= 0.503), 3)


class FastPathTests(SynchronousTestCase):
    """
    A frame the fast path answers at once for a memory disk is started through
    ``submit`` on an asynchronous disk (accepted by ``fastpath.fast_pending``,
    counted as the fast path's) and answered when the disk completes it.
    """

    def check(self, rings: bool) -> None:
        disk = ControlledDisk()
        memory = MemoryBackend(SIZE)
        server = Server(async_target(disk), Target(SHELF, 1, memory), rings=rings)
        dispatcher = server.protocol.dispatcher
        assert dispatcher is not None
        (reply,) = server.send(read_frame(3, tag=1, slot=1))
        self.assertEqual(dispatcher.counters.fast, 1)  # the frame is one the fast path takes
        self.assertEqual(server.send(read_frame(3, tag=2)), [])
        self.assertEqual(dispatcher.counters.fast, 2)
        call = disk.one("read")
        self.assertEqual((call.offset, call.length), (3 * SECTOR_SIZE, SECTOR_SIZE))
        disk.complete(call)
        if rings:
            # Replies to completions leave together, once the reactor's turn ends.
            self.assertEqual(server.sent(), [])
            server.reactor.advance(0)
        (reply,) = server.sent()
        self.assertEqual(ata_reply(reply)[1].data, bytes(disk.contents[1536:2048]))

    def test_plain(self) -> None:
        """Through ``datagramReceived``."""
        self.check(rings=False)

    def test_rings(self) -> None:
        """Through the ring walk (``frameReceivedInto``)."""
        self.check(rings=True)


class GroupCommitTests(AsyncCase):
    """Per-target sync: a write is acknowledged once the disk's ``flush`` completed."""

    def test_held_until_flush(self) -> None:
        """The write's reply waits for the write, then for one flush; then it is sent."""
        server = self.serve(sync=True)
        server.send(write_frame(4, b"\x44" * SECTOR_SIZE, tag=1),
                    write_frame(5, b"\x45" * SECTOR_SIZE, tag=2))
        for call in list(self.disk.waiting):
            self.disk.complete(call)
        server.reactor.advance(0)  # the end of the drain the completions came in
        self.assertEqual(server.sent(), [])
        flush = self.disk.one("flush")
        server.reactor.advance(1)
        self.assertEqual(server.sent(), [])
        self.disk.complete(flush)
        replies = server.sent()
        self.assertEqual([ata_reply(r)[0] for r in replies], [1, 2])
        for reply, tag in zip(replies, (1, 2), strict=True):
            self.assert_ok(reply, tag)
        self.assertEqual(server.protocol.synced_writes, 2)

    def test_flush_fails(self) -> None:
        """A failed flush refuses its group's writes with ``ABRT``: never acknowledged."""
        server = self.serve(sync=True)
        server.send(write_frame(4, b"\x44" * SECTOR_SIZE, tag=1))
        self.disk.complete(self.disk.one("write"))
        server.reactor.advance(0)
        self.disk.fail(self.disk.one("flush"), errno.EIO)
        (reply,) = server.sent()
        self.assert_failed(reply, 1, ATAError.ABRT)
        self.assertEqual(server.protocol.sync_failures, 1)
        self.assertEqual(server.stats(self.target)["errors"]["backend_EIO"], 1)

    def test_flush_times_out(self) -> None:
        """A flush that never completes refuses its group at the deadline, and is cancelled."""
        server = self.serve(sync=True, backend_timeout=2.0)
        server.send(write_frame(4, b"\x44" * SECTOR_SIZE, tag=1))
        self.disk.complete(self.disk.one("write"))
        server.reactor.advance(0)
        flush = self.disk.one("flush")
        server.reactor.advance(1.9)
        self.assertEqual(server.sent(), [])
        server.reactor.advance(0.1)
        (reply,) = server.sent()
        self.assert_failed(reply, 1, ATAError.ABRT)
        self.assertTrue(flush.cancelled)
        self.assertEqual(server.stats(self.target)["errors"]["backend_ETIMEDOUT"], 1)

    def test_groups_in_order(self) -> None:
        """A later group whose flush completes first still waits for the earlier group."""
        server = self.serve(sync=True)
        server.send(write_frame(4, b"\x44" * SECTOR_SIZE, tag=1))
        self.disk.complete(self.disk.one("write"))
        server.reactor.advance(0)
        first = self.disk.one("flush")
        server.send(write_frame(5, b"\x45" * SECTOR_SIZE, tag=2))
        self.disk.complete(self.disk.one("write"))
        server.reactor.advance(0)
        second = next(c for c in self.disk.waiting if c is not first)
        self.disk.complete(second)
        self.assertEqual(server.sent(), [])
        self.disk.complete(first)
        self.assertEqual([ata_reply(r)[0] for r in server.sent()], [1, 2])

    def test_other_disk_not_held(self) -> None:
        """
        A disk whose flush hangs holds back only its own writes: another
        disk's writes in later drains are acknowledged once that disk is synced.
        """
        self.disk = ControlledDisk()
        memory = MemoryBackend(SIZE)
        server = Server(async_target(self.disk, sync=True), Target(SHELF, 1, memory, sync=True))
        server.send(write_frame(4, b"\x44" * SECTOR_SIZE, tag=1))
        self.disk.complete(self.disk.one("write"))
        server.reactor.advance(0)
        flush = self.disk.one("flush")
        (reply,) = server.send(write_frame(4, b"\x45" * SECTOR_SIZE, tag=2, slot=1))
        self.assert_ok(reply, 2)
        self.assertEqual(memory.read(4 * SECTOR_SIZE, 1), b"\x45")
        self.disk.complete(flush)
        (reply,) = server.sent()
        self.assert_ok(reply, 1)

    def test_no_sync_no_flush(self) -> None:
        """Without sync a completed write is acknowledged at once, with no flush."""
        server = self.serve()
        server.send(write_frame(4, b"\x44" * SECTOR_SIZE, tag=1))
        self.disk.complete(self.disk.one("write"))
        self.assertEqual(len(server.sent()), 1)
        server.reactor.advance(0)
        self.assertEqual([c.kind for c in self.disk.log], ["write"])


class CloseTests(AsyncCase):
    """Stopping the service flushes and closes an asynchronous disk, waiting for both."""

    def test_stop_waits(self) -> None:
        """``stopService`` fires once the disk's flush, then its close, completed."""
        server = self.serve()
        d = server.service.stopService()
        server.reactor.advance(0)
        self.assertNoResult(d)
        self.disk.complete(self.disk.one("flush"))
        self.assertNoResult(d)
        self.disk.complete(self.disk.one("close"))
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual([c.kind for c in self.disk.log], ["flush", "close"])

    def test_read_only_not_flushed(self) -> None:
        """A read-only disk is closed without a flush."""
        disk = ControlledDisk(read_only=True)
        server = Server(async_target(disk))
        d = server.service.stopService()
        server.reactor.advance(0)
        disk.complete(disk.one("close"))
        self.successResultOf(d)
        self.assertEqual([c.kind for c in disk.log], ["close"])

    def test_failures_logged(self) -> None:
        """A flush and a close that fail are logged; the service still stops."""
        server = self.serve()
        with capturedLogs() as events:
            d = server.service.stopService()
            server.reactor.advance(0)
            self.disk.fail(self.disk.one("flush"), errno.EIO)
            self.disk.fail(self.disk.one("close"), errno.ENOTCONN)
        self.successResultOf(d)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 2)
        text = " ".join(e["log_format"] for e in events)
        self.assertIn("cannot flush the disk of", text)
        self.assertIn("cannot close the disk of", text)

    def test_stalled_disk(self) -> None:
        """
        A disk that never completes its flush or its close does not hang the
        stop: each is given up after ``backend_timeout``, logged, and the stop ends.
        """
        server = self.serve(backend_timeout=5.0)
        with capturedLogs() as events:
            d = server.service.stopService()
            server.reactor.advance(0)
            flush = self.disk.one("flush")
            server.reactor.advance(5.0)
            self.assertTrue(flush.cancelled)
            close = self.disk.one("close")
            self.assertNoResult(d)
            server.reactor.advance(5.0)
        self.assertTrue(close.cancelled)
        self.successResultOf(d)
        self.flushLoggedErrors(defer.TimeoutError)
        text = " ".join(e["log_format"] for e in events)
        self.assertIn("cannot flush the disk of", text)
        self.assertIn("cannot close the disk of", text)

    def test_completion_after_stop(self) -> None:
        """A request still in flight when the service stops completes quietly: nothing is sent."""
        server = self.serve()
        server.send(read_frame(1, tag=1))
        read = self.disk.one("read")
        d = server.service.stopService()
        server.reactor.advance(0)
        self.disk.complete(read)
        self.disk.complete_all()
        self.successResultOf(d)
        self.assertEqual(server.sent(), [])
        self.assertEqual(server.stats(self.target)["in_flight"], 0)


# -- the example plugin -------------------------------------------------------------


def later_backend(size: int, clock: Any, read_only: bool = False) -> Any:
    """A ``later:`` disk (the example plugin's ``LaterBackend``) on ``clock``."""
    factory = find_backend_factories()["later"]
    cls = type(factory.open("512"))
    return cls(size, read_only=read_only, reactor=clock)


class ExamplePluginTests(SynchronousTestCase):
    """``later:SIZE``, the example asynchronous plugin in ``tests/plugins``."""

    def setUp(self) -> None:
        use_test_plugins(self)

    def test_found(self) -> None:
        """The plugin is found and opens an ``IAsyncBlockBackend`` of the size asked."""
        factories = find_backend_factories()
        self.assertTrue(verifyObject(IBackendFactory, factories["later"]))
        disk = open_backend("later:64K")
        self.assertTrue(verifyObject(IAsyncBlockBackend, disk))
        self.assertEqual((disk.size, disk.read_only), (65536, False))
        self.assertTrue(open_backend("later:1K", read_only=True).read_only)

    def test_later(self) -> None:
        """Each operation completes on the reactor's next turn, not during the call."""
        clock = task.Clock()
        disk = later_backend(4096, clock)
        write = disk.write(512, b"\x77" * 512)
        read = disk.read(0, 1024)
        self.assertNoResult(write)
        self.assertNoResult(read)
        clock.advance(0)
        self.assertIsNone(self.successResultOf(write))
        self.assertEqual(self.successResultOf(read), bytes(512) + b"\x77" * 512)
        flush = disk.flush()
        self.assertNoResult(flush)
        clock.advance(0)
        self.assertIsNone(self.successResultOf(flush))

    def test_read_only(self) -> None:
        """A read-only disk fails a write with ``EROFS``."""
        disk = later_backend(4096, task.Clock(), read_only=True)
        failure = self.failureResultOf(disk.write(0, bytes(512)), OSError)
        self.assertEqual(failure.value.errno, errno.EROFS)

    def test_cancel(self) -> None:
        """A cancelled write (the server gave up on it) is never carried out."""
        clock = task.Clock()
        disk = later_backend(4096, clock)
        write = disk.write(0, b"\x55" * 512)
        write.cancel()
        self.failureResultOf(write, CancelledError)
        clock.advance(0)
        read = disk.read(0, 512)
        clock.advance(0)
        self.assertEqual(self.successResultOf(read), bytes(512))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_no_thread_wrapper(self) -> None:
        """``thread:`` refuses a disk that already answers later, in one line."""
        error = self.assertRaises(BackendSpecError, open_backend, "thread:later:1M")
        self.assertEqual(str(error), "later:1M already answers later: no need for thread:")

    def test_served(self) -> None:
        """Served by the server: a write and a read are answered on the reactor's next turn."""
        clock = MemoryReactorClock()
        server = Server(Target(SHELF, SLOT, later_backend(SIZE, clock)), reactor=clock)
        data = pattern(SECTOR_SIZE, seed=9)
        self.assertEqual(server.send(write_frame(3, data, tag=1)), [])
        clock.advance(0)
        (ack,) = server.sent()
        self.assertEqual(ata_reply(ack)[1].cmd_status, _DRDY)
        self.assertEqual(server.send(read_frame(3, tag=2)), [])
        clock.advance(0)
        (reply,) = server.sent()
        self.assertEqual(ata_reply(reply)[1].data, data)


# -- real sockets -------------------------------------------------------------------


#: The sector the stalled disk never answers a read of.
STALL_LBA = 7


class ExamplePluginEndToEndTests(TwistdProcessMixin, TestCase):
    """``twistd aoe`` serves the example plugin, found on ``PYTHONPATH`` as a third party's."""

    timeout = 60

    @defer.inlineCallbacks
    def test_served_by_twistd(self) -> Gen:
        """Data written through ``later:`` by the user-space client reads back; SIGTERM is clean."""
        require(self)
        pair = VethPair.create(self)
        work = Path(self.mktemp()).resolve()
        plugins = work / "thirdparty" / "twisted" / "plugins"
        plugins.mkdir(parents=True)
        shutil.copy(Path(TEST_PLUGINS) / "aoe_twisted_async_example.py", plugins)
        proc = _twistd(
            "aoe", "--iface", pair.server_if, "--target", f"{SHELF}.{SLOT}=later:1M",
            netns=pair.server_ns, pythonpath=str(work / "thirdparty"), cwd=str(work),
        )
        self.addCleanup(self._kill, proc)
        client = AoEClient.listen(pair.client_if, reactor=reactor, netns=pair.client_ns,
                                  retry=RetryPolicy(0.25, 1.0, 40))
        self.addCleanup(client.close)
        disk = yield client.open(SHELF, SLOT)
        self.assertEqual(disk.size, 1 << 20)
        data = pattern(256 * 1024, seed=5)
        yield disk.write(100, data)
        yield disk.flush()
        self.assertEqual((yield disk.read(100, len(data) // SECTOR_SIZE)), data)
        self.assertEqual((yield disk.read(0, 1)), bytes(SECTOR_SIZE))
        out = yield self.stop_cleanly(proc)
        self.assertIn("serving e1.0 = later:1M", out)


class StalledBackendTests(TestCase):
    """
    Issue #13: a stalled backend (an asynchronous disk that never answers one
    request) does not slow other targets.
    """

    timeout = 60
    #: Seconds each throughput sample lasts, and how many of each kind are taken.
    SAMPLE = 0.25
    ROUNDS = 8

    @defer.inlineCallbacks
    def test_stall_does_not_slow_others(self) -> Gen:
        """
        Target B's read throughput while target A holds a request unanswered is
        within noise of B's throughput without it (at least 0.7 of it).
        """
        require(self)
        pair = VethPair.create(self)
        stalled: list[Call] = []

        def stall(call: Call) -> bool:
            if call.kind == "read" and call.offset == STALL_LBA * SECTOR_SIZE:
                stalled.append(call)
                return True
            return False

        a = ControlledDisk(1 << 20, clock=reactor, answer_after=0, stall=stall)
        b = MemoryBackend(1 << 20)
        b.write(0, pattern(1 << 20, seed=6))
        service = AoEService(
            pair.server_if,
            [Target(SHELF, 1, a), Target(SHELF, 2, b)],
            netns=pair.server_ns,
            backend_timeout=60.0,
        )
        service.privilegedStartService()
        service.startService()

        def release() -> None:
            for call in list(a.waiting):
                a.complete(call)

        self.addCleanup(service.stopService)
        self.addCleanup(release)  # runs first: nothing left waiting for the timeout
        client = AoEClient.listen(pair.client_if, reactor=reactor, netns=pair.client_ns)
        self.addCleanup(client.close)
        disk_a = yield client.open(SHELF, 1)
        disk_b = yield client.open(SHELF, 2)
        # A answers its other requests:
        self.assertEqual(len((yield disk_a.read(0, 16))), 16 * SECTOR_SIZE)

        @defer.inlineCallbacks
        def throughput() -> Generator[Deferred[Any], Any, float]:
            """B's reads for ``SAMPLE`` seconds, 64 KiB at a time, 4 at once: bytes/s."""
            done = 0
            start = time.perf_counter()
            deadline = start + self.SAMPLE
            while time.perf_counter() < deadline:
                chunks = yield defer.gatherResults(
                    [disk_b.read(128 * i, 128) for i in range(4)]
                )
                done += sum(map(len, chunks))
            return done / (time.perf_counter() - start)

        def hold_one() -> None:
            """Send A one read of ``STALL_LBA``, once, which its disk never answers."""
            tag = 0x0000_1234 + len(stalled)  # bit 31 clear: never the client's own tag
            frame = ethernet_frame(
                ata_request(ATACmdStatus.READ_48BIT, shelf=SHELF, slot=1, lba=STALL_LBA,
                            tag=tag),
                src=client.protocol.mac, dst=disk_a.info.mac,
            )
            client.port.write(frame)

        free: list[float] = []
        held: list[float] = []
        # Short samples, alternating (free, held, held, free, ...): the machine's load,
        # shared with other work, weighs on both alike.
        for round_ in range(self.ROUNDS):
            for holding in (False, True) if round_ % 2 == 0 else (True, False):
                if holding:
                    hold_one()
                    yield task.deferLater(reactor, 0.01, lambda: None)
                    self.assertEqual(len(a.waiting), 1, "A holds the one request")
                (held if holding else free).append((yield throughput()))
                self.assertEqual(len(a.waiting), int(holding), "held, unanswered")
                release()
        ratio = sum(held) / sum(free)
        print(
            f"\nB without A stalled: {sum(free) / len(free) / 1e6:.2f} MB/s; "
            f"with A holding one request: {sum(held) / len(held) / 1e6:.2f} MB/s "
            f"(ratio {ratio:.2f})"
        )
        self.assertGreaterEqual(ratio, 0.7)
