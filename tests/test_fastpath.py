"""
Tests for ``aoe_twisted.core.fastpath``: the fast path answers as the general path does.

The reference is ``Dispatcher(..., fast_path=False)``: the codec, ``Target``
and ``serve_ata``.  For any sequence of frames, a dispatcher with the fast
path must give the same reply bytes, the same counters and leave the same
disk contents, and it must take the fast path for plain reads and writes and
leave every other frame to the general path untouched.  The zero-copy
variant (``fast_reply_into``, ``Dispatcher.frame_received_into``), which
writes the reply into a reused buffer as the port does into a TX ring slot,
must give the same bytes again, whatever the buffer held before.

Everything a target counts goes through its ``TargetStats``, which counts
initiators and tags in the compiled lane's ``Tally`` when the lane is built
and in Python when it is not: the tests that count (``LaneChoice``) run
against both, the compiled variant skipping where the extension is absent
(or ``AOE_TWISTED_PURE_PYTHON=1``).  ``tests.test_lane`` tests the compiled
lane's own answers against this module's reference.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Any, ClassVar

from attrs import define, field
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface import implementer

from aoe_twisted import lane as _lane
from aoe_twisted.backends.file import FileBackend
from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.core.acl import MemoryACLStore
from aoe_twisted.core.dispatch import Dispatcher, FrameCounters
from aoe_twisted.core.fastpath import FRAME_HEADER, fast_reply, fast_reply_into
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import (
    ETHERTYPE,
    MIN_FRAME_SIZE,
    SECTOR_SIZE,
    ATAArg,
    ATACmdStatus,
    ATAError,
    EthernetFrame,
    Header,
)
from aoe_twisted.interfaces import IBlockBackend
from aoe_twisted.testing import (
    INITIATOR_MAC,
    OTHER_MAC,
    TARGET_MAC,
    ata_request,
    ethernet_frame,
)
from tests import strategies

MULTICAST = bytes.fromhex("030000000001")
TAG = b"\x01\x02\x03\x04"
SECTORS = 64
#: Sectors from here on fail with EIO on the failing disk.
BAD_SECTOR = 48

_READS = (int(ATACmdStatus.READ_28BIT), int(ATACmdStatus.READ_48BIT))
_WRITES = (int(ATACmdStatus.WRITE_28BIT), int(ATACmdStatus.WRITE_48BIT))


class LaneChoice(SynchronousTestCase):
    """
    A test case run with one data lane: ``compiled`` says which.

    ``False``: the Python lane, as ``AOE_TWISTED_PURE_PYTHON=1`` gives
    (``aoe_twisted.lane.native`` patched to ``None`` for the test, so the
    targets it makes count in Python and no port runs the compiled lane);
    ``True``: the compiled lane, skipped when it is not there; ``None``:
    whichever the environment gives.  Targets, dispatchers and ports read
    ``native`` when they are made, so make them in the test, not at import.
    """

    compiled: ClassVar[bool | None] = None

    def setUp(self) -> None:
        super().setUp()
        if self.compiled is None:
            return
        if not self.compiled:
            self.patch(_lane, "native", None)
        elif _lane.native is None:
            raise SkipTest(f"the compiled lane is not here: {_lane.lane_reason}")

    def assertLane(self, dispatcher: Dispatcher) -> None:
        """Check that every target of ``dispatcher`` counts in the lane this case runs with."""
        if self.compiled is None:
            return
        for target in dispatcher.targets:
            self.assertEqual(target.stats.tally is not None, self.compiled, target.address)


@implementer(IBlockBackend)
@define
class FailingBackend:
    """A memory disk whose sectors from ``BAD_SECTOR`` on fail, counting every write attempt."""

    disk: MemoryBackend = field(factory=lambda: MemoryBackend(SECTORS * SECTOR_SIZE))
    writes: int = 0

    @property
    def size(self) -> int:
        return self.disk.size

    @property
    def read_only(self) -> bool:
        return self.disk.read_only

    def read(self, offset: int, length: int) -> bytes:
        if offset + length > BAD_SECTOR * SECTOR_SIZE:
            raise OSError(5, "I/O error")
        return self.disk.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self.writes += 1
        if offset + len(data) > BAD_SECTOR * SECTOR_SIZE:
            raise OSError(5, "I/O error")
        self.disk.write(offset, data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


@define
class Setup:
    """How the targets of one example are configured: the same for both dispatchers."""

    max_sectors: int = 2
    read_only: bool = False
    failing: bool = False
    mask: tuple[bytes, ...] = ()
    reserve: tuple[bytes, ...] = ()

    def dispatcher(self, fast_path: bool) -> Dispatcher:
        """Return a dispatcher for fresh targets at 1.0 and 1.1 configured as this says."""
        targets = []
        for slot in (0, 1):
            disk = MemoryBackend(SECTORS * SECTOR_SIZE, read_only=self.read_only)
            backend: Any = FailingBackend(disk) if self.failing else disk
            acl = MemoryACLStore(mask_list=self.mask, reserve_list=self.reserve)
            targets.append(Target(1, slot, backend, acl=acl, max_sectors=self.max_sectors))
        return Dispatcher(TARGET_MAC, targets, fast_path=fast_path)


def sectors(count: int, fill: int = 0xA5) -> bytes:
    """Return ``count`` sectors of one byte value."""
    return bytes([fill]) * (count * SECTOR_SIZE)


@st.composite
def setups(draw: st.DrawFn) -> Setup:
    """Target configurations: usually plain, sometimes masked, reserved, read-only or failing."""
    lists = st.sampled_from(
        [(), (), (), (INITIATOR_MAC,), (OTHER_MAC,), (OTHER_MAC, INITIATOR_MAC)]
    )
    unusual = draw(st.sets(st.sampled_from(["read_only", "failing", "mask", "reserve"])))
    return Setup(
        max_sectors=draw(st.integers(1, 4)),
        read_only="read_only" in unusual,
        failing="failing" in unusual,
        mask=draw(lists) if "mask" in unusual else (),
        reserve=draw(lists) if "reserve" in unusual else (),
    )


#: The fields ``near_requests`` may make unusual, a few at a time.
_FIELDS = (
    "cmd", "count", "aflags", "lba", "length", "verflags", "error", "major", "minor",
    "command", "feature", "reserved", "src", "ethertype", "mutate",
)


@st.composite
def near_requests(draw: st.DrawFn) -> bytes:
    """
    Plain reads and writes with none, one or a few fields drawn from a wider range.

    Each field is valid unless drawn as unusual, so about a third of the
    frames can take the fast path and the others each miss it for few reasons.
    """
    unusual = draw(st.sets(st.sampled_from(_FIELDS), max_size=3))

    def pick(name: str, usual: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> Any:
        return draw(other if name in unusual else usual)

    cmd = pick("cmd", st.sampled_from([*_READS, *_WRITES]), st.sampled_from([0xEC, 0xE7, 0x25]))
    write = cmd in _WRITES
    count = pick("count", st.integers(1, 4), st.one_of(st.integers(0, 5), strategies.uint8))
    aflags = pick(
        "aflags",
        st.sampled_from([0x00, 0x40, 0x50, 0x52]).map(lambda a: a | write),
        strategies.uint8,
    )
    lba = pick(
        "lba",
        st.one_of(st.integers(0, SECTORS - 4), st.integers(BAD_SECTOR - 4, SECTORS - 4)),
        st.one_of(
            st.integers(SECTORS - 4, SECTORS + 2),
            st.sampled_from([0xE000000, 0xE000001, 1 << 28, (1 << 28) + 3, (1 << 40) + 1]),
            st.integers(0, strategies.MAX_LBA),
        ),
    )
    length = count * SECTOR_SIZE if write else 0
    length = pick(
        "length",
        st.sampled_from([length, length, length + 1, length + 24]),
        st.integers(0, 5 * SECTOR_SIZE + 1),
    )
    message = ata_request(
        cmd,
        count=count,
        lba=lba,
        data=draw(st.binary(min_size=length, max_size=length)),
        aflags=aflags,
        verflags=pick("verflags", st.just(0x10), st.sampled_from([0x14, 0x18, 0x1C, 0x20, 0])),
        error=pick("error", st.just(0), strategies.uint8),
        shelf=pick("major", st.just(1), st.sampled_from([0, 2, 0xFFFF])),
        slot=pick("minor", st.sampled_from([0, 1]), st.sampled_from([2, 0xFF])),
        aoe_command=pick("command", st.just(0), st.integers(1, 5)),
        feature=pick("feature", st.just(0), strategies.uint8),
        reserved=pick("reserved", st.just(0), strategies.uint16),
        tag=TAG,
    )
    frame = ethernet_frame(
        message,
        pick("src", st.just(INITIATOR_MAC), st.sampled_from([OTHER_MAC, MULTICAST])),
        ethertype=pick("ethertype", st.just(ETHERTYPE), st.sampled_from([0x0800, 0x88A3])),
    )
    if "mutate" in unusual:
        frame = draw(strategies.mutated_messages(st.just(frame)))
    return frame


#: Frames of every kind: near plain reads and writes, and any AoE message at all.
frames = st.one_of(
    near_requests(),
    near_requests(),
    strategies.aoe_frames.map(lambda f: ethernet_frame(f.payload, f.src, ethertype=f.ethertype)),
)


#: What a reused TX slot holds before the reply is written: the last, longer frame's bytes.
_STALE = 0xEE
#: A TX slot as big as one at MTU 9000.
_SLOT = 9000 + 14


def received_into(dispatcher: Dispatcher, frame: bytes, size: int = _SLOT) -> list[bytes]:
    """
    Answer ``frame`` as ``AoEProtocol.frameReceivedInto`` does; return the reply frames.

    The frame is a ``memoryview`` of a buffer that is overwritten afterwards
    (as a ring slot is), and the reply buffer starts full of stale bytes.
    """
    rx = bytearray(frame)
    slot = bytearray([_STALE]) * size
    length = dispatcher.frame_received_into(memoryview(rx), memoryview(slot))
    rx[:] = bytes([_STALE]) * len(rx)
    if length:
        return [bytes(slot[:length])]
    return dispatcher.serve(frame)


def index(targets: list[Target]) -> dict[tuple[int, int], Target]:
    """The targets by address, as ``Dispatcher.index`` holds them for the fast path."""
    return {(target.shelf, target.slot): target for target in targets}


def fates(dispatcher: Dispatcher) -> dict[str, int]:
    """Return the dispatcher's counters but ``fast``, which says which path answered."""
    counts = dispatcher.counters.as_dict()
    del counts["fast"]
    return counts


