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

from aoe_twisted import lane
from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.core.acl import MemoryACLStore
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import (
    BROADCAST_MAC,
    MIN_FRAME_SIZE,
    SECTOR_SIZE,
    ATAArg,
    ATACmdStatus,
    Command,
    ConfigArg,
    ConfigCommand,
    Error,
    EthernetFrame,
    Header,
)
from aoe_twisted.net.packetsystem import CannotOpenInterface
from aoe_twisted.net.port import AoEPort
from aoe_twisted.server import AoEProtocol, AoEService
from aoe_twisted.testing import (
    INITIATOR_MAC,
    TARGET_MAC,
    MemoryPacketSystem,
    ata_request,
    config_request,
    ethernet_frame,
)

SIZE = 64 * SECTOR_SIZE


def target(shelf: int = 1, slot: int = 2, size: int = SIZE, **kwargs: Any) -> Target:
    """Return a target on a fresh memory disk."""
    return Target(shelf, slot, MemoryBackend(size), **kwargs)


def decode(frame: bytes) -> tuple[EthernetFrame, Header]:
    """Decode a frame the server sent."""
    ethernet = EthernetFrame.from_bytes(frame)
    return ethernet, Header.from_bytes(ethernet.payload)


#: A broadcast config query, as Linux sends it.
DISCOVERY = ethernet_frame(config_request(tag=7), dst=BROADCAST_MAC)
#: A request with AoE version 2: malformed, answered with an error by the target.
BAD_VERSION = ethernet_frame(config_request(tag=8, verflags=0x20), dst=BROADCAST_MAC)


class ServiceTestsMixin:
    """A service on ``eth0`` (MTU 1500 by default) of a fake system, on a memory reactor."""

    mtu = 1500

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.system = MemoryPacketSystem()
        self.interface = self.system.add_interface("eth0", mac=TARGET_MAC, mtu=self.mtu)

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

    def served_sectors(self) -> list[int]:
        """The sector count each target is served with on the interface."""
        protocol = self.service.protocol
        assert protocol is not None and protocol.dispatcher is not None
        return [t.max_sectors for t in protocol.dispatcher.targets]

    def test_max_sectors_from_mtu(self) -> None:
        """
        Each target is served with the sector count that fits the interface's
        MTU; the targets themselves keep their own cap (none).
        """
        targets = [target(1, 1), target(1, 2)]
        self.serve(*targets)
        self.assertEqual(self.served_sectors(), [2, 2])
        self.assertEqual([t.max_sectors for t in targets], [255, 255])

    def test_target_cap_kept(self) -> None:
        """A target's own cap below the MTU's count is what it is served with."""
        self.interface.mtu = 9000
        self.serve(target(1, 1), target(1, 2, max_sectors=4))
        self.assertEqual(self.served_sectors(), [17, 4])

    def test_max_sectors_capped(self) -> None:
        """``max_sectors`` caps the count below what the MTU allows."""
        self.interface.mtu = 9000
        self.serve(target(), max_sectors=8)
        self.assertEqual(self.served_sectors(), [8])

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
            self.assertEqual((ethernet.dst, ethernet.src), (BROADCAST_MAC, TARGET_MAC))
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
        replies = self.answer(DISCOVERY)
        self.assertEqual(len(replies), 1)
        ethernet, header = decode(replies[0])
        self.assertEqual((ethernet.dst, ethernet.src), (INITIATOR_MAC, TARGET_MAC))
        self.assertEqual(header.tag, b"\x00\x00\x00\x07")
        self.assertEqual((header.major, header.minor), (1, 2))

    def test_several_targets(self) -> None:
        """A broadcast query gets one reply per target; a unicast one only its target's."""
        self.serve(target(1, 1), target(1, 2), target(2, 1))
        self.assertEqual(len(self.answer(DISCOVERY)), 3)
        identify = ata_request(ATACmdStatus.IDENTIFY, slot=2, tag=9)
        replies = self.answer(ethernet_frame(identify))
        self.assertEqual([decode(r)[1].minor for r in replies], [2])

    def test_write_reaches_backend(self) -> None:
        """An ATA write is on the backend when its reply is sent."""
        disk = target()
        self.serve(disk)
        data = bytes(range(256)) * 2
        write = ata_request(ATACmdStatus.WRITE_48BIT, slot=2, lba=5, data=data, tag=10)
        (reply,) = self.answer(ethernet_frame(write))
        arg = decode(reply)[1].arg
        assert isinstance(arg, ATAArg)
        self.assertEqual(arg.cmd_status, ATACmdStatus.READY_STATUS)
        self.assertEqual(disk.backend.read(5 * SECTOR_SIZE, SECTOR_SIZE), data)

    def test_drops(self) -> None:
        """Responses and truncated frames get no reply."""
        self.serve()
        response = ethernet_frame(config_request(tag=7, verflags=0x18), dst=BROADCAST_MAC)
        self.assertEqual(self.answer(response), [])
        self.assertEqual(self.answer(DISCOVERY[:20]), [])

    def test_not_started(self) -> None:
        """A protocol that was never connected ignores frames."""
        protocol = AoEProtocol([target()], clock=self.reactor)
        protocol.datagramReceived(DISCOVERY)
        self.assertIsNone(protocol.dispatcher)


