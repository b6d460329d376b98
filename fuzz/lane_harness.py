"""
The compiled data lane's fuzz check: ``check_lane(data)``, the lane against the Python paths.

The lane (``aoe_twisted.lane._lane``) must answer exactly the frames
``core.fastpath.fast_reply_into`` answers, with the same reply bytes, the
same counters and the same disk contents, and decline everything else
without counting it.  A lane input is two bytes and a frames input
(``fuzz.harness.parse_input``)::

    byte 0   LaneOptions: the disks (memory, a memory slice, a memfd read with
             pread and written through a mapping or, if byte 1 has bit 6
             clear, with pwrite, a memfd slice read through the lane's
             O_DIRECT bounce buffer), faulty descriptors, writes held as under --sync,
             a target's own sync, answer() or the ring walk, when to sweep,
             accept_other
    byte 1   the ring's seed: reply capacity (answer), start slots, batch size
             and the hostile slot headers (tp_status, tp_len, tp_snaplen,
             tp_mac, sll_pkttype, a busy TX slot) the ring walk meets
    2..      a frames input: the scenario byte and up to eight frames

Every frame goes three ways, each on its own identical targets:

- the lane: ``Lane.answer`` (or ``Lane.drain`` over a ``bytearray`` holding
  RX and TX rings), and what it declines through the Python fast path in
  place and then the general path, as ``AoEProtocol`` does; its targets
  count in a ``Tally``;
- the Python lane (``AOE_TWISTED_PURE_PYTHON=1``): ``frame_received_into``,
  then the general path; its targets count in Python;
- the general path alone (``fast_path=False``), the reference.

After every frame the replies, the dispatchers' counters, every disk's bytes
and ACL state, and (after a sweep, every frame or at the end) every target's
``TargetStats`` snapshot with the timings dropped are the same three ways;
the lane answers a frame exactly when the Python lane answers it in place.
The ring walk must also consume and queue what the Python walk would, and
write nothing in the ring but the RX slots' status words and the TX slots it
queues.  Built with AddressSanitizer (``make fuzz-native``), an out-of-bounds
access anywhere in the extension aborts the run.

``check_lane`` does nothing (returns ``None``) when the extension is not
built.
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

from attrs import evolve, frozen

from aoe_twisted import lane as _lane
from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.backends.shared_memory import SharedMemoryBackend
from aoe_twisted.backends.slice import SliceBackend
from aoe_twisted.core.dispatch import Dispatcher
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import ETHERNET_HEADER_SIZE, MIN_FRAME_SIZE, SECTOR_SIZE
from aoe_twisted.lane.storage import LaneStorage
from aoe_twisted.lane.table import build_table
from aoe_twisted.net.ring import (
    RX_PKTTYPE_AT,
    RX_SLOT_HEADER,
    RX_SLOT_STAMPED,
    STALE_AFTER,
    TP_STATUS_AVAILABLE,
    TP_STATUS_SEND_REQUEST,
    TP_STATUS_SENDING,
    TP_STATUS_USER,
    TPACKET2_HDRLEN,
    TX_DATA_AT,
    RingGeometry,
    stale_window,
)
from fuzz.harness import (
    DISK_SECTORS,
    MAX_FRAMES,
    PATTERN,
    SERVER_MAC,
    FuzzInvariantError,
    Scenario,
    build_targets,
    encode_input,
    memory_disk,
    pack_option_byte,
    parse_input,
    unpack_option_byte,
)

__all__ = ["PLAIN", "LaneOptions", "check_lane", "encode_lane_input", "parse_lane_input"]

#: Where the kernel puts a frame in an RX slot (``net.ring._RX_HEADROOM``).
RX_MAC_AT = -(-(TPACKET2_HDRLEN + 16) // 16) * 16
#: RX and TX slots of the ring the walk runs over: more RX slots than frames, so
#: the walk meets an empty slot; fewer TX slots, so replies wrap around.
RX_SLOTS = MAX_FRAMES + 2
TX_SLOTS = 4
#: Reply buffers ``answer`` is given (the byte-1 seed picks): roomy, a TX slot at
#: MTU 1500, one sector's read exactly, and too small for any read.
_CAPACITIES = (16384, RingGeometry.for_mtu(1500, 1).frame_capacity(), 36 + SECTOR_SIZE, 100)
#: A slice starts this many sectors into its inner disk (not a 4096-byte boundary).
_SLICE_AT = 3
#: The inner disk of a slice: a whole number of 4096-byte blocks.
_INNER_SECTORS = 72
#: The block size of the emulated O_DIRECT disk.
_DIRECT_ALIGNMENT = 4096
_PACKET_HOST, _PACKET_OTHERHOST, _PACKET_OUTGOING = 0, 3, 4
_U32 = struct.Struct("=I")
_TX_HEADER = struct.Struct("=II")
#: A TX slot holding a reply for group commit (``_lane.c``'s ``TP_STATUS_HELD``).
TP_STATUS_HELD = 1 << 30
#: The ATA commands of a write, as one byte each.
_WRITES = (b"\x30", b"\x34")


def _check(condition: object, message: str) -> None:
    """Raise ``FuzzInvariantError(message)`` unless ``condition`` is true."""
    if not condition:
        raise FuzzInvariantError(message)


@frozen
class LaneOptions:
    """What byte 0 of a lane input picks."""

    disk: int
    faulty: bool
    hold_writes: bool
    target_sync: bool
    ring: bool
    sweep_each: bool
    accept_other: bool

    @classmethod
    def from_byte(cls, value: int) -> LaneOptions:
        """Decode: bits 0-1 disk, 2 faulty, 3 hold writes, 4 sync, 5 ring, 6 sweep, 7 other."""
        return cls(*unpack_option_byte(value))

    def to_byte(self) -> int:
        """Encode byte 0."""
        return pack_option_byte(
            self.disk,
            self.faulty,
            self.hold_writes,
            self.target_sync,
            self.ring,
            self.sweep_each,
            self.accept_other,
        )


def parse_lane_input(data: bytes) -> tuple[LaneOptions, int, Scenario, list[bytes]]:
    """
    Split a lane input into its options, ring seed, scenario and frames.

    In ring mode frames longer than the MTU are kept (the walk ignores them
    by ``tp_len``, or the hostile header hides their length).
    """
    options = LaneOptions.from_byte(data[0] if data else 0)
    seed = data[1] if len(data) > 1 else 0
    scenario, frames = parse_input(data[2:], oversized=options.ring)
    return options, seed, scenario, frames


def encode_lane_input(
    options: LaneOptions, seed: int, scenario: Scenario, frames: list[bytes]
) -> bytes:
    """Return the lane input ``parse_lane_input`` reads as these."""
    return bytes([options.to_byte(), seed]) + encode_input(scenario, frames)


# -- the disks ------------------------------------------------------------------


class _DirectSlice(SliceBackend):
    """
    A slice whose lane storage says ``O_DIRECT``: the lane then reads and writes whole
    4096-byte blocks through its bounce buffer (read-modify-write at unaligned edges),
    while Python reads the same bytes plainly, so both must agree.
    """

    def lane_storage(self) -> LaneStorage:
        """The inner memfd, from the slice's first byte, as an O_DIRECT disk."""
        return evolve(super().lane_storage(), direct=True, alignment=_DIRECT_ALIGNMENT,
                      mapped=False)


