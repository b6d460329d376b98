"""
Tests for ``aoe_twisted.net.ring``: ``PACKET_MMAP`` ring geometry and rings on real sockets.

The geometry tests are pure; the others open ``AF_PACKET`` sockets on a veth
pair between two namespaces the tests create (root only).
"""

from __future__ import annotations

import errno
import mmap
import socket
import struct
import time

from twisted.trial.unittest import SynchronousTestCase

from aoe_twisted.core.wire import ETHERTYPE
from aoe_twisted.net.packetsystem import open_packet_socket
from aoe_twisted.net.ring import (
    DEFAULT_RING_FRAMES,
    MIN_RING_FRAMES,
    PACKET_FANOUT,
    PACKET_FANOUT_HASH,
    RX_PKTTYPE_AT,
    RX_SLOT_HEADER,
    SOCKADDR_LL,
    SOL_PACKET,
    TP_STATUS_AVAILABLE,
    TP_STATUS_KERNEL,
    TP_STATUS_SEND_REQUEST,
    TPACKET2_HDR,
    TPACKET2_HDRLEN,
    TX_DATA_AT,
    PacketRings,
    RingGeometry,
    receive_ring_frames,
)
from aoe_twisted.testing import ethernet_frame
from tests.netns import VethPair


class LayoutTests(SynchronousTestCase):
    """The ``linux/if_packet.h`` layout the ring code relies on."""

    def test_sizes(self) -> None:
        """``tpacket2_hdr`` is 32 bytes, ``sockaddr_ll`` 20, ``TPACKET2_HDRLEN`` 52."""
        self.assertEqual(TPACKET2_HDR.size, 32)
        self.assertEqual(SOCKADDR_LL.size, 20)
        self.assertEqual(TPACKET2_HDRLEN, 52)
        self.assertEqual(TX_DATA_AT, 32)
        self.assertEqual(RX_PKTTYPE_AT, 42)

    def test_rx_slot_header(self) -> None:
        """``RX_SLOT_HEADER`` at byte 4 reads ``tp_len``, ``tp_snaplen`` and ``tp_mac``."""
        slot = TPACKET2_HDR.pack(1, 1514, 1500, 66, 80, 0, 0, 0, 0)
        self.assertEqual(RX_SLOT_HEADER.unpack_from(slot, 4), (1514, 1500, 66))


class ReceiveRingFramesTests(SynchronousTestCase):
    """``receive_ring_frames``: the RX ring sized by what can be in flight, capped."""

    def test_four_windows_per_target(self) -> None:
        """Under the cap, four initiators' full windows on every target."""
        self.assertEqual(receive_ring_frames([64, 64, 64]), 4 * 3 * 64)

    def test_at_least_the_minimum(self) -> None:
        """One small target still gets ``MIN_RING_FRAMES`` slots."""
        self.assertEqual(receive_ring_frames([16]), MIN_RING_FRAMES)
        self.assertEqual(receive_ring_frames([]), MIN_RING_FRAMES)

    def test_capped(self) -> None:
        """1,000 targets get the default cap, as 16 do: the ring no longer grows with them."""
        self.assertEqual(receive_ring_frames([64] * 16), DEFAULT_RING_FRAMES)
        self.assertEqual(receive_ring_frames([64] * 1000), DEFAULT_RING_FRAMES)

    def test_cap_given(self) -> None:
        """A cap given (``--ring-frames``) replaces the default one."""
        self.assertEqual(receive_ring_frames([64] * 1000, 8192), 8192)
        self.assertEqual(receive_ring_frames([64] * 1000, 512), 512)

    def test_one_full_window(self) -> None:
        """Never fewer slots than the largest buffer count: one busy initiator loses nothing."""
        self.assertEqual(receive_ring_frames([64, 1000], 512), 1000)

    def test_memory_at_the_cap(self) -> None:
        """
        The default cap maps under 40 MiB at MTU 9000 and 8 MiB at 1500
        (the figures docs/performance.md gives), whatever the number of targets.
        """
        frames = receive_ring_frames([64] * 1000)
        self.assertLess(RingGeometry.for_mtu(9000, frames).size, 40 << 20)
        self.assertLess(RingGeometry.for_mtu(1500, frames).size, 8 << 20)


