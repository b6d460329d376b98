# -*- test-case-name: tests.test_port -*-
"""
Fakes for testing code built on ``aoe_twisted.net.port``, as ``twisted.pair.testing`` is for tuntap.

``MemoryPacketSystem`` (an ``IRingPacketSystem``, from
``aoe_twisted.net.packetsystem``) stands in for the kernel's packet sockets: give it
interfaces (optionally joined in pairs, like a veth pair), hand it to
``AoEPort(..., system=...)``, then push frames in and look at what came out.
Failures are injected the way the kernel reports them: an ``OSError`` with
the right ``errno``.  ``tests/test_port.py`` runs the same contract against
this fake and against real sockets on a veth pair, so tests built on the fake
test what the kernel does.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections import deque
from typing import Any

from attrs import define, field
from zope.interface import implementer

from aoe_twisted.core.wire import BROADCAST_MAC, ETHERTYPE
from aoe_twisted.net.netns import NETNS_RUN_DIR
from aoe_twisted.net.packetsystem import IRingPacketSystem
from aoe_twisted.net.ring import (
    SOCKADDR_LL,
    TP_STATUS_AVAILABLE,
    TP_STATUS_KERNEL,
    TP_STATUS_SEND_REQUEST,
    TP_STATUS_USER,
    TPACKET2_HDR,
    TX_DATA_AT,
    PacketRings,
    RingGeometry,
)

__all__ = [
    "RX_FRAME_AT",
    "MemoryInterface",
    "MemoryPacketSocket",
    "MemoryPacketSystem",
    "fill_rx_slot",
]

#: ``sll_hatype`` of an Ethernet interface (``ARPHRD_ETHER``).
_ARPHRD_ETHER = 1
#: Where the kernel puts a frame in an RX slot of ``TPACKET_V2`` (``tp_mac``).
RX_FRAME_AT = 66
#: Linux's default receive buffer (``net.core.rmem_default``), as ``SO_RCVBUF`` reports it.
_DEFAULT_RCVBUF = 212992


def fill_rx_slot(
    rings: PacketRings,
    offset: int,
    frame: bytes,
    pkttype: int,
    src: bytes,
    *,
    ethertype: int = ETHERTYPE,
    hatype: int = _ARPHRD_ETHER,
    length: int | None = None,
    snaplen: int | None = None,
    at: int = RX_FRAME_AT,
    received_at: int | None = None,
) -> None:
    """
    Put ``frame`` in the RX slot at ``offset`` as the kernel does, and hand the slot over.

    The ``tpacket2_hdr`` (``tp_len`` = ``length``, ``tp_snaplen`` = ``snaplen``,
    both ``len(frame)`` unless given; ``tp_mac`` = ``at``; ``tp_sec`` =
    ``received_at``, the current second unless given), the ``sockaddr_ll``
    after it, the frame's bytes (as many as fit before the mapping's end), then
    ``TP_STATUS_USER``.  Tests give lengths and offsets a kernel never would.
    """
    length = len(frame) if length is None else length
    snaplen = len(frame) if snaplen is None else snaplen
    if received_at is None:
        received_at = int(time.time())
    TPACKET2_HDR.pack_into(rings.view, offset, TP_STATUS_KERNEL, length, snaplen, at, at + 14,
                           received_at, 0, 0, 0)  # fmt: skip
    SOCKADDR_LL.pack_into(rings.view, offset + TX_DATA_AT, socket.AF_PACKET,
                          socket.htons(ethertype), 1, hatype, pkttype, len(src), src)  # fmt: skip
    room = min(snaplen, len(frame), len(rings.view) - offset - at)
    rings.view[offset + at : offset + at + room] = frame[:room]
    rings.status[offset >> 2] = TP_STATUS_USER


def _oserror(code: int) -> OSError:
    """Build the ``OSError`` the kernel would raise for ``code``."""
    return OSError(code, os.strerror(code))


@define(eq=False)
class MemoryPacketSocket:
    """
    One open packet socket of a ``MemoryPacketSystem``.

    ``inbound`` holds ``(frame, sockaddr_ll)`` pairs waiting to be read;
    ``sent`` every frame written, in order.  Put ``OSError``s in
    ``recv_errors`` or ``send_errors`` and the next ``recvfrom`` or ``send``
    raises them (one each, first in first out) instead.

    With ``rings`` (set by ``MemoryPacketSystem.map_rings``) frames arrive
    in the RX ring instead of ``inbound`` (``rx_dropped`` counts those that
    found it full), and ``flush`` takes the TX slots marked for sending
    (``flushes`` counts the calls); ``tx_stalled`` makes it take none, as a
    kernel that cannot send yet.
    """

    fd: int
    interface: MemoryInterface
    ethertype: int
    netns: str | None
    inbound: deque[tuple[bytes, tuple[Any, ...]]] = field(factory=deque)
    sent: list[bytes] = field(factory=list)
    recv_errors: deque[OSError] = field(factory=deque)
    send_errors: deque[OSError] = field(factory=deque)
    receive_buffer: int = _DEFAULT_RCVBUF
    closed: bool = False
    rings: PacketRings | None = None
    rx_dropped: int = 0
    flushes: int = 0
    tx_stalled: bool = False
    pending_error: int = 0
    _rx_next: int = 0
    _tx_next: int = 0

    def deliver(self, frame: bytes, addr: tuple[Any, ...]) -> None:
        """Queue ``frame`` for reading: in the RX ring if it has one (as the kernel does)."""
        rings = self.rings
        if rings is None:
            self.inbound.append((frame, addr))
            return
        offset = rings.rx_offsets[self._rx_next]
        if rings.status[offset >> 2] != TP_STATUS_KERNEL:
            self.rx_dropped += 1
            return
        _name, ethertype, pkttype, hatype, src = addr
        snaplen = min(len(frame), rings.rx.frame_size - RX_FRAME_AT)
        fill_rx_slot(rings, offset, frame, pkttype, src, ethertype=ethertype, hatype=hatype,
                     snaplen=snaplen)  # fmt: skip
        self._rx_next = (self._rx_next + 1) % len(rings.rx_offsets)

    def flush(self) -> list[bytes]:
        """Take every TX slot marked for sending, in ring order; return their frames."""
        rings = self.rings
        assert rings is not None
        self.flushes += 1
        frames: list[bytes] = []
        while not self.tx_stalled:
            offset = rings.tx_offsets[self._tx_next]
            if rings.status[offset >> 2] != TP_STATUS_SEND_REQUEST:
                return frames
            length = TPACKET2_HDR.unpack_from(rings.view, offset)[1]
            start = offset + TX_DATA_AT
            frames.append(bytes(rings.view[start : start + length]))
            rings.status[offset >> 2] = TP_STATUS_AVAILABLE
            self._tx_next = (self._tx_next + 1) % len(rings.tx_offsets)
        return frames


@define(eq=False)
class MemoryInterface:
    """
    An Ethernet interface of a ``MemoryPacketSystem``.

    A frame sent on it goes to its ``peer`` (if it has one), whose open
    sockets receive it marked as the kernel would mark it: ``PACKET_HOST``,
    ``PACKET_BROADCAST`` or ``PACKET_OTHERHOST``.  As on Linux, a socket bound
    to one EtherType does not see the frames its own interface sends.
    """

    name: str
    mac: bytes
    mtu: int = 1500
    netns: str | None = None
    peer: MemoryInterface | None = None
    sockets: list[MemoryPacketSocket] = field(factory=list)

    def receive(self, frame: bytes, pkttype: int | None = None) -> None:
        """
        Deliver ``frame`` (with its Ethernet header) from the wire to every open socket.

        ``pkttype`` defaults to what the destination MAC makes it.  Frames of
        another EtherType are filtered out, as the kernel filters them.
        """
        if len(frame) < 14:
            return
        if pkttype is None:
            dst = frame[:6]
            if dst == self.mac:
                pkttype = socket.PACKET_HOST
            elif dst == BROADCAST_MAC:
                pkttype = socket.PACKET_BROADCAST
            elif dst[0] & 1:
                pkttype = socket.PACKET_MULTICAST
            else:
                pkttype = socket.PACKET_OTHERHOST
        ethertype = int.from_bytes(frame[12:14], "big")
        for sock in self.sockets:
            if sock.ethertype == ethertype:
                addr = (self.name, ethertype, pkttype, _ARPHRD_ETHER, bytes(frame[6:12]))
                sock.deliver(bytes(frame), addr)

    def transmit(self, frame: bytes) -> None:
        """Put ``frame`` on the wire: its peer, if any, receives it."""
        if self.peer is not None:
            self.peer.receive(frame)


@implementer(IRingPacketSystem)
class MemoryPacketSystem:
    """
    An in-memory ``IRingPacketSystem``: interfaces, namespaces and packet sockets.

    ``privileged`` false makes ``open`` fail with ``EPERM``, as it does
    without ``CAP_NET_RAW``; an unknown interface gives ``ENODEV`` and an
    unknown namespace ``ENOENT``, just as the real system does.

    With ``rings`` on, ``map_rings`` gives sockets ``PACKET_MMAP`` rings in
    memory (a ``bytearray``), filled and emptied the way the kernel fills and
    empties them, so the port's ring walk runs in unit tests; with it off,
    ``map_rings`` returns ``None`` (no rings on offer) and the port uses
    ``recvfrom`` and ``send``.  Put an ``OSError`` in ``ring_errors`` to make the next
    ``map_rings`` fail with it.
    """

    def __init__(self, rings: bool = False) -> None:
        self.rings = rings
        self.ring_errors: deque[OSError] = deque()
        self.privileged = True
        self.namespaces: set[str] = set()
        self.interfaces: dict[tuple[str | None, str], MemoryInterface] = {}
        self.sockets: dict[int, MemoryPacketSocket] = {}
        self._next_fd = 1000
        self._next_mac = 1

    def add_interface(
        self,
        name: str,
        mac: bytes | None = None,
        mtu: int = 1500,
        netns: str | None = None,
    ) -> MemoryInterface:
        """Create interface ``name`` in namespace ``netns``, with a fresh local MAC by default."""
        if mac is None:
            mac = b"\x02\x00\x00\x00" + self._next_mac.to_bytes(2, "big")
            self._next_mac += 1
        if netns is not None:
            self.namespaces.add(netns)
        interface = MemoryInterface(name, mac, mtu, netns)
        self.interfaces[(netns, name)] = interface
        return interface

    def add_veth(
        self,
        name: str,
        peer_name: str,
        mtu: int = 1500,
        netns: str | None = None,
        peer_netns: str | None = None,
    ) -> tuple[MemoryInterface, MemoryInterface]:
        """Create two interfaces joined like a veth pair: each one's frames reach the other."""
        a = self.add_interface(name, mtu=mtu, netns=netns)
        b = self.add_interface(peer_name, mtu=mtu, netns=peer_netns)
        a.peer, b.peer = b, a
        return a, b

    def socket_for(self, port: Any) -> MemoryPacketSocket:
        """Return the socket an ``AoEPort`` using this system has open."""
        return self.sockets[port.fileno()]

    def _socket(self, fd: int) -> MemoryPacketSocket:
        try:
            sock = self.sockets[fd]
        except KeyError:
            raise _oserror(errno.EBADF) from None
        if sock.closed:
            raise _oserror(errno.EBADF)
        return sock

    def open(self, interface: str, ethertype: int, netns: str | None = None) -> int:
        """Open a socket on ``interface`` (see ``IPacketSystem.open``)."""
        if netns is not None and netns not in self.namespaces:
            path = os.path.join(NETNS_RUN_DIR, netns)
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if not self.privileged:
            raise _oserror(errno.EPERM)
        try:
            iface = self.interfaces[(netns, interface)]
        except KeyError:
            raise _oserror(errno.ENODEV) from None
        fd = self._next_fd
        self._next_fd += 1
        sock = MemoryPacketSocket(fd, iface, ethertype, netns)
        self.sockets[fd] = sock
        iface.sockets.append(sock)
        return fd

    def open_unbound(self, netns: str | None = None) -> int:
        """Not modelled: interfaces of a memory system exist from the start (``ENODEV``)."""
        raise _oserror(errno.ENODEV)

    def rebind(self, fd: int, interface: str, ethertype: int) -> None:
        """Move the socket to ``interface`` of its namespace, as ``bind`` by name does."""
        sock = self._socket(fd)
        try:
            iface = self.interfaces[(sock.netns, interface)]
        except KeyError:
            raise _oserror(errno.ENODEV) from None
        if iface is not sock.interface:
            sock.interface.sockets.remove(sock)
            iface.sockets.append(sock)
            sock.interface = iface
        sock.ethertype = ethertype

    def socket_error(self, fd: int) -> int:
        """Return and clear the socket's ``pending_error`` (0 if none)."""
        sock = self._socket(fd)
        error, sock.pending_error = sock.pending_error, 0
        return error

    def adopt(self, fd: int) -> int:
        """Take over a socket this system opened (``open``); ``EBADF`` for any other."""
        self._socket(fd)
        return fd

    def map_rings(self, fd: int, rx: RingGeometry, tx: RingGeometry) -> PacketRings | None:
        """Give the socket rings in memory, or ``None`` if ``rings`` is off."""
        sock = self._socket(fd)
        if not self.rings:
            return None
        if self.ring_errors:
            raise self.ring_errors.popleft()
        sock.rings = PacketRings(bytearray(rx.size + tx.size), rx, tx)
        while sock.inbound:
            sock.deliver(*sock.inbound.popleft())
        return sock.rings

    def flush(self, fd: int) -> int:
        """Send the socket's TX slots marked for sending (see ``send``); return 0."""
        sock = self._socket(fd)
        if sock.send_errors:
            raise sock.send_errors.popleft()
        for frame in sock.flush():
            sock.sent.append(frame)
            sock.interface.transmit(frame)
        return 0

    def hardware_address(self, fd: int) -> bytes:
        """The MAC of the socket's interface."""
        return self._socket(fd).interface.mac

    def mtu(self, fd: int, interface: str) -> int:
        """The MTU of the socket's interface."""
        return self._socket(fd).interface.mtu

    def set_receive_buffer(self, fd: int, size: int) -> int:
        """Record the size asked for, doubled as Linux reports it; never shrink."""
        sock = self._socket(fd)
        sock.receive_buffer = max(sock.receive_buffer, 2 * size)
        return sock.receive_buffer

    def recvfrom(self, fd: int, bufsize: int) -> tuple[bytes, tuple[Any, ...]]:
        """Take the next waiting frame, truncated to ``bufsize``; ``EAGAIN`` if none."""
        sock = self._socket(fd)
        if sock.recv_errors:
            raise sock.recv_errors.popleft()
        if not sock.inbound:
            raise _oserror(errno.EAGAIN)
        frame, addr = sock.inbound.popleft()
        return frame[:bufsize], addr

    def send(self, fd: int, frame: bytes) -> int:
        """Record ``frame`` and put it on the wire; ``EMSGSIZE`` if it exceeds the MTU."""
        sock = self._socket(fd)
        if sock.send_errors:
            raise sock.send_errors.popleft()
        if len(frame) > sock.interface.mtu + 14:
            raise _oserror(errno.EMSGSIZE)
        frame = bytes(frame)
        sock.sent.append(frame)
        sock.interface.transmit(frame)
        return len(frame)

    def close(self, fd: int) -> None:
        """Close the socket: it receives nothing more."""
        sock = self._socket(fd)
        sock.closed = True
        sock.interface.sockets.remove(sock)