def _memfd(sectors: int, contents: bytes, at: int) -> SharedMemoryBackend:
    """A memfd disk of ``sectors``, ``contents`` at byte ``at``, ``0xEE`` elsewhere."""
    data = bytearray(b"\xee" * (sectors * SECTOR_SIZE))
    data[at : at + len(contents)] = contents
    return SharedMemoryBackend.create(len(data), contents=data)


def _faulty_memfd(mapped: bool) -> SharedMemoryBackend:
    """
    A memfd disk cut to half its size: reads past the half fail (``EIO``), in the
    lane and in Python alike.  Unless ``mapped``, it is opened read-only behind a
    backend that thinks it writable, so every write fails (``EBADF``); if
    ``mapped`` it is opened read-write, so a write past the half extends it,
    in the lane (which does not map a file shorter than its disk, and writes
    it with ``pwrite``) as in Python.
    """
    disk = _memfd(DISK_SECTORS, PATTERN, 0)
    fd = disk.lane_storage().fd
    os.ftruncate(fd, DISK_SECTORS * SECTOR_SIZE // 2)
    flags = os.O_RDWR if mapped else os.O_RDONLY
    reopened = os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)
    disk.close()
    return SharedMemoryBackend(
        path="memfd:faulty", size=DISK_SECTORS * SECTOR_SIZE, read_only=False, fd=reopened
    )


