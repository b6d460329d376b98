# -*- test-case-name: tests.test_ring -*-
"""
``PACKET_MMAP`` rings (``TPACKET_V2``) on an ``AF_PACKET`` socket: frames without a syscall each.

With an RX ring the kernel writes every received frame into a slot of a
buffer shared with us (``mmap``) and marks it ``TP_STATUS_USER``; we read it
in place and hand the slot back by writing ``TP_STATUS_KERNEL``.  With a TX
ring we write replies into slots, mark them ``TP_STATUS_SEND_REQUEST`` and
one ``send`` of nothing transmits every marked slot.  ``AoEPort`` uses them
so that a burst of requests costs one ``poll`` and one ``send`` per batch,
not a ``recvfrom`` and a ``send`` per frame.

A slot (``tpacket2_hdr`` then the frame)::

    RX: 0..31  tpacket2_hdr (tp_status, tp_len, tp_snaplen, tp_mac, ...)
        32..51 sockaddr_ll (sll_pkttype at 42)
        tp_mac.. the frame, Ethernet header included
    TX: 0..31  tpacket2_hdr (tp_status, tp_len)
        32..   the frame to send

The layout is Linux's (``linux/if_packet.h``); everything here is a thin
wrapper over ``setsockopt`` and ``mmap``, with the slot walking left to the
caller's loop for speed (see ``AoEPort``).  This module also holds the one
copy of the ``SOL_PACKET`` socket options this package uses, the fanout
ones (``aoe_twisted.net.fanout``) included.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import socket
import struct
from collections.abc import Iterable
from typing import Any

from attrs import frozen

__all__ = [
    "DEFAULT_RING_FRAMES",
    "MAX_RING_FRAMES",
    "MAX_STALE_AFTER",
    "MIN_RING_FRAMES",
    "NO_TIME",
    "PACKET_FANOUT",
    "PACKET_FANOUT_CBPF",
    "PACKET_FANOUT_DATA",
    "PACKET_FANOUT_FLAG_UNIQUEID",
    "PACKET_FANOUT_HASH",
    "RX_PKTTYPE_AT",
    "RX_SLOT_HEADER",
    "RX_SLOT_STAMPED",
    "SOCKADDR_LL",
    "SOL_PACKET",
    "STALE_AFTER",
    "TPACKET2_HDR",
    "TP_STATUS_AVAILABLE",
    "TP_STATUS_KERNEL",
    "TP_STATUS_SEND_REQUEST",
    "TP_STATUS_USER",
    "TX_DATA_AT",
    "TX_LEN",
    "WINDOWS_PER_TARGET",
    "PacketRings",
    "RingGeometry",
    "receive_ring_frames",
    "stale_window",
]

#: ``SOL_PACKET`` and the ``PACKET_*`` socket options of this package (``linux/if_packet.h``).
SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_VERSION = 10
PACKET_TX_RING = 13
PACKET_LOSS = 14
PACKET_FANOUT = 18
PACKET_QDISC_BYPASS = 20
PACKET_FANOUT_DATA = 22
PACKET_IGNORE_OUTGOING = 23
#: Fanout modes: spread frames over the group by flow hash, or by a classic BPF program.
PACKET_FANOUT_HASH = 0
PACKET_FANOUT_CBPF = 6
#: Fanout flag: let the kernel pick an unused group id.
PACKET_FANOUT_FLAG_UNIQUEID = 0x2000
#: ``tpacket_versions``: ``TPACKET_V2`` (per-frame slots, VLAN fields; fixed slot size).
TPACKET_V2 = 1

#: RX slot states: the kernel's to fill, or ours to read.
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
#: TX slot states: free for us, queued for the kernel, being sent, refused.
TP_STATUS_AVAILABLE = 0
TP_STATUS_SEND_REQUEST = 1
TP_STATUS_SENDING = 2
TP_STATUS_WRONG_FORMAT = 4

#: ``struct tpacket_req``: block size, block count, frame size, frame count.
TPACKET_REQ = struct.Struct("=IIII")
#: ``struct tpacket2_hdr``: status, len, snaplen, mac, net, sec, nsec, vlan tci, vlan tpid, pad.
TPACKET2_HDR = struct.Struct("=IIIHHIIHH4x")
#: ``struct sockaddr_ll``: family, protocol (big-endian), ifindex, hatype, pkttype, halen, addr.
SOCKADDR_LL = struct.Struct("=HHiHBB8s")
#: Slot alignment (``TPACKET_ALIGNMENT``).
TPACKET_ALIGNMENT = 16
#: ``TPACKET2_HDRLEN``: the aligned header, then the ``sockaddr_ll``.
TPACKET2_HDRLEN = -(-TPACKET2_HDR.size // TPACKET_ALIGNMENT) * TPACKET_ALIGNMENT + SOCKADDR_LL.size
#: Where a TX slot's frame starts (``tp_hdrlen - sizeof(sockaddr_ll)`` in ``tpacket_fill_skb``).
TX_DATA_AT = TPACKET2_HDRLEN - SOCKADDR_LL.size
#: Where an RX slot's ``sll_pkttype`` byte is.
RX_PKTTYPE_AT = TX_DATA_AT + 10
#: ``tp_len``, ``tp_snaplen`` and ``tp_mac`` of an RX slot, read from byte 4 of it.
RX_SLOT_HEADER = struct.Struct("=IIH")
#: The same and ``tp_sec``, the second (``CLOCK_REALTIME``) the kernel received the frame.
RX_SLOT_STAMPED = struct.Struct("=IIH2xI")

#: Seconds a frame may have waited in the RX ring and still be answered.
#:
#: A process that stops running without dying while its kernel runs on
#: (SIGSTOP, a debugger, a disk that blocks it) finds, when it runs again,
#: every frame that came meanwhile in its ring.  Its initiators have retried
#: those requests (the Linux initiator sends them through another server of
#: the same disk after 10 s), and may have written newer data to the same
#: sectors since: carrying out such a write now would put the older data
#: back.  So a frame the kernel received more than this long ago (its
#: timestamp in the slot) is dropped unanswered; an initiator still waiting
#: for it sends it again.  Nothing waits this long in a ring of a process
#: that runs.  (A paused virtual machine is not covered: its kernel is
#: paused too, and stamps what arrived meanwhile when it resumes.)
STALE_AFTER = 5
#: The most ``stale_after`` may be (``--stale-after``), in seconds.
MAX_STALE_AFTER = 3600
#: A receive time more than this many seconds before the present is taken for
#: no time at all: never a reason to drop a frame.  The kernel stamps ring
#: slots with ``CLOCK_REALTIME``; were a frame ever stamped from another clock
#: (one counting from boot), every frame would look decades old, and a server
#: that drops them all would look alive and serve nothing.  (``_lane.c``'s
#: ``NO_TIME_SECONDS`` is the same.)
NO_TIME = 365 * 86400


def stale_window(stale_after: int, now: float) -> tuple[int, int]:
    """
    The receive times (``tp_sec``) that are stale at ``now``: ``[low, high)``.

    Received ``stale_after`` seconds or more before the present, but not more
    than ``NO_TIME`` before; empty when ``stale_after`` is 0 (never stale).
    """
    if stale_after <= 0:
        return 0, 0
    high = int(now) - stale_after
    return high - NO_TIME, high
#: ``tp_len`` of a TX slot, written at byte 4 of it.
TX_LEN = struct.Struct("=I")
#: Room before the frame in an RX slot: the kernel puts it 16 bytes past the aligned header.
_RX_HEADROOM = -(-(TPACKET2_HDRLEN + 16) // TPACKET_ALIGNMENT) * TPACKET_ALIGNMENT
#: Room for a VLAN tag, a frame a few bytes over the MTU (veth accepts them) and alignment.
_SLACK = 64
#: The ``tpacket_req`` that removes a ring.
_NO_RING = TPACKET_REQ.pack(0, 0, 0, 0)
#: Blocks are this big at least, so a block holds several slots.
_MIN_BLOCK = 64 * 1024

#: The RX ring has this many slots at least, whatever the targets.
MIN_RING_FRAMES = 256
#: Full windows the RX ring holds per target until the cap: four initiators each
#: keeping one target's whole buffer count in flight.
WINDOWS_PER_TARGET = 4
#: The default cap on the RX ring's slots: 64 full windows of the Linux initiator's 64
#: requests (38 MiB a ring at MTU 9000, 7 MiB at 1500; docs/performance.md).
DEFAULT_RING_FRAMES = 4096
#: The most slots ``--ring-frames`` may ask for (about 600 MiB a ring at MTU 9000).
MAX_RING_FRAMES = 65536


def receive_ring_frames(buffer_counts: Iterable[int], cap: int | None = None) -> int:
    """
    Return how many RX ring slots serve targets advertising ``buffer_counts``.

    Room for ``WINDOWS_PER_TARGET`` initiators' full windows on every target
    (``4 * sum(buffer_counts)``), at least ``MIN_RING_FRAMES``, at most ``cap``
    (``DEFAULT_RING_FRAMES`` if ``None``): the slots a burst of requests
    can wait in before the kernel drops frames, so what the server can
    really have in flight, not a product of the number of targets (that made
    the ring, and the memory it pins, grow without bound: 1,000 targets at
    MTU 9000 asked for 2.4 GB).  Never fewer than the largest buffer count,
    though, whatever ``cap`` says: one initiator keeping the window a target
    advertises full must never lose a frame to the ring.  With many targets,
    the ring is shared: it holds ``frames // max(buffer_counts)`` full windows
    at once (64 of 64 at the default cap), which is what the buffer count
    promises to each initiator for each target as long as no more of them
    are busy at the same instant (docs/performance.md, "Many targets").
    """
    counts = list(buffer_counts)
    if cap is None:
        cap = DEFAULT_RING_FRAMES
    wanted = max(MIN_RING_FRAMES, WINDOWS_PER_TARGET * sum(counts))
    return max(min(wanted, cap), max(counts, default=0))


def _align(value: int, alignment: int) -> int:
    """Round ``value`` up to a multiple of ``alignment``."""
    return -(-value // alignment) * alignment


@frozen
class RingGeometry:
    """
    The shape of one ring: ``block_nr`` blocks of ``block_size`` bytes, each holding slots.

    A slot (``frame_size`` bytes) never crosses a block; ``frame_nr`` slots in all.
    """

    block_size: int
    block_nr: int
    frame_size: int
    frame_nr: int

    @classmethod
    def for_mtu(cls, mtu: int, frames: int) -> RingGeometry:
        """Return a geometry with at least ``frames`` slots, each holding a frame of ``mtu``."""
        frame_size = _align(_RX_HEADROOM + mtu + _SLACK, TPACKET_ALIGNMENT)
        page = mmap.PAGESIZE
        block_size = _align(max(frame_size, _MIN_BLOCK), page)
        per_block = block_size // frame_size
        block_nr = max(1, -(-frames // per_block))
        return cls(block_size, block_nr, frame_size, block_nr * per_block)

    @property
    def size(self) -> int:
        """The bytes this ring takes in the mapping."""
        return self.block_size * self.block_nr

    def request(self) -> bytes:
        """Return the ``struct tpacket_req`` that asks the kernel for this ring."""
        return TPACKET_REQ.pack(self.block_size, self.block_nr, self.frame_size, self.frame_nr)

    def offsets(self, base: int = 0) -> list[int]:
        """Return the byte offset of every slot, in ring order, from ``base``."""
        per_block = self.block_size // self.frame_size
        return [
            base + block * self.block_size + index * self.frame_size
            for block in range(self.block_nr)
            for index in range(per_block)
        ]

    def frame_capacity(self) -> int:
        """Return the longest frame a TX slot holds."""
        return self.frame_size - TX_DATA_AT


class PacketRings:
    """
    An RX ring and a TX ring mapped from one packet socket (or, in tests, in a ``bytearray``).

    ``view`` is the whole mapping as bytes and ``status`` as 32-bit words (a
    slot's ``tp_status`` is ``status[offset >> 2]``).  ``rx_offsets`` and
    ``tx_offsets`` list the slots in ring order, and ``rx_next`` and
    ``tx_next`` are the indexes the walk goes on from.  ``tx_frames`` holds
    a view of each TX slot's frame area.
    """

    def __init__(self, buffer: mmap.mmap | bytearray, rx: RingGeometry, tx: RingGeometry) -> None:
        self._buffer = buffer
        self.rx = rx
        self.tx = tx
        self.view = memoryview(buffer)
        self.status = self.view.cast("I")
        self.rx_offsets = rx.offsets()
        self.tx_offsets = tx.offsets(rx.size)
        self.tx_frames = [
            self.view[offset + TX_DATA_AT : offset + tx.frame_size] for offset in self.tx_offsets
        ]
        self.rx_next = 0
        self.tx_next = 0
        #: The compiled lane walking these rings (``AoEPort``), and what it was built for.
        self.lane: Any = None
        self.lane_key: Any = None

    @classmethod
    def setup(
        cls, sock: socket.socket, rx: RingGeometry, tx: RingGeometry, bypass_qdisc: bool = False
    ) -> PacketRings:
        """
        Switch ``sock`` to ``TPACKET_V2``, give it both rings and map them.

        Also asks for ``PACKET_LOSS`` (a malformed TX slot is skipped rather
        than stalling the ring), ``PACKET_IGNORE_OUTGOING`` (our own and other
        local sockets' outgoing frames are not copied into the RX ring) and,
        if ``bypass_qdisc``, ``PACKET_QDISC_BYPASS`` (frames go straight to
        the driver); those are optional and their failure is ignored.  The
        bypass is off by default: frames sent around the qdisc are invisible
        to packet captures on the interface (``tcpdump``, ``tshark``), and a
        driver whose queue is full (a tap device) drops them with ``ENOBUFS``
        where the qdisc would have queued them; on veth, which has no qdisc,
        it saved nothing measurable.

        @raise OSError: if the version, a ring or the mapping is refused.
        """
        try:
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
        except OSError as e:
            # EBUSY: the socket has rings already, from a previous owner (a
            # worker restarted on the socket its predecessor used).  Once
            # unmapped they can be removed (else EBUSY again) and replaced.
            if e.errno != errno.EBUSY or sock.getsockopt(SOL_PACKET, PACKET_VERSION) != TPACKET_V2:
                raise
            for option in (PACKET_RX_RING, PACKET_TX_RING):
                sock.setsockopt(SOL_PACKET, option, _NO_RING)
        optional = [(PACKET_LOSS, 1), (PACKET_IGNORE_OUTGOING, 1)]
        if bypass_qdisc:
            optional.append((PACKET_QDISC_BYPASS, 1))
        for option, value in optional:
            with contextlib.suppress(OSError):
                sock.setsockopt(SOL_PACKET, option, value)
        try:
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, rx.request())
            sock.setsockopt(SOL_PACKET, PACKET_TX_RING, tx.request())
            buffer = mmap.mmap(
                sock.fileno(), rx.size + tx.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
        except OSError:
            # An RX ring left in place (ours, or a previous owner's) would
            # swallow every frame recvfrom expects: remove both, if we can.
            for option in (PACKET_RX_RING, PACKET_TX_RING):
                with contextlib.suppress(OSError):
                    sock.setsockopt(SOL_PACKET, option, _NO_RING)
            raise
        return cls(buffer, rx, tx)

    def tx_commit(self, index: int, length: int) -> None:
        """
        Hand TX slot ``index``, holding a frame of ``length`` bytes, to the kernel.

        The slot is marked ``TP_STATUS_SEND_REQUEST`` (the next ``send`` of
        nothing transmits it) and ``tx_next`` moves on to the slot after it.
        ``AoEPort`` inlines these lines in its receive loop, for speed, and
        calls this everywhere else.
        """
        offset = self.tx_offsets[index]
        TX_LEN.pack_into(self.view, offset + 4, length)
        self.status[offset >> 2] = TP_STATUS_SEND_REQUEST
        index += 1
        self.tx_next = 0 if index == len(self.tx_offsets) else index

    def tx_available(self, index: int) -> bool:
        """Return whether TX slot ``index`` is free to fill."""
        return self.status[self.tx_offsets[index] >> 2] == TP_STATUS_AVAILABLE

    def rx_ready(self, index: int) -> bool:
        """Return whether RX slot ``index`` holds a frame for us."""
        return bool(self.status[self.rx_offsets[index] >> 2] & TP_STATUS_USER)

    def close(self) -> bool:
        """
        Release the views and unmap; return whether the mapping is gone.

        If a view of a slot is still held somewhere (a bug: nothing may keep
        one), the mapping cannot be closed now and is left to the garbage
        collector; ``False`` says so.
        """
        self.lane = None  # it holds the mapping: let go of it first
        for frame in self.tx_frames:
            frame.release()
        self.tx_frames = []
        self.status.release()
        self.view.release()
        close = getattr(self._buffer, "close", None)  # a bytearray (in tests) has none
        try:
            if close is not None:
                close()
        except BufferError:
            return False
        return True