def target_stats(dispatcher: Dispatcher) -> list[dict[str, Any]]:
    """
    Return what each target counted, but the service times (which differ run to run).

    Requests by kind, bytes, errors by cause, retransmissions, in flight,
    how many service times were counted, and each initiator's frames.
    """
    figures = []
    for target in dispatcher.targets:
        snapshot = target.stats.snapshot(target.address, "", 0.0)
        del snapshot["service_seconds"]["buckets"], snapshot["service_seconds"]["sum"]
        figures.append(snapshot)
    return figures


def counted(dispatcher: Dispatcher) -> dict[str, int]:
    """Return the dispatcher's counters that are not zero."""
    return {name: value for name, value in dispatcher.counters.as_dict().items() if value}


def disks(dispatcher: Dispatcher) -> list[bytes]:
    """Return the contents of every target's disk."""
    contents = []
    for target in dispatcher.targets:
        backend: Any = target.backend
        disk = backend.disk if isinstance(backend, FailingBackend) else backend
        contents.append(disk.read(0, disk.size))
    return contents


def writes(dispatcher: Dispatcher) -> list[int]:
    """Return how many writes each failing disk was asked for (nothing for plain disks)."""
    return [t.backend.writes for t in dispatcher.targets if isinstance(t.backend, FailingBackend)]


