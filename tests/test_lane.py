"""
Tests for ``aoe_twisted.lane``: the compiled data lane answers exactly as the Python lane does.

The reference is the Python lane: ``fastpath.fast_reply_into`` and, for
what it declines, the general path (``Dispatcher``), itself checked
against the general path alone in ``tests.test_fastpath``.  For any frames,
the compiled lane (``Lane.answer``, then the general path for what it
declines) must give the same reply bytes, leave the reply buffer as the
fast path leaves it, answer a frame exactly when ``fast_reply_into`` does,
count the same (``TargetStats`` snapshots after a sweep, but the service
times) and leave the same disks, over every disk it serves (memory, file,
``O_DIRECT`` file, slices of them) and beside one it does not.  Then
``Tally`` against ``TargetStats``'s own book of tags, ``Lane.drain`` over a
ring in a ``bytearray``, a disk that fails, the constructors' refusals, and
``ILaneBackend``.

Without the extension (not built, or ``AOE_TWISTED_PURE_PYTHON=1``) the
tests that need it skip, saying why.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from attrs import define
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface.verify import verifyObject

from aoe_twisted import lane as _lane
from aoe_twisted.backends.block import BlockDeviceBackend
from aoe_twisted.backends.file import FileBackend
from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.backends.slice import SliceBackend
from aoe_twisted.core.acl import MemoryACLStore
from aoe_twisted.core.dispatch import Dispatcher
from aoe_twisted.core.fastpath import fast_reply, fast_reply_into
from aoe_twisted.core.stats import RECENT_TAGS, TargetStats
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import (
    MIN_FRAME_SIZE,
    SECTOR_SIZE,
    ATACmdStatus,
    ATAError,
    Directive,
    DirectiveCommand,
    MACMaskCommand,
    ReserveReleaseCommand,
)
from aoe_twisted.errors import BackendSpecError
from aoe_twisted.interfaces import ILaneBackend
from aoe_twisted.lane.table import build_table, lane_served
from aoe_twisted.net.ring import (
    TP_STATUS_AVAILABLE,
    TP_STATUS_KERNEL,
    TP_STATUS_SEND_REQUEST,
    TP_STATUS_USER,
    TPACKET2_HDR,
    TX_DATA_AT,
    PacketRings,
    RingGeometry,
)
from aoe_twisted.testing import (
    INITIATOR_MAC,
    OTHER_MAC,
    TARGET_MAC,
    ata_request,
    ethernet_frame,
    mask_request,
    reserve_request,
)
from aoe_twisted.testing.packets import RX_FRAME_AT, fill_rx_slot
from tests import strategies
from tests.test_fastpath import (
    SECTORS,
    TAG,
    FailingBackend,
    near_requests,
    sectors,
    target_stats,
)

#: What a reply buffer holds before an answer is written: a reused slot's stale bytes.
STALE = 0xEE
#: A slice's first sector in its disk: not on a 4096-byte block boundary.
SLICE_AT = 3
#: The disk under a slice: the slice's 64 sectors and some either side.
INNER_SECTORS = SECTORS + 8
#: What every disk holds at first (the first bytes of it, for the smaller ones).
CONTENTS = random.Random(14).randbytes(INNER_SECTORS * SECTOR_SIZE)
#: A frame too long for any ring slot here.
MAX_FRAME = 9014

#: The disks a target of the equivalence tests may have; ``python`` is one the lane cannot serve.
KINDS = ("memory", "file", "pwrite", "direct", "memory-slice", "file-slice", "pwrite-slice",
         "direct-slice", "python")


def native_lane() -> Any:
    """Return the compiled lane's module, or skip the test saying why it is not there."""
    native = _lane.native
    if native is None:
        raise SkipTest(f"the compiled lane is not here: {_lane.lane_reason}")
    return native


@contextlib.contextmanager
def lane_module(module: Any) -> Iterator[None]:
    """Make targets, dispatchers and tables inside with ``aoe_twisted.lane.native`` = ``module``."""
    saved = _lane.native
    _lane.native = module
    try:
        yield
    finally:
        _lane.native = saved


def one_frame_lane(native: Any, accept_other: bool = False) -> Any:
    """Return a ``Lane`` to call ``answer`` on (its rings are never walked)."""
    return native.Lane(
        bytearray(4096), [0], 2048, [2048], 2048, TARGET_MAC, MAX_FRAME, accept_other
    )


_direct_problem: dict[str, str | None] = {}


def small_tmpfs(case: Any, directory: str, size: str) -> str:
    """
    Mount a ``tmpfs`` of ``size`` (``"64k"``) in a new directory under ``directory``; return it.

    Unmounted at the end of ``case``; the test is skipped if it cannot be mounted.
    """
    mount = tempfile.mkdtemp(dir=directory)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mount],
                       check=True, capture_output=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as e:
        raise SkipTest(f"cannot mount a tmpfs to fill: {e}") from None
    case.addCleanup(subprocess.run, ["umount", "-l", mount], check=False)
    return mount