class MalformedLoggingTests(ServiceTestsMixin, SynchronousTestCase):
    """Malformed input is logged, but never a line per frame."""

    def malformed_lines(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in events if "malformed AoE frame" in e["log_format"]]

    def test_first_logged_at_once(self) -> None:
        """The first malformed frame is logged immediately, with the reason."""
        self.serve()
        with capturedLogs() as events:
            self.answer(BAD_VERSION)
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
                self.answer(BAD_VERSION)
            self.answer(DISCOVERY[:20])
            self.assertEqual(len(self.malformed_lines(events)), 1)
            self.reactor.advance(10)
        _first, summary = self.malformed_lines(events)
        self.assertEqual(summary["count"], 100)
        self.assertIn("header of 6 bytes", summary["reason"])

    def test_summary_interval(self) -> None:
        """After a summary the next malformed frame waits for the next one; after quiet, not."""
        self.serve()
        with capturedLogs() as events:
            self.answer(BAD_VERSION)
            self.answer(BAD_VERSION)
            self.reactor.advance(10)
            self.answer(BAD_VERSION)
            self.assertEqual(len(self.malformed_lines(events)), 2)
            self.reactor.advance(10)
            self.assertEqual(len(self.malformed_lines(events)), 3)
            self.reactor.advance(60)
            self.answer(BAD_VERSION)
            self.assertEqual(len(self.malformed_lines(events)), 4)
        self.assertEqual([e.get("count") for e in self.malformed_lines(events)],
                         [None, 1, 1, None])

    def test_summary_at_stop(self) -> None:
        """Stopping logs what was not summarised yet, and leaves no timer behind."""
        service = self.serve()
        with capturedLogs() as events:
            for _ in range(3):
                self.answer(BAD_VERSION)
            service.stopService()
            self.reactor.advance(0)
        self.assertEqual(self.malformed_lines(events)[-1]["count"], 2)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_valid_frames_not_logged(self) -> None:
        """Valid requests and their replies log nothing about malformed input."""
        self.serve()
        with capturedLogs() as events:
            self.answer(DISCOVERY)
        self.assertEqual(self.malformed_lines(events), [])


# -- the zero-copy frame path (PACKET_MMAP rings) -------------------------------


class _FullStore(MemoryACLStore):
    """An ACL store on a full disk: a config string cannot be stored."""

    def set_config_string(self, value: bytes) -> None:
        raise OSError(28, "No space left on device")