class _EquivalenceChecks(LaneChoice):
    """What the equivalence tests check, for the lane each concrete case runs with."""

    def check_same(self, setup: Setup, sent: list[bytes]) -> None:
        """``sent`` gives the same replies, counters, disks and write attempts either way."""
        fast = setup.dispatcher(fast_path=True)
        general = setup.dispatcher(fast_path=False)
        self.assertLane(fast)
        for frame in sent:
            self.assertEqual(fast.serve(frame), general.serve(frame))
        self.assertEqual(fates(fast), fates(general))
        self.assertEqual(target_stats(fast), target_stats(general))
        self.assertEqual(disks(fast), disks(general))
        self.assertEqual(writes(fast), writes(general))
        self.assertEqual(general.counters.fast, 0)

    def check_into(self, setup: Setup, sent: list[bytes]) -> None:
        """Answering into a reused buffer gives the replies, counters and disks of both others."""
        into = setup.dispatcher(fast_path=True)
        fast = setup.dispatcher(fast_path=True)
        general = setup.dispatcher(fast_path=False)
        self.assertLane(into)
        for frame in sent:
            expected = general.serve(frame)
            self.assertEqual(fast.serve(frame), expected)
            self.assertEqual(received_into(into, frame), expected)
        self.assertEqual(fates(into), fates(general))
        self.assertEqual(target_stats(into), target_stats(general))
        self.assertEqual(into.counters.fast, fast.counters.fast)
        self.assertEqual(disks(into), disks(general))
        self.assertEqual(writes(into), writes(general))

    def check_plain(
        self, cmd: int, count: int, lba: int, aflags: int, feature: int, tag: bytes, extra: int
    ) -> None:
        """A plain read or write is answered by the fast path, as the general path answers."""
        write = cmd in _WRITES
        aflags = aflags | 0x01 if write else aflags & ~0x01
        data = sectors(count) + bytes(extra) if write else b""
        message = ata_request(
            cmd, count=count, lba=lba, data=data, aflags=aflags, feature=feature, tag=tag
        )
        frame = ethernet_frame(message)
        setup = Setup(max_sectors=4)
        fast = setup.dispatcher(fast_path=True)
        general = setup.dispatcher(fast_path=False)
        self.assertLane(fast)
        self.assertEqual(fast.serve(frame), general.serve(frame))
        self.assertEqual(fast.counters.fast, 1)
        self.assertEqual(fates(fast), fates(general))
        self.assertEqual(target_stats(fast), target_stats(general))
        [figures] = [f for f in target_stats(fast) if f["initiators"]]
        kind = "write" if write else "read"
        self.assertEqual(figures["requests"][kind], 1)
        self.assertEqual(figures["bytes"][kind], count * 512)
        self.assertEqual(figures["service_seconds"]["count"], 1)
        self.assertEqual(figures["initiators"][0]["frames"], 1)
        self.assertEqual(disks(fast), disks(general))
        into = setup.dispatcher(fast_path=True)
        slot = memoryview(bytearray([_STALE]) * _SLOT)
        length = into.frame_received_into(memoryview(frame), slot)
        self.assertEqual([bytes(slot[:length])], general.serve(frame))
        self.assertEqual(into.counters.fast, 1)
        self.assertEqual(disks(into), disks(general))


