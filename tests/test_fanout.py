"""
Tests for ``aoe_twisted.net.fanout``: the program that spreads frames over workers.

The end-to-end cases join real packet sockets in a namespace of their own to
a group and send frames over a veth pair; they check that the kernel
delivers each frame to exactly one socket, the one ``fanout_index`` names.
"""

from __future__ import annotations

import select
import socket

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from aoe_twisted.core.wire import BROADCAST_MAC, ETHERTYPE
from aoe_twisted.net.fanout import FanoutError, fanout_index, fanout_program, join_fanout
from aoe_twisted.net.packetsystem import open_packet_socket
from aoe_twisted.net.ring import PACKET_FANOUT, PACKET_FANOUT_HASH, SOL_PACKET
from aoe_twisted.testing import INITIATOR_MAC, config_request, ethernet_frame
from tests.netns import VethPair

_MACS = st.binary(min_size=6, max_size=6).map(lambda b: bytes([b[0] & 0xFE]) + b[1:])


class IndexTests(SynchronousTestCase):
    """``fanout_index`` and the program it mirrors."""

    def test_program_length(self) -> None:
        """The program is whole 8-byte instructions and ends by returning A."""
        program = fanout_program()
        self.assertEqual(len(program) % 8, 0)
        self.assertEqual(program[-8:-6], b"\x16\x00")

    @given(_MACS, st.integers(0, 0xFFFE), st.integers(0, 0xFE), st.integers(1, 16))
    def test_in_range(self, src: bytes, shelf: int, slot: int, sockets: int) -> None:
        """Every frame maps to one of the sockets."""
        self.assertIn(fanout_index(src, shelf, slot, sockets), range(sockets))

    def test_spreads_initiators(self) -> None:
        """Initiators whose MACs differ in the last byte spread over two workers evenly."""
        counts = [0, 0]
        for last in range(256):
            counts[fanout_index(bytes([2, 0, 0, 0, 0, last]), 1, 1, 2)] += 1
        self.assertTrue(96 <= counts[0] <= 160, counts)

    def test_spreads_targets(self) -> None:
        """One initiator's frames for different slots spread over the workers too."""
        workers = {fanout_index(INITIATOR_MAC, 1, slot, 4) for slot in range(32)}
        self.assertEqual(workers, {0, 1, 2, 3})


class KernelTests(SynchronousTestCase):
    """The program as the kernel runs it, on sockets joined over a real veth pair."""

    def setUp(self) -> None:
        self.pair = VethPair.create(self)
        self.sockets: list[socket.socket] = []

    def _socket(self) -> socket.socket:
        sock = open_packet_socket(self.pair.server_if, ETHERTYPE, self.pair.server_ns)
        self.addCleanup(sock.close)
        return sock

    def _sender(self) -> socket.socket:
        sock = open_packet_socket(self.pair.client_if, ETHERTYPE, self.pair.client_ns)
        self.addCleanup(sock.close)
        return sock

    def _received(self, sock: socket.socket) -> list[bytes]:
        frames = []
        while True:
            ready, _, _ = select.select([sock], [], [], 0.3)
            if not ready:
                return frames
            frames.append(sock.recv(2048))

    def test_each_frame_once_where_the_hash_says(self) -> None:
        """Frames from 32 initiators to 3 targets each reach exactly the socket the hash names."""
        group_sockets = [self._socket() for _ in range(3)]
        group = join_fanout(group_sockets[0])
        for sock in group_sockets[1:]:
            self.assertEqual(join_fanout(sock, group), group)
        sender = self._sender()
        expected: list[set[int]] = [set(), set(), set()]
        tag = 0
        for n in range(32):
            src = bytes([2, 0x10, 0x20, 0x30, n * 7 % 256, n])
            for shelf, slot in ((0, 1), (7, 3), (65000, 200)):
                tag += 1
                query = config_request(shelf=shelf, slot=slot, tag=tag)
                sender.send(ethernet_frame(query, src, BROADCAST_MAC, pad=True))
                expected[fanout_index(src, shelf, slot, 3)].add(tag)
        received = [
            {int.from_bytes(f[20:24], "big") for f in self._received(sock)}
            for sock in group_sockets
        ]
        self.assertEqual(received, expected)
        self.assertTrue(all(expected), "the test must exercise every socket")

    def test_queued_before_joining_discarded(self) -> None:
        """A frame that arrived before the socket joined is not delivered to it later."""
        first = self._socket()
        second = self._socket()
        sender = self._sender()
        query = config_request(shelf=1, slot=1, tag=99)
        sender.send(ethernet_frame(query, INITIATOR_MAC, BROADCAST_MAC, pad=True))
        select.select([second], [], [], 1.0)
        group = join_fanout(first)
        join_fanout(second, group)
        self.assertEqual(self._received(first) + self._received(second), [])

    def test_incompatible_group(self) -> None:
        """Joining a group of another kind gives a one-line FanoutError."""
        other = self._socket()
        other.setsockopt(SOL_PACKET, PACKET_FANOUT, PACKET_FANOUT_HASH << 16 | 4242)
        sock = self._socket()
        with self.assertRaises(FanoutError) as caught:
            join_fanout(sock, 4242)
        self.assertIn("cannot join a PACKET_FANOUT group", str(caught.exception))
        self.assertNotIn("\n", str(caught.exception))
