"""
Hostile input over a real veth pair: a flood of junk interleaved with real I/O.

The server (``AoEService``, in this process, on the trial reactor) serves a
memory disk in one network namespace; ``tests.peer.Peer`` in the other sends
some 20,000 hostile frames as fast as the server drains them (random bytes,
truncations, wrong versions, responses, broadcast config storms, requests for
other shelves, frames up to the MTU and giants 4 bytes past it, which a veth
end still takes) while a client writes and reads real sectors.  Checked: every
real request is answered correctly during and after the flood, the disk holds
exactly what the real writes wrote, the malformed counter counted exactly the
malformed frames the port passed on, the port ignored the giants, nothing was
logged as an error, and the process's memory stays put.  A burst far beyond
the advertised buffer count, sent while the server is not reading, is bounded
by the socket's receive buffer: the kernel drops the excess, the server
answers what it kept, memory stays put.

Root only (``tests.netns.require``), but for ``GiantFrameTests``.
"""

from __future__ import annotations

import random
import socket
import struct
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import (
    BROADCAST_MAC,
    BROADCAST_MAJOR,
    SECTOR_SIZE,
    ATACmdStatus,
)
from aoe_twisted.net.port import max_sectors_for_mtu
from aoe_twisted.net.ring import SOL_PACKET
from aoe_twisted.server import AoEService
from aoe_twisted.testing import (
    TARGET_MAC,
    MemoryPacketSystem,
    ata_request,
    config_request,
    ethernet_frame,
)
from tests.netns import VethPair, require, run
from tests.peer import Peer, Reply

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fuzz.harness import changes_state, classify_frame  # noqa: E402

Gen = Generator[defer.Deferred[Any], Any, None]

SHELF, SLOT = 3, 7
SECTORS = 512
MTU = 1500
#: The client end's MTU: larger, so it can send frames just past the server's MTU.
CLIENT_MTU = 1600
FLOOD = 20_000
#: Hostile frames sent between two turns of the reactor.
BATCH = 100
#: Real writes (one sector each, at distinct LBAs) spread over the flood.
REAL_WRITES = 100
#: Requests sent at once, unread, in the buffer-count test.
BURST = 3000
#: How much the process's resident memory may grow over a flood or a burst.
RSS_SLACK = 24 * 1024 * 1024
_DRDY = int(ATACmdStatus.READY_STATUS)
#: ``PACKET_STATISTICS`` (``linux/if_packet.h``): packets and drops.
_PACKET_STATISTICS = 6


