"""
Tests for ``aoe_twisted.net.bpf``: the kernel filter that keeps other servers' frames away.

The programs are run by a small classic-BPF interpreter written here (the
few opcodes ``address_filter`` emits, with the kernel's rules for loads
past the end of a frame and the checks ``bpf_check_classic`` makes before
it accepts a program) and compared with a plain predicate over random
address sets and frames.  Then the kernel runs them: packet sockets in a
namespace of the test's own, frames sent over a veth pair (root only).
Last, ``AoEPort.filter_addresses``: when it attaches, detaches and re-attaches.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import select
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.protocol import AbstractDatagramProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from aoe_twisted.core.wire import BROADCAST_MAC, ETHERTYPE
from aoe_twisted.net.bpf import (
    MAX_INSTRUCTIONS,
    SNAP_LENGTH,
    Instruction,
    ISocketFilterSystem,
    address_filter,
    attach_filter,
    catch_all_filter,
    detach_filter,
    encode,
    is_catch_all,
)
from aoe_twisted.net.fanout import fanout_index, join_fanout
from aoe_twisted.net.packetsystem import RealPacketSystem, open_packet_socket
from aoe_twisted.net.port import AoEPort
from aoe_twisted.testing import INITIATOR_MAC, TARGET_MAC, MemoryPacketSystem, config_request
from aoe_twisted.testing import ethernet_frame as _ethernet_frame
from tests.netns import VethPair, run

#: Any set of this many addresses (or fewer) gets an exact program, whatever its shape.
ALWAYS_FITS = 1300
#: ``SO_GET_FILTER`` (``SO_ATTACH_FILTER``'s number, read with ``getsockopt``).
_SO_GET_FILTER = 26
_ETH_P_ALL = 3

# -- a classic BPF interpreter for the opcodes address_filter emits --------------

_LD_H_ABS, _LD_B_ABS, _JEQ_K, _JA, _RET_K, _TAX, _TXA = 0x28, 0x30, 0x15, 0x05, 0x06, 0x07, 0x87
_JUMPS = {_JEQ_K}
_KNOWN = {_LD_H_ABS, _LD_B_ABS, _JEQ_K, _JA, _RET_K, _TAX, _TXA}


class Rejected(Exception):
    """The kernel would refuse this program (``EINVAL``)."""


def check(program: Sequence[Instruction]) -> None:
    """Make the checks ``bpf_check_classic`` makes, for the opcodes used here."""
    flen = len(program)
    if not 0 < flen <= MAX_INSTRUCTIONS:
        raise Rejected(f"{flen} instructions")
    for pc, (code, jt, jf, k) in enumerate(program):
        if code not in _KNOWN:
            raise Rejected(f"opcode {code:#x} at {pc}")
        if not (0 <= jt <= 255 and 0 <= jf <= 255 and 0 <= k < 2**32):
            raise Rejected(f"field out of range at {pc}: {(code, jt, jf, k)}")
        if code == _JA and k >= flen - pc - 1:
            raise Rejected(f"ja out of range at {pc}")
        if code in _JUMPS and (pc + jt + 1 >= flen or pc + jf + 1 >= flen):
            raise Rejected(f"jump out of range at {pc}")
    if program[-1][0] != _RET_K:
        raise Rejected("does not end with ret")


def execute(program: Sequence[Instruction], frame: bytes) -> int:
    """Run ``program`` on ``frame`` as the kernel does; return what it returns."""
    a = x = pc = 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code == _LD_H_ABS:
            if k + 2 > len(frame):
                return 0  # a load past the end ends the program with 0
            a = int.from_bytes(frame[k : k + 2], "big")
        elif code == _LD_B_ABS:
            if k + 1 > len(frame):
                return 0
            a = frame[k]
        elif code == _JEQ_K:
            pc += jt if a == k else jf
        elif code == _JA:
            pc += k
        elif code == _RET_K:
            return k
        elif code == _TAX:
            x = a
        elif code == _TXA:
            a = x
        else:
            raise Rejected(f"opcode {code:#x}")


def wanted(addresses: Iterable[tuple[int, int]], frame: bytes) -> bool:
    """The reference: whether a frame should wake a server of ``addresses``."""
    if len(frame) < 19 or frame[12:14] != ETHERTYPE.to_bytes(2, "big"):
        return False
    major, minor = int.from_bytes(frame[16:18], "big"), frame[18]
    return major == 0xFFFF or minor == 0xFF or (major, minor) in set(addresses)


def is_aoe(frame: bytes) -> bool:
    """What the catch-all program accepts: any frame of EtherType 0x88A2."""
    return frame[12:14] == ETHERTYPE.to_bytes(2, "big")


def aoe_frame(major: int, minor: int, ethertype: int = ETHERTYPE, tag: int = 0) -> bytes:
    """A padded config query to ``major.minor`` (as a frame, ``ethertype`` in its header)."""
    return _ethernet_frame(
        config_request(shelf=major, slot=minor, tag=tag), INITIATOR_MAC, TARGET_MAC, ethertype,
        pad=True,
    )


# -- strategies -------------------------------------------------------------


@st.composite
def address_sets(draw: Any, max_count: int = 2000) -> frozenset[tuple[int, int]]:
    """1..``max_count`` addresses, on anything from one shelf to as many shelves as addresses."""
    count = draw(st.integers(1, max_count))
    shelves = draw(st.integers(1, count))
    rng = draw(st.randoms(use_true_random=False))
    pool = rng.sample(range(0xFFFF), shelves)
    bulk = {(rng.choice(pool), rng.randrange(0xFF)) for _ in range(count)}
    # A few drawn directly (broadcast values among them), so failures shrink to them.
    few = draw(st.sets(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFF)), max_size=4))
    return frozenset(bulk | few)


def frames(served: Sequence[tuple[int, int]]) -> st.SearchStrategy[bytes]:
    """Frames near ``served``: theirs, their shelves' other slots, broadcast, short, not AoE."""
    majors = sorted({major for major, _ in served})
    minors = sorted({minor for _, minor in served})
    address = st.one_of(
        st.sampled_from(served),
        st.tuples(st.sampled_from(majors), st.integers(0, 0xFF)),
        st.tuples(st.integers(0, 0xFFFF), st.sampled_from(minors)),
        st.tuples(st.just(0xFFFF), st.integers(0, 0xFF)),
        st.tuples(st.integers(0, 0xFFFF), st.just(0xFF)),
        st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFF)),
    )
    ethertype = st.one_of(
        st.just(ETHERTYPE), st.sampled_from([0x0800, 0x86DD, 0x8100, 0x88A3, 0xA288]),
        st.integers(0, 0xFFFF),
    )
    length = st.one_of(st.just(60), st.integers(0, 24))
    built = st.builds(
        lambda a, e, n: aoe_frame(a[0], a[1], e)[:n], address, ethertype, length
    )
    return st.one_of(built, st.binary(max_size=40))