class GeometryTests(SynchronousTestCase):
    """``RingGeometry.for_mtu``: what the kernel accepts, and room for every frame."""

    def test_kernel_rules(self) -> None:
        """
        Slots are 16-byte aligned, blocks whole pages, slots never cross blocks,
        and ``frame_nr`` is exactly the slots the blocks hold.
        """
        for mtu in (68, 1500, 4000, 9000, 65535):
            for frames in (1, 16, 256, 1000):
                g = RingGeometry.for_mtu(mtu, frames)
                self.assertEqual(g.frame_size % 16, 0)
                self.assertEqual(g.block_size % mmap.PAGESIZE, 0)
                per_block = g.block_size // g.frame_size
                self.assertGreaterEqual(per_block, 1)
                self.assertEqual(g.frame_nr, per_block * g.block_nr)
                self.assertGreaterEqual(g.frame_nr, frames)
                self.assertEqual(g.size, g.block_size * g.block_nr)

    def test_room_for_a_frame(self) -> None:
        """An RX slot holds the kernel's headroom and a frame a VLAN tag over the MTU."""
        for mtu in (1500, 9000):
            g = RingGeometry.for_mtu(mtu, 16)
            # The kernel puts the frame at TPACKET_ALIGN(52 + 16) = 80 - 14.
            self.assertGreaterEqual(g.frame_size, 66 + mtu + 14 + 4)
            self.assertGreaterEqual(g.frame_capacity(), mtu + 14)

    def test_offsets(self) -> None:
        """Offsets list every slot once, in order, inside its block, from ``base``."""
        g = RingGeometry(8192, 3, 3000, 6)
        self.assertEqual(g.offsets(), [0, 3000, 8192, 11192, 16384, 19384])
        self.assertEqual(g.offsets(100)[0], 100)

    def test_request(self) -> None:
        """``request`` is the ``struct tpacket_req`` of the geometry."""
        g = RingGeometry(65536, 2, 2048, 64)
        self.assertEqual(g.request(), struct.pack("=IIII", 65536, 2, 2048, 64))


class TxCommitTests(SynchronousTestCase):
    """``PacketRings.tx_commit``: the TX enqueue the port uses outside its receive loop."""

    def setUp(self) -> None:
        geometry = RingGeometry(8192, 1, 2048, 4)
        self.rings = PacketRings(bytearray(2 * geometry.size), geometry, geometry)
        self.addCleanup(self.rings.close)

    def test_marks_the_slot(self) -> None:
        """The slot's ``tp_len`` is the frame's length and its status ``SEND_REQUEST``."""
        self.rings.tx_commit(1, 70)
        offset = self.rings.tx_offsets[1]
        status, length = TPACKET2_HDR.unpack_from(self.rings.view, offset)[:2]
        self.assertEqual((status, length), (TP_STATUS_SEND_REQUEST, 70))
        self.assertFalse(self.rings.tx_available(1))
        self.assertEqual(self.rings.status[self.rings.tx_offsets[0] >> 2], TP_STATUS_AVAILABLE)
        self.assertTrue(self.rings.tx_available(2))

    def test_moves_on(self) -> None:
        """``tx_next`` goes to the slot after the committed one, and from the last to 0."""
        self.rings.tx_commit(0, 60)
        self.assertEqual(self.rings.tx_next, 1)
        self.rings.tx_commit(3, 60)
        self.assertEqual(self.rings.tx_next, 0)

    def test_rx_untouched(self) -> None:
        """Committing a TX slot writes nothing in the RX ring."""
        for index in range(4):
            self.rings.tx_commit(index, 60 + index)
        rx_end = self.rings.rx.size
        self.assertEqual(bytes(self.rings.view[:rx_end]), bytes(rx_end))