def _disk_maker(options: LaneOptions, opened: list[Any], mapped: bool) -> Callable[[], Any]:
    """
    Return the factory of ``options``'s disks; it notes each in ``opened`` to close.

    ``mapped``: a memfd disk is mapped into memory for the lane (mapped I/O),
    else read and written with ``pread``/``pwrite``.
    """
    size = DISK_SECTORS * SECTOR_SIZE
    at = _SLICE_AT * SECTOR_SIZE

    def make() -> Any:
        if options.disk == 0:
            disk: Any = memory_disk()
        elif options.disk == 1:
            inner = MemoryBackend(_INNER_SECTORS * SECTOR_SIZE)
            inner.write(0, b"\xee" * inner.size)
            inner.write(at, PATTERN)
            disk = SliceBackend(inner, at, size)
        elif options.disk == 2:
            disk = _faulty_memfd(mapped) if options.faulty else _memfd(DISK_SECTORS, PATTERN, 0)
            disk.mappable = mapped
        else:
            disk = _DirectSlice(_memfd(_INNER_SECTORS, PATTERN, at), at, size)
        opened.append(disk)
        return disk

    return make


def _disk_bytes(backend: Any) -> bytes:
    """The disk's bytes as its storage holds them (a faulty disk's short file too)."""
    storage = backend.lane_storage()
    if storage.buffer is not None:
        view = memoryview(storage.buffer)
        return bytes(view[storage.offset : storage.offset + backend.size])
    return os.pread(storage.fd, backend.size, storage.offset)


def _state(target: Target) -> tuple[Any, ...]:
    """What a target holds: disk bytes and ACL state."""
    acl = target.acl
    return _disk_bytes(target.backend), acl.config_string, acl.mask_list, acl.reserve_list


def _stats(target: Target) -> dict[str, Any]:
    """The target's snapshot after a sweep, the service times dropped (their count kept)."""
    snapshot = target.stats.snapshot("t", "b", 1.0)
    snapshot["served"] = snapshot.pop("service_seconds")["count"]
    return snapshot


@contextlib.contextmanager
def _pure_python() -> Iterator[None]:
    """Build targets as ``AOE_TWISTED_PURE_PYTHON=1`` would: their stats count in Python."""
    native = _lane.native
    _lane.native = None
    try:
        yield
    finally:
        _lane.native = native


# -- the three ways -------------------------------------------------------------


class _Side:
    """One way of serving frames: a dispatcher on its own targets."""

    def __init__(self, name: str, targets: list[Target], dispatcher: Dispatcher) -> None:
        self.name = name
        self.targets = targets
        self.dispatcher = dispatcher
        self.slot = memoryview(bytearray(16384))

    def python(self, frame: bytes, capacity: int) -> tuple[list[bytes], bool, bytes]:
        """
        Serve ``frame`` by the Python paths: in place, else the fast path, else generally.

        Return the replies, whether the lane must have answered the frame (the
        fast path answered it in place, or answered a write whose reply waits
        for group commit, which the lane holds in its TX slot, or whose disk
        failed) and that write's refusal (``b""`` if none).  A frame declined in place goes to
        ``frame_received`` (not ``general``, as ``AoEProtocol`` does) so that
        the fast path says whether it would hold the write.
        """
        dispatcher = self.dispatcher
        if not dispatcher.fast_path:
            return dispatcher.serve(frame), False, b""
        reply = self.slot[:capacity]
        length = dispatcher.frame_received_into(memoryview(frame), reply)
        if length:
            return [bytes(reply[:length])], True, b""
        fast = dispatcher.counters.fast
        decision = dispatcher.frame_received(frame)
        # What the fast path answers here but not in place is a write whose reply waits
        # for group commit (or its failure), which the lane answers too; or a read too
        # long for ``capacity``, which it does not.
        lane = dispatcher.counters.fast > fast and frame[27:28] in _WRITES
        return dispatcher.settle(decision), lane, decision.refusal or b""

    def lane_answered(self, count: int) -> None:
        """Count frames the lane answered, as ``AoEProtocol.laneAnswered`` does."""
        counters = self.dispatcher.counters
        counters.received += count
        counters.answered += count
        counters.replies += count
        counters.fast += count

    def fates(self) -> dict[str, int]:
        """The dispatcher's counters but ``fast``."""
        counts = self.dispatcher.counters.as_dict()
        del counts["fast"]
        return counts