class StoreFailureTests(ServiceTestsMixin, SynchronousTestCase):
    """An ACL store that fails: answered, logged at error level, never a flood."""

    def test_answered_and_logged_once_per_interval(self) -> None:
        """
        Each failed change is answered DEVICE_UNAVAILABLE; the log has one
        line naming the target and the error per interval, then the count.
        """
        self.serve(target(acl=_FullStore()))
        with capturedLogs() as events:
            set_x = config_request(ConfigCommand.FORCE_SET, b"x", shelf=1, slot=2, tag=9)
            replies = [self.answer(ethernet_frame(set_x)) for _ in range(5)]
            self.reactor.advance(10)
            set_y = config_request(ConfigCommand.FORCE_SET, b"y", shelf=1, slot=2, tag=9)
            self.answer(ethernet_frame(set_y))
        for [reply] in replies:
            _, header = decode(reply)
            self.assertTrue(header.flag_error)
            self.assertEqual(header.error, Error.DEVICE_UNAVAILABLE)
        lines = [formatEvent(e) for e in events if "cannot store" in formatEvent(e)]
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("e1.2", lines[0])
        self.assertIn("No space left on device", lines[0])
        self.assertIn("(0 more failures", lines[0])
        self.assertIn("(4 more failures", lines[1])
        self.assertEqual({e["log_level"].name for e in events if "fault" in e}, {"error"})


class RingSystemMixin(ServiceTestsMixin):
    """The service on a fake system with rings: frames come through ``frameReceivedInto``."""

    def setUp(self) -> None:
        super().setUp()
        self.system.rings = True

    def serve(self, *targets: Target, **kwargs: Any) -> AoEService:
        """Start the service, check its port has rings, and count what goes through ``write``."""
        service = super().serve(*targets, **kwargs)
        port = service.port
        assert port is not None
        self.assertIsNotNone(port._rings)
        self.written: list[bytes] = []
        write = port.write

        def counting_write(frame: bytes) -> None:
            self.written.append(frame)
            write(frame)

        port.write = counting_write  # type: ignore[method-assign]
        return service


class RingAoEProtocolTests(RingSystemMixin, AoEProtocolTests):
    """``AoEProtocolTests`` again, through the ring walk."""


class RingMalformedLoggingTests(RingSystemMixin, MalformedLoggingTests):
    """``MalformedLoggingTests`` again, through the ring walk."""


def read(lba: int, count: int = 1, tag: bytes = b"\x00\x00\x01\x00") -> bytes:
    """A READ SECTORS EXT of ``count`` sectors at ``lba``, for target 1.2."""
    return ethernet_frame(ata_request(lba=lba, count=count, slot=2, tag=tag))


def write(lba: int, fill: int, tag: bytes = b"\x00\x00\x02\x00") -> bytes:
    """A WRITE SECTORS EXT of one sector of ``fill`` at ``lba``, for target 1.2."""
    data = bytes([fill]) * SECTOR_SIZE
    message = ata_request(ATACmdStatus.WRITE_48BIT, lba=lba, data=data, slot=2, tag=tag)
    return ethernet_frame(message)


