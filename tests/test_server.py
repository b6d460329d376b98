"""
Tests for ``aoe_twisted.server``: ``AoEProtocol`` and ``AoEService`` on a fake packet system.

The port underneath is the real ``AoEPort`` over ``MemoryPacketSystem`` (which
``tests.test_port`` checks against real sockets), on a ``MemoryReactorClock``.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.port import AoEPort, CannotOpenInterface
from aoe_twisted.server import AoEProtocol, AoEService
from aoe_twisted.target import Target
from aoe_twisted.testing import MemoryPacketSystem
from aoe_twisted.wire import (
    BROADCAST_MAC,
    ETHERTYPE,
    MIN_FRAME_SIZE,
    SECTOR_SIZE,
    ATAArg,
    ATACmdStatus,
    Command,
    ConfigArg,
    EthernetFrame,
    Header,
)

SERVER_MAC = bytes.fromhex("02aa00000001")
HOST_MAC = bytes.fromhex("020000000001")
SIZE = 64 * SECTOR_SIZE


def target(shelf: int = 1, slot: int = 2, size: int = SIZE, **kwargs: Any) -> Target:
    """Return a target on a fresh memory disk."""
    return Target(shelf, slot, MemoryBackend(size), **kwargs)


def request(header: Header, dst: bytes = SERVER_MAC, src: bytes = HOST_MAC) -> bytes:
    """Return ``header`` in an unpadded Ethernet frame from the host to ``dst``."""
    return EthernetFrame(dst, src, ETHERTYPE, header.to_bytes()).to_bytes()


def decode(frame: bytes) -> tuple[EthernetFrame, Header]:
    """Decode a frame the server sent."""
    ethernet = EthernetFrame.from_bytes(frame)
    return ethernet, Header.from_bytes(ethernet.payload)


def discovery(tag: bytes = b"\x00\x00\x00\x07") -> bytes:
    """A broadcast config query, as Linux sends it."""
    return request(
        Header(major=0xFFFF, minor=0xFF, command=Command.QUERY_CONFIG_INFORMATION, tag=tag,
               arg=ConfigArg()),
        dst=BROADCAST_MAC,
    )


def bad_version(tag: bytes = b"\x00\x00\x00\x08") -> bytes:
    """A request with AoE version 2: malformed, answered with an error by the target."""
    frame = bytearray(discovery(tag))
    frame[14] = 0x20
    return bytes(frame)


class ServiceTestsMixin:
    """A service on ``eth0`` (MTU 1500 by default) of a fake system, on a memory reactor."""

    mtu = 1500

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.system = MemoryPacketSystem()
        self.interface = self.system.add_interface("eth0", mac=SERVER_MAC, mtu=self.mtu)

    def serve(self, *targets: Target, **kwargs: Any) -> AoEService:
        """Start a service for ``targets`` (one at 1.2 by default); return it."""
        service = AoEService(
            "eth0",
            list(targets) or [target()],
            reactor=self.reactor,
            system=self.system,
            **kwargs,
        )
        service.privilegedStartService()
        service.startService()
        self.service = service
        self.sock = self.system.socket_for(service.port)
        return service

    def answer(self, frame: bytes) -> list[bytes]:
        """Deliver ``frame`` to the server and return what it sent in reply."""
        before = len(self.sock.sent)
        self.interface.receive(frame)
        assert self.service.port is not None
        self.service.port.doRead()
        return list(self.sock.sent[before:])


class AoEServiceTests(ServiceTestsMixin, SynchronousTestCase):
    """Starting and stopping the service."""

    def test_interface(self) -> None:
        """The service provides ``IService``."""
        self.assertTrue(verifyObject(IService, AoEService("eth0", [])))

    def test_privileged_start_opens_port(self) -> None:
        """The port opens in ``privilegedStartService``, before privileges are dropped."""
        service = AoEService("eth0", [target()], reactor=self.reactor, system=self.system)
        service.privilegedStartService()
        self.assertIsInstance(service.port, AoEPort)
        self.assertIn(service.port, self.reactor.getReaders())
        service.startService()
        self.assertEqual(len(self.system.sockets), 1)

    def test_start_without_privileged_start(self) -> None:
        """``startService`` alone opens the port too."""
        service = AoEService("eth0", [target()], reactor=self.reactor, system=self.system)
        service.startService()
        self.assertIn(service.port, self.reactor.getReaders())

    def test_missing_interface(self) -> None:
        """A missing interface fails the start with a one-line ``CannotOpenInterface``."""
        service = AoEService("eth7", [target()], reactor=self.reactor, system=self.system)
        exc = self.assertRaises(CannotOpenInterface, service.privilegedStartService)
        self.assertEqual(str(exc), "cannot open interface eth7: no such interface")

    def test_exit_on_error(self) -> None:
        """With ``exit_on_error`` (for twistd) the failure is a one-line ``SystemExit``."""
        self.system.privileged = False
        service = AoEService("eth0", [target()], reactor=self.reactor, system=self.system,
                             exit_on_error=True)
        exc = self.assertRaises(SystemExit, service.privilegedStartService)
        self.assertEqual(
            str(exc),
            "twistd aoe: cannot open interface eth0: "
            "needs CAP_NET_RAW (run as root or grant the capability)",
        )

    def test_max_sectors_from_mtu(self) -> None:
        """Each target advertises the sector count that fits the interface's MTU."""
        targets = [target(1, 1), target(1, 2)]
        self.serve(*targets)
        self.assertEqual([t.max_sectors for t in targets], [2, 2])

    def test_max_sectors_capped(self) -> None:
        """``max_sectors`` caps the count below what the MTU allows."""
        self.interface.mtu = 9000
        capped = target()
        self.serve(capped, max_sectors=8)
        self.assertEqual(capped.max_sectors, 8)

    def test_announces(self) -> None:
        """
        At start every target sends an unsolicited config reply (tag 0) to the
        broadcast address, padded to 60 bytes, from the interface's MAC.
        """
        self.serve(target(1, 1), target(3, 4))
        self.assertEqual(len(self.sock.sent), 2)
        addresses = []
        for frame in self.sock.sent:
            self.assertEqual(len(frame), MIN_FRAME_SIZE)
            ethernet, header = decode(frame)
            self.assertEqual((ethernet.dst, ethernet.src), (BROADCAST_MAC, SERVER_MAC))
            self.assertTrue(header.flag_response)
            self.assertEqual(header.command, Command.QUERY_CONFIG_INFORMATION)
            self.assertEqual(header.tag, bytes(4))
            assert isinstance(header.arg, ConfigArg)
            self.assertEqual(header.arg.sector_count, 2)
            addresses.append((header.major, header.minor))
        self.assertEqual(addresses, [(1, 1), (3, 4)])

    def test_logs_each_target(self) -> None:
        """Start-up logs one line per target naming its address, size, mode and the interface."""
        with capturedLogs() as events:
            self.serve(target(1, 2), Target(5, 6, MemoryBackend(SIZE, read_only=True)))
        lines = [e for e in events if e["log_format"].startswith("serving")]
        self.assertEqual(len(lines), 2)
        self.assertEqual(
            formatEvent(lines[0]),
            "serving e1.2 (32768 bytes, rw) on eth0 (02:aa:00:00:00:01, MTU 1500, "
            "2 sectors per frame)",
        )
        self.assertIn("e5.6 (32768 bytes, ro)", formatEvent(lines[1]))

    def test_stop(self) -> None:
        """
        ``stopService`` closes the port and then closes every backend; its
        ``Deferred`` fires once both are done.
        """
        first, second = target(1, 1), target(1, 2)
        service = self.serve(first, second)
        d = service.stopService()
        self.assertNoResult(d)
        self.reactor.advance(0)
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(self.sock.closed)
        self.assertIsNone(service.port)
        self.assertFalse(service.running)
        for t in (first, second):
            self.assertRaises(ValueError, t.backend.read, 0, SECTOR_SIZE)

    def test_stop_twice(self) -> None:
        """Stopping a stopped service is harmless and closes the backends only once."""
        service = self.serve()
        service.stopService()
        self.reactor.advance(0)
        self.assertIsNone(self.successResultOf(service.stopService()))