def _compare(sides: list[_Side], what: str, stats: bool) -> None:
    """Every side's counters, disks, ACL state (and target stats) equal the reference's."""
    lane, python, general = sides
    _check(
        lane.dispatcher.counters.as_dict() == python.dispatcher.counters.as_dict(),
        f"{what}: the lane counted otherwise than the Python lane: "
        f"{lane.dispatcher.counters.as_dict()} != {python.dispatcher.counters.as_dict()}",
    )
    _check(python.fates() == general.fates(), f"{what}: the Python lane counted otherwise")
    reference = [_state(t) for t in general.targets]
    for side in (lane, python):
        _check(
            [_state(t) for t in side.targets] == reference,
            f"{what}: {side.name} left other disks or ACL state",
        )
    if stats:
        reference_stats = [_stats(t) for t in general.targets]
        for side in (lane, python):
            mine = [_stats(t) for t in side.targets]
            _check(
                mine == reference_stats,
                f"{what}: {side.name} target stats differ: {mine} != {reference_stats}",
            )


def _answer_walk(
    lane: Any, table: Any, sides: list[_Side], frames: list[bytes], capacity: int,
    sweep_each: bool,
) -> None:
    """Each frame through ``Lane.answer`` (else Python), the Python lane and the general path."""
    lane_side, python, general = sides
    reply = bytearray(capacity)
    for number, frame in enumerate(frames, 1):
        written = lane.answer(table, frame, reply) if table is not None else 0
        _check(0 <= written <= capacity, f"answer returned {written} for a {capacity}-byte buffer")
        expected, must, _ = python.python(frame, capacity)
        if written:
            _check(written >= MIN_FRAME_SIZE, f"the lane's reply of {written} bytes is not padded")
            lane_side.lane_answered(1)
            replies = [bytes(reply[:written])]
        else:
            replies = lane_side.python(frame, capacity)[0]
        what = f"frame {number} ({frame[:40].hex()}...)"
        _check(
            bool(written) == must,
            f"{what}: the lane {'answered' if written else 'declined'} a frame "
            f"the Python fast path {'answered' if must else 'declined'}",
        )
        _check(replies == expected, f"{what}: the lane answered otherwise than the Python lane")
        _check(general.python(frame, capacity)[0] == expected, f"{what}: the general path differs")
        _compare(sides, what, sweep_each)


# -- the ring walk --------------------------------------------------------------


@frozen
class _Slot:
    """An RX slot's header as the walk reads it."""

    status: int
    length: int
    snaplen: int
    mac: int
    pkttype: int
    #: Its receive time (``tp_sec``): fresh, stale (an hour old), no time (a stamp
    #: from boot), or in the future; the lane drops stale ones (``STALE_AFTER``).
    age: int = 0


#: ``age`` values of a ``_Slot``.
_FRESH, _STALE, _NO_TIME, _FUTURE = range(4)


def _received_at(age: int) -> int:
    """The ``tp_sec`` of a slot of ``age``, far enough from the second's edges to be sure."""
    now = int(time.time())
    return {_FRESH: now, _STALE: now - 3600, _NO_TIME: 1000, _FUTURE: now + 3600}[age]


def _hostile(rng: random.Random, slot: _Slot, size: int, max_frame: int) -> _Slot:
    """Spoil one field of ``slot`` (an RX slot of ``size`` bytes) the way ``rng`` picks."""
    kind = rng.randrange(12)
    if kind == 11:
        return evolve(slot, age=rng.choice((_STALE, _NO_TIME, _FUTURE)))
    if kind == 0:
        return evolve(slot, snaplen=rng.getrandbits(32))
    if kind == 1:
        return evolve(slot, snaplen=size - slot.mac + 1)
    if kind == 2:
        return evolve(slot, mac=rng.getrandbits(16))
    if kind == 3:
        return evolve(slot, mac=rng.randrange(0, 48))
    if kind == 4:
        return evolve(slot, mac=max(0, size - slot.snaplen))
    if kind == 5:
        return evolve(slot, length=rng.choice((max_frame, max_frame + 1, rng.getrandbits(32))))
    if kind == 6:
        return evolve(slot, status=rng.choice((0xFFFFFFFF, 2, 3, 0x81, 0x20000001)))
    if kind == 7:
        return evolve(slot, pkttype=rng.choice((_PACKET_OUTGOING, _PACKET_OTHERHOST, 1, 2, 255)))
    if kind == 8:
        return evolve(slot, mac=size - 1, snaplen=rng.choice((0, 1, 2)))
    if kind == 9:
        return evolve(slot, snaplen=rng.randrange(0, max(1, slot.snaplen)))
    return evolve(slot, mac=0xFFFF, snaplen=0xFFFFFFFF)