def rss() -> int:
    """Return this process's resident set size in bytes (``VmRSS``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _unicast(rng: random.Random) -> bytes:
    """Return a random locally administered unicast MAC."""
    return bytes([0x02]) + rng.randbytes(5)


class Hostile:
    """
    Makes hostile frames from forged sources to the server; ``frames`` keeps only
    those that cannot change the target (``fuzz.harness.changes_state``).
    """

    def __init__(self, rng: random.Random, server: bytes, peer: bytes) -> None:
        self.rng = rng
        self.server = server
        self.peer = peer

    def _frame(self, payload: bytes, dst: bytes | None = None, src: bytes | None = None) -> bytes:
        """``payload`` to ``dst`` (the server) from ``src`` (a random forged MAC)."""
        return ethernet_frame(payload, src or _unicast(self.rng), dst or self.server)

    def _write(self, shelf: int = SHELF, slot: int = SLOT, count: int = 1) -> bytes:
        lba = self.rng.randrange(SECTORS)
        data = self.rng.randbytes(count * SECTOR_SIZE)
        return ata_request(ATACmdStatus.WRITE_48BIT, lba=lba, count=count, data=data,
                           shelf=shelf, slot=slot, tag=self.rng.randbytes(4))

    def random_bytes(self) -> bytes:
        """Any bytes (at least an Ethernet header's worth: the kernel sends no less)."""
        return self.rng.randbytes(self.rng.randrange(14, 200))

    def random_aoe(self) -> bytes:
        return self._frame(self.rng.randbytes(self.rng.randrange(0, 200)))

    def truncated(self) -> bytes:
        return self._frame(self._write())[: self.rng.randrange(14, 14 + 22 + SECTOR_SIZE)]

    def bad_version(self) -> bytes:
        payload = bytearray(self._write())
        payload[0] = self.rng.choice([0, 2, 3, 15]) << 4 | (payload[0] & 0x0F)
        return self._frame(bytes(payload))

    def response(self) -> bytes:
        payload = bytearray(self._write())
        payload[0] |= 0x08
        return self._frame(bytes(payload))

    def broadcast_query(self) -> bytes:
        return self._frame(config_request(tag=self.rng.randbytes(4)), dst=BROADCAST_MAC)

    def other_shelf(self) -> bytes:
        shelf = self.rng.choice([0, SHELF + 1, BROADCAST_MAJOR - 1])
        return self._frame(self._write(shelf=shelf, slot=self.rng.choice([SLOT, 0])))

    def too_many_sectors(self) -> bytes:
        return self._frame(self._write(count=max_sectors_for_mtu(MTU) + 1)[:MTU])

    def full_size(self) -> bytes:
        """A frame of exactly MTU bytes of payload: junk after a bad header."""
        payload = bytearray(self._write(count=2))
        payload[5] = self.rng.randrange(4, 256)  # an unknown command
        return self._frame(bytes(payload[:MTU]).ljust(MTU, b"\x00"))

    def oversize(self) -> bytes:
        """Past the server's MTU by the 4 bytes a veth end still lets through."""
        payload = bytearray(self._write(count=3)[: MTU + 4])
        payload[0] = 0x20  # version 2: the target would answer with an error echoing it
        return self._frame(bytes(payload))

    def multicast_source(self) -> bytes:
        return self._frame(self._write(), src=b"\x03" + self.rng.randbytes(5))

    def frames(self, count: int, target: Target) -> list[bytes]:
        """Return ``count`` hostile frames of every kind, none of which may change ``target``."""
        makers = [self.random_bytes, self.random_aoe, self.truncated, self.bad_version,
                  self.response, self.broadcast_query, self.other_shelf, self.too_many_sectors,
                  self.full_size, self.oversize, self.multicast_source]
        frames: list[bytes] = []
        while len(frames) < count:
            frame = makers[len(frames) % len(makers)]()
            while changes_state(target, frame):
                frame = self.random_aoe()
            frames.append(frame)
        return frames


class HostileInputTests(TestCase):
    """The server keeps serving, and nothing but real writes reaches the disk."""

    timeout = 60

    def setUp(self) -> None:
        require(self)
        self.pair = VethPair.create(self, mtu=MTU)
        run("ip", "-n", self.pair.client_ns, "link", "set", "dev", self.pair.client_if,
            "mtu", str(CLIENT_MTU))
        self.peer = Peer(self.pair.client_if, self.pair.client_ns)
        self.peer.start()
        self.addCleanup(self.peer.stop)
        self.backend = MemoryBackend(SECTORS * SECTOR_SIZE)
        self.disk = bytearray(random.Random(7).randbytes(self.backend.size))
        self.backend.write(0, bytes(self.disk))
        self.target = Target(SHELF, SLOT, self.backend)
        self.service = AoEService(self.pair.server_if, [self.target], netns=self.pair.server_ns)
        self.addCleanup(self.service.stopService)
        self.service.privilegedStartService()
        self.service.startService()
        port = self.service.port
        assert port is not None and port.mac is not None
        self.port = port
        self.server = port.mac
        protocol = self.service.protocol
        assert protocol is not None and protocol.dispatcher is not None
        self.counters = protocol.dispatcher.counters

    def server_socket(self) -> socket.socket:
        """Return the server's packet socket."""
        return self.port._system._sockets[self.port.fileno()]  # type: ignore[no-any-return]

    def drops(self) -> tuple[int, int]:
        """Return (and reset) the server socket's kernel counters: frames queued, dropped."""
        raw = self.server_socket().getsockopt(SOL_PACKET, _PACKET_STATISTICS, 8)
        packets, dropped = struct.unpack("II", raw)  # packets counts the dropped ones too
        return packets - dropped, dropped

    def forget_replies(self) -> None:
        """Drop what the peer kept of replies nobody waits for (they are not the server's)."""
        del self.peer.unsolicited[:]
        del self.peer.undecodable[:]

    @defer.inlineCallbacks
    def reliable(self, send: Any, tries: int = 4) -> Gen:
        """Call ``send()`` (a Peer request) until it gets a reply, as an initiator retransmits."""
        for _ in range(tries):
            replies: list[Reply] = yield send()
            if replies:
                return replies
        raise AssertionError(f"no reply after {tries} tries")

    def check_ata(self, replies: list[Reply], data: bytes = b"") -> None:
        """Check one successful ATA reply from the target, with ``data`` if given."""
        self.assertEqual(len(replies), 1)
        reply = replies[0]
        self.assertEqual((reply.src, reply.header.major, reply.header.minor),
                         (self.server, SHELF, SLOT))
        self.assertFalse(reply.header.flag_error)
        self.assertEqual(reply.arg.cmd_status, _DRDY)
        if data:
            self.assertEqual(reply.arg.data, data)

    @defer.inlineCallbacks
    def test_flood_with_real_io(self) -> Gen:
        """
        20,000 hostile frames interleaved with 100 real writes and 100 real
        reads, then the writes read back: every real request is answered right,
        the disk is exactly the real writes, every hostile frame was counted,
        memory is bounded.
        """
        rng = random.Random(20_000)
        hostile = Hostile(rng, self.server, self.peer.mac)
        flood = hostile.frames(FLOOD, self.target)
        # The socket only gets AoE frames, and the port passes on those to the
        # server's MAC or to a group (broadcast, multicast) that fit the MTU.
        aoe = [frame for frame in flood if frame[12:14] == b"\x88\xa2"]
        delivered = [
            frame for frame in aoe
            if (frame[:6] == self.server or frame[0] & 1) and len(frame) <= 14 + MTU
        ]
        expected_malformed = sum(classify_frame(frame)[2] for frame in delivered)
        oversize = sum(len(frame) > 14 + MTU for frame in flood)
        lbas = rng.sample(range(SECTORS), 2 * REAL_WRITES)
        writes = [(lba, rng.randbytes(SECTOR_SIZE)) for lba in lbas[:REAL_WRITES]]
        # Reads during the flood go to sectors no write touches: they hold the pattern.
        reads = [(lba, bytes(self.disk[lba * SECTOR_SIZE : (lba + 1) * SECTOR_SIZE]))
                 for lba in lbas[REAL_WRITES:]]
        reading = []
        # Hostile frames for other addresses would stop in the kernel's filter:
        # let every one through, to the code under test.
        self.port.filter_addresses(None)
        self.drops()
        received = self.counters["received"]
        malformed = self.counters["malformed"]
        ignored = self.port.frames_ignored
        before = rss()
        pending = []
        per_write = len(flood) // len(writes)
        for i, start in enumerate(range(0, len(flood), BATCH)):
            for frame in flood[start : start + BATCH]:
                self.peer.send_raw(frame)
            if i % (per_write // BATCH) == 0 and writes:
                lba, data = writes.pop()
                self.disk[lba * SECTOR_SIZE : (lba + 1) * SECTOR_SIZE] = data
                pending.append((lba, data, self.reliable(
                    lambda lba=lba, data=data: self.peer.write(
                        self.server, SHELF, SLOT, lba, data, timeout=0.5))))
                lba, data = reads.pop()
                reading.append((data, self.reliable(
                    lambda lba=lba: self.peer.read(self.server, SHELF, SLOT, lba, timeout=0.5))))
            self.forget_replies()
            yield task.deferLater(reactor, 0, lambda: None)
        for _, _, d in pending:
            self.check_ata((yield d))
        for data, d in reading:
            self.check_ata((yield d), data)
        # Read every written sector back once the flood is over.
        for lba, data, _ in pending:
            replies = yield self.reliable(
                lambda lba=lba: self.peer.read(self.server, SHELF, SLOT, lba, timeout=0.5))
            self.check_ata(replies, data)
        self.forget_replies()
        after = rss()
        _, dropped = self.drops()

        self.assertEqual(self.backend.read(0, self.backend.size), bytes(self.disk))
        self.assertEqual(dropped, 0, "the kernel dropped frames; the counts below would be off")
        real = self.counters["received"] - received - len(delivered)
        self.assertGreaterEqual(real, 3 * REAL_WRITES)
        self.assertLess(real, 4 * REAL_WRITES, "a third of the real requests were retried")
        self.assertEqual(self.port.frames_ignored - ignored, len(aoe) - len(delivered))
        self.assertEqual(self.counters["malformed"] - malformed, expected_malformed)
        self.assertGreater(expected_malformed, FLOOD // 3)
        self.assertGreater(oversize, FLOOD // 20)
        self.assertEqual(self.counters["unencodable"], 0)
        self.assertEqual(self.port.frames_dropped, 0)
        self.assertLess(after - before, RSS_SLACK, f"RSS grew from {before} to {after}")
        found = yield self.peer.discover()
        self.assertEqual([(r.header.major, r.header.minor) for r in found], [(SHELF, SLOT)])

    @defer.inlineCallbacks
    def test_burst_beyond_buffer_count(self) -> Gen:
        """
        3,000 reads sent while the server does not read (the advertised buffer
        count is 16): the socket keeps what its receive buffer holds, the kernel
        drops the rest, the server answers exactly what it kept, memory stays put.
        """
        rcvbuf = self.server_socket().getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        # Room for at least the advertised buffer count of full frames, and a bound:
        # the port sizes it (SO_RCVBUFFORCE) from the targets' buffer counts.
        self.assertGreaterEqual(rcvbuf, self.target.buffer_count * (14 + MTU))
        self.assertLess(rcvbuf, 16 * 1024 * 1024)
        (config,) = yield self.peer.discover()
        self.assertEqual(config.arg.buffer_count, self.target.buffer_count)
        self.forget_replies()
        self.drops()
        received = self.counters["received"]
        replies = self.counters["replies"]
        before = rss()
        self.port.stopReading()
        read = ata_request(ATACmdStatus.READ_48BIT, lba=8, count=2, shelf=SHELF, slot=SLOT,
                           tag=b"burs")
        frame = ethernet_frame(read, self.peer.mac, self.server)
        for _ in range(BURST):
            self.peer.send_raw(frame)
        yield task.deferLater(reactor, 0.2, lambda: None)
        queued, dropped = self.drops()
        self.port.startReading()
        yield task.deferLater(reactor, 0.5, lambda: None)
        kept = self.counters["received"] - received
        self.forget_replies()
        after = rss()
        self.assertEqual(queued + dropped, BURST)
        self.assertEqual(kept, queued)
        self.assertGreater(dropped, BURST // 2, f"kept {kept} of {BURST}")
        self.assertGreaterEqual(kept, self.target.buffer_count)
        self.assertEqual(self.counters["replies"] - replies, kept)
        self.assertLess(after - before, RSS_SLACK, f"RSS grew from {before} to {after}")
        replies = yield self.reliable(
            lambda: self.peer.read(self.server, SHELF, SLOT, 8, 2, timeout=0.5))
        self.check_ata(replies, bytes(self.disk[8 * SECTOR_SIZE : 10 * SECTOR_SIZE]))


class GiantFrameTests(SynchronousTestCase):
    """Frames past the MTU (giants) never reach the dispatcher; no root needed."""

    def test_giant_ignored(self) -> None:
        """
        A bad-version frame 4 bytes past the MTU (a veth end takes it) is
        ignored by the port: its error reply, echoing it, could not be sent
        (EMSGSIZE, logged with a traceback per frame).  One at the MTU is answered.
        """
        system = MemoryPacketSystem()
        interface = system.add_interface("eth0", mac=TARGET_MAC, mtu=MTU)
        service = AoEService("eth0", [Target(SHELF, SLOT, MemoryBackend(SECTORS * SECTOR_SIZE))],
                             reactor=MemoryReactorClock(), system=system)
        service.startService()
        self.addCleanup(service.stopService)
        port = service.port
        assert port is not None and port.mac is not None
        sock = system.socket_for(port)
        sent = len(sock.sent)
        payload = ata_request(shelf=SHELF, slot=SLOT, tag=b"tag!", verflags=0x20)
        for size in (MTU + 4, MTU):
            frame = ethernet_frame(payload.ljust(size, b"\x00"))
            interface.receive(frame)
            port.doRead()
        self.assertEqual(port.frames_ignored, 1)
        self.assertEqual(port.frames_received, 1)
        replies = sock.sent[sent:]
        self.assertEqual([len(r) for r in replies], [14 + MTU])