#: What ``check_plain`` draws: command, count, LBA, AFlags, feature, tag, bytes past the data.
_PLAIN = (
    st.sampled_from([*_READS, *_WRITES]),
    st.integers(1, 4),
    st.integers(0, SECTORS - 4),
    st.sampled_from([0x00, 0x01, 0x10, 0x40, 0x41, 0x53, 0xFF, 0xAC]),
    strategies.uint8,
    strategies.tags,
    st.sampled_from([0, 1, 24]),
)


class EquivalenceTests(_EquivalenceChecks):
    """The fast path answers exactly as the general path does (the Python lane counting)."""

    compiled = False

    @settings(max_examples=250)
    @given(setups(), st.lists(frames, min_size=1, max_size=6))
    def test_same_replies_counters_and_disks(self, setup: Setup, sent: list[bytes]) -> None:
        """
        Any frames give the same replies, counters, disks and write attempts either way.
        """
        self.check_same(setup, sent)

    @settings(max_examples=250)
    @given(setups(), st.lists(frames, min_size=1, max_size=6))
    def test_into_same_replies_counters_and_disks(
        self, setup: Setup, sent: list[bytes]
    ) -> None:
        """
        Answering into a reused buffer gives the replies, counters and disks of both others.
        """
        self.check_into(setup, sent)

    @given(*_PLAIN)
    def test_plain_requests_take_the_fast_path(
        self, cmd: int, count: int, lba: int, aflags: int, feature: int, tag: bytes, extra: int
    ) -> None:
        """
        Every plain read and write is answered by the fast path, as the general path answers.
        """
        self.check_plain(cmd, count, lba, aflags, feature, tag, extra)


class CompiledLaneEquivalenceTests(_EquivalenceChecks):
    """
    The same, with the compiled lane's ``Tally`` counting initiators and tags for both paths.

    Fewer examples: what differs from ``EquivalenceTests`` is the book of
    tags, which ``tests.test_lane`` also tests on its own.
    """

    compiled = True

    @settings(max_examples=150)
    @given(setups(), st.lists(frames, min_size=1, max_size=6))
    def test_same_replies_counters_and_disks(self, setup: Setup, sent: list[bytes]) -> None:
        """
        Any frames give the same replies, counters, disks and write attempts either way.
        """
        self.check_same(setup, sent)

    @settings(max_examples=150)
    @given(setups(), st.lists(frames, min_size=1, max_size=6))
    def test_into_same_replies_counters_and_disks(
        self, setup: Setup, sent: list[bytes]
    ) -> None:
        """
        Answering into a reused buffer gives the replies, counters and disks of both others.
        """
        self.check_into(setup, sent)

    @settings(max_examples=50)
    @given(*_PLAIN)
    def test_plain_requests_take_the_fast_path(
        self, cmd: int, count: int, lba: int, aflags: int, feature: int, tag: bytes, extra: int
    ) -> None:
        """
        Every plain read and write is answered by the fast path, as the general path answers.
        """
        self.check_plain(cmd, count, lba, aflags, feature, tag, extra)