class _Ring:
    """RX and TX rings in a ``bytearray``, laid out as the kernel lays them out."""

    def __init__(self, mtu: int) -> None:
        self.slot = RingGeometry.for_mtu(mtu, 1).frame_size
        self.max_frame = mtu + ETHERNET_HEADER_SIZE
        self.rx = [index * self.slot for index in range(RX_SLOTS)]
        self.tx = [(RX_SLOTS + index) * self.slot for index in range(TX_SLOTS)]
        self.buffer = bytearray((RX_SLOTS + TX_SLOTS) * self.slot)

    def put(self, index: int, frame: bytes, slot: _Slot, frame_at: int) -> None:
        """Write RX slot ``index``: its header, and ``frame`` at ``frame_at`` if it fits."""
        offset = self.rx[index]
        buffer = self.buffer
        struct.pack_into("=IIIH", buffer, offset, slot.status, slot.length, slot.snaplen,
                         slot.mac)
        struct.pack_into("=I", buffer, offset + 16, _received_at(slot.age))
        buffer[offset + RX_PKTTYPE_AT] = slot.pkttype
        room = self.slot - frame_at
        if frame_at >= RX_PKTTYPE_AT + 1 and room > 0:
            buffer[offset + frame_at : offset + frame_at + min(room, len(frame))] = frame[:room]

    def python_frame(
        self, index: int, accept_other: bool, image: bytes | bytearray | None = None
    ) -> tuple[bool, bytes | None]:
        """
        What the Python walk does with RX slot ``index``: (consumed, frame or ``None``).

        Not consumed: the slot is the kernel's.  Consumed without a frame: the
        port ignores it.  The frame is clamped to its slot (``AoEPort._walk_ring``
        slices the whole mapping, which a hostile ``tp_snaplen`` could overrun
        into the next slot; the kernel never writes such a header).  ``image``
        is the ring as it was at some moment (the ring now by default).
        """
        offset = self.rx[index]
        buffer = self.buffer if image is None else image
        if not _U32.unpack_from(buffer, offset)[0] & TP_STATUS_USER:
            return False, None
        length, snaplen, mac, received_at = RX_SLOT_STAMPED.unpack_from(buffer, offset + 4)
        pkttype = buffer[offset + RX_PKTTYPE_AT]
        no_time, stale_before = stale_window(STALE_AFTER, time.time())
        if (
            pkttype == _PACKET_OUTGOING
            or (pkttype == _PACKET_OTHERHOST and not accept_other)
            or length > self.max_frame
            or no_time <= received_at < stale_before
        ):
            return True, None
        end = min(mac + snaplen, self.slot)
        return True, bytes(buffer[offset + mac : offset + end]) if mac < end else b""

    def inside(self, index: int) -> bool:
        """Whether RX slot ``index``'s header puts its frame inside the slot."""
        _, snaplen, mac = RX_SLOT_HEADER.unpack_from(self.buffer, self.rx[index] + 4)
        return mac + snaplen <= self.slot

    def consume(self, index: int) -> None:
        """Give RX slot ``index`` back to the kernel."""
        _U32.pack_into(self.buffer, self.rx[index], 0)


def _fill_ring(
    ring: _Ring, frames: list[bytes], seed: int, options: LaneOptions, start: int
) -> list[int]:
    """Put ``frames`` into RX slots from ``start``; return the TX slots made busy."""
    rng = random.Random(seed << 8 | options.to_byte())
    hostile = seed >= 0x10
    busy = []
    for number, frame in enumerate(frames):
        index = (start + number) % RX_SLOTS
        room = ring.slot - RX_MAC_AT
        slot = _Slot(TP_STATUS_USER, len(frame), min(len(frame), room), RX_MAC_AT, _PACKET_HOST)
        frame_at = RX_MAC_AT
        if hostile and rng.random() < 0.5:
            slot = _hostile(rng, slot, ring.slot, ring.max_frame)
            if RX_PKTTYPE_AT < slot.mac < ring.slot:
                frame_at = slot.mac
        ring.put(index, frame, slot, frame_at)
        if hostile and rng.random() < 0.1:
            busy.append(rng.randrange(TX_SLOTS))
    return busy