def fill_filesystem(mount: str) -> None:
    """Write a file into ``mount`` until its filesystem has no room left."""
    filler = os.open(os.path.join(mount, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(filler, bytes(4096))
    finally:
        os.close(filler)


def direct_problem(directory: str) -> str | None:
    """Return why ``O_DIRECT`` files cannot be served from ``directory``, or ``None``."""
    if directory not in _direct_problem:
        path = os.path.join(directory, "probe.img")
        with open(path, "wb") as f:
            f.truncate(8 * 4096)
        try:
            FileBackend.open(path, direct=True).close()
        except BackendSpecError as e:
            _direct_problem[directory] = str(e)
        else:
            _direct_problem[directory] = None
        os.unlink(path)
    return _direct_problem[directory]


def make_disk(kind: str, read_only: bool, directory: str, name: str) -> Any:
    """
    Return a 64-sector disk of ``kind`` holding ``CONTENTS``, in ``directory`` if a file.

    A slice's disk is ``INNER_SECTORS`` long and the slice starts at
    ``SLICE_AT``; ``python`` is ``FailingBackend`` (no ``ILaneBackend``).
    A ``file`` the compiled lane writes through a mapping (the default); a
    ``pwrite`` file it writes with ``pwrite``.
    """
    base = kind.removesuffix("-slice")
    sliced = kind.endswith("-slice")
    size = (INNER_SECTORS if sliced else SECTORS) * SECTOR_SIZE
    disk: Any
    if base in ("memory", "python"):
        disk = MemoryBackend(size, read_only=read_only)
        disk.lane_storage().buffer[:] = CONTENTS[:size]
        if base == "python":
            return FailingBackend(disk)
    else:
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(CONTENTS[:size])
        disk = FileBackend.open(path, read_only=read_only, direct=base == "direct")
        disk.mappable = base == "file"
        # The same name in every world (it comes from the file's inode): IDENTIFY agrees.
        disk.identity = name.encode()
    if sliced:
        return SliceBackend(disk, SLICE_AT * SECTOR_SIZE, SECTORS * SECTOR_SIZE)
    return disk


def whole(backend: Any) -> bytes:
    """Return every byte of the disk under ``backend`` (a slice's whole inner disk)."""
    if isinstance(backend, SliceBackend):
        backend = backend.inner
    elif isinstance(backend, FailingBackend):
        backend = backend.disk
    return backend.read(0, backend.size)


@define
class World:
    """One copy of the targets: a dispatcher, the disks, and how frames were answered."""

    dispatcher: Dispatcher
    backends: list[Any]

    def disks(self) -> list[bytes]:
        """Return each target's whole disk."""
        return [whole(backend) for backend in self.backends]

    def write_attempts(self) -> list[int]:
        """Return the writes each disk the lane cannot serve was asked for."""
        return [b.writes for b in self.backends if isinstance(b, FailingBackend)]

    def answered(self, length: int) -> None:
        """Count a frame answered in place, as ``AoEProtocol.laneAnswered`` and the fast path do."""
        counters = self.dispatcher.counters
        counters.received += 1
        counters.answered += 1
        counters.replies += 1
        counters.fast += 1

    def general(self, frame: bytes) -> list[bytes]:
        """Answer ``frame`` by the general path; return its replies."""
        dispatcher = self.dispatcher
        return dispatcher.settle(dispatcher.general(frame))

    def close(self) -> None:
        """Close every disk."""
        for backend in self.backends:
            backend.close()


@define(frozen=True)
class LaneSetup:
    """How the targets of one example are configured: the same in every world."""

    kinds: tuple[str, ...] = ("memory",)
    #: Each target's disk read-only, and each target ``sync`` (missing: neither).
    read_only: tuple[bool, ...] = ()
    sync: tuple[bool, ...] = ()
    max_sectors: int = 2
    mask: tuple[bytes, ...] = ()
    reserve: tuple[bytes, ...] = ()
    hold: bool = False
    capacity: int = 2100

    @property
    def holds(self) -> bool:
        """Whether a write may wait for group commit (``--sync``, or a target's own ``sync``)."""
        return self.hold or any(self.sync)

    def world(self, module: Any, directory: str, fast_path: bool = True) -> World:
        """Return fresh targets at 1.0, 1.1 ... configured so, counting with lane ``module``."""
        backends = []
        targets = []
        with lane_module(module):
            for slot, kind in enumerate(self.kinds):
                read_only = slot < len(self.read_only) and self.read_only[slot]
                backend = make_disk(kind, read_only, directory, f"{slot}.img")
                backends.append(backend)
                acl = MemoryACLStore(mask_list=self.mask, reserve_list=self.reserve)
                targets.append(
                    Target(
                        1, slot, backend, acl=acl, max_sectors=self.max_sectors,
                        sync=slot < len(self.sync) and self.sync[slot], serial=f"LANE{slot}",
                    )
                )
            dispatcher = Dispatcher(
                TARGET_MAC, targets, fast_path=fast_path, hold_writes=self.hold
            )
        return World(dispatcher, backends)


@st.composite
def lane_setups(draw: st.DrawFn, direct: bool = True) -> LaneSetup:
    """One to three targets on any disks, sometimes read-only, synchronous, masked or reserved."""
    kinds = [k for k in KINDS if direct or not k.startswith("direct")]
    count = draw(st.integers(1, 3))
    lists = st.sampled_from(
        [(), (), (), (INITIATOR_MAC,), (OTHER_MAC,), (OTHER_MAC, INITIATOR_MAC)]
    )
    flags = st.lists(st.sampled_from([False, False, False, True]), min_size=count,
                     max_size=count)  # fmt: skip
    return LaneSetup(
        kinds=tuple(draw(st.lists(st.sampled_from(kinds), min_size=count, max_size=count))),
        read_only=tuple(draw(flags)),
        sync=tuple(draw(flags)),
        max_sectors=draw(st.integers(1, 4)),
        mask=draw(lists),
        reserve=draw(lists),
        hold=draw(st.sampled_from([False, False, False, True])),
        capacity=draw(st.sampled_from([2100, 2100, 2100, 60, 36 + 1023, 36 + 2048])),
    )


#: Tags a few frames share: a frame repeating one is a retransmission.
_TAGS = st.sampled_from([TAG, bytes(4), b"\x00\x00\x00\x01", b"\xff" * 4])


@st.composite
def retagged_requests(draw: st.DrawFn) -> bytes:
    """``near_requests`` to any of three targets, with a few shared tags, from either host."""
    frame = bytearray(draw(near_requests()))
    if len(frame) >= 24:
        frame[20:24] = draw(_TAGS)
    if len(frame) >= 19 and draw(st.booleans()):
        frame[18] = draw(st.integers(0, 2))
    if len(frame) >= 12 and not frame[6] & 1 and draw(st.integers(0, 3)) == 0:
        frame[6:12] = OTHER_MAC
    return bytes(frame)


@st.composite
def acl_changes(draw: st.DrawFn) -> bytes:
    """A mask list edit or a reserve list change for one target, from either host."""
    slot = draw(st.integers(0, 2))
    mac = draw(st.sampled_from([INITIATOR_MAC, OTHER_MAC]))
    if draw(st.booleans()):
        directive = Directive(
            draw(st.sampled_from([DirectiveCommand.ADD, DirectiveCommand.DELETE])), mac
        )
        message = mask_request(MACMaskCommand.EDIT, [directive], shelf=1, slot=slot)
    else:
        command = draw(
            st.sampled_from([ReserveReleaseCommand.SET, ReserveReleaseCommand.FORCE_SET])
        )
        macs = draw(st.sampled_from([(), (mac,)]))
        message = reserve_request(command, macs, shelf=1, slot=slot)
    return ethernet_frame(message, draw(st.sampled_from([INITIATOR_MAC, OTHER_MAC])))


#: Frames of every kind: mostly near plain reads and writes, then AoE messages, garbage, ACLs.
lane_frames = st.one_of(
    retagged_requests(),
    retagged_requests(),
    retagged_requests(),
    strategies.aoe_frames.map(lambda f: ethernet_frame(f.payload, f.src, ethertype=f.ethertype)),
    st.binary(max_size=80),
    retagged_requests().flatmap(lambda f: st.integers(0, len(f)).map(lambda n: f[:n])),
    acl_changes(),
)


def python_lane(
    world: World, frame: bytes, setup: LaneSetup
) -> tuple[list[bytes], bytearray, bool]:
    """
    Answer ``frame`` as the Python lane does (``AoEProtocol.frameReceivedInto``).

    In place by the fast path (``fast_reply_into``); else, when a write may
    wait for group commit, by ``frame_received`` (the fast path holding its
    reply, else the general path); else by the general path.  Return the
    replies, the reply buffer as the lane would leave it (a held reply is
    written there too, as the lane writes it into its TX slot) and whether
    the fast path answered in a way the lane can (in the buffer, or a write
    whose reply is held).
    """
    dispatcher = world.dispatcher
    buffer = bytearray([STALE]) * setup.capacity
    length = dispatcher.frame_received_into(memoryview(frame), memoryview(buffer))
    if length:
        return [bytes(buffer[:length])], buffer, True
    if setup.holds:
        fast = dispatcher.counters.fast
        replies = dispatcher.settle(dispatcher.frame_received(frame))
        if dispatcher.counters.fast == fast or frame[27] not in _WRITE_COMMANDS:
            # Not by the fast path; or a read, which only a reply buffer too small for it
            # sends here: the lane, answering into that buffer, declines it too.
            return replies, buffer, False
        [reply] = replies
        buffer[: len(reply)] = reply
        return replies, buffer, True
    return world.general(frame), buffer, False


#: ATA WRITE SECTORS (EXT).
_WRITE_COMMANDS = (int(ATACmdStatus.WRITE_28BIT), int(ATACmdStatus.WRITE_48BIT))


def address(frame: bytes) -> tuple[int, int] | None:
    """Return the shelf and slot ``frame`` is addressed to, if it is long enough to say."""
    if len(frame) < 19:
        return None
    return int.from_bytes(frame[16:18], "big"), frame[18]


class _NativeCase(SynchronousTestCase):
    """A test of the compiled lane itself: skipped without it."""

    def setUp(self) -> None:
        self.native = native_lane()
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.addCleanup(shutil.rmtree, self.directory, True)


class EquivalenceTests(_NativeCase):
    """The compiled lane answers, counts and writes exactly as the Python lane."""

    def check(self, setup: LaneSetup, sent: list[bytes], wrap: Any = None) -> None:
        """
        Send ``sent`` to three worlds and compare them.

        The lane's (``Lane.answer``, ``wrap(answer)`` if given, then the
        general path), the Python lane's (``fast_reply_into``, then the
        general path) and the general path's alone.
        """
        if setup.kinds.count("direct") + setup.kinds.count("direct-slice"):
            problem = direct_problem(self.directory)
            if problem is not None:
                raise SkipTest(f"no O_DIRECT in {self.directory}: {problem}")
        directory = tempfile.mkdtemp(dir=self.directory)
        worlds: list[World] = []
        try:
            for name, module, fast in (("lane", self.native, True), ("fast", None, True),
                                       ("general", None, False)):  # fmt: skip
                os.mkdir(os.path.join(directory, name))
                worlds.append(setup.world(module, os.path.join(directory, name), fast))
            self._compare(setup, sent, wrap, *worlds)
        finally:
            for world in worlds:
                world.close()
            shutil.rmtree(directory, True)

    def _compare(self, setup: LaneSetup, sent: list[bytes], wrap: Any, lane_world: World,
                 fast_world: World, general_world: World) -> None:  # fmt: skip
        """Send ``sent`` to the three worlds; check they answer, count and write alike."""
        with lane_module(self.native):
            table = build_table(lane_world.dispatcher.fast_index.values(), hold_writes=setup.hold)
        served = [kind != "python" for kind in setup.kinds]
        self.assertEqual(table is not None and len(table), any(served) and sum(served))
        for target, lane_kind in zip(lane_world.dispatcher.targets, served, strict=True):
            self.assertEqual(lane_served(target), lane_kind)
        addresses = {(1, slot) for slot, lane_kind in enumerate(served) if lane_kind}
        lane = one_frame_lane(self.native)
        answer = lane.answer if wrap is None else wrap(lane.answer)
        by_lane_count = 0
        for frame in sent:
            lane_buffer = bytearray([STALE]) * setup.capacity
            length = answer(table, frame, lane_buffer) if table is not None else 0
            if length:
                by_lane_count += 1
                lane_world.answered(length)
                got = [bytes(lane_buffer[:length])]
            else:
                got = lane_world.general(frame)
            expected, fast_buffer, by_fast = python_lane(fast_world, frame, setup)
            # The lane answers exactly what the fast path answers, for the disks it serves.
            self.assertEqual(bool(length), by_fast and address(frame) in addresses,
                             f"answered by the lane: {setup!r}, {frame.hex()}")  # fmt: skip
            self.assertEqual(got, expected)
            if length or not by_fast:
                self.assertEqual(lane_buffer, fast_buffer)
            else:
                self.assertEqual(lane_buffer, bytearray([STALE]) * setup.capacity)
            self.assertEqual(general_world.dispatcher.serve(frame), expected)
        self.assertEqual(lane_world.dispatcher.counters.fast, by_lane_count)
        counters = [world.dispatcher.counters.as_dict() for world in
                    (lane_world, fast_world, general_world)]  # fmt: skip
        for figures in counters:
            del figures["fast"]
        self.assertEqual(counters[0], counters[1])
        self.assertEqual(counters[0], counters[2])
        figures = target_stats(lane_world.dispatcher)
        self.assertEqual(figures, target_stats(fast_world.dispatcher))
        self.assertEqual(figures, target_stats(general_world.dispatcher))
        for target in lane_world.dispatcher.targets:
            self.assertEqual(target.stats.tally.take()[:6], (0,) * 6, "all absorbed")
        disks = lane_world.disks()
        self.assertEqual(disks, fast_world.disks())
        self.assertEqual(disks, general_world.disks())
        self.assertEqual(lane_world.write_attempts(), fast_world.write_attempts())
        self.assertEqual(lane_world.write_attempts(), general_world.write_attempts())

    @settings(max_examples=200, deadline=None)
    @given(lane_setups(), st.lists(lane_frames, min_size=1, max_size=8))
    def test_same_as_python_lane(self, setup: LaneSetup, sent: list[bytes]) -> None:
        """
        Any frames, to any targets on any disks: the same replies, buffers, counters and disks,
        and the lane answers exactly the frames the fast path answers.
        """
        self.check(setup, sent)

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(st.sampled_from(KINDS[:-1]), min_size=1, max_size=3),
        st.lists(
            st.tuples(st.sampled_from([0x20, 0x24, 0x30, 0x34]), st.integers(0, 2),
                      st.integers(1, 4), st.integers(0, SECTORS - 4), _TAGS),
            min_size=1, max_size=10,
        ),
        st.booleans(),
        st.lists(st.booleans(), min_size=3, max_size=3),
    )  # fmt: skip
    def test_plain_requests_answered(
        self, kinds: list[str], requests: list[tuple[int, int, int, int, bytes]], hold: bool,
        sync: list[bool],
    ) -> None:  # fmt: skip
        """
        Plain reads and writes in range on the disks it serves are all answered by the lane,
        with writes held for group commit (``--sync``, a target's ``sync``) or not.
        """
        setup = LaneSetup(kinds=tuple(kinds), sync=tuple(sync), max_sectors=4, hold=hold)
        sent = []
        answered = 0
        for cmd, slot, count, lba, tag in requests:
            write = cmd in (0x30, 0x34)
            data = random.Random(lba).randbytes(count * SECTOR_SIZE) if write else b""
            message = ata_request(cmd, count=count, lba=lba, data=data, slot=slot, tag=tag)
            sent.append(ethernet_frame(message))
            answered += slot < len(kinds)
        counted: list[int] = []

        def wrap(answer: Any) -> Any:
            def counting(table: Any, frame: bytes, buffer: bytearray) -> int:
                length = answer(table, frame, buffer)
                counted.append(length)
                return length

            return counting

        self.check(setup, sent, wrap)
        self.assertEqual(sum(1 for length in counted if length), answered)

    def test_direct(self) -> None:
        """``O_DIRECT`` files (and a slice of one off the block boundary) are served too."""
        problem = direct_problem(self.directory)
        if problem is not None:
            raise SkipTest(f"no O_DIRECT in {self.directory}: {problem}")
        setup = LaneSetup(kinds=("direct", "direct-slice"), max_sectors=4)
        sent = [
            ethernet_frame(ata_request(0x34, count=3, lba=1, data=sectors(3, 0x31), slot=slot))
            for slot in (0, 1)
        ] + [
            ethernet_frame(ata_request(0x24, count=4, lba=0, slot=slot, tag=5)) for slot in (0, 1)
        ] + [ethernet_frame(ata_request(0x34, count=1, lba=63, data=sectors(1, 0x32), slot=1))]
        self.check(setup, sent)


class MutantTests(_NativeCase):
    """The equivalence check fails when the lane's answer is wrong in any way: it can fail."""

    SETUP = LaneSetup(kinds=("memory", "file"))
    SENT = [
        ethernet_frame(ata_request(0x24, lba=4)),
        ethernet_frame(ata_request(0x34, lba=4, data=sectors(1, 0x42), slot=1)),
        ethernet_frame(ata_request(0x24, lba=4, slot=1)),
    ]

    def fails(self, wrap: Any) -> None:
        """Check that ``EquivalenceTests.check`` fails with the lane's answer wrapped so."""
        case = EquivalenceTests("test_direct")
        case.native = self.native
        case.directory = self.directory
        self.assertRaises(case.failureException, case.check, self.SETUP, self.SENT, wrap)

    def test_sound(self) -> None:
        """Unwrapped, the check passes (so what fails below is the mutation)."""
        case = EquivalenceTests("test_direct")
        case.native = self.native
        case.directory = self.directory
        case.check(self.SETUP, self.SENT)

    def test_flipped_reply_byte(self) -> None:
        """A byte of the lane's reply flipped."""

        def wrap(answer: Any) -> Any:
            def flipped(table: Any, frame: bytes, buffer: bytearray) -> int:
                length = answer(table, frame, buffer)
                if length:
                    buffer[length - 1] ^= 1
                return length

            return flipped

        self.fails(wrap)

    def test_byte_past_the_reply(self) -> None:
        """A byte written past the reply's end."""

        def wrap(answer: Any) -> Any:
            def scribbled(table: Any, frame: bytes, buffer: bytearray) -> int:
                length = answer(table, frame, buffer)
                if length and length < len(buffer):
                    buffer[length] = 0
                return length

            return scribbled

        self.fails(wrap)

    def test_declined(self) -> None:
        """A frame the fast path answers declined by the lane."""

        def wrap(answer: Any) -> Any:
            def declined(table: Any, frame: bytes, buffer: bytearray) -> int:
                return 0 if frame[27] == 0x30 or frame[27] == 0x34 else answer(table, frame, buffer)

            return declined

        self.fails(wrap)

    def test_count_lost(self) -> None:
        """What the lane counted taken away (a counter the lane forgot)."""

        def wrap(answer: Any) -> Any:
            def forgetful(table: Any, frame: bytes, buffer: bytearray) -> int:
                length = answer(table, frame, buffer)
                for target in self.targets:
                    target.stats.tally.take()
                return length

            return forgetful

        original = build_table

        def keep(targets: Any, hold_writes: bool = False) -> Any:
            self.targets = list(targets)
            return original(self.targets, hold_writes)

        self.patch(sys.modules[__name__], "build_table", keep)
        self.fails(wrap)


def _python_sequence(rng: random.Random, macs: list[bytes], length: int, space: int,
                     sequential: bool) -> list[tuple[bytes, bytes]]:  # fmt: skip
    """
    Return ``length`` (MAC, tag) requests.

    Random tags from ``space`` values, or each initiator's tags counting up
    as Linux's do, now and then one from further back: one, or about one or
    two generations (``RECENT_TAGS``) back, or anywhere.
    """
    sent: list[tuple[bytes, bytes]] = []
    counters = dict.fromkeys(macs, 0)
    back = [1, RECENT_TAGS - 1, RECENT_TAGS, RECENT_TAGS + 1, 2 * RECENT_TAGS - 1,
            2 * RECENT_TAGS, 2 * RECENT_TAGS + 1]  # fmt: skip
    for _ in range(length):
        mac = rng.choice(macs)
        if not sequential:
            tag = rng.randrange(space)
        elif rng.random() < 0.1:
            distance = rng.choice([*back, rng.randrange(1, 3 * RECENT_TAGS)])
            tag = (counters[mac] - distance) % (1 << 32)
        else:
            counters[mac] += 1
            tag = counters[mac] % (1 << 32)
        sent.append((mac, tag.to_bytes(4, "big")))
    return sent


class TallyTests(_NativeCase):
    """``Tally.seen``: the same book of initiators and tags as ``TargetStats.seen`` in Python."""

    @settings(max_examples=40, deadline=None)
    @given(
        st.integers(0, 2**32 - 1),
        st.integers(1, 4),
        st.integers(2 * RECENT_TAGS + 1, 3 * RECENT_TAGS + 500),
        st.sampled_from([RECENT_TAGS // 2, RECENT_TAGS, 3 * RECENT_TAGS // 2, 2 * RECENT_TAGS,
                         1 << 32]),
        st.booleans(),
    )  # fmt: skip
    def test_same_decisions(
        self, seed: int, count: int, length: int, space: int, sequential: bool
    ) -> None:
        """
        Over more than two generations of tags from several initiators: the same
        retransmission decisions, request by request, and the same frames per initiator.
        """
        rng = random.Random(seed)
        macs = [bytes([2, 0, 0, 0, 0, n]) for n in range(count)]
        if count > 1:
            macs[1] = b"\x02\xff\xff\xff\xff\xff"
        with lane_module(None):
            python = TargetStats()
        self.assertIsNone(python.tally)
        tally = self.native.Tally()
        sent = _python_sequence(rng, macs, length, space, sequential)
        for number, (mac, tag) in enumerate(sent):
            before = python.retransmits
            python.seen(mac, tag)
            self.assertEqual(tally.seen(mac, tag), python.retransmits > before, number)
        if sequential or space <= 2 * RECENT_TAGS:
            self.assertGreater(python.retransmits, 0)
        self.assertEqual(tally.peers(), [(mac, p.frames) for mac, p in python.peers.items()])

    def test_generations(self) -> None:
        """
        A tag is remembered for at least ``RECENT_TAGS`` requests, and forgotten two
        generations on, as in Python.
        """
        tally = self.native.Tally()
        self.assertEqual(self.native.RECENT_TAGS, RECENT_TAGS)
        for tag in range(RECENT_TAGS):
            self.assertFalse(tally.seen(INITIATOR_MAC, tag.to_bytes(4, "big")))
        # The first generation is full: its tags are all still known.
        self.assertTrue(tally.seen(INITIATOR_MAC, (0).to_bytes(4, "big")))
        self.assertTrue(tally.seen(INITIATOR_MAC, (RECENT_TAGS - 1).to_bytes(4, "big")))
        self.assertFalse(tally.seen(OTHER_MAC, (0).to_bytes(4, "big")))
        for tag in range(RECENT_TAGS, 2 * RECENT_TAGS):
            self.assertFalse(tally.seen(INITIATOR_MAC, tag.to_bytes(4, "big")))
        self.assertFalse(tally.seen(INITIATOR_MAC, (0).to_bytes(4, "big")))
        self.assertEqual(tally.peers(), [(INITIATOR_MAC, 2 * RECENT_TAGS + 3), (OTHER_MAC, 1)])

    def test_seen_refuses(self) -> None:
        """``seen`` wants a 6-byte MAC and a 4-byte tag, and two arguments."""
        tally = self.native.Tally()
        self.assertRaises(ValueError, tally.seen, INITIATOR_MAC[:5], TAG)
        self.assertRaises(ValueError, tally.seen, INITIATOR_MAC, TAG + b"\x00")
        self.assertRaises(TypeError, tally.seen, INITIATOR_MAC)
        self.assertRaises(TypeError, tally.seen, "020000000001", TAG)
        self.assertRaises(TypeError, tally.seen, INITIATOR_MAC, 5)
        self.assertRaises(TypeError, self.native.Tally, 1)
        self.assertEqual(tally.peers(), [])

    def test_take(self) -> None:
        """``take`` returns what was counted since the last, zeroed; the initiators stay."""
        tally = self.native.Tally()
        tally.seen(INITIATOR_MAC, TAG)
        self.assertTrue(tally.seen(INITIATOR_MAC, TAG))
        taken = tally.take()
        self.assertEqual(taken[:7], (0, 0, 0, 0, 0, 0, 0.0))
        self.assertEqual(taken[7], (0,) * self.native.BUCKETS)
        self.assertEqual(taken[8], [])
        self.assertEqual(tally.peers(), [(INITIATOR_MAC, 2)])


# -- the rings --------------------------------------------------------------

#: Small rings: four RX and four TX slots of 2048 bytes.
GEOMETRY = RingGeometry(8192, 1, 2048, 4)


def make_rings() -> PacketRings:
    """Return an RX ring and a TX ring of ``GEOMETRY`` in a ``bytearray``, all slots free."""
    return PacketRings(bytearray(2 * GEOMETRY.size), GEOMETRY, GEOMETRY)


def put(
    rings: PacketRings,
    index: int,
    frame: bytes,
    pkttype: int = socket.PACKET_HOST,
    length: int | None = None,
    snaplen: int | None = None,
    at: int = RX_FRAME_AT,
) -> None:
    """Put ``frame`` in RX slot ``index`` as the kernel does, and hand the slot to us."""
    fill_rx_slot(rings, rings.rx_offsets[index], frame, pkttype, frame[6:12], length=length,
                 snaplen=snaplen, at=at)  # fmt: skip


def put_frame(rings: PacketRings, index: int) -> bytes:
    """Return the frame in RX slot ``index``."""
    offset = rings.rx_offsets[index]
    _status, _length, snaplen, at = TPACKET2_HDR.unpack_from(rings.view, offset)[:4]
    return bytes(rings.view[offset + at : offset + at + snaplen])


def rx_status(rings: PacketRings) -> list[int]:
    """Return every RX slot's ``tp_status``."""
    return [rings.status[offset >> 2] for offset in rings.rx_offsets]


def tx_slot(rings: PacketRings, index: int) -> tuple[int, int, bytes]:
    """Return TX slot ``index``'s status, ``tp_len`` and frame."""
    offset = rings.tx_offsets[index]
    status, length = TPACKET2_HDR.unpack_from(rings.view, offset)[:2]
    return status, length, bytes(rings.view[offset + TX_DATA_AT : offset + TX_DATA_AT + length])


class _RingCase(_NativeCase):
    """Two memory disks, small rings in a ``bytearray``, and the Python lane to compare with."""

    def setUp(self) -> None:
        super().setUp()
        self.rings = make_rings()
        self.world = LaneSetup(kinds=("memory", "memory")).world(self.native, self.directory)
        self.reference = LaneSetup(kinds=("memory", "memory")).world(None, self.directory)
        with lane_module(self.native):
            self.table = build_table(self.world.dispatcher.fast_index.values())

    def lane(self, accept_other: bool = False, max_frame: int = 1514) -> Any:
        """Return the lane over ``self.rings``."""
        rings = self.rings
        return self.native.Lane(rings.view, rings.rx_offsets, GEOMETRY.frame_size,
                                rings.tx_offsets, GEOMETRY.frame_size, TARGET_MAC, max_frame,
                                accept_other)  # fmt: skip

    def expected(self, frame: bytes) -> bytes:
        """Return the Python lane's reply to ``frame`` (answered by ``fast_reply_into``)."""
        buffer = bytearray(GEOMETRY.frame_size - TX_DATA_AT)
        index = self.reference.dispatcher.fast_index
        length = fast_reply_into(frame, memoryview(buffer), TARGET_MAC, index)
        self.assertTrue(length)
        return bytes(buffer[:length])

    def drain(self, lane: Any, budget: int = 64, unflushed: int = 0, batch: int = 64) -> Any:
        """Drain ``self.rings`` from where they are; return what ``drain`` returns."""
        return lane.drain(self.table, self.rings.rx_next, self.rings.tx_next, budget, unflushed,
                          batch)  # fmt: skip


class DrainTests(_RingCase):
    """``Lane.drain``: the RX ring walked, replies queued in TX slots, and where it stops."""

    def test_answers_until_empty(self) -> None:
        """
        Two reads and a write answered in TX slots 0-2 (``tp_len``, ``SEND_REQUEST``, the
        Python lane's bytes), their RX slots handed back, then ``STOP_EMPTY``.
        """
        frames = [
            ethernet_frame(ata_request(0x24, lba=3, tag=1)),
            ethernet_frame(ata_request(0x34, count=2, lba=9, data=sectors(2, 0x66), tag=2)),
            ethernet_frame(ata_request(0x20, count=2, lba=9, slot=1, tag=3)),
        ]
        for index, frame in enumerate(frames):
            put(self.rings, index, frame)
        result = self.drain(self.lane())
        self.assertEqual(result, (self.native.STOP_EMPTY, 3, 3, 3, 0, 3, 3))
        self.assertEqual(rx_status(self.rings), [TP_STATUS_KERNEL] * 4)
        for index, frame in enumerate(frames):
            reply = self.expected(frame)
            self.assertEqual(tx_slot(self.rings, index), (TP_STATUS_SEND_REQUEST, len(reply),
                                                           reply))  # fmt: skip
        self.assertEqual(tx_slot(self.rings, 3)[:2], (TP_STATUS_AVAILABLE, 0))
        self.assertEqual(self.world.disks(), self.reference.disks())
        self.assertEqual(target_stats(self.world.dispatcher),
                         target_stats(self.reference.dispatcher))  # fmt: skip

    def test_ignored(self) -> None:
        """
        Our own outgoing frames, another host's (unless accepted) and frames over the
        largest are counted as ignored and handed back, unanswered.
        """
        frame = ethernet_frame(ata_request())
        put(self.rings, 0, frame, socket.PACKET_OUTGOING)
        put(self.rings, 1, frame, socket.PACKET_OTHERHOST)
        put(self.rings, 2, frame, length=1515)
        result = self.drain(self.lane())
        self.assertEqual(result, (self.native.STOP_EMPTY, 3, 0, 0, 3, 0, 0))
        self.assertEqual(rx_status(self.rings), [TP_STATUS_KERNEL] * 4)
        self.assertEqual(tx_slot(self.rings, 0)[:2], (TP_STATUS_AVAILABLE, 0))
        self.assertEqual(target_stats(self.world.dispatcher)[0]["requests"]["read"], 0)

    def test_other_host_accepted(self) -> None:
        """With ``accept_other``, another host's frame is answered (outgoing still ignored)."""
        frame = ethernet_frame(ata_request())
        put(self.rings, 0, frame, socket.PACKET_OTHERHOST)
        put(self.rings, 1, frame, socket.PACKET_OUTGOING)
        result = self.drain(self.lane(accept_other=True))
        self.assertEqual(result, (self.native.STOP_EMPTY, 2, 1, 1, 1, 1, 1))
        self.assertEqual(tx_slot(self.rings, 0)[2], self.expected(frame))

    def test_declined_stops(self) -> None:
        """
        A frame the lane leaves to Python stops the walk at it (``STOP_PYTHON``), its slot
        still ours; what came before was answered.
        """
        put(self.rings, 0, ethernet_frame(ata_request()))
        put(self.rings, 1, ethernet_frame(ata_request(0xEC)))
        put(self.rings, 2, ethernet_frame(ata_request()))
        result = self.drain(self.lane())
        self.assertEqual(result, (self.native.STOP_PYTHON, 1, 1, 1, 0, 1, 1))
        self.assertEqual(rx_status(self.rings)[:3], [TP_STATUS_KERNEL, TP_STATUS_USER,
                                                     TP_STATUS_USER])  # fmt: skip

    def test_frame_overrunning_its_slot(self) -> None:
        """
        A frame whose ``tp_mac`` + ``tp_snaplen`` pass its slot's end is left to Python,
        unread: ``STOP_PYTHON``, nothing answered or counted, the slot still ours.
        """
        frame = ethernet_frame(ata_request())
        put(self.rings, 0, frame, at=GEOMETRY.frame_size - len(frame) + 1)
        put(self.rings, 1, frame, snaplen=GEOMETRY.frame_size - RX_FRAME_AT + 1)
        result = self.drain(self.lane(max_frame=MAX_FRAME))
        self.assertEqual(result, (self.native.STOP_PYTHON, 0, 0, 0, 0, 0, 0))
        self.rings.status[self.rings.rx_offsets[0] >> 2] = TP_STATUS_KERNEL
        self.rings.rx_next = 1
        result = self.drain(self.lane(max_frame=MAX_FRAME))
        self.assertEqual(result, (self.native.STOP_PYTHON, 1, 0, 0, 0, 0, 0))
        self.assertEqual(rx_status(self.rings)[1], TP_STATUS_USER)
        self.assertEqual(tx_slot(self.rings, 0)[:2], (TP_STATUS_AVAILABLE, 0))
        self.assertEqual(target_stats(self.world.dispatcher)[0]["initiators"], [])

    def test_tx_slot_busy(self) -> None:
        """A TX slot the kernel has not sent yet stops the walk: ``STOP_PYTHON``, unread."""
        put(self.rings, 0, ethernet_frame(ata_request()))
        offset = self.rings.tx_offsets[0]
        self.rings.status[offset >> 2] = TP_STATUS_SEND_REQUEST
        result = self.drain(self.lane())
        self.assertEqual(result, (self.native.STOP_PYTHON, 0, 0, 0, 0, 0, 0))
        self.assertEqual(rx_status(self.rings)[0], TP_STATUS_USER)
        self.assertEqual(target_stats(self.world.dispatcher)[0]["requests"]["read"], 0)

    def test_flush_budget_and_wrap(self) -> None:
        """
        ``STOP_FLUSH`` when the unflushed replies reach the batch, ``STOP_BUDGET`` when the
        budget is spent; both rings wrap around from their last slot to slot 0.
        """
        self.rings.rx_next = self.rings.tx_next = 3
        frames = [ethernet_frame(ata_request(lba=n, tag=n)) for n in range(4)]
        for index, frame in zip((3, 0, 1, 2), frames, strict=True):
            put(self.rings, index, frame)
        lane = self.lane()
        result = self.drain(lane, unflushed=1, batch=3)
        self.assertEqual(result, (self.native.STOP_FLUSH, 1, 1, 2, 0, 2, 3))
        self.rings.rx_next, self.rings.tx_next = 1, 1
        result = self.drain(lane, budget=1)
        self.assertEqual(result, (self.native.STOP_BUDGET, 2, 2, 1, 0, 1, 1))
        self.rings.rx_next, self.rings.tx_next = 2, 2
        result = self.drain(lane, budget=5)
        self.assertEqual(result, (self.native.STOP_EMPTY, 3, 3, 1, 0, 1, 1))
        for index, frame in zip((3, 0, 1, 2), frames, strict=True):
            reply = self.expected(frame)
            self.assertEqual(tx_slot(self.rings, index), (TP_STATUS_SEND_REQUEST, len(reply),
                                                           reply))  # fmt: skip

    def test_held_for_group_commit(self) -> None:
        """
        With writes held (``--sync``): a write is done and its reply written in its TX slot
        but held (not ``SEND_REQUEST``) until ``release``, which queues the Python lane's
        acknowledgement, or its refusal (``ABRT``) for a target whose sync failed; reads
        are sent at once; a held slot is not free for the next reply.
        """
        native = self.native
        with lane_module(native):
            table = build_table(self.world.dispatcher.fast_index.values(), hold_writes=True)
        target = self.world.dispatcher.targets[0]
        index = self.reference.dispatcher.fast_index
        lane = self.lane()
        writes = [
            ethernet_frame(ata_request(0x34, count=2, lba=n, data=sectors(2, n), tag=n))
            for n in range(1, 5)
        ]
        put(self.rings, 0, writes[0])
        put(self.rings, 1, ethernet_frame(ata_request(0x24, lba=3, tag=9)))
        put(self.rings, 2, writes[1])
        result = lane.drain(table, 0, 0, 8, 0, 8)
        self.assertEqual(result, (native.STOP_EMPTY, 3, 3, 3, 0, 3, 3))
        self.assertEqual(lane.holding, 2)
        self.assertEqual(lane.held(), [target])
        statuses = [tx_slot(self.rings, n)[0] for n in range(4)]
        self.assertNotIn(statuses[0], (TP_STATUS_AVAILABLE, TP_STATUS_SEND_REQUEST))
        self.assertEqual(statuses[1:], [TP_STATUS_SEND_REQUEST, statuses[0], TP_STATUS_AVAILABLE])
        self.assertEqual(tx_slot(self.rings, 1)[2], self.expected(put_frame(self.rings, 1)))
        decisions = [fast_reply(frame, TARGET_MAC, index, hold=True) for frame in writes[:2]]
        self.assertEqual(self.world.disks(), self.reference.disks())
        self.assertEqual(lane.release(set()), (2, 0))
        self.assertEqual(lane.holding, 0)
        for slot, decision in zip((0, 2), decisions, strict=True):
            assert decision is not None and decision.refusal is not None
            self.assertEqual(tx_slot(self.rings, slot), (TP_STATUS_SEND_REQUEST, 60,
                                                         decision.replies[0]))  # fmt: skip
        # Refused: the sync of the target failed.
        for slot in range(4):
            self.rings.status[self.rings.tx_offsets[slot] >> 2] = TP_STATUS_AVAILABLE
        put(self.rings, 3, writes[2])
        put(self.rings, 0, writes[3], pkttype=socket.PACKET_HOST)
        self.assertEqual(lane.drain(table, 3, 3, 8, 0, 8), (native.STOP_EMPTY, 1, 1, 2, 0, 2, 2))
        decisions = [fast_reply(frame, TARGET_MAC, index, hold=True) for frame in writes[2:]]
        self.assertEqual(lane.release({id(target)}), (2, 2))
        for slot, decision in zip((3, 0), decisions, strict=True):
            assert decision is not None and decision.refusal is not None
            self.assertEqual(tx_slot(self.rings, slot), (TP_STATUS_SEND_REQUEST, 60,
                                                         decision.refusal))  # fmt: skip
        self.assertEqual(lane.held(), [])
        # A held slot is not free: the next reply waits for Python.
        put(self.rings, 1, writes[0])
        self.rings.status[self.rings.tx_offsets[1] >> 2] = TP_STATUS_AVAILABLE
        self.rings.status[self.rings.tx_offsets[2] >> 2] = TP_STATUS_AVAILABLE
        put(self.rings, 2, writes[1])
        self.assertEqual(lane.drain(table, 1, 1, 8, 0, 8), (native.STOP_EMPTY, 3, 3, 2, 0, 2, 2))
        put(self.rings, 3, writes[2])
        self.rings.status[self.rings.tx_offsets[3] >> 2] = TP_STATUS_AVAILABLE
        self.rings.rx_next, self.rings.tx_next = 3, 1
        self.assertEqual(lane.drain(table, 3, 1, 8, 0, 8), (native.STOP_PYTHON, 3, 1, 0, 0, 0, 0))
        self.assertEqual(lane.release(set()), (2, 0))

    def test_no_budget(self) -> None:
        """A budget of 0 walks nothing: ``STOP_BUDGET``."""
        put(self.rings, 0, ethernet_frame(ata_request()))
        result = self.drain(self.lane(), budget=0)
        self.assertEqual(result, (self.native.STOP_BUDGET, 0, 0, 0, 0, 0, 0))
        self.assertEqual(rx_status(self.rings)[0], TP_STATUS_USER)

    def test_target_raising(self) -> None:
        """
        A target whose ``acl`` raises: ``answer`` raises, ``drain`` stops (``STOP_PYTHON``)
        without an exception and leaves the frame to Python, which will see it too.
        """

        class Raising:
            backend = self.world.dispatcher.targets[0].backend
            sync = False

            @property
            def acl(self) -> Any:
                raise RuntimeError("no acl")

        entry = (1, 0, 2, SECTORS, -1, self.world.backends[0].lane_storage().buffer, 0, False,
                 512, True, Raising(), Raising.backend, self.native.Tally())  # fmt: skip
        table = self.native.Table([entry])
        frame = ethernet_frame(ata_request())
        self.assertRaises(RuntimeError, self.lane().answer, table, frame, bytearray(2000))
        put(self.rings, 0, frame)
        self.assertEqual(self.lane().drain(table, 0, 0, 8, 0, 8),
                         (self.native.STOP_PYTHON, 0, 0, 0, 0, 0, 0))  # fmt: skip

    def test_drain_refuses(self) -> None:
        """``drain`` wants a table, slots that exist and six arguments."""
        lane = self.lane()
        self.assertRaises(TypeError, lane.drain, None, 0, 0, 1, 0, 1)
        self.assertRaises(TypeError, lane.drain, self.table, 0, 0, 1, 0)
        self.assertRaises(IndexError, lane.drain, self.table, 4, 0, 1, 0, 1)
        self.assertRaises(IndexError, lane.drain, self.table, 0, -1, 1, 0, 1)
        self.assertRaises(TypeError, lane.drain, self.table, "0", 0, 1, 0, 1)
        self.assertRaises(TypeError, lane.answer, None, b"", bytearray(10))
        self.assertRaises((TypeError, BufferError), lane.answer, self.table, b"", b"read-only")

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(st.tuples(lane_frames, st.sampled_from([0, 0, 0, 3, 4])), min_size=1,
                 max_size=12),
        st.integers(1, 4),
    )  # fmt: skip
    def test_walk_as_the_port_does(self, sent: list[tuple[bytes, int]], batch: int) -> None:
        """
        Any frames walked as ``AoEPort._drain_ring`` walks them (the lane, and Python for
        each frame it stops at, sends when told) give the Python lane's replies, in order.
        """
        world = LaneSetup(kinds=("memory", "python")).world(self.native, self.directory)
        reference = LaneSetup(kinds=("memory", "python")).world(None, self.directory)
        with lane_module(self.native):
            table = build_table(world.dispatcher.fast_index.values())
        rings = make_rings()
        lane = self.native.Lane(rings.view, rings.rx_offsets, GEOMETRY.frame_size,
                                rings.tx_offsets, GEOMETRY.frame_size, TARGET_MAC, 1514,
                                False)  # fmt: skip
        got: list[bytes] = []
        sending = 0
        tx_slots = len(rings.tx_offsets)

        def flush() -> None:
            """Send the queued TX slots in ring order, as the kernel does."""
            nonlocal sending
            while tx_slot(rings, sending)[0] == TP_STATUS_SEND_REQUEST:
                got.append(tx_slot(rings, sending)[2])
                rings.status[rings.tx_offsets[sending] >> 2] = TP_STATUS_AVAILABLE
                sending = (sending + 1) % tx_slots

        expected: list[bytes] = []
        unflushed = 0
        rx_slots = len(rings.rx_offsets)
        for start in range(0, len(sent), rx_slots - 1):
            index = rings.rx_next
            for frame, pkttype in sent[start : start + rx_slots - 1]:
                frame = frame[:1514]
                put(rings, index, frame, pkttype)
                index = (index + 1) % rx_slots
                if pkttype == socket.PACKET_HOST:
                    buffer = bytearray(GEOMETRY.frame_size - TX_DATA_AT)
                    length = fast_reply_into(frame, memoryview(buffer), TARGET_MAC,
                                             reference.dispatcher.fast_index)  # fmt: skip
                    expected.extend([bytes(buffer[:length])] if length
                                    else reference.general(frame))  # fmt: skip
            while True:
                stop, rings.rx_next, rings.tx_next, _r, _i, _a, unflushed = lane.drain(
                    table, rings.rx_next, rings.tx_next, 64, unflushed, batch
                )
                if stop == self.native.STOP_EMPTY:
                    break
                flush()
                unflushed = 0
                if stop == self.native.STOP_PYTHON:
                    # _walk_ring(rings, 1): the frame to the protocol, the slot handed back.
                    got.extend(world.general(put_frame(rings, rings.rx_next)))
                    rings.status[rings.rx_offsets[rings.rx_next] >> 2] = TP_STATUS_KERNEL
                    rings.rx_next = (rings.rx_next + 1) % rx_slots
                else:
                    self.assertEqual(stop, self.native.STOP_FLUSH)
            self.assertEqual(rings.rx_next, index)
            flush()
            unflushed = 0
        self.assertEqual(got, expected)
        self.assertEqual(world.disks(), reference.disks())
        self.assertEqual(target_stats(world.dispatcher), target_stats(reference.dispatcher))


