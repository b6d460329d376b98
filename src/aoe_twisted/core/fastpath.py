# -*- test-case-name: tests.test_fastpath -*-
"""
A fast path for the frames that dominate traffic: plain ATA READ/WRITE SECTORS (EXT).

``fast_reply`` answers such a frame straight from its bytes, with one
``struct`` unpack of the 36 bytes of Ethernet, AoE and ATA headers and one
pack of the reply's, and no ``EthernetFrame``, ``Header`` or ``ATAArg``
objects.  It is a specialised decode of frames the general codec also covers:
for every frame it answers, ``Dispatcher`` without it (the codec, ``Target``
and ``serve_ata``) produces the same reply bytes, the same counters and the
same disk contents, and ``tests.test_fastpath`` checks that they do.  It
answers only a frame whose success it can see before touching the disk, and
returns ``None`` for anything else, which the general path then handles as
it always did: every AoE error, every refused ATA command, every unusual flag.

It counts what the general path counts (``Target.stats``: the request, its
bytes, its service time, the initiator and whether its tag was seen
before), written out inline: two clock reads and a few increments per frame.

The one failure it answers itself is the backend's: a read or write that
raises ``OSError`` (or a short read) gets the ``ERR|DRDY`` reply the ATA
engine gives (``UNC`` for a read, ``ABRT`` for a write), so a failed write
is never attempted twice.  It calls the backend directly: it serves only
``IBlockBackend``'s synchronous methods, as ``operations.perform`` would.

A request it answers, byte by byte (offsets in the Ethernet frame)::

     0.. 5  destination MAC        any (the port delivers only ours)
     6..11  source MAC             unicast
    12..13  EtherType              0x88A2
    14      AoE version and flags  exactly 0x10: version 1, no R or E flag
    15      AoE error              0
    16..17  major (shelf)          a target's own shelf, not the broadcast
    18      minor (slot)           that target's own slot, not the broadcast
    19      AoE command            0, Issue ATA Command
    20..23  tag                    any, echoed
    24      ATA AFlags             W set for a write and clear for a read
    25      ATA error/feature      any (ignored)
    26      ATA sector count       1 to the target's max_sectors
    27      ATA command            0x20, 0x24 (read), 0x30, 0x34 (write)
    28..33  LBA, little-endian     the sectors inside the disk
    34..35  ATA reserved           0
    36..    data                   a write's sectors (and any Ethernet padding)

and the target's MAC mask list and reserve list must each be empty or list
the source.  The reply swaps the MACs, sets the R flag, carries the target's
shelf.slot, echoes the tag, the known AFlags bits and the request's LBA,
with sector count 0, status ``DRDY`` and a read's sectors after it; a reply
shorter than 60 bytes (a write's) is padded with zeros.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from time import perf_counter as _clock

from attrs import define, setters

from aoe_twisted.core.decision import Decision
from aoe_twisted.core.operations import BackendIO, IOKind
from aoe_twisted.core.stats import SERVICE_BUCKETS
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import (
    ETHERTYPE,
    MIN_FRAME_SIZE,
    SECTOR_SIZE,
    VERSION,
    ATACmdStatus,
    ATAError,
    ATAFlag,
    Command,
)
from aoe_twisted.core.wire.ata import _ATA as _ATA_ARG
from aoe_twisted.core.wire.ethernet import _ETHERNET
from aoe_twisted.core.wire.header import _FLAG_RESPONSE, _HEADER

__all__ = ["FRAME_HEADER", "FastPending", "fast_pending", "fast_reply", "fast_reply_into"]

FRAME_HEADER = struct.Struct(
    "!" + _ETHERNET.format.lstrip("!") + _HEADER.format.lstrip("!") + _ATA_ARG.format.lstrip("<")
)
"""
The Ethernet, AoE and ATA headers of a frame as one struct (36 bytes).