@frozen
class _Walked:
    """One RX slot as a walk left it: ignored, answered by the lane or by Python."""

    replies: tuple[bytes, ...]
    ignored: bool = False
    lane: bool = False
    refusal: bytes = b""
    excused: bool = False


def _ring_walk(
    native: Any, table: Any, sides: list[_Side], frames: list[bytes], seed: int,
    options: LaneOptions, mtu: int,
) -> None:
    """
    The frames in an RX ring: ``Lane.drain`` (with Python taking each frame it stops
    at, as ``AoEPort._drain_ring`` does) against the Python walk over its own copy.

    Replies the lane holds for group commit stay in their TX slots until the
    walk ends, as until ``AoEProtocol.drainFinished``; then ``Lane.release``
    sends them, refusals for the first target's if the seed's low bit says
    its disk failed to sync.
    """
    lane_side, python, general = sides
    ring = _Ring(mtu)
    rx_start = seed % RX_SLOTS
    tx_start = (seed >> 4) % TX_SLOTS
    batch = 1 + (seed >> 2) % 5
    busy = _fill_ring(ring, frames, seed, options, rx_start)
    for index in busy:
        _U32.pack_into(ring.buffer, ring.tx[index], TP_STATUS_SENDING)
    reference = _Ring(mtu)
    reference.buffer[:] = ring.buffer
    capacity = ring.slot - TX_DATA_AT
    budget = RX_SLOTS

    # The Python walk, the reference: the Python lane (and the general path).
    expected: list[_Walked] = []
    index = rx_start
    for _ in range(budget):
        consumed, frame = reference.python_frame(index, options.accept_other)
        if not consumed:
            break
        if frame is None:
            expected.append(_Walked((), ignored=True))
        else:
            replies, fast, refusal = python.python(frame, capacity)
            _check(general.python(frame, capacity)[0] == replies, "ring: the general path differs")
            expected.append(_Walked(tuple(replies), lane=fast, refusal=refusal))
        reference.consume(index)
        index = (index + 1) % RX_SLOTS

    # The lane's walk.
    lane = native.Lane(ring.buffer, ring.rx, ring.slot, ring.tx, ring.slot, SERVER_MAC,
                       ring.max_frame, options.accept_other)
    lane.stale_after = STALE_AFTER  # as AoEPort sets it
    got: list[_Walked] = []
    held: list[tuple[int, int]] = []  # (TX slot, walk position) of each held reply
    rx, tx = rx_start, tx_start
    unflushed = 0
    left = budget
    calls = 0
    while left > 0:
        calls += 1
        _check(calls <= 4 * RX_SLOTS, "ring: the lane walk does not progress")
        if table is None:
            stop = native.STOP_PYTHON
        else:
            before = bytes(ring.buffer)
            stop, new_rx, new_tx, received, ignored, answered, unflushed = lane.drain(
                table, rx, tx, left, unflushed, batch
            )
            _check(received == answered, "ring: the lane received what it did not answer")
            _check(
                new_rx == (rx + received + ignored) % RX_SLOTS
                and new_tx == (tx + answered) % TX_SLOTS,
                f"ring: drain moved rx {rx}->{new_rx}, tx {tx}->{new_tx} "
                f"for {received}+{ignored} slots",
            )
            taken = _harvest(ring, before, rx, received + ignored, tx, answered)
            replies = iter(taken)
            for step in range(received + ignored):
                _, frame = ring.python_frame((rx + step) % RX_SLOTS, options.accept_other, before)
                if frame is None:
                    got.append(_Walked((), ignored=True))
                    continue
                item = next(replies, None)
                _check(item is not None, "ring: the lane answered fewer slots than it took")
                assert item is not None
                slot, reply, is_held = item
                if is_held:
                    held.append((slot, len(got)))
                got.append(_Walked((reply,), lane=True))
            _check(next(replies, None) is None, "ring: the lane answered a slot it ignored")
            if answered:
                lane_side.lane_answered(answered)
            left -= received + ignored
            rx, tx = new_rx, new_tx
            if stop == native.STOP_FLUSH:
                unflushed = 0
                continue
            if stop != native.STOP_PYTHON:
                break
        # Python takes the slot the lane stopped at, as _walk_ring(rings, 1) does.
        consumed, frame = ring.python_frame(rx, options.accept_other)
        if not consumed:
            break
        if frame is None:
            got.append(_Walked((), ignored=True))
        else:
            # The lane leaves a frame that does not lie inside its slot, or that finds
            # the next TX slot busy, to Python: then it need not have answered it.
            excused = table is None or not ring.inside(rx) or _U32.unpack_from(
                ring.buffer, ring.tx[tx]
            )[0] != TP_STATUS_AVAILABLE
            got.append(_Walked(tuple(lane_side.python(frame, capacity)[0]), excused=excused))
        ring.consume(rx)
        left -= 1
        rx = (rx + 1) % RX_SLOTS
        for index in busy:  # the kernel sends what kept a TX slot busy
            _U32.pack_into(ring.buffer, ring.tx[index], TP_STATUS_AVAILABLE)
    failed = bool(seed & 1) and table is not None
    _release(lane, ring, lane_side, held, got, expected, failed)
    _check(
        len(got) == len(expected),
        f"ring: the lane walked {len(got)} slots, the Python walk {len(expected)}",
    )
    for position, (mine, theirs) in enumerate(zip(got, expected, strict=True)):
        what = f"ring slot {position}"
        _check(mine.ignored == theirs.ignored, f"{what}: ignored by one walk only")
        _check(
            mine.lane == theirs.lane or (mine.excused and not mine.lane),
            f"{what}: the lane {'answered' if mine.lane else 'declined'} a frame the "
            f"Python fast path {'answered' if theirs.lane else 'declined'}",
        )
        _check(mine.replies == theirs.replies, f"{what}: the lane's walk answered otherwise")
    _compare(sides, "ring", True)


