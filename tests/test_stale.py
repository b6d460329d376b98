"""
Tests for dropping stale frames: requests that waited in the RX ring longer than
``AoEPort.stale_after`` seconds (by the kernel's receive time in the slot) are
not answered, by either lane.

A process that was stopped and runs again must not carry out the writes that
waited in its ring meanwhile: their initiators have retried them, perhaps
through another server of the same disk, and may have written newer data
since.  ``tests.test_e2e.StaleFrameTests`` checks the same with real rings and
the kernel's own timestamps.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import ClassVar

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import SECTOR_SIZE, ATACmdStatus
from aoe_twisted.net import port as port_module
from aoe_twisted.net.ring import STALE_AFTER, TP_STATUS_USER
from aoe_twisted.server import AoEService
from aoe_twisted.testing import (
    INITIATOR_MAC,
    TARGET_MAC,
    MemoryPacketSystem,
    ata_request,
    ethernet_frame,
)
from tests.test_fastpath import LaneChoice

#: ``tp_sec`` in a ``tpacket2_hdr``.
_TP_SEC = struct.Struct("=I")
_TP_SEC_AT = 16
SECTORS = 64


def write(lba: int, fill: int, tag: int) -> bytes:
    """A plain one-sector write of ``fill`` bytes at ``lba`` to 1.2, from the initiator."""
    return ethernet_frame(
        ata_request(
            int(ATACmdStatus.WRITE_48BIT), count=1, lba=lba, aflags=0x41,
            data=bytes([fill]) * SECTOR_SIZE, shelf=1, slot=2, tag=tag.to_bytes(4, "big"),
        ),
        INITIATOR_MAC,
        TARGET_MAC,
    )  # fmt: skip


class SlowMemory(MemoryBackend):
    """A memory disk that calls ``stall`` after each write the Python lane makes."""

    stall: Callable[[], object] = staticmethod(lambda: None)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        super().write(offset, data)
        self.stall()


class _StaleChecks:
    """A service on a memory system with rings; frames aged in the ring before it reads them."""

    compiled: ClassVar[bool | None] = None

    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        self.reactor = MemoryReactorClock()
        self.system = MemoryPacketSystem(rings=True)
        self.interface = self.system.add_interface("eth0", mac=TARGET_MAC, mtu=1500)
        self.disk = SlowMemory(SECTORS * SECTOR_SIZE)
        service = AoEService(
            "eth0", [Target(1, 2, self.disk)], reactor=self.reactor, system=self.system
        )
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        self.service = service
        assert service.port is not None
        self.port = service.port
        self.sock = self.system.socket_for(service.port)
        if self.compiled is not None:
            self.assertEqual(self.port._lane_sink is not None, self.compiled)

    def age(self, seconds: int) -> None:
        """Make every frame waiting in the RX ring ``seconds`` older (its ``tp_sec``)."""
        rings = self.sock.rings
        assert rings is not None
        for offset in rings.rx_offsets:
            if rings.status[offset >> 2] & TP_STATUS_USER:
                (sec,) = _TP_SEC.unpack_from(rings.view, offset + _TP_SEC_AT)
                _TP_SEC.pack_into(rings.view, offset + _TP_SEC_AT, sec - seconds)

    def summaries(self) -> list[object]:
        """The timed calls due to log a summary of stale drops."""
        return [c for c in self.reactor.getDelayedCalls() if c.func == self.port._log_stale]

    def read_now(self) -> list[bytes]:
        """Let the port read what waits; return what it sent."""
        before = len(self.sock.sent)
        self.port.doRead()
        return list(self.sock.sent[before:])

    def test_stale_write_not_done(self) -> None:
        """
        A write that waited longer than ``stale_after`` is neither done nor answered;
        it is counted, and one warning says why.  Fresh frames behind it are answered.
        """
        self.assertEqual(self.port.stale_after, STALE_AFTER)
        self.interface.receive(write(3, 0x5A, tag=1))
        self.interface.receive(write(4, 0x5B, tag=2))
        self.age(STALE_AFTER + 2)
        self.interface.receive(write(5, 0x5C, tag=3))
        with capturedLogs() as events:
            sent = self.read_now()
        self.assertEqual(len(sent), 1)
        self.assertEqual(sent[0][20:24], (3).to_bytes(4, "big"))
        self.assertEqual(self.disk.read(3 * SECTOR_SIZE, 2 * SECTOR_SIZE), bytes(2 * SECTOR_SIZE))
        self.assertEqual(self.disk.read(5 * SECTOR_SIZE, SECTOR_SIZE), b"\x5c" * SECTOR_SIZE)
        self.assertEqual(self.port.frames_stale, 2)
        self.assertEqual(self.port.frames_ignored, 2)
        self.assertEqual(self.port.frames_received, 1)
        (interface,) = self.service.snapshot()["interfaces"]
        self.assertEqual((interface["stale"], interface["ignored"]), (2, 2))
        lines = [formatEvent(e) for e in events if "receive ring" in formatEvent(e)]
        self.assertEqual(len(lines), 1)
        self.assertIn("dropped 2 frame(s) that waited more than 5 s", lines[0])
        # The initiator sends it again: answered and done.
        self.interface.receive(write(3, 0x5A, tag=4))
        self.assertEqual(len(self.read_now()), 1)
        self.assertEqual(self.disk.read(3 * SECTOR_SIZE, SECTOR_SIZE), b"\x5a" * SECTOR_SIZE)

    def test_not_yet_stale(self) -> None:
        """A frame that waited ``stale_after`` seconds or less is answered as ever."""
        self.interface.receive(write(3, 0x5A, tag=1))
        self.age(STALE_AFTER - 1)
        self.assertEqual(len(self.read_now()), 1)
        self.assertEqual(self.disk.read(3 * SECTOR_SIZE, SECTOR_SIZE), b"\x5a" * SECTOR_SIZE)
        self.assertEqual(self.port.frames_stale, 0)

    def test_off(self) -> None:
        """``stale_after = 0``: however old, a frame is answered."""
        self.port.stale_after = 0
        self.interface.receive(write(3, 0x5A, tag=1))
        self.age(100_000)
        self.assertEqual(len(self.read_now()), 1)
        self.assertEqual(self.disk.read(3 * SECTOR_SIZE, SECTOR_SIZE), b"\x5a" * SECTOR_SIZE)

    def test_changed_while_serving(self) -> None:
        """A new ``stale_after`` holds from the next read on, for the compiled lane too."""
        self.interface.receive(write(3, 0x5A, tag=1))
        self.age(3)
        self.assertEqual(len(self.read_now()), 1)
        self.port.stale_after = 2
        self.interface.receive(write(4, 0x5B, tag=2))
        self.age(3)
        self.assertEqual(self.read_now(), [])
        self.assertEqual(self.port.frames_stale, 1)

    def test_one_line_per_interval(self) -> None:
        """
        Drops within ten seconds of the last warning are summed into one more line,
        due when the ten seconds end: no line per drop, and no drop unsaid.
        """
        lines: list[str] = []
        with capturedLogs() as events:
            for round_ in range(3):
                self.interface.receive(write(3, 0x5A, tag=round_))
                self.age(STALE_AFTER + 1)
                self.read_now()
                self.reactor.advance(3)
            lines = [formatEvent(e) for e in events if "receive ring" in formatEvent(e)]
            self.assertEqual(len(lines), 1)
            self.assertIn("dropped 1 frame(s)", lines[0])
            self.reactor.advance(1)  # ten seconds after the first line
            lines = [formatEvent(e) for e in events if "receive ring" in formatEvent(e)]
        self.assertEqual(len(lines), 2)
        self.assertIn("dropped 2 frame(s)", lines[1])
        self.assertEqual(self.port.frames_stale, 3)
        self.assertEqual(self.summaries(), [])

    def test_stop_over_several_reads(self) -> None:
        """
        One stop's frames, walked over several reads (``max_frames_per_read``), are
        all dropped and all said: four at once, the other six in the next line.
        """
        self.port.max_frames_per_read = 4
        for tag in range(10):
            self.interface.receive(write(3, 0x5A, tag=tag))
        self.age(STALE_AFTER + 1)
        with capturedLogs() as events:
            for _ in range(3):
                self.assertEqual(self.read_now(), [])
            self.reactor.advance(10)
        lines = [formatEvent(e) for e in events if "receive ring" in formatEvent(e)]
        self.assertEqual(len(lines), 2)
        self.assertIn("dropped 4 frame(s)", lines[0])
        self.assertIn("dropped 6 frame(s)", lines[1])
        self.assertEqual(self.port.frames_stale, 10)
        self.assertEqual(self.disk.read(3 * SECTOR_SIZE, SECTOR_SIZE), bytes(SECTOR_SIZE))

    def test_said_when_the_port_stops(self) -> None:
        """Drops not yet said when the port stops are said then."""
        for round_ in range(2):
            self.interface.receive(write(3, 0x5A, tag=round_))
            self.age(STALE_AFTER + 1)
            self.read_now()
        with capturedLogs() as events:
            self.port.connectionLost()
        lines = [formatEvent(e) for e in events if "receive ring" in formatEvent(e)]
        self.assertEqual(len(lines), 1)
        self.assertIn("dropped 1 frame(s)", lines[0])
        self.assertEqual(self.summaries(), [])

    def test_not_a_receive_time(self) -> None:
        """
        A stamp more than a year old is no receive time (another clock): the frame
        is answered, never dropped, so a server cannot go silent that way.
        """
        self.interface.receive(write(3, 0x5A, tag=1))
        rings = self.sock.rings
        assert rings is not None
        for offset in rings.rx_offsets:
            if rings.status[offset >> 2] & TP_STATUS_USER:
                _TP_SEC.pack_into(rings.view, offset + _TP_SEC_AT, 86400)  # a day after boot
        self.assertEqual(len(self.read_now()), 1)
        self.assertEqual(self.port.frames_stale, 0)


class PythonLaneStaleTests(_StaleChecks, LaneChoice):
    """The Python lane's walk of the ring drops stale frames."""

    compiled = False

    def test_disk_stalls_in_the_walk(self) -> None:
        """
        A disk that keeps the walk for longer than ``stale_after`` makes the frames
        after it in the ring stale: the clock is read again after each frame.
        """
        clock = [1_000_000.0]
        self.patch(port_module, "time", _Clock(clock))
        self.disk.stall = lambda: clock.__setitem__(0, clock[0] + STALE_AFTER + 2)
        self.interface.receive(write(3, 0x5A, tag=1))
        self.interface.receive(write(4, 0x5B, tag=2))
        rings = self.sock.rings
        assert rings is not None
        for offset in rings.rx_offsets:
            if rings.status[offset >> 2] & TP_STATUS_USER:
                _TP_SEC.pack_into(rings.view, offset + _TP_SEC_AT, int(clock[0]))
        self.assertEqual(len(self.read_now()), 1)
        self.assertEqual(self.disk.read(4 * SECTOR_SIZE, SECTOR_SIZE), bytes(SECTOR_SIZE))
        self.assertEqual(self.port.frames_stale, 1)


class _Clock:
    """A stand-in for the ``time`` module whose ``time()`` reads ``now[0]``."""

    def __init__(self, now: list[float]) -> None:
        self.now = now

    def time(self) -> float:
        return self.now[0]


class CompiledLaneStaleTests(_StaleChecks, LaneChoice):
    """The compiled lane drops stale frames itself."""

    compiled = True


class ServiceOptionTests(SynchronousTestCase):
    """``AoEService(stale_after=...)`` (``--stale-after``, ``stale_after``) sets every port's."""

    def test_every_port(self) -> None:
        system = MemoryPacketSystem(rings=True)
        for name in ("eth0", "eth1"):
            system.add_interface(name, mtu=1500)
        service = AoEService(
            ["eth0", "eth1"], [Target(1, 2, MemoryBackend(SECTORS * SECTOR_SIZE))],
            reactor=MemoryReactorClock(), system=system, stale_after=0,
        )
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual([port.stale_after for port in service.ports.values()], [0, 0])