# -- the program --------------------------------------------------------------


class AddressFilterTests(SynchronousTestCase):
    """``address_filter`` against the reference, and the limits it keeps."""

    def assert_agrees(self, addresses: Iterable[tuple[int, int]], frame: bytes) -> None:
        """The program for ``addresses`` accepts ``frame`` exactly when the reference does."""
        addresses = set(addresses)
        program = address_filter(addresses)
        self.assertEqual(execute(program, frame) != 0, wanted(addresses, frame), frame.hex())

    @settings(max_examples=150, deadline=None)
    @given(address_sets(), st.data())
    def test_matches_reference(self, addresses: frozenset[tuple[int, int]], data: Any) -> None:
        """
        For any set of 1..2000 addresses the kernel accepts the program, and it
        accepts exactly the frames the reference does (every AoE frame, if the
        set does not fit: only for sets larger than any that always fit).
        """
        program = address_filter(addresses)
        check(program)
        catch_all = is_catch_all(program)
        if catch_all:
            self.assertGreater(len(addresses), ALWAYS_FITS)
        served = sorted(addresses)
        for frame in data.draw(st.lists(frames(served), min_size=30, max_size=30)):
            verdict = execute(program, frame)
            self.assertIn(verdict, (0, SNAP_LENGTH))
            expected = is_aoe(frame) if catch_all else wanted(addresses, frame)
            self.assertEqual(verdict != 0, expected, frame.hex())

    def test_every_address_near_a_small_set(self) -> None:
        """Every shelf.slot on the shelves around a small set, and broadcast: as the reference."""
        addresses = {(0, 0), (0, 1), (1, 7), (300, 3), (300, 254), (0xFFFE, 0xFE)}
        program = address_filter(addresses)
        check(program)
        for major in (0, 1, 2, 299, 300, 301, 0xFFFE, 0xFFFF):
            for minor in range(256):
                frame = aoe_frame(major, minor)
                self.assertEqual(execute(program, frame) != 0, wanted(addresses, frame),
                                 (major, minor))  # fmt: skip

    def test_empty(self) -> None:
        """No address: broadcast only."""
        program = address_filter([])
        check(program)
        self.assertTrue(execute(program, aoe_frame(0xFFFF, 0xFF)))
        self.assertTrue(execute(program, aoe_frame(4, 0xFF)))
        self.assertTrue(execute(program, aoe_frame(0xFFFF, 4)))
        self.assertFalse(execute(program, aoe_frame(4, 4)))

    def test_broadcast_values_as_addresses(self) -> None:
        """A broadcast value among the addresses is no error and adds nothing."""
        self.assertEqual(address_filter([(0xFFFF, 1), (2, 0xFF)]), address_filter([]))

    def test_order_does_not_matter(self) -> None:
        """The program depends on the set only: the same in any order, with repeats."""
        addresses = [(5, 1), (1, 2), (5, 0), (1, 2)]
        self.assertEqual(address_filter(addresses), address_filter(sorted(set(addresses))))

    def test_bad_address(self) -> None:
        """A major or minor out of range is a ValueError naming it."""
        for bad in ((0x10000, 0), (-1, 0), (0, 0x100), (0, -1)):
            with self.assertRaises(ValueError) as caught:
                address_filter([bad])
            self.assertIn(f"{bad[0]}.{bad[1]}", str(caught.exception))

    def test_short_and_foreign_frames(self) -> None:
        """Frames too short to hold the address, and other EtherTypes, are dropped."""
        program = address_filter([(1, 0)])
        frame = aoe_frame(1, 0)
        self.assertTrue(execute(program, frame))
        for length in range(19):
            self.assertFalse(execute(program, frame[:length]), length)
        self.assertTrue(execute(program, frame[:19]))
        self.assertFalse(execute(program, aoe_frame(1, 0, ethertype=0x0800)))
        self.assertFalse(execute(program, aoe_frame(0xFFFF, 0xFF, ethertype=0x0800)))

    def test_response_flag_ignored(self) -> None:
        """Another server's reply for one of our addresses passes (duplicate detection)."""
        program = address_filter([(1, 0)])
        reply = bytearray(aoe_frame(1, 0))
        reply[14] |= 0x08
        self.assertTrue(execute(program, bytes(reply)))

    def test_one_shelf_full(self) -> None:
        """
        A shelf with all 255 slots: its block is longer than a jump reaches,
        so it is skipped with a long jump; every address is still right.
        """
        addresses = {(7, minor) for minor in range(255)} | {(9, 3)}
        program = address_filter(addresses)
        check(program)
        self.assertIn(_JA, [code for code, _, _, k in program if k > 255])
        for major in (6, 7, 8, 9):
            for minor in range(256):
                frame = aoe_frame(major, minor)
                self.assertEqual(execute(program, frame) != 0, wanted(addresses, frame))

    def test_always_fits(self) -> None:
        """The worst shape (each address on a shelf of its own) fits up to ``ALWAYS_FITS``."""
        rng = random.Random(1)
        addresses = {(shelf, rng.randrange(255)) for shelf in rng.sample(range(0xFFFF),
                                                                         ALWAYS_FITS)}  # fmt: skip
        program = address_filter(addresses)
        check(program)
        self.assertFalse(is_catch_all(program))
        for major, minor in rng.sample(sorted(addresses), 50):
            self.assertTrue(execute(program, aoe_frame(major, minor)))
            self.assertFalse(execute(program, aoe_frame(major, (minor + 1) % 255)))

    def test_many_slots_fit(self) -> None:
        """Addresses sharing shelves fit by the thousand (15 full shelves and more)."""
        addresses = {(n // 255, n % 255) for n in range(3900)}
        program = address_filter(addresses)
        check(program)
        self.assertFalse(is_catch_all(program))
        self.assertLessEqual(len(program), MAX_INSTRUCTIONS)
        self.assertTrue(execute(program, aoe_frame(15, 74)))
        self.assertFalse(execute(program, aoe_frame(15, 75)))

    def test_too_many(self) -> None:
        """A set that cannot fit gets the catch-all program: every AoE frame, nothing else."""
        program = address_filter((n // 255, n % 255) for n in range(16 * 255))
        self.assertTrue(is_catch_all(program))
        self.assertEqual(program, catch_all_filter())
        check(program)
        self.assertTrue(execute(program, aoe_frame(100, 100)))
        self.assertFalse(execute(program, aoe_frame(100, 100, ethertype=0x0800)))
        self.assertFalse(is_catch_all(address_filter([(1, 1)])))

    def test_encode(self) -> None:
        """``encode`` lays instructions out as ``struct sock_filter``: u16, u8, u8, u32."""
        program = [(0x15, 1, 2, 0x88A2), (0x06, 0, 0, SNAP_LENGTH)]
        self.assertEqual(
            encode(program),
            (0x15).to_bytes(2, "little") + bytes([1, 2]) + (0x88A2).to_bytes(4, "little")
            + (0x06).to_bytes(2, "little") + bytes(2) + SNAP_LENGTH.to_bytes(4, "little"),
        )  # fmt: skip


# -- the kernel ---------------------------------------------------------------


_libc = ctypes.CDLL(None, use_errno=True)


def filter_length(fd: int) -> int:
    """How many instructions the socket's filter has (0: none), as ``SO_GET_FILTER`` says."""
    # Asked with a zero length, the kernel answers with the count (in the
    # length); Python's getsockopt will not pass a zero length, hence libc.
    length = ctypes.c_uint(0)
    if _libc.getsockopt(fd, socket.SOL_SOCKET, _SO_GET_FILTER, None, ctypes.byref(length)):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return length.value


class KernelFilterTests(SynchronousTestCase):
    """The programs as the kernel runs them, on packet sockets over a real veth pair."""

    def setUp(self) -> None:
        self.pair = VethPair.create(self)
        self.sender = self.socket(self.pair.client_if, self.pair.client_ns)
        self.tags = iter(range(1, 1 << 30))

    def socket(self, interface: str, netns: str, ethertype: int = ETHERTYPE) -> socket.socket:
        sock = open_packet_socket(interface, ethertype, netns)
        self.addCleanup(sock.close)
        return sock

    def server(self, ethertype: int = ETHERTYPE) -> socket.socket:
        return self.socket(self.pair.server_if, self.pair.server_ns, ethertype)

    def send(self, major: int, minor: int, ethertype: int = ETHERTYPE,
             src: bytes = INITIATOR_MAC, dst: bytes = BROADCAST_MAC) -> int:  # fmt: skip
        """Send a config query to ``major.minor``; return its tag."""
        tag = next(self.tags)
        frame = _ethernet_frame(config_request(shelf=major, slot=minor, tag=tag), src, dst,
                                ethertype, pad=True)  # fmt: skip
        self.sender.send(frame)
        return tag

    def received(self, sock: socket.socket) -> set[int]:
        """The tags of the AoE-shaped frames ``sock`` gets within 0.3 s of quiet."""
        tags = set()
        while True:
            ready, _, _ = select.select([sock], [], [], 0.3)
            if not ready:
                return tags
            frame = sock.recv(2048)
            tags.add(int.from_bytes(frame[20:24], "big"))

    def test_filters(self) -> None:
        """
        With the filter for e1.0 a socket gets e1.0's frames and broadcasts,
        not e2.0's nor (on a socket bound to every EtherType) other EtherTypes.
        """
        aoe = self.server()
        every = self.server(_ETH_P_ALL)
        for sock in (aoe, every):
            attach_filter(sock.fileno(), address_filter([(1, 0)]))
            self.assertEqual(filter_length(sock.fileno()), len(address_filter([(1, 0)])))
        mine = {self.send(1, 0), self.send(0xFFFF, 0xFF), self.send(1, 0xFF),
                self.send(0xFFFF, 0)}  # fmt: skip
        self.send(2, 0)
        self.send(2, 1)
        self.send(1, 0, ethertype=0x88B5)
        self.assertEqual(self.received(aoe), mine)
        self.assertEqual(self.received(every), mine)

    def test_detach_restores(self) -> None:
        """``detach_filter`` removes it: frames for others arrive again; twice is harmless."""
        sock = self.server()
        attach_filter(sock.fileno(), address_filter([(1, 0)]))
        self.send(2, 0)
        self.assertEqual(self.received(sock), set())
        detach_filter(sock.fileno())
        self.assertEqual(filter_length(sock.fileno()), 0)
        detach_filter(sock.fileno())
        tag = self.send(2, 0)
        self.assertEqual(self.received(sock), {tag})

    def test_replace(self) -> None:
        """Attaching again replaces the program."""
        sock = self.server()
        attach_filter(sock.fileno(), address_filter([(1, 0)]))
        attach_filter(sock.fileno(), address_filter([(2, 0)]))
        self.send(1, 0)
        tag = self.send(2, 0)
        self.assertEqual(self.received(sock), {tag})

    def test_largest_programs(self) -> None:
        """
        The longest programs (a long jump over a full shelf; thousands of
        shelves with many stations) pass the kernel's checks and filter right.
        """
        sock = self.server()
        slots = {(n // 255, n % 255) for n in range(3900)}
        shelves = {(shelf, shelf % 255) for shelf in range(ALWAYS_FITS)}
        for addresses, last, absent in ((slots, (15, 74), (15, 75)),
                                        (shelves, (ALWAYS_FITS - 1, (ALWAYS_FITS - 1) % 255),
                                         (ALWAYS_FITS, ALWAYS_FITS % 255))):  # fmt: skip
            program = address_filter(addresses)
            self.assertFalse(is_catch_all(program))
            try:
                attach_filter(sock.fileno(), program)
            except OSError as e:
                if e.errno == errno.ENOMEM:
                    self.skipTest(f"net.core.optmem_max is too small for {len(program)} "
                                  "instructions here")  # fmt: skip
                raise
            self.assertEqual(filter_length(sock.fileno()), len(program))
            wanted_tags = {self.send(*last), self.send(0, 0)}
            self.send(*absent)
            self.assertEqual(self.received(sock), wanted_tags)

    def test_fanout_group(self) -> None:
        """
        On a ``PACKET_FANOUT`` group whose sockets all carry the filter, each
        frame for a served address reaches the socket the hash names, and
        frames for others reach none: the group's program chooses first.
        """
        group_sockets = [self.server() for _ in range(2)]
        group = join_fanout(group_sockets[0])
        join_fanout(group_sockets[1], group)
        for sock in group_sockets:
            attach_filter(sock.fileno(), address_filter([(1, 0)]))
        expected: list[set[int]] = [set(), set()]
        for n in range(24):
            src = bytes([2, 0, 0, 0, 7, n])
            expected[fanout_index(src, 1, 0, 2)].add(self.send(1, 0, src=src))
            self.send(2, 0, src=src)
        self.assertTrue(all(expected), "the test must exercise both sockets")
        self.assertEqual([self.received(sock) for sock in group_sockets], expected)

    def test_vlan(self) -> None:
        """On a VLAN device the tag is gone before the filter looks: offsets still hold."""
        for ns, interface in self.pair.ends():
            try:
                run("ip", "-n", ns, "link", "add", "link", interface, "name", "vl5",
                    "type", "vlan", "id", "5")  # fmt: skip
            except RuntimeError as e:
                self.skipTest(f"no VLAN devices here: {e}")
            run("ip", "-n", ns, "link", "set", "vl5", "up")
        sock = self.socket("vl5", self.pair.server_ns)
        attach_filter(sock.fileno(), address_filter([(1, 0)]))
        self.sender = self.socket("vl5", self.pair.client_ns)
        deadline = time.monotonic() + 5
        tag = self.send(1, 0)
        while not self.received(sock) and time.monotonic() < deadline:
            tag = self.send(1, 0)  # the VLAN device may take a moment to pass frames
        self.send(2, 0)
        tag = self.send(1, 0)
        self.assertEqual(self.received(sock), {tag})


# -- the port -----------------------------------------------------------------


class _Protocol(AbstractDatagramProtocol):
    """Remember the tags of the frames received."""

    noisy = False

    def __init__(self) -> None:
        self.tags: list[int] = []

    def datagramReceived(self, datagram: bytes, addr: Any = None) -> None:
        self.tags.append(int.from_bytes(datagram[20:24], "big"))


@implementer(ISocketFilterSystem)
class _FilteringSystem(MemoryPacketSystem):
    """A memory system whose sockets take filters: it records what it is asked."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int, Any]] = []
        self.errors: deque[OSError] = deque()

    def attach_filter(self, fd: int, program: Sequence[Instruction]) -> None:
        self.calls.append(("attach", fd, list(program)))
        if self.errors:
            raise self.errors.popleft()

    def detach_filter(self, fd: int) -> None:
        self.calls.append(("detach", fd, None))


class PortFilterTests(SynchronousTestCase):
    """``AoEPort.filter_addresses``: what reaches the system, and when."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.system = _FilteringSystem()
        self.system.add_interface("eth0", mac=TARGET_MAC)

    def port(self, **kwargs: Any) -> AoEPort:
        return AoEPort("eth0", _Protocol(), reactor=self.reactor, system=self.system, **kwargs)

    def test_real_system_adapts(self) -> None:
        """The real system has kernel filters (an adapter); the memory fake has none."""
        self.assertTrue(verifyObject(ISocketFilterSystem, ISocketFilterSystem(RealPacketSystem())))
        self.assertIsNone(ISocketFilterSystem(MemoryPacketSystem(), None))
        self.assertTrue(verifyObject(ISocketFilterSystem, self.system))

    def test_attach_now(self) -> None:
        """On an open port the filter is attached at once, and remembered."""
        port = self.port()
        port.startListening()
        port.filter_addresses([(1, 0), (1, 1)])
        self.assertEqual(self.system.calls,
                         [("attach", port.fileno(), address_filter([(1, 0), (1, 1)]))])  # fmt: skip
        self.assertEqual(port.filtered_addresses, {(1, 0), (1, 1)})

    def test_attach_when_opened(self) -> None:
        """Addresses given before the socket is open are attached when it opens."""
        port = self.port()
        port.filter_addresses([(3, 4)])
        self.assertEqual(self.system.calls, [])
        port.startListening()
        self.assertEqual(self.system.calls, [("attach", port.fileno(), address_filter([(3, 4)]))])

    def test_detach(self) -> None:
        """``None`` detaches an attached filter; with none attached it asks nothing."""
        port = self.port()
        port.startListening()
        port.filter_addresses(None)
        self.assertEqual(self.system.calls, [])
        port.filter_addresses([(1, 0)])
        port.filter_addresses(None)
        self.assertEqual([call[0] for call in self.system.calls], ["attach", "detach"])
        self.assertIsNone(port.filtered_addresses)

    def test_rebind(self) -> None:
        """Bound again, the socket gets the filter again; without one, nothing is asked."""
        port = self.port()
        port.startListening()
        self.assertTrue(port.rebind())
        self.assertEqual(self.system.calls, [])
        port.filter_addresses([(1, 0)])
        self.assertTrue(port.rebind())
        attach = ("attach", port.fileno(), address_filter([(1, 0)]))
        self.assertEqual(self.system.calls, [attach, attach])

    def test_adopted_socket(self) -> None:
        """On an adopted socket (a worker's) nothing is attached: the parent owns the filter."""
        fd = self.system.open("eth0", ETHERTYPE)
        port = self.port(socket_fd=fd)
        port.startListening()
        port.filter_addresses([(1, 0)])
        port.rebind()
        self.assertEqual(self.system.calls, [])
        self.assertEqual(port.filtered_addresses, {(1, 0)})

    def test_refused(self) -> None:
        """
        A filter the kernel refuses is a warning; the old filter is removed (it
        could drop the new targets' frames) and the port serves on.
        """
        port = self.port()
        port.startListening()
        port.filter_addresses([(1, 0)])
        self.system.errors.append(OSError(errno.ENOMEM, "Cannot allocate memory"))
        with capturedLogs() as events:
            port.filter_addresses([(1, 0), (2, 0)])
        self.assertEqual([call[0] for call in self.system.calls], ["attach", "attach", "detach"])
        self.assertTrue(any("Cannot allocate memory" in str(e.get("error")) for e in events))
        self.assertTrue(port.connected)

    def test_too_many_warned(self) -> None:
        """A set too big for a program is attached as the catch-all, with a warning."""
        port = self.port()
        port.startListening()
        with capturedLogs() as events:
            port.filter_addresses((n // 255, n % 255) for n in range(16 * 255))
        self.assertEqual(self.system.calls, [("attach", port.fileno(), catch_all_filter())])
        self.assertEqual([e.get("count") for e in events if "count" in e], [16 * 255])

    def test_memory_system(self) -> None:
        """On the memory fake (no kernel filters) addresses are remembered, nothing fails."""
        system = MemoryPacketSystem()
        system.add_interface("eth0", mac=TARGET_MAC)
        port = AoEPort("eth0", _Protocol(), reactor=self.reactor, system=system)
        port.startListening()
        port.filter_addresses([(1, 0)])
        port.filter_addresses(None)
        self.assertIsNone(port.filtered_addresses)


class RealPortFilterTests(SynchronousTestCase):
    """``filter_addresses`` on a real port, with rings, over a veth pair (root only)."""

    def setUp(self) -> None:
        self.pair = VethPair.create(self)
        self.reactor = MemoryReactorClock()
        self.sender = open_packet_socket(self.pair.client_if, ETHERTYPE, self.pair.client_ns)
        self.addCleanup(self.sender.close)
        self.tags = iter(range(1, 1 << 30))

    def send(self, major: int, minor: int) -> int:
        tag = next(self.tags)
        self.sender.send(_ethernet_frame(config_request(shelf=major, slot=minor, tag=tag),
                                         INITIATOR_MAC, BROADCAST_MAC, pad=True))  # fmt: skip
        return tag

    def drain(self, port: AoEPort, until: Callable[[], bool]) -> None:
        """Read from ``port`` until ``until()`` or 1 s, and 0.2 s more for stragglers."""
        deadline = time.monotonic() + 1
        while not until() and time.monotonic() < deadline:
            select.select([port.fileno()], [], [], 0.05)
            port.doRead()
        time.sleep(0.2)
        port.doRead()

    def test_port(self) -> None:
        """A port (with rings) given e1.0 passes on e1.0 and broadcasts only; None undoes it."""
        protocol = _Protocol()
        port = AoEPort(self.pair.server_if, protocol, reactor=self.reactor,
                       netns=self.pair.server_ns)  # fmt: skip
        port.startListening()
        self.addCleanup(port.connectionLost, None)
        self.assertGreater(port.ring_size, 0)
        port.filter_addresses([(1, 0)])
        self.assertEqual(filter_length(port.fileno()), len(address_filter([(1, 0)])))
        mine = [self.send(1, 0), self.send(0xFFFF, 0xFF)]
        self.send(2, 0)
        self.drain(port, lambda: len(protocol.tags) >= 2)
        self.assertEqual(protocol.tags, mine)
        self.assertEqual(port.frames_ignored, 0)
        port.filter_addresses(None)
        self.assertEqual(filter_length(port.fileno()), 0)
        other = self.send(2, 0)
        self.drain(port, lambda: len(protocol.tags) >= 3)
        self.assertEqual(protocol.tags, [*mine, other])

    def test_waiting_for_interface(self) -> None:
        """
        A port waiting for its interface carries the filter on its unbound
        socket, and still after ``rebind`` binds it to the interface.
        """
        protocol = _Protocol()
        port = AoEPort("aoesrv1", protocol, reactor=self.reactor, netns=self.pair.server_ns,
                       wait_for_interface=True)  # fmt: skip
        port.filter_addresses([(1, 0)])
        port.startListening()
        self.addCleanup(port.connectionLost, None)
        self.assertFalse(port.bound)
        self.assertEqual(filter_length(port.fileno()), len(address_filter([(1, 0)])))
        run("ip", "-n", self.pair.client_ns, "link", "add", "aoecli1", "type", "veth",
            "peer", "name", "aoesrv1", "netns", self.pair.server_ns)  # fmt: skip
        run("ip", "-n", self.pair.client_ns, "link", "set", "aoecli1", "up")
        run("ip", "-n", self.pair.server_ns, "link", "set", "aoesrv1", "up")
        self.assertTrue(port.rebind())
        self.assertEqual(filter_length(port.fileno()), len(address_filter([(1, 0)])))
        self.sender.close()
        self.sender = open_packet_socket("aoecli1", ETHERTYPE, self.pair.client_ns)
        self.addCleanup(self.sender.close)
        deadline = time.monotonic() + 5
        while not protocol.tags and time.monotonic() < deadline:
            self.send(2, 0)
            self.send(1, 0)  # until the new pair passes frames
            self.drain(port, lambda: bool(protocol.tags))
        del protocol.tags[:]
        self.send(2, 0)
        tag = self.send(1, 0)
        self.drain(port, lambda: bool(protocol.tags))
        self.assertEqual(protocol.tags, [tag])