class AoEProtocolTests(ServiceTestsMixin, SynchronousTestCase):
    """Frames in, replies out."""

    def test_replies(self) -> None:
        """A request gets its reply, written to the requester as one frame."""
        self.serve()
        replies = self.answer(discovery())
        self.assertEqual(len(replies), 1)
        ethernet, header = decode(replies[0])
        self.assertEqual((ethernet.dst, ethernet.src), (HOST_MAC, SERVER_MAC))
        self.assertEqual(header.tag, b"\x00\x00\x00\x07")
        self.assertEqual((header.major, header.minor), (1, 2))

    def test_several_targets(self) -> None:
        """A broadcast query gets one reply per target; a unicast one only its target's."""
        self.serve(target(1, 1), target(1, 2), target(2, 1))
        self.assertEqual(len(self.answer(discovery())), 3)
        identify = Header(
            major=1, minor=2, command=Command.ISSUE_ATA_COMMAND, tag=b"\x00\x00\x00\x09",
            arg=ATAArg(sector_count=1, cmd_status=ATACmdStatus.IDENTIFY),
        )
        replies = self.answer(request(identify))
        self.assertEqual([decode(r)[1].minor for r in replies], [2])

    def test_write_reaches_backend(self) -> None:
        """An ATA write is on the backend when its reply is sent."""
        disk = target()
        self.serve(disk)
        data = bytes(range(256)) * 2
        write = Header(
            major=1, minor=2, command=Command.ISSUE_ATA_COMMAND, tag=b"\x00\x00\x00\x0a",
            arg=ATAArg(flag_lba48_extended=True, flag_write=True, sector_count=1,
                       cmd_status=ATACmdStatus.WRITE_48BIT, lba=5, data=data),
        )
        (reply,) = self.answer(request(write))
        arg = decode(reply)[1].arg
        assert isinstance(arg, ATAArg)
        self.assertEqual(arg.cmd_status, ATACmdStatus.READY_STATUS)
        self.assertEqual(disk.backend.read(5 * SECTOR_SIZE, SECTOR_SIZE), data)

    def test_drops(self) -> None:
        """Responses and truncated frames get no reply."""
        self.serve()
        response = bytearray(discovery())
        response[14] |= 0x08
        self.assertEqual(self.answer(bytes(response)), [])
        self.assertEqual(self.answer(discovery()[:20]), [])

    def test_not_started(self) -> None:
        """A protocol that was never connected ignores frames."""
        protocol = AoEProtocol([target()], clock=self.reactor)
        protocol.datagramReceived(discovery())
        self.assertIsNone(protocol.dispatcher)