The wire's three structs joined: the Ethernet and AoE ones are big-endian,
and of the ATA one's fields only the reserved word is wider than a byte,
which reads as zero in either byte order (the LBA stays 6 raw bytes).
"""

_REQUEST_VERFLAGS = VERSION << 4
_REPLY_VERFLAGS = VERSION << 4 | _FLAG_RESPONSE
_ATA = int(Command.ISSUE_ATA_COMMAND)
_ECHOED_AFLAGS = int(
    ATAFlag.LBA48_EXTENDED | ATAFlag.DEVICE_HEAD | ATAFlag.ASYNCHRONOUS | ATAFlag.WRITE
)
_WRITE = int(ATAFlag.WRITE)
_EXTENDED = int(ATAFlag.LBA48_EXTENDED)
_DRDY = int(ATACmdStatus.READY_STATUS)
_ERR_DRDY = int(ATACmdStatus.ERR_STATUS) | _DRDY
_ABRT = int(ATAError.ABRT)
_UNC = int(ATAError.UNC)
_MASK28 = (1 << 28) - 1
_MASK48 = (1 << 48) - 1

#: The served commands: (is a write, LBA mask without and with the E flag).
_COMMANDS: dict[int, tuple[bool, int, int]] = {
    int(ATACmdStatus.READ_28BIT): (False, _MASK28, _MASK28),
    int(ATACmdStatus.READ_48BIT): (False, _MASK28, _MASK48),
    int(ATACmdStatus.WRITE_28BIT): (True, _MASK28, _MASK28),
    int(ATACmdStatus.WRITE_48BIT): (True, _MASK28, _MASK48),
}

_pack = FRAME_HEADER.pack
#: The histogram's ``+Inf`` bucket (``TargetStats.served``, written out inline here).
_LAST_BUCKET = len(SERVICE_BUCKETS)
_unpack_from = FRAME_HEADER.unpack_from
_HEADER_SIZE = FRAME_HEADER.size
_PADDING = bytes(MIN_FRAME_SIZE - _HEADER_SIZE)


TargetIndex = Mapping[tuple[int, int], Target]
"""The targets this path may answer for, by ``(shelf, slot)`` (``Dispatcher.index``)."""

#: What ``_accept`` finds in a frame this path answers.
_Plan = tuple[bytes, Target, int, int, bytes, bytes, int, bool]


def fast_reply(
    frame: bytes | memoryview, mac: bytes, targets: TargetIndex, hold: bool = False
) -> Decision | None:
    """
    Return the decision answering ``frame`` from the interface ``mac``, or ``None``.

    ``None`` means the frame is not one this path answers (see the module
    docstring); the caller then gives it to the general path, to which
    nothing has happened: no counter, no backend call.  A write's decision
    names its target in ``written`` and, with ``hold`` or the target's
    ``sync`` (its reply waits for group commit), carries its ``refusal``: the ``ABRT`` reply to send
    instead if the write cannot be made durable.
    """
    plan = _accept(frame, targets)
    if plan is None:
        return None
    src, target, aflags, count, tag, lba, first, write = plan
    backend = target.backend
    stats = target.stats
    if write:
        end = _HEADER_SIZE + count * SECTOR_SIZE
        if backend.read_only or len(frame) < end:
            return None
        data = frame[_HEADER_SIZE:end]
        if not target.zero_copy and not isinstance(data, bytes):
            data = bytes(data)
        stats.seen(src, tag)
        stats.write += 1
        started = _clock()
        try:
            backend.write(first * SECTOR_SIZE, data)
        except OSError as e:
            elapsed = _clock() - started
            bucket = int(elapsed * 1_000_000).bit_length()
            stats.buckets[bucket if bucket < _LAST_BUCKET else _LAST_BUCKET] += 1
            stats.seconds += elapsed
            stats.ata_errors += 1
            stats.failed("write", e)
            return Decision((_header(src, mac, target, tag, aflags, lba, _ABRT, count) + _PADDING,))
        elapsed = _clock() - started
        bucket = int(elapsed * 1_000_000).bit_length()
        stats.buckets[bucket if bucket < _LAST_BUCKET else _LAST_BUCKET] += 1
        stats.seconds += elapsed
        stats.write_bytes += end - _HEADER_SIZE
        reply = _header(src, mac, target, tag, aflags, lba) + _PADDING
        if hold or target.sync:
            refusal = _header(src, mac, target, tag, aflags, lba, _ABRT, count) + _PADDING
            return Decision((reply,), target, refusal)
        return Decision((reply,), target)
    length = count * SECTOR_SIZE
    stats.seen(src, tag)
    stats.read += 1
    started = _clock()
    try:
        data = backend.read(first * SECTOR_SIZE, length)
    except OSError as e:
        data = b""
        stats.failed("read", e)
    else:
        if len(data) != length:
            stats.failed("read", None)
    elapsed = _clock() - started
    bucket = int(elapsed * 1_000_000).bit_length()
    stats.buckets[bucket if bucket < _LAST_BUCKET else _LAST_BUCKET] += 1
    stats.seconds += elapsed
    if len(data) != length:
        stats.ata_errors += 1
        return Decision((_header(src, mac, target, tag, aflags, lba, _UNC, count) + _PADDING,))
    stats.read_bytes += length
    return Decision((_header(src, mac, target, tag, aflags, lba) + data,))


def fast_reply_into(
    frame: bytes | memoryview,
    reply: memoryview,
    mac: bytes,
    targets: TargetIndex,
    writes: bool = True,
) -> int:
    """
    Write the reply to ``frame`` into ``reply`` and return its length, or return 0.

    The zero-copy twin of ``fast_reply``, for a transmit buffer (a TX ring
    slot): the same frames answered with the same bytes, but a read's
    sectors land in ``reply`` straight from the backend if it provides
    ``IZeroCopyBackend`` (``Target.zero_copy``), and a write's sectors go to
    such a backend as a ``memoryview`` of ``frame`` (others get ``bytes``).
    0 means not answered, as ``None`` from ``fast_reply``; so does a
    ``reply`` too small for the answer, and a write when ``writes`` is false
    or the target's ``sync`` is set (its reply must wait for group commit,
    so it cannot go into a slot that is sent at once).  Nothing is kept:
    ``frame`` and ``reply`` may be reused as soon as this returns.
    """
    plan = _accept(frame, targets)
    if plan is None:
        return 0
    src, target, aflags, count, tag, lba, first, write = plan
    backend = target.backend
    stats = target.stats
    if write:
        end = _HEADER_SIZE + count * SECTOR_SIZE
        if (
            not writes
            or target.sync
            or backend.read_only
            or len(frame) < end
            or len(reply) < MIN_FRAME_SIZE
        ):
            return 0
        data = frame[_HEADER_SIZE:end]
        if not target.zero_copy:
            data = bytes(data)
        stats.seen(src, tag)
        stats.write += 1
        started = _clock()
        try:
            backend.write(first * SECTOR_SIZE, data)
        except OSError as e:
            elapsed = _clock() - started
            bucket = int(elapsed * 1_000_000).bit_length()
            stats.buckets[bucket if bucket < _LAST_BUCKET else _LAST_BUCKET] += 1
            stats.seconds += elapsed
            stats.ata_errors += 1
            stats.failed("write", e)
            reply[:_HEADER_SIZE] = _header(src, mac, target, tag, aflags, lba, _ABRT, count)
        else:
            elapsed = _clock() - started
            bucket = int(elapsed * 1_000_000).bit_length()
            stats.buckets[bucket if bucket < _LAST_BUCKET else _LAST_BUCKET] += 1
            stats.seconds += elapsed
            stats.write_bytes += end - _HEADER_SIZE
            reply[:_HEADER_SIZE] = _header(src, mac, target, tag, aflags, lba)
        reply[_HEADER_SIZE:MIN_FRAME_SIZE] = _PADDING
        return MIN_FRAME_SIZE
    length = count * SECTOR_SIZE
    end = _HEADER_SIZE + length
    if len(reply) < end:
        return 0
    stats.seen(src, tag)
    stats.read += 1
    started = _clock()
    try:
        if target.zero_copy:
            got = backend.read_into(first * SECTOR_SIZE, reply[_HEADER_SIZE:end])  # type: ignore[attr-defined]
        else:
            data = backend.read(first * SECTOR_SIZE, length)
            got = len(data)
            if got == length:
                reply[_HEADER_SIZE:end] = data
    except OSError as e:
        got = -1
        stats.failed("read", e)
    else:
        if got != length:
            stats.failed("read", None)
    elapsed = _clock() - started
    bucket = int(elapsed * 1_000_000).bit_length()
    stats.buckets[bucket if bucket < _LAST_BUCKET else _LAST_BUCKET] += 1
    stats.seconds += elapsed
    if got != length:
        stats.ata_errors += 1
        reply[:_HEADER_SIZE] = _header(src, mac, target, tag, aflags, lba, _UNC, count)
        reply[_HEADER_SIZE:MIN_FRAME_SIZE] = _PADDING
        return MIN_FRAME_SIZE
    stats.read_bytes += length
    reply[:_HEADER_SIZE] = _header(src, mac, target, tag, aflags, lba)
    return end



@define(eq=False, on_setattr=setters.NO_OP)
class FastPending:
    """
    A plain read or write to an asynchronous disk, accepted by ``fast_pending``.

    The fast path's twin of ``target.Pending`` for an ``IAsyncBlockBackend``:
    its answer waits for the disk, which completes it later and in any
    order.  It carries what the server needs to start the operation and
    keep its books (``target``, ``initiator``, ``io``), and what the reply
    needs (the request's tag, AFlags, LBA and sector count), instead of the
    request's decoded ``Header``; ``finish`` returns the whole reply frame,
    from the MAC the completing dispatcher gives (the interface's MAC may
    have changed meanwhile; ``mac``, the accepting one's, if none is given).
    The replies are byte for byte the general path's (``Pending.finish``
    and ``ata.finish_ata``): ``tests.test_fastpath`` checks that they are.
    """

    target: Target
    initiator: bytes
    io: BackendIO
    mac: bytes
    tag: bytes
    aflags: int
    lba: bytes
    count: int

    @property
    def writes(self) -> bool:
        """Whether a successful ``finish`` acknowledges a write."""
        return self.io.kind is IOKind.WRITE

    def finish(
        self,
        result: bytes | None,
        error: OSError | None = None,
        elapsed: float = 0.0,
        mac: bytes | None = None,
    ) -> bytes:
        """
        Return the reply frame from ``mac`` once the operation gave ``result`` (or ``error``).

        A failed or short read is ``UNC``, a failed write ``ABRT`` (never
        acknowledged); the target's ``stats`` learn what ``Pending.finish``
        teaches them: no longer in flight, the service time, the bytes or
        the failure.
        """
        io = self.io
        stats = self.target.stats
        stats.in_flight -= 1
        stats.served(elapsed)
        if io.kind is IOKind.WRITE:
            if error is not None:
                stats.failed("write", error)
                stats.ata_errors += 1
                return self._reply(mac, _ABRT) + _PADDING
            stats.write_bytes += io.length
            return self._reply(mac) + _PADDING
        if error is not None or result is None or len(result) != io.length:
            stats.failed("read", error)
            stats.ata_errors += 1
            return self._reply(mac, _UNC) + _PADDING
        stats.read_bytes += io.length
        return self._reply(mac) + result

    def refusal(self, mac: bytes | None = None) -> bytes:
        """Return the ``ERR|DRDY``/``ABRT`` reply from ``mac`` refusing this write (no count)."""
        return self._reply(mac, _ABRT) + _PADDING

    def _reply(self, mac: bytes | None, error: int = 0) -> bytes:
        """The reply's 36 header bytes from ``mac`` (the accepting one's if ``None``)."""
        return _header(
            self.initiator, self.mac if mac is None else mac, self.target, self.tag,
            self.aflags, self.lba, error, self.count if error else 0,
        )


def fast_pending(
    frame: bytes | memoryview, mac: bytes, targets: TargetIndex
) -> FastPending | None:
    """
    Accept ``frame`` as a plain read or write to an asynchronous disk, or return ``None``.

    ``targets`` holds the asynchronous disks (``Dispatcher.async_index``).
    The frames accepted are those ``fast_reply`` answers (the module
    docstring), counted as the general path counts them (the request, its
    initiator and tag, one more in flight); the operation is left for the
    caller to start, and its completion to ``FastPending.finish``.  A
    write's data is copied out of ``frame``, which may be a ring slot
    reused once this returns.  ``None`` means nothing happened: the general
    path then decides, as it always did (a write to a read-only disk, too
    short a frame, and every error it answers).
    """
    plan = _accept(frame, targets)
    if plan is None:
        return None
    src, target, aflags, count, tag, lba, first, write = plan
    stats = target.stats
    length = count * SECTOR_SIZE
    if write:
        end = _HEADER_SIZE + length
        if target.backend.read_only or len(frame) < end:
            return None
        io = BackendIO(IOKind.WRITE, first * SECTOR_SIZE, length, bytes(frame[_HEADER_SIZE:end]))
        stats.write += 1
    else:
        io = BackendIO(IOKind.READ, first * SECTOR_SIZE, length)
        stats.read += 1
    stats.seen(src, tag)
    stats.in_flight += 1
    return FastPending(target, src, io, mac, tag, aflags, lba, count)


def _header(
    src: bytes,
    mac: bytes,
    target: Target,
    tag: bytes,
    aflags: int,
    lba: bytes,
    error: int = 0,
    count: int = 0,
) -> bytes:
    """
    Return the 36 header bytes of the reply to a request this path answers.

    From us (``mac``) to ``src``, from ``target``'s address, echoing the tag,
    the known AFlags bits and the LBA; with ``error`` it is ``ERR|DRDY``
    carrying that error register and the request's ``count``, without it
    ``DRDY`` with count 0.
    """
    return _pack(
        src, mac, ETHERTYPE, _REPLY_VERFLAGS, 0, target.shelf, target.slot, _ATA, tag,
        aflags & _ECHOED_AFLAGS, error, count, _ERR_DRDY if error else _DRDY, lba, 0,
    )


def _accept(frame: bytes | memoryview, targets: TargetIndex) -> _Plan | None:
    """
    Return what answering ``frame`` needs, or ``None`` if this path does not answer it.

    The plan is the source MAC, the target, the AFlags, the sector count,
    the tag, the raw LBA bytes, the first sector and whether it is a write.
    The access rule is ``acl.mask_allows`` and ``acl.reserve_allows``
    written out inline, as every check here is: this runs for every frame.
    """
    if len(frame) < _HEADER_SIZE:
        return None
    (
        _dst, src, ethertype, verflags, error, major, minor, command, tag,
        aflags, _feature, count, cmd, lba, reserved,
    ) = _unpack_from(frame)
    if (
        ethertype != ETHERTYPE
        or verflags != _REQUEST_VERFLAGS
        or error
        or command != _ATA
        or reserved
        or src[0] & 1
    ):
        return None
    kind = _COMMANDS.get(cmd)
    if kind is None:
        return None
    write, mask28, mask48 = kind
    if write != bool(aflags & _WRITE):
        return None
    # One dict lookup, however many targets: the broadcast address is not in
    # the index, so a broadcast request goes to the general path.
    target = targets.get((major, minor))
    if target is None:
        return None
    if not 0 < count <= target.max_sectors:
        return None
    acl = target.acl
    allowed = acl.mask_list
    if allowed and src not in allowed:
        return None
    allowed = acl.reserve_list
    if allowed and src not in allowed:
        return None
    backend = target.backend
    first = int.from_bytes(lba, "little") & (mask48 if aflags & _EXTENDED else mask28)
    if first + count > backend.size // SECTOR_SIZE:
        return None
    return src, target, aflags, count, tag, lba, first, write