class RealRingTests(SynchronousTestCase):
    """Rings on real ``AF_PACKET`` sockets at either end of a veth pair (root only)."""

    def setUp(self) -> None:
        self.pair = VethPair.create(self)
        self.server = self.open(self.pair.server_ns, self.pair.server_if)
        self.client = self.open(self.pair.client_ns, self.pair.client_if)
        self.server_mac = bytes(self.server.getsockname()[4])
        self.client_mac = bytes(self.client.getsockname()[4])

    def open(self, netns: str, interface: str) -> socket.socket:
        """Open a non-blocking AoE packet socket on ``interface``; closed at cleanup."""
        sock = open_packet_socket(interface, ETHERTYPE, netns)
        self.addCleanup(sock.close)
        sock.setblocking(False)
        return sock

    def rings(self, sock: socket.socket) -> PacketRings:
        """Give ``sock`` rings for the pair's MTU; unmapped at cleanup."""
        rx = RingGeometry.for_mtu(self.pair.mtu, 32)
        tx = RingGeometry.for_mtu(self.pair.mtu, 32)
        rings = PacketRings.setup(sock, rx, tx)
        self.addCleanup(rings.close)
        return rings

    def frame(self, n: int) -> bytes:
        """Return an AoE-typed frame from the client to the server, numbered ``n``."""
        return ethernet_frame(n.to_bytes(2, "big") * 40, self.client_mac, self.server_mac)

    def wait_rx(self, rings: PacketRings, count: int) -> list[tuple[bytes, int]]:
        """Wait for ``count`` frames in the RX ring; return (frame, pkttype) and free the slots."""
        got: list[tuple[bytes, int]] = []
        deadline = time.monotonic() + 5
        while len(got) < count:
            if rings.rx_ready(rings.rx_next):
                offset = rings.rx_offsets[rings.rx_next]
                length, snaplen, mac = RX_SLOT_HEADER.unpack_from(rings.view, offset + 4)
                self.assertEqual(length, snaplen)
                frame = bytes(rings.view[offset + mac : offset + mac + snaplen])
                got.append((frame, rings.view[offset + RX_PKTTYPE_AT]))
                rings.status[offset >> 2] = TP_STATUS_KERNEL
                rings.rx_next = (rings.rx_next + 1) % len(rings.rx_offsets)
            elif time.monotonic() > deadline:
                self.fail(f"only {len(got)} of {count} frames arrived in the RX ring")
            else:
                time.sleep(0.001)
        return got

    def test_rx(self) -> None:
        """Frames sent to a socket with an RX ring land in its slots, in order, whole."""
        rings = self.rings(self.server)
        frames = [self.frame(n) for n in range(30)]  # fewer than the ring holds
        for frame in frames:
            self.client.send(frame)
        got = self.wait_rx(rings, 30)
        self.assertEqual([f for f, _ in got], frames)
        self.assertEqual({t for _, t in got}, {socket.PACKET_HOST})
        self.assertRaises(BlockingIOError, self.server.recv, 2048)

    def test_tx(self) -> None:
        """Slots committed to the TX ring leave with one ``send`` of nothing."""
        rings = self.rings(self.server)
        server, client = self.server_mac, self.client_mac
        frames = [ethernet_frame(bytes([n]) * 60, server, client) for n in range(10)]
        for index, frame in enumerate(frames):
            self.assertTrue(rings.tx_available(index))
            rings.tx_frames[index][: len(frame)] = frame
            rings.tx_commit(index, len(frame))
            self.assertEqual(rings.tx_next, index + 1)
        self.server.send(b"", socket.MSG_DONTWAIT)
        received = []
        deadline = time.monotonic() + 5
        while len(received) < 10 and time.monotonic() < deadline:
            try:
                received.append(self.client.recv(2048))
            except BlockingIOError:
                time.sleep(0.001)
        self.assertEqual(received, frames)
        deadline = time.monotonic() + 5
        while not all(rings.tx_available(i) for i in range(10)):
            self.assertLess(time.monotonic(), deadline, "TX slots never came back")
            time.sleep(0.001)

    def test_after_fanout(self) -> None:
        """
        Rings can be set up on a socket that has already joined a ``PACKET_FANOUT`` group.

        What ``--workers`` needs: the parent opens, binds and joins the
        sockets; each worker then maps its own rings.
        """
        group = 0x5A5A
        self.server.setsockopt(SOL_PACKET, PACKET_FANOUT, group | PACKET_FANOUT_HASH << 16)
        rings = self.rings(self.server)
        self.client.send(self.frame(7))
        [(frame, _)] = self.wait_rx(rings, 1)
        self.assertEqual(frame, self.frame(7))

    def test_failed_setup_rolls_back(self) -> None:
        """A refused TX ring removes the RX ring again: ``recv`` still gets the frames."""
        rx = RingGeometry.for_mtu(self.pair.mtu, 32)
        bad = RingGeometry(4096, 1, 1000, 4)  # frame size not 16-byte aligned
        exc = self.assertRaises(OSError, PacketRings.setup, self.server, rx, bad)
        self.assertEqual(exc.errno, errno.EINVAL)
        self.client.send(self.frame(1))
        deadline = time.monotonic() + 5
        while True:
            try:
                self.assertEqual(self.server.recv(2048), self.frame(1))
                break
            except BlockingIOError:
                self.assertLess(time.monotonic(), deadline, "the frame never arrived")
                time.sleep(0.001)

    def test_close(self) -> None:
        """``close`` unmaps; with a slot view still held it cannot and says so."""
        rx = RingGeometry.for_mtu(self.pair.mtu, 32)
        rings = PacketRings.setup(self.server, rx, rx)
        held = rings.view[0:16]
        self.assertFalse(rings.close())
        held.release()
        other = PacketRings.setup(self.client, rx, rx)
        self.assertTrue(other.close())

    def test_handed_over(self) -> None:
        """
        A socket whose rings a previous owner unmapped (a killed worker's)
        takes new rings, and the frames arrive in them.
        """
        first = self.rings(self.server)
        self.assertTrue(first.close())
        rings = self.rings(self.server)
        self.client.send(self.frame(3))
        [(frame, _)] = self.wait_rx(rings, 1)
        self.assertEqual(frame, self.frame(3))

    def test_still_mapped_elsewhere(self) -> None:
        """Rings still mapped by their owner cannot be replaced: ``EBUSY``."""
        self.rings(self.server)
        rx = RingGeometry.for_mtu(self.pair.mtu, 32)
        exc = self.assertRaises(OSError, PacketRings.setup, self.server, rx, rx)
        self.assertEqual(exc.errno, errno.EBUSY)