class FrameReceivedIntoTests(RingSystemMixin, SynchronousTestCase):
    """``AoEProtocol.frameReceivedInto``: in place when it can, through a copy when it must."""

    def test_read_in_place(self) -> None:
        """A plain read is answered into the TX slot (not ``write``), as the plain path would."""
        disk = target()
        disk.backend.write(3 * SECTOR_SIZE, b"\x5a" * 2 * SECTOR_SIZE)
        self.serve(disk)
        (reply,) = self.answer(read(3, 2))
        self.assertEqual(self.written, [])
        arg = decode(reply)[1].arg
        assert isinstance(arg, ATAArg)
        self.assertEqual(arg.data, b"\x5a" * 2 * SECTOR_SIZE)
        protocol = self.service.protocol
        assert protocol is not None and protocol.dispatcher is not None
        self.assertEqual(protocol.dispatcher.counters.fast, 1)
        reference = AoEProtocol([target()], clock=self.reactor)
        reference.dispatcher = type(protocol.dispatcher)(TARGET_MAC, reference.targets)
        reference.targets[0].max_sectors = 2
        reference.targets[0].backend.write(3 * SECTOR_SIZE, b"\x5a" * 2 * SECTOR_SIZE)
        self.assertEqual([reply], reference.dispatcher.serve(read(3, 2)))

    def test_write_in_place(self) -> None:
        """Without ``sync`` a plain write is answered in place too, and lands on the disk."""
        disk = target()
        self.serve(disk)
        (reply,) = self.answer(write(4, 0x33))
        self.assertEqual(self.written, [])
        self.assertEqual(len(reply), MIN_FRAME_SIZE)
        self.assertEqual(disk.backend.read(4 * SECTOR_SIZE, SECTOR_SIZE), b"\x33" * SECTOR_SIZE)

    def test_general_path(self) -> None:
        """Anything else reaches ``datagramReceived`` as ``bytes`` and is answered by ``write``."""
        self.serve()
        (reply,) = self.answer(DISCOVERY)
        self.assertEqual(self.written, [reply])

    def test_sync_write_held(self) -> None:
        """
        Under ``sync`` a write's reply is held until its disk is synced, then sent.

        The Python lane holds it as a copy (written by ``write``); the
        compiled lane does the write in place and holds the reply in its TX
        slot, released by ``drainFinished``.
        """
        disk = target()
        self.serve(disk, sync=True)
        (reply,) = self.answer(write(4, 0x44))
        self.assertEqual(self.written, [] if lane.native is not None else [reply])
        self.assertEqual(decode(reply)[1].arg.cmd_status, ATACmdStatus.READY_STATUS)
        self.assertEqual(disk.backend.read(4 * SECTOR_SIZE, SECTOR_SIZE), b"\x44" * SECTOR_SIZE)
        protocol = self.service.protocol
        assert protocol is not None
        self.assertEqual((protocol.syncs, protocol.synced_writes), (1, 1))

    def test_sync_read_in_place_unless_held(self) -> None:
        """
        Under ``sync`` a read is answered in place when nothing is held, and
        held behind a write of the same drain otherwise (order kept).
        """
        self.serve(sync=True)
        self.answer(read(1))
        self.assertEqual(self.written, [])
        before = len(self.sock.sent)
        for frame in (write(1, 0x77), read(1, tag=b"\x00\x00\x03\x00")):
            self.interface.receive(frame)
        assert self.service.port is not None
        self.service.port.doRead()
        replies = self.sock.sent[before:]
        # The Python lane holds both as copies; the compiled one holds the write's reply
        # in its TX slot, which keeps the read's (the next slot) from leaving before it.
        self.assertEqual(self.written, [] if lane.native is not None else replies)
        self.assertEqual([decode(r)[1].tag for r in replies],
                         [b"\x00\x00\x02\x00", b"\x00\x00\x03\x00"])  # fmt: skip
        arg = decode(replies[1])[1].arg
        assert isinstance(arg, ATAArg)
        self.assertEqual(arg.data, b"\x77" * SECTOR_SIZE)

    def test_sync_one_per_drain(self) -> None:
        """Under ``sync`` the writes of a drain through the ring still share one sync."""
        disk = target()
        self.serve(disk, sync=True)
        for i in range(8):
            self.interface.receive(write(i, i + 1, tag=bytes([0, 0, 9, i])))
        assert self.service.port is not None
        self.service.port.doRead()
        protocol = self.service.protocol
        assert protocol is not None
        self.assertEqual((protocol.syncs, protocol.synced_writes), (1, 8))
        self.assertEqual([decode(r)[1].tag[3] for r in self.sock.sent[-8:]], list(range(8)))

    def test_no_slot(self) -> None:
        """Given no TX slot (``None``), the frame is answered through ``datagramReceived``."""
        self.serve()
        protocol = self.service.protocol
        assert protocol is not None
        self.assertEqual(protocol.frameReceivedInto(memoryview(read(1)), None), 0)
        self.assertEqual(len(self.written), 1)

    def test_not_started(self) -> None:
        """A protocol that was never connected answers nothing."""
        protocol = AoEProtocol([target()], clock=self.reactor)
        slot = memoryview(bytearray(2000))
        self.assertEqual(protocol.frameReceivedInto(memoryview(read(1)), slot), 0)
