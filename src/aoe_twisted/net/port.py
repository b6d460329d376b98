# -*- test-case-name: tests.test_port -*-
"""
The raw Ethernet port: AoE frames in and out of one interface.

``AoEPort`` is written the way Twisted writes ``twisted.pair.tuntap.TuntapPort``:
a ``FileDescriptor`` the reactor polls, an injectable ``system`` that stands
for the operating system (an ``IPacketSystem`` from
``aoe_twisted.net.packetsystem``: ``RealPacketSystem`` by default,
``MemoryPacketSystem`` from ``aoe_twisted.testing`` in unit tests),
``startListening`` / ``stopListening`` and a datagram protocol it feeds one
whole frame at a time.

The socket is a Linux ``AF_PACKET``/``SOCK_RAW`` socket bound to one
interface and to EtherType 0x88A2, so the kernel filters out everything that
is not AoE.  Frames come with their Ethernet header and leave with it.

Where the system offers them (it provides ``IRingPacketSystem``; the real
one does), the port maps ``PACKET_MMAP`` rings (``aoe_twisted.net.ring``) on
the socket: frames are read in place from the RX ring with no system call
each, and frames written go into the TX ring and leave by one ``send`` per
batch.  A protocol providing ``IZeroCopyFrameSink`` is even given the frame
and a TX slot as ``memoryview``s to answer into (``AoEProtocol`` does, for
plain reads and writes); others get ``datagramReceived`` with a copy.  If the
kernel refuses the rings, the port says so once and uses ``recvfrom`` and
``send``.  A protocol providing ``IFrameSink`` is told where each burst of
frames ends (``drainFinished``).

``filter_addresses`` gives the socket a kernel filter (``aoe_twisted.net.bpf``)
so that it wakes only for frames addressed to the targets served, or
broadcast, when another server (or another server's initiators) shares
the interface.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any

from attrs import frozen
from twisted.internet import abstract, defer, error, interfaces, task
from twisted.internet.protocol import AbstractDatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.reflect import fullyQualifiedName
from zope.interface import Interface, implementer

from aoe_twisted import lane as _lane
from aoe_twisted.core.wire import ETHERTYPE, MIN_FRAME_SIZE, format_mac
from aoe_twisted.net.bpf import (
    MAX_INSTRUCTIONS,
    Instruction,
    ISocketFilterSystem,
    address_filter,
    is_catch_all,
)
from aoe_twisted.net.packetsystem import (
    MAX_RECEIVE_BUFFER,
    CannotOpenInterface,
    IPacketSystem,
    IRingPacketSystem,
    RealPacketSystem,
)
from aoe_twisted.net.ring import (
    MIN_RING_FRAMES,
    RX_PKTTYPE_AT,
    RX_SLOT_STAMPED,
    SOCKADDR_LL,
    STALE_AFTER,
    TP_STATUS_AVAILABLE,
    TP_STATUS_KERNEL,
    TP_STATUS_SEND_REQUEST,
    TP_STATUS_USER,
    TX_DATA_AT,
    TX_LEN,
    PacketRings,
    RingGeometry,
    stale_window,
)

__all__ = [
    "TX_RING_FRAMES",
    "AoEPort",
    "EthernetAddress",
    "IFrameSink",
    "ILaneFrameSink",
    "IZeroCopyFrameSink",
    "max_sectors_for_mtu",
    "receive_buffer_size",
]

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # no epoll: the lane never waits (``_reactor_epoll``)
    EPollReactor = None

_log = Logger()

#: AoE header (10 bytes) + ATA argument (12 bytes): what a frame carries besides sectors.
_ATA_OVERHEAD = 22
#: The sector count is one byte on the wire.
_MAX_SECTORS = 255
#: Slack over the MTU for the receive buffer: the 14-byte Ethernet header and a VLAN tag.
_RECV_SLACK = 64
#: An untagged frame is at most the MTU plus this Ethernet header.
_ETHERNET_HEADER = 14

#: Send errors that mean "not now" rather than "never": the frame is dropped and
#: the initiator retransmits, as it would after any loss on the wire.
_TRANSIENT_SEND_ERRORS = frozenset(
    {errno.ENOBUFS, errno.EAGAIN, errno.EWOULDBLOCK, errno.ENETDOWN, errno.ENXIO}
)
#: Receive errors after which reading simply waits for the next readiness.
_RETRY_LATER = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR})
#: Slots of the RX ring at least (more if ``receive_frames`` asks for more).
_RX_RING_FRAMES = MIN_RING_FRAMES
#: What the kernel charges a received frame beyond its MTU, at most (``receive_buffer_size``).
_RECEIVE_SLACK_PER_FRAME = 1024
#: Slots of the TX ring: twice a drain's frames (``max_frames_per_read``), so that replies
#: the compiled lane holds for group commit (which keep later slots from being sent until
#: the drain ends) never leave a drain without a free slot.
TX_RING_FRAMES = 512
#: Replies queued in the TX ring before one ``send`` flushes them, within a drain: few
#: enough that an initiator keeping 16 requests in flight gets replies (and sends more)
#: while the drain goes on, instead of the two sides taking turns (measured best of 1-32).
_TX_BATCH = 8

#: The longest (ms) one ``doRead`` stays in the compiled lane waiting for the
#: port's next frame.  Anything else ready (another descriptor, a timed call
#: due) ends the wait at once, so this bounds only what nothing else needs:
#: how soon an idle port hands the wait back to the reactor.
LINGER_MS = 10

#: At most one "stale frames dropped" line per this many seconds (the rest are counted in it).
_STALE_LOG_INTERVAL = 10.0


def _reactor_epoll(reactor: Any) -> int | None:
    """
    The descriptor of ``reactor``'s epoll set, if it is Twisted's epoll reactor.

    The compiled lane waits on it (``Lane.linger``) to tell "only this port's
    frames are ready" from "the reactor has something else to do" without
    taking anything from it: Twisted registers descriptors level-triggered,
    so an event the lane sees and leaves is reported to the reactor again.
    ``_poller`` is the reactor's own attribute (no public accessor exists);
    any other reactor gets ``None`` and the lane never waits.
    """
    if EPollReactor is not None and isinstance(reactor, EPollReactor):
        fileno: int = reactor._poller.fileno()
        return fileno
    return None


def receive_buffer_size(frames: int, mtu: int) -> int:
    """
    Return the ``SO_RCVBUF`` that holds ``frames`` full frames at ``mtu``, as the kernel takes it.

    The kernel charges each frame its buffer's true size; the MTU plus 1 KiB
    of slack per frame covers it at any MTU.  The result is at most
    ``MAX_RECEIVE_BUFFER`` (half of ``INT_MAX``: the option is a C ``int`` and
    Linux doubles it), the most the kernel grants.
    """
    return min(frames * (mtu + _RECEIVE_SLACK_PER_FRAME), MAX_RECEIVE_BUFFER)


def max_sectors_for_mtu(mtu: int) -> int:
    """
    Return how many 512-byte sectors one ATA request or reply can carry at ``mtu``.

    The Ethernet payload (at most the MTU) holds the 10-byte AoE header, the
    12-byte ATA argument and the sectors: ``(mtu - 22) // 512``.  That is 2 at
    MTU 1500 and 17 at MTU 9000, as the Linux initiator computes it (vblade's
    ``(mtu - 36) // 512`` gives the same values at both).  The count is one
    byte on the wire, so it is capped at 255, and it is never below 1: an
    interface too small for one sector still answers config queries.
    """
    return max(1, min(_MAX_SECTORS, (mtu - _ATA_OVERHEAD) // 512))


@implementer(interfaces.IAddress)
@frozen
class EthernetAddress:
    """Where an ``AoEPort`` listens: the interface, its MAC address and its MTU."""

    interface: str
    mac: bytes
    mtu: int

    def __str__(self) -> str:
        return f"{self.interface} ({format_mac(self.mac)}, MTU {self.mtu})"


class IFrameSink(Interface):
    """
    A protocol fed by ``AoEPort`` that wants to know where a burst of frames ends.

    The port calls ``datagramReceived`` for each frame, as for any datagram
    protocol (``frameReceivedInto`` instead for an ``IZeroCopyFrameSink`` on
    rings) and, if the protocol provides this interface, ``drainFinished``
    once after each drain that delivered frames.  A protocol providing
    neither interface gets ``datagramReceived`` only.  The port reads what a
    protocol provides once, when it is built.
    """

    def drainFinished() -> None:
        """
        Called once after the frames of one drain (one ``doRead``), if there were any.

        The end of a burst: where ``AoEProtocol`` makes the writes of the
        drain durable at once.  What it writes goes out with the drain's last
        TX batch.  An exception is logged and reading goes on.
        """


class ILinkAwareProtocol(Interface):
    """A protocol that wants to know when its port's interface changed under it."""

    def linkChanged() -> None:
        """
        The port is bound again (the interface came back, maybe as a new
        device with the same name) or its MAC or MTU changed: read them
        again from ``transport.getHost()`` and announce what is served.
        """


class IZeroCopyFrameSink(IFrameSink):
    """
    A protocol that answers frames in place: read from the RX ring, written into the TX ring.

    On a port with ``PACKET_MMAP`` rings such a protocol gets
    ``frameReceivedInto`` instead of ``datagramReceived`` (which it still
    gets, with a copy, on a port without rings).
    """

    def frameReceivedInto(frame: memoryview, reply: memoryview | None) -> int:  # noqa: N805
        """
        Handle ``frame`` (a view of its RX slot) and answer, if it can, into ``reply``.

        ``reply`` is a view of the next free TX slot (``None`` if the TX ring
        is full).  Return the length of the reply written there, or 0 if none:
        the protocol may have answered through ``transport.write`` instead, but
        not both.  Neither view may be kept after the call returns: the port
        releases ``frame`` and gives the slot back to the kernel.
        """


class ILaneFrameSink(IZeroCopyFrameSink):
    """
    A protocol whose plain reads and writes the compiled data lane may answer in its place.

    On a port with rings, when ``aoe_twisted.lane`` is compiled, the port
    lets the lane (C) walk the RX ring with the protocol's table of targets
    (``laneTable``): it answers the frames it can, straight into TX slots,
    and stops at any other, which the port then gives to
    ``frameReceivedInto`` as usual.  The protocol counts what the lane
    answered when told (``laneAnswered``); the targets' own counters are
    counted by the lane itself (``TargetStats.tally``).
    """

    def laneTable() -> Any:
        """
        Return the lane's table of targets as they are now, or ``None``.

        ``None`` means the lane must answer nothing now (no target it can
        serve, or replies are being held): every frame goes to
        ``frameReceivedInto``.  Asked before each stretch of frames the lane
        walks, so it must be cheap when nothing changed.
        """

    def laneAnswered(count: int) -> None:  # noqa: N805
        """The lane answered ``count`` more frames for this protocol."""


def _missing(error: OSError) -> bool:
    """Whether ``error`` says the interface does not exist."""
    return error.errno in (errno.ENODEV, errno.ENXIO) and not error.filename


@implementer(interfaces.IListeningPort, interfaces.IHalfCloseableDescriptor)
class AoEPort(abstract.FileDescriptor):
    """
    A raw Ethernet port for AoE on one interface, feeding a datagram protocol.

    The protocol's ``datagramReceived(frame, addr)`` gets each frame whole,
    Ethernet header included, and ``addr`` is the kernel's ``sockaddr_ll``.
    ``write(frame)`` transmits one frame.  After ``startListening`` the port
    knows its interface's ``mac`` (6 bytes) and ``mtu``.

    Frames the kernel marks ``PACKET_OUTGOING`` (our own) or
    ``PACKET_OTHERHOST`` (addressed to another station, seen only in
    promiscuous mode) are not passed on: neither is a request to this host.
    ``accept_other_hosts=True`` passes the latter on anyway, for test peers
    that watch replies sent to forged addresses.  Frames longer than the MTU
    plus the Ethernet header are not passed on either: a veth end (and some
    NICs) accept giants up to 4 bytes longer, and the error reply echoing one
    would be too long to send (``EMSGSIZE``).  All three count in
    ``frames_ignored``.

    ``filter_addresses`` narrows what the kernel queues on the socket at
    all to the frames for the addresses served (and broadcast): frames for
    other servers' targets then cost this process nothing, and are not
    counted anywhere.
    """

    def __init__(
        self,
        interface: str,
        protocol: AbstractDatagramProtocol,
        reactor: Any = None,
        system: Any = None,
        max_frames_per_read: int = 256,
        netns: str | None = None,
        receive_frames: int | None = None,
        accept_other_hosts: bool = False,
        pad_frames: bool = True,
        socket_fd: int | None = None,
        rings: bool = True,
        wait_for_interface: bool = False,
        linger_ms: int = LINGER_MS,
        stale_after: int = STALE_AFTER,
    ) -> None:
        """
        @param interface: the interface to bind to, e.g. ``"eth0"``.
        @param protocol: the protocol fed with every frame received; what it
            provides (``IFrameSink``, ``IZeroCopyFrameSink``) is read here, once.
        @param reactor: the reactor to register with (the global one by default).
        @param system: an ``IPacketSystem`` (``RealPacketSystem`` by default, a
            ``MemoryPacketSystem`` in tests); rings need an ``IRingPacketSystem``.
        @param max_frames_per_read: how many frames one ``doRead`` takes at most,
            so a flood on one interface cannot starve the rest of the reactor.
        @param netns: the name of the network namespace (``ip netns``) that
            holds ``interface``; ``None`` for the process's own.
        @param receive_frames: grow the socket's receive buffer to hold this many
            full-size frames, if it is smaller.
        @param accept_other_hosts: pass on frames addressed to other stations.
        @param pad_frames: pad frames shorter than the Ethernet minimum before
            sending them; test peers turn this off to send the 32- and 36-byte
            frames the Linux initiator sends on virtio.
        @param socket_fd: an open ``AF_PACKET`` socket already bound to
            ``interface`` (and perhaps joined to a ``PACKET_FANOUT`` group) to
            use instead of opening one; the port owns it from then on and
            closes it when it stops.  ``netns`` is then ignored.
        @param rings: use ``PACKET_MMAP`` rings where the system offers them
            (``False``: one ``recvfrom`` and one ``send`` per frame).
        @param wait_for_interface: if ``interface`` does not exist, open a
            socket that receives nothing and wait (``bound`` stays false)
            instead of failing; ``rebind`` binds it once it appears.
        @param linger_ms: with the compiled lane on Twisted's epoll reactor, how
            long one ``doRead`` may go on waiting for and answering this port's
            frames while nothing else is ready (0: not at all).
        @param stale_after: drop, unanswered, a frame that waited in the RX
            ring more than this many whole seconds (``STALE_AFTER``; 0:
            never).  Only with rings, whose slots carry the kernel's receive
            time.
        """
        abstract.FileDescriptor.__init__(self, reactor)
        self._system: IPacketSystem = RealPacketSystem() if system is None else system
        self._ring_system = IRingPacketSystem.providedBy(self._system)
        self.interface = interface
        self.protocol = protocol
        self._frame_sink = IFrameSink.providedBy(protocol)
        self._zero_copy_sink = IZeroCopyFrameSink.providedBy(protocol)
        #: The protocol the compiled lane answers for, when there is a lane.
        self._lane_sink: Any = (
            protocol if _lane.native is not None and ILaneFrameSink.providedBy(protocol) else None
        )
        self._link_aware = ILinkAwareProtocol.providedBy(protocol)
        self.wait_for_interface = wait_for_interface
        self.bound = False
        self._resume: Any = None
        self.max_frames_per_read = max_frames_per_read
        self.netns = netns
        self.receive_frames = receive_frames
        self.accept_other_hosts = accept_other_hosts
        self.pad_frames = pad_frames
        self.socket_fd = socket_fd
        self.rings = rings
        self._rings: PacketRings | None = None
        self.tx_batch = _TX_BATCH
        self._batching = False
        self._unflushed = 0
        #: The last drain was the compiled lane's alone, and it holds nothing.
        self._lane_quiet = False
        #: The longest (ms) the compiled lane waits in C for this port's next
        #: frame before the reactor's turn (0: never; see ``_drain_ring``).
        self.linger_ms = linger_ms
        #: The reactor's epoll descriptor, when the lane may wait on it.
        self._epoll = (
            _reactor_epoll(self.reactor) if isinstance(self._system, RealPacketSystem) else None
        )
        #: How many times the lane woke up for a frame without a reactor turn.
        self.lane_wakeups = 0
        #: Seconds after which a frame waiting in the RX ring is dropped (0: never).
        self.stale_after = stale_after
        #: Frames dropped as stale (``stale_after``); they count in ``frames_ignored`` too.
        self.frames_stale = 0
        self._stale_unlogged = 0
        self._stale_logged_at: float | None = None
        self._stale_summary: Any = None
        self.mac: bytes | None = None
        self.mtu: int | None = None
        self._fileno = -1
        self._bufsize = 1500 + _RECV_SLACK
        self._max_frame = 1500 + _ETHERNET_HEADER
        self._stopped: defer.Deferred[None] | None = None
        self.frames_received = 0
        self.frames_ignored = 0
        self.frames_sent = 0
        self.frames_dropped = 0
        self._filters: Any = ISocketFilterSystem(self._system, None)
        self._filtered: frozenset[tuple[int, int]] | None = None
        self._filter_program: list[Instruction] | None = None
        self._filter_attached = False
        self.logstr = f"{self._getLogPrefix(protocol)} (AoE {interface})"

    def __repr__(self) -> str:
        state = "" if self.connected else "not "
        return (
            f"<{type(self).__name__} {fullyQualifiedName(type(self.protocol))} "
            f"{state}listening on {self.interface}>"
        )

    def startListening(self) -> None:
        """
        Open the socket, learn the MAC and MTU, connect the protocol and start reading.

        With ``wait_for_interface`` and no such interface yet, the socket is
        open but unbound: the protocol is connected when ``rebind`` succeeds.

        @raise CannotOpenInterface: (a ``CannotListenError``) if the socket
            cannot be opened or bound; its ``str`` is one line naming the
            interface and the cause.
        """
        self._bindSocket()
        if self.bound:
            self.protocol.makeConnection(self)  # type: ignore[arg-type]
            self.startReading()

    def _bindSocket(self) -> None:
        """Open and bind the socket and read the interface's properties."""
        try:
            if self.socket_fd is None:
                fd = self._system.open(self.interface, ETHERTYPE, self.netns)
            else:
                fd = self._system.adopt(self.socket_fd)
        except OSError as e:
            if not (self.wait_for_interface and self.socket_fd is None and _missing(e)):
                raise CannotOpenInterface(self.interface, e, self.netns) from None
            try:
                fd = self._system.open_unbound(self.netns)
            except OSError as e:
                raise CannotOpenInterface(self.interface, e, self.netns) from None
            self._fileno = fd
            self.connected = 1
            self._apply_filter()
            _log.warn(
                "interface {interface} does not exist: waiting for it to appear",
                interface=self.interface,
            )
            return
        try:
            self._configure(fd)
        except OSError as e:
            self._system.close(fd)
            raise CannotOpenInterface(self.interface, e, self.netns) from None
        self._fileno = fd
        self._apply_filter()
        self._rings = self._map_rings(fd, self.mtu or 1500)
        self.connected = 1
        self.bound = True
        rings = ""
        if self._rings is not None:
            rings = (
                f" (PACKET_MMAP rings: {self._rings.rx.frame_nr} receive slots, "
                f"{self.ring_size / (1 << 20):.1f} MiB)"
            )
        _log.info("AoE port open on {address}{rings}", address=self.getHost(), rings=rings)

    def _configure(self, fd: int) -> None:
        """Learn the bound interface's MAC and MTU and size the receive buffer for them."""
        mac = self._system.hardware_address(fd)
        if len(mac) != 6:
            # A tun or other non-Ethernet device: no MAC to answer from.
            raise OSError(errno.EINVAL, "not an Ethernet interface (no 6-byte MAC address)")
        mtu = self._system.mtu(fd, self.interface)
        if self.receive_frames:
            self._grow_receive_buffer(fd, receive_buffer_size(self.receive_frames, mtu))
        self.mac = mac
        self.mtu = mtu
        self._bufsize = mtu + _RECV_SLACK
        self._max_frame = mtu + _ETHERNET_HEADER

    def _grow_receive_buffer(self, fd: int, size: int) -> None:
        """
        Ask for ``size`` bytes of receive buffer; a refusal is a warning, not a failure.

        The buffer only matters without rings (with them, frames wait in the
        RX ring); a smaller one loses frames in a burst, which the initiator
        retransmits, so it is no reason not to serve.
        """
        try:
            self._system.set_receive_buffer(fd, size)
        except OSError as e:
            _log.warn(
                "AoE port {interface}: cannot grow the receive buffer to {size} bytes "
                "({error}); a burst of requests may lose frames",
                interface=self.interface,
                size=size,
                error=e.strerror or str(e),
            )

    @property
    def ring_size(self) -> int:
        """The bytes the port's RX and TX rings map (0 without rings)."""
        rings = self._rings
        return 0 if rings is None else rings.rx.size + rings.tx.size

    @property
    def ring_frames(self) -> int:
        """The slots of the port's RX ring (0 without rings)."""
        rings = self._rings
        return 0 if rings is None else rings.rx.frame_nr

    def rebind(self) -> bool:
        """
        Bind the socket to the interface again and re-read its MAC and MTU; return success.

        For an interface that appeared, or came back as a new device with the
        same name (a VLAN, a bond, a USB NIC re-created), or whose MAC or MTU
        changed.  The socket stays the same, so no privilege is needed; rings
        are mapped anew if the MTU changed.  The protocol is connected now if
        it was waiting, else told (``ILinkAwareProtocol.linkChanged``).
        Failure (the interface went away again) is logged and leaves the
        port waiting for the next try.
        """
        if not self.connected or self.disconnecting:
            return False
        fd = self._fileno
        old_mtu = self.mtu
        try:
            self._system.rebind(fd, self.interface, ETHERTYPE)
            self._configure(fd)
        except OSError as e:
            _log.warn(
                "cannot bind to {interface} again: {error}",
                interface=self.interface,
                error=e.strerror or str(e),
            )
            return False
        self._apply_filter()
        if self.mtu != old_mtu and self._rings is not None:
            # Answer what already arrived before the ring it waits in goes away.
            self.doRead()
            rings, self._rings = self._rings, None
            rings.close()
            self._rings = self._map_rings(fd, self.mtu or 1500)
        elif self._rings is None and not self.bound:
            self._rings = self._map_rings(fd, self.mtu or 1500)
        was_bound, self.bound = self.bound, True
        if not was_bound:
            _log.info("AoE port open on {address}", address=self.getHost())
            self.protocol.makeConnection(self)  # type: ignore[arg-type]
        elif self._link_aware:
            self.protocol.linkChanged()  # type: ignore[attr-defined]
        self.startReading()
        return True

    @property
    def filtered_addresses(self) -> frozenset[tuple[int, int]] | None:
        """The ``(major, minor)`` addresses given to ``filter_addresses`` (``None``: no filter)."""
        return self._filtered

    def filter_addresses(self, addresses: Iterable[tuple[int, int]] | None) -> None:
        """
        Let the kernel queue only frames for ``addresses`` (``(major, minor)`` pairs) or broadcast.

        Attaches ``aoe_twisted.net.bpf.address_filter(addresses)`` to the
        socket now if it is open, and again whenever it is opened or bound
        again (``startListening``, ``rebind``); ``None`` removes the filter.
        Call it again whenever the served addresses change: the new program
        replaces the old at once, so no frame for an address served by both
        is lost in between.  Replies from other servers for these addresses
        pass too (the filter ignores the response flag).

        A set too large for one program (more than some 1,300 addresses on
        as many shelves) gets a filter that accepts every AoE frame, with a
        warning.  If the kernel refuses the filter, a warning says so and
        the socket goes on without one: it wakes for every AoE frame, as
        without this call; nothing is lost.

        On a socket that the port adopted (``socket_fd``: a ``--workers``
        worker's share of a ``PACKET_FANOUT`` group) the addresses are only
        remembered, not attached.  A filter belongs to the socket, not to
        the descriptor, and every socket of a group must carry the same one
        for the whole group (see ``aoe_twisted.net.bpf``): the parent, which
        opened the group, keeps its sockets and sees every change of the
        targets, attaches it to each (``bpf.attach_filter``).  A worker
        attaching too would be a second writer of the same setting, and
        one restarted with an older list of targets would narrow it for the
        group's other holders of that socket.

        With a system that has no kernel filters (no ``ISocketFilterSystem``
        for it, as ``MemoryPacketSystem``) the addresses are remembered and
        nothing else happens: the protocol ignores frames for others anyway.
        """
        if addresses is None:
            self._filtered = None
            self._filter_program = None
        else:
            self._filtered = frozenset(addresses)
            self._filter_program = address_filter(self._filtered)
            if is_catch_all(self._filter_program) and self._filtered:
                _log.warn(
                    "AoE port {interface}: {count} addresses are too many for a kernel "
                    "filter ({limit} instructions); every AoE frame on the interface "
                    "wakes this server",
                    interface=self.interface,
                    count=len(self._filtered),
                    limit=MAX_INSTRUCTIONS,
                )
        self._apply_filter()

    def _apply_filter(self) -> None:
        """Attach the remembered filter to the socket (or remove it); a refusal is a warning."""
        filters = self._filters
        if filters is None or self._fileno < 0 or self.socket_fd is not None:
            return
        program = self._filter_program
        try:
            if program is not None:
                filters.attach_filter(self._fileno, program)
                self._filter_attached = True
            elif self._filter_attached:
                self._filter_attached = False
                filters.detach_filter(self._fileno)
        except OSError as e:
            _log.warn(
                "AoE port {interface}: cannot filter frames in the kernel ({error}); "
                "every AoE frame on the interface wakes this server",
                interface=self.interface,
                error=e.strerror or str(e),
            )
            self._filter_attached = False
            try:
                # Never keep an older, narrower filter: it would drop new targets' frames.
                filters.detach_filter(self._fileno)
            except OSError:
                _log.failure(
                    "AoE port {interface}: cannot remove the kernel filter either",
                    interface=self.interface,
                )

    def readConnectionLost(self, reason: Failure) -> None:
        """
        The socket polls as in error (its interface went down or away): clear it, read on.

        The reactor calls this (the port provides ``IHalfCloseableDescriptor``)
        instead of closing the port.  Reading the error (``SO_ERROR``)
        clears it; the socket stays bound, and frames flow again when the
        interface is up (a new device with the same name needs ``rebind``).
        If there was no error to clear, reading resumes a second later, so a
        socket that keeps polling as closed cannot spin the reactor.
        """
        if not self.connected or self.disconnecting:
            return
        try:
            code = self._system.socket_error(self._fileno)
        except OSError as e:
            code = e.errno or 0
        if code:
            _log.info(
                "AoE port {interface}: {error}; the socket is kept for when it is back",
                interface=self.interface,
                error=os.strerror(code),
            )
            self.startReading()
            return
        if self._resume is None or not self._resume.active():
            self._resume = self.reactor.callLater(1.0, self._resume_reading)

    def _resume_reading(self) -> None:
        """Read again after a pause (see ``readConnectionLost``)."""
        self._resume = None
        if self.connected and not self.disconnecting:
            self.startReading()

    def writeConnectionLost(self, reason: Failure) -> None:
        """Nothing to do: the port never waits to write (``IHalfCloseableDescriptor``)."""

    def _map_rings(self, fd: int, mtu: int) -> PacketRings | None:
        """Set up the RX and TX rings if the system can; ``None`` (logged) if it cannot."""
        if not self.rings or not self._ring_system:
            return None
        rx = RingGeometry.for_mtu(mtu, max(_RX_RING_FRAMES, self.receive_frames or 0))
        tx = RingGeometry.for_mtu(mtu, TX_RING_FRAMES)
        try:
            rings: PacketRings | None = self._system.map_rings(fd, rx, tx)
        except OSError as e:
            _log.warn(
                "AoE port {interface}: no PACKET_MMAP rings ({error}); "
                "using one system call per frame",
                interface=self.interface,
                error=e.strerror or str(e),
            )
            return None
        return rings

    def fileno(self) -> int:
        """The packet socket's descriptor (-1 when closed)."""
        return self._fileno

    def doRead(self) -> None:
        """
        Pass every waiting frame to the protocol, up to ``max_frames_per_read``.

        Stops when the socket has nothing more (``EAGAIN``), so one readiness
        event drains a burst instead of costing a reactor turn per frame.  An
        exception from the protocol is logged and reading goes on.

        If the protocol provides ``IFrameSink``, its ``drainFinished()`` is
        called once after the frames of the drain (if there were any): the end
        of a burst, where ``AoEProtocol`` makes a group of writes durable at once.

        With rings, the frames are read from the RX ring in place (no system
        call), and the replies written during the drain (and its
        ``drainFinished``) are queued in the TX ring and sent by one ``send``
        per ``_TX_BATCH`` and one at the end.
        """
        received = self.frames_received
        self._batching = True
        self._lane_quiet = False
        try:
            if self._rings is not None:
                self._drain_ring(self._rings)
            else:
                self._drain()
        finally:
            try:
                self._drain_finished(received)
            finally:
                try:
                    if self._unflushed:
                        self._flush()
                finally:
                    self._batching = False

    def _drain_finished(self, received: int) -> None:
        """
        Call an ``IFrameSink``'s ``drainFinished`` if frames came since ``received``.

        Not when the compiled lane answered every one of them and holds no
        reply: the protocol saw none of them, so there is nothing to end.
        """
        if self.frames_received == received or not self._frame_sink or self._lane_quiet:
            return
        try:
            self.protocol.drainFinished()  # type: ignore[attr-defined]
        except Exception:
            _log.failure(
                "Unhandled exception from {protocol}.drainFinished",
                protocol=fullyQualifiedName(type(self.protocol)),
            )

    def _drain_ring(self, rings: PacketRings) -> None:
        """
        Answer the frames waiting in the RX ring: by the compiled lane, else the protocol.

        With the compiled lane (an ``ILaneFrameSink`` protocol and
        ``aoe_twisted.lane.native``) the lane walks the ring and answers what
        it can; each frame it leaves is given to the protocol by
        ``_walk_ring``, then the lane goes on.  Without it, ``_walk_ring``
        gives every frame to the protocol.  Either way at most
        ``max_frames_per_read`` slots are walked.
        """
        sink = self._lane_sink
        budget = self.max_frames_per_read
        if sink is None:
            self._walk_ring(rings, budget)
            return
        native = _lane.native
        assert native is not None
        lane = None
        walked = answered = 0
        # ``linger``: the lane is waiting for frames (once per drain at most:
        # ``lingered``); a frame for Python or a failed send ends it for good.
        linger = lingered = False
        wait = 0
        try:
            while budget > 0:
                try:
                    table = sink.laneTable()
                except Exception:
                    # A bug, not a frame: this port goes on with the Python lane.
                    _log.failure(
                        "AoE port {interface}: the compiled lane is off for this port",
                        interface=self.interface,
                    )
                    self._lane_sink = None
                    table = None
                if table is None:
                    walked += self._walk_ring(rings, budget)
                    return
                lane = self._ring_lane(rings, native)
                if self._epoll is not None:
                    # The lane sends its own batches too (STOP_FLUSH only when a
                    # send fails); it waits for more frames only when ``linger``.
                    result = lane.linger(
                        table,
                        rings.rx_next,
                        rings.tx_next,
                        self.max_frames_per_read if linger else budget,
                        self._unflushed,
                        self.tx_batch,
                        self._fileno,
                        self._epoll,
                        wait if linger else 0,
                    )
                    self.lane_wakeups += result[7]
                    stop, rx, tx, received, ignored, answered_now, unflushed = result[:7]
                else:
                    stop, rx, tx, received, ignored, answered_now, unflushed = lane.drain(
                        table, rings.rx_next, rings.tx_next, budget, self._unflushed, self.tx_batch
                    )
                if not linger:
                    budget -= received + ignored
                if lane.stale:
                    self._count_stale(lane.stale)
                    lane.stale = 0
                rings.rx_next = rx
                rings.tx_next = tx
                self.frames_received += received
                self.frames_ignored += ignored
                self.frames_sent += answered_now
                self._unflushed = unflushed
                answered += answered_now
                if stop == native.STOP_FLUSH:
                    linger = False
                    self._flush()
                elif stop == native.STOP_PYTHON:
                    linger = False
                    walked += self._walk_ring(rings, 1)
                    budget -= 1
                elif (
                    stop == native.STOP_EMPTY
                    and not lingered
                    and not walked
                    and not lane.holding
                    and self._epoll is not None
                ):
                    # Every frame was the lane's and nothing waits for Python:
                    # wait for the next one in C rather than in a reactor turn.
                    wait = self._linger_wait()
                    linger = lingered = wait > 0
                    if not linger:
                        return
                else:  # the ring is drained, or the budget spent
                    return
        finally:
            if answered:
                sink.laneAnswered(answered)
            self._lane_quiet = not walked and lane is not None and not lane.holding

    def _linger_wait(self) -> int:
        """
        How long (ms) the lane may wait for this port's next frame: ``linger_ms``
        (at most a minute), or less if the reactor has a call due sooner.
        """
        longest = max(0, min(self.linger_ms, 60_000))
        due = self.reactor.timeout()
        if due is None:
            return longest
        return min(longest, int(due * 1000))

    def _ring_lane(self, rings: PacketRings, native: Any) -> Any:
        """Return the compiled lane over ``rings`` for this port as it is now (MAC, MTU)."""
        key = (self.mac, self._max_frame, self.accept_other_hosts)
        if rings.lane is None or rings.lane_key != key:
            rings.lane = native.Lane(
                rings.view,
                rings.rx_offsets,
                rings.rx.frame_size,
                rings.tx_offsets,
                rings.tx.frame_size,
                self.mac,
                self._max_frame,
                self.accept_other_hosts,
            )
            rings.lane_key = key
        stale = max(0, min(int(self.stale_after), 0xFFFFFFFF))
        if rings.lane.stale_after != stale:
            rings.lane.stale_after = stale
        return rings.lane

    def lane_held(self) -> list[Any]:
        """Return the targets whose writes the compiled lane answered and holds for group commit."""
        rings = self._rings
        if rings is None or rings.lane is None:
            return []
        return rings.lane.held()  # type: ignore[no-any-return]

    def lane_release(self, failed: set[int]) -> tuple[int, int]:
        """
        Queue the replies the compiled lane holds; return (replies, refusals).

        A target whose ``id`` is in ``failed`` (its disk could not be made
        durable) gets ``ERR|DRDY``/``ABRT`` instead of each acknowledgement.
        They go with the port's next ``send``.
        """
        rings = self._rings
        if rings is None or rings.lane is None:
            return 0, 0
        released, refused = rings.lane.release(failed)
        self._unflushed += released
        if released and not self._batching:
            self._flush()
        return released, refused

    def _walk_ring(self, rings: PacketRings, limit: int) -> int:
        """
        Pass up to ``limit`` frames waiting in the RX ring to the protocol, in place.

        An ``IZeroCopyFrameSink`` gets ``frameReceivedInto(frame, reply)``: each
        frame as a ``memoryview`` of its RX slot and ``reply``, a view of the
        next free TX slot (``None`` if the TX ring is full); it returns the
        length of the reply it wrote there (0 if none: it may have answered
        through ``write`` instead, but not both).  Other protocols get ``datagramReceived``
        with a copy (``bytes``) and the ``sockaddr_ll`` as ``recvfrom`` gives
        it.  Either way the frame's view is released when the call returns
        and the slot goes back to the kernel.  Return the slots walked.
        """
        status = rings.status
        view = rings.view
        offsets = rings.rx_offsets
        slots = len(offsets)
        index = rings.rx_next
        slot_size = rings.rx.frame_size
        unpack_from = RX_SLOT_STAMPED.unpack_from
        stale_after = int(self.stale_after)
        # Frames the kernel received (tp_sec) in [no_time_before, stale_before) are stale.
        no_time_before, stale_before = stale_window(stale_after, time.time())
        stale = 0
        max_frame = self._max_frame
        accept_other = self.accept_other_hosts
        protocol = self.protocol
        into = protocol.frameReceivedInto if self._zero_copy_sink else None  # type: ignore[attr-defined]
        tx_frames = rings.tx_frames
        tx_offsets = rings.tx_offsets
        tx_slots = len(tx_offsets)
        pack_len = TX_LEN.pack_into
        pad = self.pad_frames
        batch = self.tx_batch
        received = ignored = 0
        try:
            for _ in range(limit):
                offset = offsets[index]
                if not status[offset >> 2] & TP_STATUS_USER:
                    break
                length, snaplen, mac, received_at = unpack_from(view, offset + 4)
                pkttype = view[offset + RX_PKTTYPE_AT]
                if (
                    pkttype == socket.PACKET_OUTGOING
                    or (pkttype == socket.PACKET_OTHERHOST and not accept_other)
                    or length > max_frame
                ):
                    ignored += 1
                elif no_time_before <= received_at < stale_before:
                    ignored += 1
                    stale += 1
                else:
                    received += 1
                    start = offset + mac
                    # Never past the slot, whatever its header says (the kernel's never does).
                    frame = view[start : min(start + snaplen, offset + slot_size)]
                    try:
                        if into is None:
                            protocol.datagramReceived(bytes(frame), self._address(rings, offset))
                        else:
                            tx = rings.tx_next
                            tx_offset = tx_offsets[tx]
                            if status[tx_offset >> 2] == TP_STATUS_AVAILABLE:
                                written = into(frame, tx_frames[tx])
                            else:
                                tx = self._free_tx_slot(rings)
                                written = into(frame, tx_frames[tx] if tx >= 0 else None)
                            if written:
                                if rings.tx_next != tx >= 0:
                                    raise RuntimeError(
                                        "frameReceivedInto wrote a reply into its slot "
                                        "and wrote a frame through write() as well"
                                    )
                                if tx < 0 or (written < MIN_FRAME_SIZE and pad):
                                    self._tx_queue(rings, tx, written)
                                else:
                                    # _tx_queue (and PacketRings.tx_commit) inlined: the
                                    # common case, a reply in a free slot.
                                    tx_offset = tx_offsets[tx]
                                    pack_len(view, tx_offset + 4, written)
                                    status[tx_offset >> 2] = TP_STATUS_SEND_REQUEST
                                    tx += 1
                                    rings.tx_next = 0 if tx == tx_slots else tx
                                    self.frames_sent += 1
                                    self._unflushed += 1
                                    if self._unflushed >= batch:
                                        self._flush()
                    except Exception:
                        _log.failure(
                            "Unhandled exception from {protocol}.{method}",
                            protocol=fullyQualifiedName(type(protocol)),
                            method="datagramReceived" if into is None else "frameReceivedInto",
                        )
                    finally:
                        frame.release()
                    if stale_after > 0:
                        # The protocol may have waited on its disk: what comes after
                        # in the ring is judged by the time now.
                        no_time_before, stale_before = stale_window(stale_after, time.time())
                status[offset >> 2] = TP_STATUS_KERNEL
                index += 1
                if index == slots:
                    index = 0
        finally:
            rings.rx_next = index
            self.frames_received += received
            self.frames_ignored += ignored
            if stale:
                self._count_stale(stale)
        return received + ignored

    def _count_stale(self, count: int) -> None:
        """
        Count ``count`` frames dropped as stale, and say so in the log.

        One warning at once, then at most one every ``_STALE_LOG_INTERVAL``
        seconds: the frames dropped after a warning (one stop's ring is
        walked over several reads) are summed into one more line, due when
        the interval since the last ends.  A process that keeps stalling says
        so without a line per frame, and no drop goes unsaid.
        """
        self.frames_stale += count
        self._stale_unlogged += count
        if self._stale_summary is not None:
            return  # the line due will say these too
        now = self.reactor.seconds()
        last = self._stale_logged_at
        if last is not None and now - last < _STALE_LOG_INTERVAL:
            self._stale_summary = self.reactor.callLater(
                last + _STALE_LOG_INTERVAL - now, self._log_stale
            )
            return
        self._log_stale()

    def _log_stale(self) -> None:
        """Log the frames dropped as stale since the last line (``_count_stale``)."""
        self._stale_summary = None
        self._stale_logged_at = self.reactor.seconds()
        dropped, self._stale_unlogged = self._stale_unlogged, 0
        if not dropped:
            return
        _log.warn(
            "AoE port {interface}: dropped {count} frame(s) that waited more than "
            "{seconds} s in the receive ring (this process was stopped or stalled); "
            "their initiators send again what they still wait for",
            interface=self.interface,
            count=dropped,
            seconds=self.stale_after,
        )

    def _address(self, rings: PacketRings, offset: int) -> tuple[Any, ...]:
        """Return the ``sockaddr_ll`` of the RX slot at ``offset`` as ``recvfrom`` gives it."""
        _family, protocol, _ifindex, hatype, pkttype, halen, addr = SOCKADDR_LL.unpack_from(
            rings.view, offset + TX_DATA_AT
        )
        return (self.interface, socket.ntohs(protocol), pkttype, hatype, addr[:halen])

    def _free_tx_slot(self, rings: PacketRings) -> int:
        """
        Return the next TX slot once free, or -1 if none is.

        Flushes first, even with nothing new queued: slots the kernel could
        not send before (``ENOBUFS``) stay queued until the next ``send``.
        """
        self._flush()
        tx = rings.tx_next
        if rings.status[rings.tx_offsets[tx] >> 2] == TP_STATUS_AVAILABLE:
            return tx
        return -1

    def _tx_queue(self, rings: PacketRings, tx: int, length: int) -> None:
        """Queue TX slot ``tx`` holding a ``length``-byte frame; send the queue when due."""
        if tx < 0:
            self._dropped(OSError(errno.ENOBUFS, "TX ring full"))
            return
        if length < MIN_FRAME_SIZE and self.pad_frames:
            rings.tx_frames[tx][length:MIN_FRAME_SIZE] = bytes(MIN_FRAME_SIZE - length)
            length = MIN_FRAME_SIZE
        rings.tx_commit(tx, length)
        self.frames_sent += 1
        self._unflushed += 1
        if not self._batching or self._unflushed >= self.tx_batch:
            self._flush()

    def _flush(self) -> None:
        """Send every queued TX slot with one ``send``; a transient error counts one drop."""
        queued, self._unflushed = self._unflushed, 0
        try:
            # Slots the kernel could not send (a transient error, counted as
            # one drop) stay queued and go with the next flush.
            self._transmit(self._system.flush, self._fileno)
        except OSError:
            if not self._batching:
                raise
            _log.failure(
                "AoE port {interface}: cannot send {count} frames",
                interface=self.interface,
                count=queued,
            )

    def _transmit(self, send: Any, *args: Any) -> bool:
        """
        Call ``send(*args)``, again after ``EINTR``; return whether the kernel took it.

        A transient error (no buffer space, interface down) is counted as a
        drop and returns ``False``: the initiator retransmits, as after any
        loss on the wire.  Any other error is raised.
        """
        while True:
            try:
                send(*args)
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                if e.errno in _TRANSIENT_SEND_ERRORS:
                    self._dropped(e)
                    return False
                raise
            return True

    def _drain(self) -> None:
        """Pass waiting frames to the protocol (``doRead`` without the end-of-drain call)."""
        for _ in range(self.max_frames_per_read):
            try:
                frame, addr = self._system.recvfrom(self._fileno, self._bufsize)
            except OSError as e:
                if e.errno in _RETRY_LATER:
                    return
                if e.errno == errno.ENETDOWN:
                    # Reported once when the interface goes down; the socket
                    # stays bound and frames flow again when it comes back up.
                    _log.warn("AoE port: interface {interface} is down", interface=self.interface)
                    return
                raise
            pkttype = addr[2] if len(addr) > 2 else socket.PACKET_HOST
            if (
                pkttype == socket.PACKET_OUTGOING
                or (pkttype == socket.PACKET_OTHERHOST and not self.accept_other_hosts)
                or len(frame) > self._max_frame
            ):
                self.frames_ignored += 1
                continue
            self.frames_received += 1
            try:
                self.protocol.datagramReceived(frame, addr)
            except Exception:
                _log.failure(
                    "Unhandled exception from {protocol}.datagramReceived",
                    protocol=fullyQualifiedName(type(self.protocol)),
                )

    def write(self, frame: bytes) -> None:  # type: ignore[override]
        """
        Transmit ``frame`` as exactly one Ethernet frame.

        A frame shorter than the Ethernet minimum (60 bytes without FCS) is
        padded with zeros (unless ``pad_frames`` is off): not every driver
        pads what it is given.  When the
        kernel has no room (``ENOBUFS``, ``EAGAIN``) or the interface is down,
        the frame is dropped and counted in ``frames_dropped``; the initiator
        retransmits as it does after any loss on the wire.

        With rings the frame is copied into the next TX slot and sent at once,
        or, during a drain, with the batch it joins (a full TX ring drops it).
        """
        rings = self._rings
        if rings is not None:
            length = len(frame)
            if length > self._max_frame:
                raise OSError(errno.EMSGSIZE, os.strerror(errno.EMSGSIZE))
            tx = rings.tx_next
            if rings.status[rings.tx_offsets[tx] >> 2] != TP_STATUS_AVAILABLE:
                tx = self._free_tx_slot(rings)
            if tx >= 0:
                rings.tx_frames[tx][:length] = frame
            self._tx_queue(rings, tx, length)
            return
        if len(frame) < MIN_FRAME_SIZE and self.pad_frames:
            frame = bytes(frame) + bytes(MIN_FRAME_SIZE - len(frame))
        if self._transmit(self._system.send, self._fileno, frame):
            self.frames_sent += 1

    @property
    def batches_writes(self) -> bool:
        """Whether ``writeFrames`` sends several frames with one system call (rings mapped)."""
        return self._rings is not None

    def writeFrames(self, frames: Sequence[bytes]) -> None:
        """
        Transmit each of ``frames`` as one Ethernet frame, as ``write`` does,
        with one ``send`` for all of them (rings), not one each.

        For replies that leave outside a drain (asynchronous completions).
        """
        if self._batching or self._rings is None:
            for frame in frames:
                self.write(frame)
            return
        self._batching = True
        try:
            for frame in frames:
                self.write(frame)
        finally:
            self._batching = False
        if self._unflushed:
            self._flush()

    def _dropped(self, e: OSError) -> None:
        """Count a frame the kernel would not take; log at 1, 2, 4, 8... drops."""
        self.frames_dropped += 1
        count = self.frames_dropped
        if count & (count - 1) == 0:
            _log.warn(
                "AoE port {interface}: dropped a frame ({error}); {count} dropped so far",
                interface=self.interface,
                error=e.strerror or str(e),
                count=count,
            )

    def writeSequence(self, seq: list[bytes]) -> None:  # type: ignore[override]
        """Transmit the pieces of ``seq`` joined as one frame."""
        self.write(b"".join(seq))

    def stopListening(self) -> defer.Deferred[None]:
        """
        Stop reading and close the socket.

        @return: a ``Deferred`` that fires (with ``None``) once the socket is
            closed and the protocol stopped.  Calling it again is safe.
        """
        self.stopReading()
        if self.disconnecting:
            assert self._stopped is not None
            return self._stopped
        if self.connected:
            self._stopped = task.deferLater(self.reactor, 0, self.connectionLost)
            self.disconnecting = True
            return self._stopped
        return defer.succeed(None)

    def connectionLost(self, reason: Failure | None = None) -> None:
        """Close the socket and stop the protocol."""
        if reason is not None and not reason.check(error.ConnectionDone):
            _log.failure("AoE port {interface} failed", reason, interface=self.interface)
        _log.info("AoE port closed on {interface}", interface=self.interface)
        abstract.FileDescriptor.connectionLost(self, reason)  # type: ignore[arg-type]
        if self._resume is not None and self._resume.active():
            self._resume.cancel()
        if self._stale_summary is not None:
            # Said now rather than never: the port will not read again.
            self._stale_summary.cancel()
            self._log_stale()
        if self.bound:
            self.protocol.doStop()
        self.bound = False
        self.connected = 0
        rings, self._rings = self._rings, None
        if rings is not None and not rings.close():
            _log.warn(
                "AoE port {interface}: a view of a ring slot is still held; "
                "the ring stays mapped until it is freed",
                interface=self.interface,
            )
        self._system.close(self._fileno)
        self._fileno = -1

    def logPrefix(self) -> str:
        """Name the protocol and interface in log lines."""
        return self.logstr

    def getHost(self) -> EthernetAddress:
        """Return the interface, MAC and MTU this port is bound to."""
        return EthernetAddress(self.interface, self.mac or bytes(6), self.mtu or 0)