# -- waiting for the next frame ------------------------------------------------------


class LingerTests(_RingCase):
    """
    ``Lane.linger``: drain, send, wait on an epoll set for the port's descriptor alone,
    drain again; back to Python when anything else needs it.

    The port's descriptor is one end of a ``socketpair`` (the "kicks" that queue
    the TX ring are empty datagrams to the other end); frames come into the
    ``bytearray`` ring from a timer thread, which then makes the descriptor
    readable, as the kernel does.
    """

    def setUp(self) -> None:
        super().setUp()
        self.ours, self.other_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(self.ours.close)
        self.addCleanup(self.other_end.close)
        self.epoll = select.epoll()
        self.addCleanup(self.epoll.close)
        self.epoll.register(self.ours.fileno(), select.EPOLLIN)

    def linger(self, lane: Any, wait_ms: int, table: Any = None) -> tuple[Any, float]:
        """Linger from where the rings are; return what ``linger`` returns and the seconds."""
        started = time.monotonic()
        result = lane.linger(self.table if table is None else table, self.rings.rx_next,
                             self.rings.tx_next, 64, 0, 8, self.ours.fileno(),
                             self.epoll.fileno(), wait_ms)  # fmt: skip
        self.rings.rx_next, self.rings.tx_next = result[1], result[2]
        return result, time.monotonic() - started

    def arrive(self, after: float, index: int, frame: bytes) -> None:
        """In ``after`` seconds, put ``frame`` in RX slot ``index`` and signal it."""

        def deliver() -> None:
            put(self.rings, index, frame)
            self.other_end.send(b"frame")

        timer = threading.Timer(after, deliver)
        timer.start()
        self.addCleanup(timer.join)

    def kicks(self) -> int:
        """Return how many sends the lane made (the empty datagrams waiting at the other end)."""
        self.other_end.setblocking(False)
        count = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                self.other_end.recv(16)
                count += 1
        return count

    def test_frames_arriving_while_it_waits(self) -> None:
        """
        A frame already there and one that comes 0.3 s later are both answered in one call,
        each sent at once; a wake-up that finds no frame ends it, well before ``wait_ms``.

        (The "frame" datagram is never read, so the descriptor stays readable after the
        second frame: that is the wake-up with no frame.  A packet socket's readiness
        goes with its ring instead.)
        """
        frames = [ethernet_frame(ata_request(lba=n, tag=n)) for n in range(2)]
        put(self.rings, 0, frames[0])
        self.arrive(0.3, 1, frames[1])
        result, seconds = self.linger(self.lane(), 5000)
        self.assertEqual(result, (self.native.STOP_EMPTY, 2, 2, 2, 0, 2, 0, 1))
        self.assertGreaterEqual(seconds, 0.25)
        self.assertLess(seconds, 2.5)
        self.assertEqual(self.kicks(), 2)
        for index, frame in enumerate(frames):
            reply = self.expected(frame)
            self.assertEqual(tx_slot(self.rings, index), (TP_STATUS_SEND_REQUEST, len(reply),
                                                           reply))  # fmt: skip

    def test_wait_bounded(self) -> None:
        """With nothing coming, it returns after ``wait_ms`` (the reactor's next call)."""
        put(self.rings, 0, ethernet_frame(ata_request()))
        result, seconds = self.linger(self.lane(), 60)
        self.assertEqual(result, (self.native.STOP_EMPTY, 1, 1, 1, 0, 1, 0, 0))
        self.assertGreaterEqual(seconds, 0.055)
        self.assertLess(seconds, 2.5)
        result, seconds = self.linger(self.lane(), 0)
        self.assertEqual(result, (self.native.STOP_EMPTY, 1, 1, 0, 0, 0, 0, 0))
        self.assertLess(seconds, 0.05)

    def test_anything_else_ready(self) -> None:
        """
        Another descriptor ready, or the port's descriptor ready for more than reading
        (writable, an error), ends the wait at once: it is the reactor's to handle.
        """
        put(self.rings, 0, ethernet_frame(ata_request()))
        other, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(other.close)
        self.addCleanup(peer.close)
        self.epoll.register(other.fileno(), select.EPOLLIN)
        peer.send(b"for the reactor")
        result, seconds = self.linger(self.lane(), 5000)
        self.assertEqual(result, (self.native.STOP_EMPTY, 1, 1, 1, 0, 1, 0, 0))
        self.assertLess(seconds, 2.5)
        self.epoll.unregister(other.fileno())
        self.epoll.modify(self.ours.fileno(), select.EPOLLIN | select.EPOLLOUT)
        self.arrive(0.0, 1, ethernet_frame(ata_request(tag=7)))
        result, seconds = self.linger(self.lane(), 5000)
        self.assertEqual(result[0], self.native.STOP_EMPTY)
        self.assertEqual(result[7], 0)
        self.assertLess(seconds, 2.5)

    def test_python_frame_ends_it(self) -> None:
        """A frame for Python arriving while it waits: ``STOP_PYTHON`` at that slot."""
        self.arrive(0.3, 0, ethernet_frame(ata_request(0xEC)))
        result, seconds = self.linger(self.lane(), 5000)
        self.assertEqual(result, (self.native.STOP_PYTHON, 0, 0, 0, 0, 0, 0, 1))
        self.assertLess(seconds, 2.5)

    def test_held_reply_ends_it(self) -> None:
        """A write held for group commit ends it: Python must sync and release it."""
        with lane_module(self.native):
            table = build_table(self.world.dispatcher.fast_index.values(), hold_writes=True)
        put(self.rings, 0, ethernet_frame(ata_request(0x34, data=sectors(1, 5))))
        lane = self.lane()
        result, seconds = self.linger(lane, 5000, table)
        self.assertEqual(result, (self.native.STOP_EMPTY, 1, 1, 1, 0, 1, 0, 0))
        self.assertEqual(lane.holding, 1)
        self.assertLess(seconds, 2.5)
        self.assertEqual(lane.release(set()), (1, 0))

    def test_failed_send_left_to_the_port(self) -> None:
        """
        A send that fails (here: not a socket) returns ``STOP_FLUSH`` with the replies still
        queued, for the port's flush and its handling of send errors.
        """
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        self.addCleanup(os.close, write_end)
        put(self.rings, 0, ethernet_frame(ata_request()))
        result = self.lane().linger(self.table, 0, 0, 64, 0, 8, write_end, self.epoll.fileno(),
                                    5000)  # fmt: skip
        self.assertEqual(result, (self.native.STOP_FLUSH, 1, 1, 1, 0, 1, 1, 0))

    def test_linger_refuses(self) -> None:
        """``linger`` wants nine arguments, descriptors that can be and a sane wait."""
        lane = self.lane()
        fd, epfd = self.ours.fileno(), self.epoll.fileno()
        self.assertRaises(TypeError, lane.linger, self.table, 0, 0, 1, 0, 1, fd, epfd)
        self.assertRaises(TypeError, lane.linger, None, 0, 0, 1, 0, 1, fd, epfd, 0)
        self.assertRaises(ValueError, lane.linger, self.table, 0, 0, 1, 0, 1, -1, epfd, 0)
        self.assertRaises(ValueError, lane.linger, self.table, 0, 0, 1, 0, 1, fd, 2**40, 0)
        self.assertRaises(ValueError, lane.linger, self.table, 0, 0, 1, 0, 1, fd, epfd, 10**6)
        self.assertRaises(IndexError, lane.linger, self.table, 9, 0, 1, 0, 1, fd, epfd, 0)