class FastPathTests(LaneChoice):
    """What the fast path answers, and that it is taken (the Python lane counting)."""

    compiled = False

    def test_read_reply(self) -> None:
        """
        A read's reply: MACs swapped, R flag, our address, tag, AFlags and LBA echoed, DRDY, data.
        """
        dispatcher = Setup().dispatcher(fast_path=True)
        dispatcher.targets[0].backend.write(5 * SECTOR_SIZE, sectors(2, 0x5A))
        frame = ethernet_frame(ata_request(0x24, count=2, lba=5, aflags=0x52, tag=TAG))
        [reply] = dispatcher.serve(frame)
        self.assertEqual(dispatcher.counters.fast, 1)
        self.assertEqual(
            reply,
            EthernetFrame(
                INITIATOR_MAC,
                TARGET_MAC,
                ETHERTYPE,
                Header(
                    flag_response=True,
                    major=1,
                    minor=0,
                    tag=TAG,
                    arg=ATAArg(True, True, True, False, 0, 0, 0x40, 5, sectors(2, 0x5A)),
                ).to_bytes(),
            ).to_bytes(),
        )
        self.assertEqual(
            counted(dispatcher), {"received": 1, "answered": 1, "replies": 1, "fast": 1}
        )

    def test_write_reply_padded(self) -> None:
        """
        A write lands on the disk (without the padding) and its reply is padded to 60 bytes.
        """
        dispatcher = Setup().dispatcher(fast_path=True)
        data = sectors(2, 0x33) + b"\xee" * 10
        frame = ethernet_frame(ata_request(0x34, count=2, lba=7, data=data))
        [reply] = dispatcher.serve(frame)
        self.assertEqual(dispatcher.counters.fast, 1)
        self.assertEqual(len(reply), MIN_FRAME_SIZE)
        self.assertEqual(reply[36:], bytes(MIN_FRAME_SIZE - 36))
        disk = dispatcher.targets[0].backend
        self.assertEqual(disk.read(7 * SECTOR_SIZE, 2 * SECTOR_SIZE), sectors(2, 0x33))
        self.assertEqual(disk.read(9 * SECTOR_SIZE, SECTOR_SIZE), bytes(SECTOR_SIZE))

    def test_failed_write_once(self) -> None:
        """
        A write the backend fails is answered ERR|DRDY/ABRT by the fast path, tried only once.
        """
        dispatcher = Setup(failing=True).dispatcher(fast_path=True)
        frame = ethernet_frame(ata_request(0x34, lba=BAD_SECTOR, data=sectors(1)))
        [reply] = dispatcher.serve(frame)
        self.assertEqual(dispatcher.counters.fast, 1)
        self.assertEqual(writes(dispatcher), [1, 0])
        arg = Header.from_bytes(EthernetFrame.from_bytes(reply).payload).arg
        self.assertEqual(
            (arg.cmd_status, arg.err_feature, arg.sector_count),
            (ATACmdStatus.ERR_STATUS | ATACmdStatus.READY_STATUS, ATAError.ABRT, 1),
        )

    def test_failed_read(self) -> None:
        """
        A read the backend fails is answered ERR|DRDY/UNC by the fast path.
        """
        dispatcher = Setup(failing=True).dispatcher(fast_path=True)
        [reply] = dispatcher.serve(ethernet_frame(ata_request(0x24, lba=BAD_SECTOR)))
        self.assertEqual(dispatcher.counters.fast, 1)
        arg = Header.from_bytes(EthernetFrame.from_bytes(reply).payload).arg
        self.assertEqual((arg.cmd_status, arg.err_feature), (0x41, ATAError.UNC))

    def test_allowed_source(self) -> None:
        """
        A source on both a non-empty mask list and reserve list still takes the fast path.
        """
        setup = Setup(mask=(OTHER_MAC, INITIATOR_MAC), reserve=(INITIATOR_MAC,))
        dispatcher = setup.dispatcher(fast_path=True)
        self.assertEqual(len(dispatcher.serve(ethernet_frame(ata_request()))), 1)
        self.assertEqual(dispatcher.counters.fast, 1)

    def test_lists_read_each_time(self) -> None:
        """
        A mask list set after the first frame stops the next one from taking the fast path.
        """
        dispatcher = Setup().dispatcher(fast_path=True)
        dispatcher.serve(ethernet_frame(ata_request()))
        dispatcher.targets[0].acl.set_mask_list((OTHER_MAC,))
        self.assertEqual(dispatcher.serve(ethernet_frame(ata_request())), [])
        self.assertEqual(dispatcher.counters.fast, 1)
        self.assertEqual(dispatcher.counters["silent"], 1)

    def test_switched_off(self) -> None:
        """
        With ``fast_path=False`` nothing takes the fast path.
        """
        dispatcher = Setup().dispatcher(fast_path=False)
        self.assertEqual(len(dispatcher.serve(ethernet_frame(ata_request()))), 1)
        self.assertEqual(dispatcher.counters.fast, 0)

    def test_retransmission_seen_by_either_path(self) -> None:
        """
        A tag the fast path saw is a retransmission when the general path sees it, and the
        initiator's frames count both: the two paths count in one book of tags.
        """
        dispatcher = Setup().dispatcher(fast_path=True)
        self.assertLane(dispatcher)
        dispatcher.serve(ethernet_frame(ata_request(tag=TAG)))
        dispatcher.serve(ethernet_frame(ata_request(0xEC, tag=TAG)))
        dispatcher.serve(ethernet_frame(ata_request(0xEC, tag=b"\x09" * 4)))
        dispatcher.serve(ethernet_frame(ata_request(tag=b"\x09" * 4)))
        self.assertEqual(dispatcher.counters.fast, 2)
        figures = target_stats(dispatcher)[0]
        self.assertEqual(figures["retransmits"], 2)
        self.assertEqual(figures["initiators"][0]["frames"], 4)
        self.assertEqual(figures["requests"]["read"], 2)

    def test_header_struct(self) -> None:
        """
        The joined struct is the 36 bytes of Ethernet, AoE and ATA headers.
        """
        self.assertEqual(FRAME_HEADER.size, 14 + 10 + 12)
        frame = ethernet_frame(ata_request(shelf=0x1234))
        self.assertEqual(FRAME_HEADER.unpack_from(frame)[5], 0x1234)
        self.assertEqual(struct.calcsize(FRAME_HEADER.format), 36)