def _release(
    lane: Any, ring: _Ring, side: _Side, held: list[tuple[int, int]], got: list[_Walked],
    expected: list[_Walked], failed: bool,
) -> None:
    """
    End the walk as ``drainFinished`` does: ``Lane.held`` names the targets written,
    ``Lane.release`` queues the replies (the first target's refused if ``failed``);
    each held reply in ``got`` becomes what was sent, and its expected reply the
    Python path's refusal if refused.
    """
    written = {}
    for _, position in held:
        frame_target = _target_of(side, got[position].replies[0])
        written[id(frame_target)] = frame_target
    names = lane.held()
    _check(
        sorted(map(id, names)) == sorted(written),
        f"ring: Lane.held() names {len(names)} targets, {len(written)} were written",
    )
    refused_target = side.targets[0] if failed else None
    released, refused = lane.release({id(refused_target)} if failed else set())
    expected_refused = 0
    for slot, position in held:
        offset = ring.tx[slot]
        status, length = _TX_HEADER.unpack_from(ring.buffer, offset)
        _check(status == TP_STATUS_SEND_REQUEST, f"ring: a released TX slot has status {status}")
        start = offset + TX_DATA_AT
        reply = bytes(ring.buffer[start : start + length])
        if _target_of(side, got[position].replies[0]) is refused_target:
            expected_refused += 1
            expected[position] = evolve(expected[position], replies=(expected[position].refusal,))
        got[position] = evolve(got[position], replies=(reply,))
        _U32.pack_into(ring.buffer, offset, TP_STATUS_AVAILABLE)
    _check(
        (released, refused) == (len(held), expected_refused),
        f"ring: release gave {(released, refused)}, {(len(held), expected_refused)} expected",
    )


def _target_of(side: _Side, reply: bytes) -> Target:
    """The target of ``side`` a reply comes from (by its shelf.slot)."""
    shelf = int.from_bytes(reply[16:18], "big")
    for target in side.targets:
        if (target.shelf, target.slot) == (shelf, reply[18]):
            return target
    raise FuzzInvariantError(f"ring: a held reply from e{shelf}.{reply[18]}, no target here")