# -- the disk failing -----------------------------------------------------------


class BackendFailureTests(_NativeCase):
    """A disk that fails: the lane answers and counts as the Python lane does."""

    def compare(self, make: Callable[[], Any], frame: bytes) -> tuple[bytes, Any]:
        """
        Answer ``frame`` by the lane and by ``fast_reply_into``, each on a disk ``make`` gives.

        Check the replies and what the targets counted are the same; return the
        reply and the lane's target's stats.
        """
        replies = []
        stats = []
        for module in (self.native, None):
            with lane_module(module):
                target = Target(1, 0, make(), max_sectors=2)
                table = build_table([target])
            self.addCleanup(target.backend.close)
            buffer = bytearray([STALE]) * 2000
            if module is None:
                length = fast_reply_into(frame, memoryview(buffer), TARGET_MAC,
                                         {(1, 0): target})  # fmt: skip
            else:
                self.assertIsNotNone(table)
                length = one_frame_lane(module).answer(table, frame, buffer)
            self.assertEqual(length, MIN_FRAME_SIZE)
            replies.append(bytes(buffer))
            target.stats.absorb()
            stats.append(target.stats)
        self.assertEqual(replies[0], replies[1])
        lane, python = stats
        for name in ("read", "write", "read_bytes", "write_bytes", "ata_errors", "retransmits",
                     "backend_errors"):  # fmt: skip
            self.assertEqual(getattr(lane, name), getattr(python, name), name)
        self.assertEqual(sum(lane.buckets), sum(python.buckets))
        return replies[0][:MIN_FRAME_SIZE], lane

    def image(self, sectors: int = SECTORS) -> str:
        """Return the path of a new image file of ``sectors`` sectors holding ``CONTENTS``."""
        path = tempfile.mktemp(dir=self.directory)
        with open(path, "wb") as f:
            f.write(CONTENTS[: sectors * SECTOR_SIZE])
        return path

    def assertFailed(self, reply: bytes, error: int, count: int) -> None:
        """Check ``reply`` is ``ERR|DRDY`` with ``error``, echoing ``count``, padded with zeros."""
        self.assertEqual(reply[25:28], bytes([error, count, 0x41]))
        self.assertEqual(reply[36:], bytes(MIN_FRAME_SIZE - 36))

    def test_write_refused(self) -> None:
        """
        A descriptor open read-only behind a disk said to be writable: the write fails with
        ``EBADF``, answered ``ABRT``, counted once as an ATA error and a backend error.
        """

        def make() -> FileBackend:
            path = self.image()
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            return FileBackend(path=path, size=SECTORS * SECTOR_SIZE, read_only=False, fd=fd)

        frame = ethernet_frame(ata_request(0x34, count=2, lba=5, data=sectors(2)))
        reply, stats = self.compare(make, frame)
        self.assertFailed(reply, int(ATAError.ABRT), 2)
        self.assertEqual((stats.write, stats.write_bytes, stats.ata_errors), (1, 0, 1))
        self.assertEqual(stats.backend_errors, {"EBADF": 1})
        self.assertEqual(stats.failures, {"EBADF": "write: Bad file descriptor"})

    def test_read_past_the_end(self) -> None:
        """
        A file shrunk behind the disk's back: a read past its new end fails with ``EIO``,
        answered ``UNC``, counted once as an ATA error and a backend error.
        """
        paths = []

        def make() -> FileBackend:
            backend = FileBackend.open(self.image())
            os.truncate(backend.path, 2 * SECTOR_SIZE)
            paths.append(backend.path)
            return backend

        for lba, count in ((10, 1), (1, 2)):
            frame = ethernet_frame(ata_request(0x24, count=count, lba=lba))
            reply, stats = self.compare(make, frame)
            self.assertFailed(reply, int(ATAError.UNC), count)
            self.assertEqual((stats.read, stats.read_bytes, stats.ata_errors), (1, 0, 1))
            self.assertEqual(stats.backend_errors, {"EIO": 1})

    def test_no_space(self) -> None:
        """
        A sparse image on a full filesystem (a 64 KiB ``tmpfs``): a write to a hole fails
        with ``ENOSPC``, answered ``ABRT`` and counted, as in Python.
        """
        mount = small_tmpfs(self, self.directory, "64k")

        def make() -> FileBackend:
            path = tempfile.mktemp(dir=mount)
            with open(path, "wb") as f:
                f.truncate(1024 * SECTOR_SIZE)
            return FileBackend.open(path)

        # Both disks exist before the filesystem is filled.
        backends = [make(), make()]
        made = iter(backends)
        fill_filesystem(mount)
        frame = ethernet_frame(ata_request(0x34, lba=700, data=sectors(1)))
        reply, stats = self.compare(lambda: next(made), frame)
        self.assertFailed(reply, int(ATAError.ABRT), 1)
        self.assertEqual(stats.backend_errors, {"ENOSPC": 1})
        self.assertEqual(stats.ata_errors, 1)