#: Each way a frame must fall back: (name, setup, frame).
FALLBACKS: list[tuple[str, Setup, bytes]] = [
    ("masked target", Setup(mask=(OTHER_MAC,)), ethernet_frame(ata_request())),
    ("reserved target", Setup(reserve=(OTHER_MAC,)), ethernet_frame(ata_request())),
    ("broadcast shelf", Setup(), ethernet_frame(ata_request(shelf=0xFFFF))),
    ("broadcast slot", Setup(), ethernet_frame(ata_request(slot=0xFF))),
    ("no such target", Setup(), ethernet_frame(ata_request(slot=2))),
    ("out of range", Setup(), ethernet_frame(ata_request(count=2, lba=SECTORS - 1))),
    (
        "28-bit LBA out of range",
        Setup(),
        ethernet_frame(ata_request(0x20, lba=SECTORS, aflags=0x40)),
    ),
    ("read-only write", Setup(read_only=True), ethernet_frame(ata_request(0x34, data=sectors(1)))),
    ("short write data", Setup(), ethernet_frame(ata_request(0x34, count=2, data=sectors(2)[:-1]))),
    ("count 0", Setup(), ethernet_frame(ata_request(count=0))),
    ("count over max", Setup(max_sectors=2), ethernet_frame(ata_request(count=3))),
    ("read with W", Setup(), ethernet_frame(ata_request(0x24, aflags=0x41))),
    ("write without W", Setup(), ethernet_frame(ata_request(0x34, aflags=0x40, data=sectors(1)))),
    ("R flag", Setup(), ethernet_frame(ata_request(verflags=0x18))),
    ("E flag", Setup(), ethernet_frame(ata_request(verflags=0x14))),
    ("bad version", Setup(), ethernet_frame(ata_request(verflags=0x20))),
    ("AoE error set", Setup(), ethernet_frame(ata_request(error=1))),
    ("not command 0", Setup(), ethernet_frame(ata_request(aoe_command=1))),
    ("ATA reserved", Setup(), ethernet_frame(ata_request(reserved=1))),
    ("IDENTIFY", Setup(), ethernet_frame(ata_request(0xEC))),
    ("FLUSH", Setup(), ethernet_frame(ata_request(0xE7))),
    ("multicast source", Setup(), ethernet_frame(ata_request(), MULTICAST)),
    ("not AoE", Setup(), ethernet_frame(ata_request(), ethertype=0x0800)),
    ("truncated", Setup(), ethernet_frame(ata_request())[:35]),
]


class FallbackTests(LaneChoice):
    """Every frame the fast path does not serve goes to the general path unchanged (Python)."""

    compiled = False

    def test_fallbacks(self) -> None:
        """
        Each fallback condition is left to the general path, which answers it as before.
        """
        for name, setup, frame in FALLBACKS:
            fast = setup.dispatcher(fast_path=True)
            general = setup.dispatcher(fast_path=False)
            self.assertIsNone(fast_reply(frame, TARGET_MAC, fast.index), name)
            self.assertEqual(fast.serve(frame), general.serve(frame), name)
            self.assertEqual(fast.counters.fast, 0, name)
            self.assertEqual(fates(fast), fates(general), name)
            self.assertEqual(disks(fast), disks(general), name)

    def test_fallbacks_take_the_fast_path_when_fixed(self) -> None:
        """
        The fallback list's base frames take the fast path, so each case tests one thing.
        """
        for message in (ata_request(), ata_request(0x34, data=sectors(1)), ata_request(count=2)):
            frame = ethernet_frame(message)
            dispatcher = Setup().dispatcher(fast_path=True)
            self.assertIsNotNone(fast_reply(frame, TARGET_MAC, dispatcher.index))