class MalformedLoggingTests(ServiceTestsMixin, SynchronousTestCase):
    """Malformed input is logged, but never a line per frame."""

    def malformed_lines(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in events if "malformed AoE frame" in e["log_format"]]

    def test_first_logged_at_once(self) -> None:
        """The first malformed frame is logged immediately, with the reason."""
        self.serve()
        with capturedLogs() as events:
            self.answer(bad_version())
        (line,) = self.malformed_lines(events)
        self.assertIn("AoE version 2", line["reason"])
        self.assertEqual(line["interface"], "eth0")

    def test_flood_summarised(self) -> None:
        """
        Further malformed frames within the interval are counted and summarised
        in one line at its end, with the last reason.
        """
        self.serve()
        with capturedLogs() as events:
            for _ in range(100):
                self.answer(bad_version())
            self.answer(discovery()[:20])
            self.assertEqual(len(self.malformed_lines(events)), 1)
            self.reactor.advance(10)
        _first, summary = self.malformed_lines(events)
        self.assertEqual(summary["count"], 100)
        self.assertIn("header of 6 bytes", summary["reason"])

    def test_summary_interval(self) -> None:
        """After a summary the next malformed frame waits for the next one; after quiet, not."""
        self.serve()
        with capturedLogs() as events:
            self.answer(bad_version())
            self.answer(bad_version())
            self.reactor.advance(10)
            self.answer(bad_version())
            self.assertEqual(len(self.malformed_lines(events)), 2)
            self.reactor.advance(10)
            self.assertEqual(len(self.malformed_lines(events)), 3)
            self.reactor.advance(60)
            self.answer(bad_version())
            self.assertEqual(len(self.malformed_lines(events)), 4)
        self.assertEqual([e.get("count") for e in self.malformed_lines(events)],
                         [None, 1, 1, None])

    def test_summary_at_stop(self) -> None:
        """Stopping logs what was not summarised yet, and leaves no timer behind."""
        service = self.serve()
        with capturedLogs() as events:
            for _ in range(3):
                self.answer(bad_version())
            service.stopService()
            self.reactor.advance(0)
        self.assertEqual(self.malformed_lines(events)[-1]["count"], 2)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_valid_frames_not_logged(self) -> None:
        """Valid requests and their replies log nothing about malformed input."""
        self.serve()
        with capturedLogs() as events:
            self.answer(discovery())
        self.assertEqual(self.malformed_lines(events), [])