# -- the constructors -------------------------------------------------------------


class ConstructorTests(_NativeCase):
    """``Table`` and ``Lane`` refuse what they cannot use with an exception, never a crash."""

    def entry(self, **changes: Any) -> tuple[Any, ...]:
        """Return a valid memory disk entry, with ``changes`` by field name."""
        target = Target(1, 0, MemoryBackend(SECTORS * SECTOR_SIZE))
        fields = {
            "shelf": 1, "slot": 0, "max_sectors": 2, "sectors": SECTORS, "fd": -1,
            "buffer": bytearray(SECTORS * SECTOR_SIZE), "base": 0, "direct": False,
            "alignment": 512, "writes": True, "target": target, "backend": target.backend,
            "tally": self.native.Tally(),
        }  # fmt: skip
        fields.update(changes)
        return tuple(fields.values())

    def test_valid(self) -> None:
        """The entries the refusals below change are accepted as they are."""
        table = self.native.Table([self.entry(), self.entry(slot=1), self.entry(shelf=0xFFFE,
                                   slot=0xFE, base=512, sectors=SECTORS - 1)])  # fmt: skip
        self.assertEqual(len(table), 3)
        self.assertEqual(len(self.native.Table([])), 0)

    def test_table_refuses(self) -> None:
        """Bad entries, a disk overrunning its buffer, two entries at one address."""
        native = self.native
        small = bytearray(SECTORS * SECTOR_SIZE - 1)
        cases: list[tuple[type[Exception] | tuple[type[Exception], ...], Any]] = [
            (TypeError, 5),
            (TypeError, [()]),
            (TypeError, [self.entry()[:-1]]),
            (TypeError, [self.entry(tally=object())]),
            (TypeError, [self.entry(shelf="1")]),
            (TypeError, [self.entry(fd=-1, buffer=None)]),
            ((TypeError, BufferError), [self.entry(buffer=bytes(SECTORS * SECTOR_SIZE))]),
            (ValueError, [self.entry(shelf=0xFFFF)]),
            (ValueError, [self.entry(slot=0xFF)]),
            (ValueError, [self.entry(shelf=-1)]),
            (ValueError, [self.entry(max_sectors=0)]),
            (ValueError, [self.entry(max_sectors=256)]),
            (ValueError, [self.entry(writes=3)]),
            (ValueError, [self.entry(writes=-1)]),
            (TypeError, [self.entry(writes="held")]),
            (ValueError, [self.entry(alignment=0)]),
            (ValueError, [self.entry(alignment=768)]),
            (ValueError, [self.entry(alignment=2 << 20)]),
            (ValueError, [self.entry(buffer=small)]),
            (ValueError, [self.entry(base=1)]),
            (ValueError, [self.entry(base=len(small) + 2)]),
            (ValueError, [self.entry(base=-1)]),
            (ValueError, [self.entry(sectors=-1)]),
            (ValueError, [self.entry(), self.entry()]),
            (ValueError, [self.entry(slot=1), self.entry(), self.entry(slot=1)]),
        ]
        for expected, entries in cases:
            self.assertRaises(expected, native.Table, entries)
        self.assertRaises(TypeError, native.Table)
        self.assertRaises(TypeError, native.Table, [], [])

    def test_table_refuses_wrapped_numbers(self) -> None:
        """
        A shelf, slot or count beyond 32 bits is refused, not taken modulo 2**32.
        """
        for changes in ({"shelf": 2**32 + 1}, {"slot": 2**32}, {"max_sectors": 2**32 + 2},
                        {"alignment": 2**32 + 512}):  # fmt: skip
            self.assertRaises((ValueError, OverflowError), self.native.Table,
                              [self.entry(**changes)])  # fmt: skip


    def test_table_refuses_entries_not_tuples(self) -> None:
        """
        An entry that is not a tuple is refused with ``TypeError`` (not ``SystemError``).
        """
        for entry in (5, list(self.entry()), None):
            self.assertRaises(TypeError, self.native.Table, [entry])


    def test_lane_refuses_wrapping_offset(self) -> None:
        """
        A slot offset so large that offset + slot size wraps past 2**64 is refused:
        ``drain`` would read and write outside the ring.
        """
        ring = bytearray(8192)
        self.assertRaises(ValueError, self.native.Lane, ring, [2**64 - 4], 2048, [4096], 2048,
                          TARGET_MAC, 1514, False)  # fmt: skip


    def test_lane_refuses(self) -> None:
        """Bad MACs, slots too small, a ring not writable or aligned, slots outside it."""
        native = self.native
        ring = bytearray(8192)

        def lane(**changes: Any) -> Any:
            fields = {"ring": ring, "rx": [0, 2048], "rx_slot": 2048, "tx": [4096, 6144],
                      "tx_slot": 2048, "mac": TARGET_MAC, "max_frame": 1514,
                      "accept_other": False}  # fmt: skip
            fields.update(changes)
            return native.Lane(*fields.values())

        self.assertIsNotNone(lane())
        cases: list[tuple[type[Exception] | tuple[type[Exception], ...], dict[str, Any]]] = [
            (ValueError, {"mac": TARGET_MAC[:5]}),
            (TypeError, {"mac": "02aa00000001"}),
            (ValueError, {"rx_slot": 63}),
            (ValueError, {"tx_slot": TX_DATA_AT + MIN_FRAME_SIZE - 1}),
            ((TypeError, BufferError), {"ring": bytes(8192)}),
            (TypeError, {"ring": None}),
            (ValueError, {"ring": memoryview(ring)[1:]}),
            (ValueError, {"rx": []}),
            (ValueError, {"tx": []}),
            (ValueError, {"rx": [2]}),
            (ValueError, {"rx": [6148]}),
            (ValueError, {"tx": [0, 6148]}),
            (ValueError, {"tx": [8192]}),
            ((ValueError, OverflowError), {"rx": [-4]}),
            ((ValueError, OverflowError), {"rx": [2**64]}),
            (TypeError, {"rx": 0}),
            (TypeError, {"rx": ["0"]}),
            (TypeError, {"tx": [None]}),
        ]
        for expected, changes in cases:
            self.assertRaises(expected, lane, **changes)
        self.assertRaises(TypeError, native.Lane)