def _harvest(
    ring: _Ring, before: bytes, rx: int, consumed: int, tx: int, answered: int
) -> list[tuple[int, bytes, bool]]:
    """
    Check what one ``drain`` wrote into the ring; return its replies: (TX slot, bytes, held).

    It may only give its ``consumed`` RX slots from ``rx`` back to the kernel
    and fill ``answered`` TX slots from ``tx`` (length, data, ``SEND_REQUEST``
    or held for group commit); every other byte of the ring is as it was.
    The sent TX slots are then freed, as the kernel does once it has sent
    them; the held ones stay until ``Lane.release``.
    """
    buffer = ring.buffer
    expected = bytearray(before)
    for step in range(consumed):
        _U32.pack_into(expected, ring.rx[(rx + step) % RX_SLOTS], 0)
    replies = []
    for step in range(answered):
        slot = (tx + step) % TX_SLOTS
        offset = ring.tx[slot]
        status, length = _TX_HEADER.unpack_from(buffer, offset)
        _check(
            status in (TP_STATUS_SEND_REQUEST, TP_STATUS_HELD),
            f"ring: a queued TX slot has status {status:#x}",
        )
        _check(
            MIN_FRAME_SIZE <= length <= ring.slot - TX_DATA_AT,
            f"ring: a queued reply of {length} bytes in a {ring.slot}-byte slot",
        )
        start = offset + TX_DATA_AT
        replies.append((slot, bytes(buffer[start : start + length]), status == TP_STATUS_HELD))
        _TX_HEADER.pack_into(expected, offset, status, length)
        expected[start : start + length] = buffer[start : start + length]
    _check(buffer == expected, "ring: drain wrote where it may not")
    for slot, _, held in replies:
        if not held:
            _U32.pack_into(buffer, ring.tx[slot], TP_STATUS_AVAILABLE)
    return replies


# -- the check ------------------------------------------------------------------


def _sides(
    scenario: Scenario, options: LaneOptions, opened: list[Any], seed: int
) -> tuple[list[_Side], Any]:
    """The lane's side, the Python lane's and the general path's; and the lane's table."""
    make = _disk_maker(options, opened, mapped=bool(seed & 0x40))

    def side(name: str, fast_path: bool) -> _Side:
        targets = build_targets(scenario, make)
        if options.target_sync:
            targets[0].sync = True
        dispatcher = Dispatcher(
            SERVER_MAC, targets, fast_path=fast_path, hold_writes=options.hold_writes
        )
        return _Side(name, targets, dispatcher)

    lane = side("the lane", True)
    with _pure_python():
        python = side("the Python lane", True)
        general = side("the general path", False)
    table = build_table(
        lane.dispatcher.fast_index.values(), hold_writes=lane.dispatcher.hold_writes
    )
    return [lane, python, general], table


def check_lane(data: bytes, lane_type: Any = None) -> dict[str, int] | None:
    """
    Run one lane input through the compiled lane and the Python paths, checking they agree.

    Return the lane side's dispatcher counters, or ``None`` when the extension
    is not built.  ``lane_type`` replaces ``_lane.Lane`` (tests give a broken
    one).  Raise ``FuzzInvariantError`` when the lane differs from the Python
    paths; any other exception is a crash.
    """
    native = _lane.native
    if native is None:
        return None
    options, seed, scenario, frames = parse_lane_input(data)
    opened: list[Any] = []
    try:
        sides, table = _sides(scenario, options, opened, seed)
        lane_native = native if lane_type is None else _Native(native, lane_type)
        if options.ring:
            _ring_walk(lane_native, table, sides, frames, seed, options, scenario.mtu)
        else:
            ring = _Ring(1500)
            lane = lane_native.Lane(ring.buffer, ring.rx, ring.slot, ring.tx, ring.slot,
                                    SERVER_MAC, ring.max_frame, False)
            capacity = _CAPACITIES[seed % len(_CAPACITIES)]
            _answer_walk(lane, table, sides, frames, capacity, options.sweep_each)
            _compare(sides, "at the end", True)
        return sides[0].dispatcher.counters.as_dict()
    finally:
        for disk in opened:
            disk.close()


class _Native:
    """The extension module with another ``Lane`` type (for tests of the check itself)."""

    def __init__(self, native: Any, lane_type: Any) -> None:
        self._native = native
        self.Lane = lane_type

    def __getattr__(self, name: str) -> Any:
        return getattr(self._native, name)


#: For callers that build inputs by hand: the options of a plain answer() run.
PLAIN = LaneOptions(0, False, False, False, False, False, False)