@implementer(IBlockBackend)
@define
class KeepingBackend:
    """A memory disk without ``read_into`` that keeps what it is given to write."""

    disk: MemoryBackend = field(factory=lambda: MemoryBackend(SECTORS * SECTOR_SIZE))
    given: list[Any] = field(factory=list)

    @property
    def size(self) -> int:
        return self.disk.size

    @property
    def read_only(self) -> bool:
        return False

    def read(self, offset: int, length: int) -> bytes:
        return self.disk.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self.given.append(data)
        self.disk.write(offset, data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class IntoTests(LaneChoice):
    """``fast_reply_into``: the same answers, written in place, keeping nothing (Python lane)."""

    compiled = False

    def test_read_lands_in_the_buffer(self) -> None:
        """
        A read's header and sectors are written into the buffer, after nothing else.
        """
        dispatcher = Setup().dispatcher(fast_path=True)
        dispatcher.targets[0].backend.write(5 * SECTOR_SIZE, sectors(2, 0x5A))
        frame = ethernet_frame(ata_request(0x24, count=2, lba=5))
        [expected] = dispatcher.serve(frame)
        slot = bytearray([_STALE]) * 2000
        targets = dispatcher.targets
        length = fast_reply_into(memoryview(frame), memoryview(slot), TARGET_MAC, index(targets))
        self.assertEqual(length, 36 + 2 * SECTOR_SIZE)
        self.assertEqual(bytes(slot[:length]), expected)
        self.assertEqual(slot[length:], bytearray([_STALE]) * (2000 - length))

    def test_write_reply_padded_over_stale_bytes(self) -> None:
        """
        A write's reply is 60 bytes, its padding zeros whatever the buffer held.
        """
        dispatcher = Setup().dispatcher(fast_path=True)
        frame = ethernet_frame(ata_request(0x34, lba=3, data=sectors(1, 0x33)))
        slot = bytearray([_STALE]) * 100
        targets = dispatcher.targets
        length = fast_reply_into(memoryview(frame), memoryview(slot), TARGET_MAC, index(targets))
        self.assertEqual(length, MIN_FRAME_SIZE)
        self.assertEqual(slot[36:60], bytes(24))
        decision = fast_reply(frame, TARGET_MAC, dispatcher.index)
        assert decision is not None
        self.assertEqual([bytes(slot[:60])], list(decision.replies))
        self.assertEqual(slot[60:], bytearray([_STALE]) * 40)
        disk = dispatcher.targets[0].backend
        self.assertEqual(disk.read(3 * SECTOR_SIZE, SECTOR_SIZE), sectors(1, 0x33))

    def test_failures_into(self) -> None:
        """
        A failed read and a failed write are answered in place as ``fast_reply`` answers them.
        """
        read = ata_request(0x24, lba=BAD_SECTOR)
        write = ata_request(0x34, lba=BAD_SECTOR, data=sectors(1))
        for frame in (ethernet_frame(read), ethernet_frame(write)):
            dispatcher = Setup(failing=True).dispatcher(fast_path=True)
            reference = Setup(failing=True).dispatcher(fast_path=True)
            self.assertEqual(received_into(dispatcher, frame), reference.serve(frame))
            self.assertEqual(writes(dispatcher), writes(reference))

    def test_buffer_too_small(self) -> None:
        """
        A buffer too small for the reply gets nothing: 0, no backend call, no counter.
        """
        cases = ((ata_request(0x24, count=2), 36 + 1023), (ata_request(0x34, data=sectors(1)), 59))
        for message, size in cases:
            frame = ethernet_frame(message)
            dispatcher = Setup().dispatcher(fast_path=True)
            slot = bytearray([_STALE]) * size
            self.assertEqual(dispatcher.frame_received_into(memoryview(frame), memoryview(slot)), 0)
            self.assertEqual(slot, bytearray([_STALE]) * size)
            self.assertEqual(dispatcher.counters, FrameCounters())
            self.assertEqual(dispatcher.counters.fast, 0)
            self.assertEqual(disks(dispatcher), [bytes(SECTORS * SECTOR_SIZE)] * 2)

    def test_not_answered_leaves_everything(self) -> None:
        """
        A frame the fast path does not answer: 0, nothing counted, the general path unchanged.
        """
        for name, setup, frame in FALLBACKS:
            dispatcher = setup.dispatcher(fast_path=True)
            slot = memoryview(bytearray(_SLOT))
            self.assertEqual(dispatcher.frame_received_into(memoryview(frame), slot), 0, name)
            self.assertEqual(dispatcher.counters, FrameCounters(), name)

    def test_switched_off(self) -> None:
        """
        With ``fast_path=False`` nothing is answered into the buffer.
        """
        dispatcher = Setup().dispatcher(fast_path=False)
        frame = ethernet_frame(ata_request())
        self.assertEqual(dispatcher.frame_received_into(frame, memoryview(bytearray(99))), 0)
        self.assertEqual(dispatcher.counters, FrameCounters())

    def test_views_only_to_backends_with_read_into(self) -> None:
        """
        A backend without ``read_into`` is given ``bytes`` to write, never a view of the frame.
        """
        backend = KeepingBackend()
        target = Target(1, 0, backend, max_sectors=2)
        frame = bytearray(ethernet_frame(ata_request(0x34, lba=2, data=sectors(1, 0x44))))
        slot = memoryview(bytearray(99))
        length = fast_reply_into(memoryview(frame), slot, TARGET_MAC, index([target]))
        self.assertEqual(length, MIN_FRAME_SIZE)
        frame[36:] = bytes(len(frame) - 36)
        [given] = backend.given
        self.assertIsInstance(given, bytes)
        self.assertEqual(given, sectors(1, 0x44))
        # And one without read_into is read with read().
        slot = bytearray(2000)
        read = ethernet_frame(ata_request(0x24, lba=2))
        length = fast_reply_into(read, memoryview(slot), TARGET_MAC, index([target]))
        self.assertEqual(bytes(slot[36:length]), sectors(1, 0x44))


class CompiledLaneFastPathTests(FastPathTests):
    """``FastPathTests`` with the compiled lane's ``Tally`` counting."""

    compiled = True


class CompiledLaneFallbackTests(FallbackTests):
    """``FallbackTests`` with the compiled lane's ``Tally`` counting."""

    compiled = True


class CompiledLaneIntoTests(IntoTests):
    """``IntoTests`` with the compiled lane's ``Tally`` counting."""

    compiled = True


class ReadIntoTests(SynchronousTestCase):
    """The backends' ``read_into``: what ``read`` returns, straight into a buffer."""

    def _check(self, backend: Any) -> None:
        """``read_into`` fills exactly the view with what ``read`` returns, or fails as it does."""
        backend.write(3 * SECTOR_SIZE, sectors(2, 0x77) + sectors(1, 0x11))
        for offset, length in ((0, 512), (3 * 512, 1024), (3 * 512, 3 * 512), (4 * 512, 512)):
            buffer = bytearray([_STALE]) * (length + 8)
            got = backend.read_into(offset, memoryview(buffer)[4 : 4 + length])
            self.assertEqual(got, length)
            self.assertEqual(bytes(buffer[4 : 4 + length]), backend.read(offset, length))
            self.assertEqual(buffer[:4] + buffer[4 + length :], bytearray([_STALE]) * 8)
        with self.assertRaises(ValueError):
            backend.read_into(backend.size - 512, memoryview(bytearray(1024)))

    def test_memory(self) -> None:
        """``MemoryBackend.read_into``."""
        self._check(MemoryBackend(SECTORS * SECTOR_SIZE))

    def _file(self, direct: bool = False) -> FileBackend:
        """Return a file backend on a fresh 64-sector file, closed when the test ends."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.truncate(SECTORS * SECTOR_SIZE)
        try:
            backend = FileBackend.open(path, direct=direct)
        except Exception as e:
            if direct:
                raise SkipTest(f"no O_DIRECT here: {e}") from None
            raise
        self.addCleanup(backend.close)
        return backend

    def test_file(self) -> None:
        """``FileBackend.read_into`` (``preadv`` into the view)."""
        self._check(self._file())

    def test_file_direct(self) -> None:
        """``FileBackend.read_into`` with ``--direct`` (through the aligned buffer)."""
        self._check(self._file(direct=True))

    def test_file_shrunk(self) -> None:
        """A file shrunk behind the backend's back: ``EIO``, as ``read`` raises."""
        backend = self._file()
        os.truncate(backend.path, 2 * SECTOR_SIZE)
        with self.assertRaises(OSError) as caught:
            backend.read_into(SECTOR_SIZE, memoryview(bytearray(2 * SECTOR_SIZE)))
        self.assertEqual(caught.exception.errno, errno.EIO)