# -- the disks the lane serves ------------------------------------------------------


class LaneBackendTests(_NativeCase):
    """``ILaneBackend``: what each disk says of its bytes is where the lane finds them."""

    def check(self, backend: Any) -> None:
        """
        ``backend`` provides ``ILaneBackend``; a slice of it too; and through each, the lane
        reads what ``read`` reads and writes what ``read`` then reads back.
        """
        self.addCleanup(backend.close)
        verifyObject(ILaneBackend, backend)
        sliced = SliceBackend(backend, SLICE_AT * SECTOR_SIZE, 16 * SECTOR_SIZE)
        verifyObject(ILaneBackend, sliced)
        for slot, disk in enumerate((backend, sliced)):
            with lane_module(self.native):
                target = Target(1, slot, disk, max_sectors=4)
                table = build_table([target])
            lane = one_frame_lane(self.native)
            data = random.Random(slot).randbytes(3 * SECTOR_SIZE)
            frame = ethernet_frame(ata_request(0x34, count=3, lba=7, data=data, slot=slot))
            self.assertEqual(lane.answer(table, frame, bytearray(100)), MIN_FRAME_SIZE)
            self.assertEqual(disk.read(7 * SECTOR_SIZE, 3 * SECTOR_SIZE), data)
            buffer = bytearray(36 + 4 * SECTOR_SIZE)
            frame = ethernet_frame(ata_request(0x24, count=4, lba=6, slot=slot))
            self.assertEqual(lane.answer(table, frame, buffer), len(buffer))
            self.assertEqual(bytes(buffer[36:]), disk.read(6 * SECTOR_SIZE, 4 * SECTOR_SIZE))
            self.assertEqual(buffer[27], int(ATACmdStatus.READY_STATUS))
        self.assertEqual(
            backend.read((SLICE_AT + 7) * SECTOR_SIZE, 3 * SECTOR_SIZE),
            random.Random(1).randbytes(3 * SECTOR_SIZE),
        )

    def image(self) -> str:
        """Return the path of a new 64-sector image holding ``CONTENTS``."""
        path = tempfile.mktemp(dir=self.directory)
        with open(path, "wb") as f:
            f.write(CONTENTS[: SECTORS * SECTOR_SIZE])
        return path

    def test_memory(self) -> None:
        """``memory:``."""
        self.check(MemoryBackend(SECTORS * SECTOR_SIZE))

    def test_shared_memory(self) -> None:
        """``memory:`` shared for ``--workers``."""
        self.check(MemoryBackend(SECTORS * SECTOR_SIZE).share())

    def test_file(self) -> None:
        """``file:``."""
        self.check(FileBackend.open(self.image()))

    def test_file_direct(self) -> None:
        """``file:`` with ``--direct``."""
        problem = direct_problem(self.directory)
        if problem is not None:
            raise SkipTest(f"no O_DIRECT in {self.directory}: {problem}")
        self.check(FileBackend.open(self.image(), direct=True))

    def test_block(self) -> None:
        """``block:``, on a loop device."""
        if shutil.which("losetup") is None:
            raise SkipTest("needs losetup (util-linux)")
        try:
            device = subprocess.run(["losetup", "--find", "--show", self.image()], check=True,
                                    capture_output=True, text=True).stdout.strip()  # fmt: skip
        except (OSError, subprocess.CalledProcessError) as e:
            raise SkipTest(f"cannot attach a loop device: {e}") from None
        self.addCleanup(subprocess.run, ["losetup", "--detach", device], check=False)
        self.check(BlockDeviceBackend.open(device))

    def test_not_served(self) -> None:
        """A disk without ``ILaneBackend`` is not in the table: ``build_table`` gives ``None``."""
        with lane_module(self.native):
            target = Target(1, 0, FailingBackend())
            self.assertFalse(lane_served(target))
            self.assertIsNone(build_table([target]))
        with lane_module(None):
            target = Target(1, 0, MemoryBackend(SECTORS * SECTOR_SIZE))
            self.assertFalse(lane_served(target))
        self.assertIsNone(build_table([target]))

    def test_backend_replaced(self) -> None:
        """A target whose disk was replaced in place is left to Python by a table made before."""
        with lane_module(self.native):
            target = Target(1, 0, MemoryBackend(SECTORS * SECTOR_SIZE))
            table = build_table([target])
        lane = one_frame_lane(self.native)
        frame = ethernet_frame(ata_request())
        self.assertTrue(lane.answer(table, frame, bytearray(2000)))
        target.backend = MemoryBackend(SECTORS * SECTOR_SIZE)
        self.assertEqual(lane.answer(table, frame, bytearray(2000)), 0)

    def test_acl_not_a_tuple(self) -> None:
        """A mask list that is not a tuple of bytes is left to Python, which reads any."""
        with lane_module(self.native):
            target = Target(1, 0, MemoryBackend(SECTORS * SECTOR_SIZE))
            table = build_table([target])
        lane = one_frame_lane(self.native)
        frame = ethernet_frame(ata_request())
        # Past the store's converter, as a store of another kind might hold it.
        object.__setattr__(target.acl, "mask_list", [INITIATOR_MAC])
        self.assertEqual(lane.answer(table, frame, bytearray(2000)), 0)
        object.__setattr__(target.acl, "mask_list", (INITIATOR_MAC,))
        self.assertTrue(lane.answer(table, frame, bytearray(2000)))
        object.__setattr__(target.acl, "mask_list", (OTHER_MAC,))
        self.assertEqual(lane.answer(table, frame, bytearray(2000)), 0)
