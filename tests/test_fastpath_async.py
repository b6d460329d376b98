"""
Tests for ``fastpath.fast_pending``: plain reads and writes to an asynchronous disk.

The reference is again ``Dispatcher(..., fast_path=False)``, whose general
path decodes the frame, plans the operation (``Pending``) and builds the
reply from the decoded request when the disk completes it.  With the fast
path, a plain read or write to an ``IAsyncBlockBackend`` is accepted from
the frame's bytes (``FastPending``) and its reply built by ``finish``.  For
any frames, completed in any order, successfully or not, both must give the
same reply bytes, counters, target statistics and disk contents.
"""

from __future__ import annotations

import errno
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.core.acl import MemoryACLStore
from aoe_twisted.core.decision import Decision
from aoe_twisted.core.dispatch import Dispatcher
from aoe_twisted.core.fastpath import FastPending
from aoe_twisted.core.operations import submit
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import SECTOR_SIZE, ATACmdStatus
from aoe_twisted.interfaces import IAsyncBlockBackend
from aoe_twisted.testing import TARGET_MAC, ata_request, ethernet_frame
from tests.test_fastpath import (
    BAD_SECTOR,
    SECTORS,
    FailingBackend,
    Setup,
    fates,
    frames,
    setups,
)


@implementer(IAsyncBlockBackend)
class LaterDisk:
    """
    An asynchronous memory disk whose operations complete when the test says.

    Each operation is done on the memory disk when it completes (so two
    writes land in completion order), and fails with ``EIO`` from
    ``BAD_SECTOR`` on when ``failing``.
    """

    def __init__(self, disk: MemoryBackend, failing: bool) -> None:
        self.disk = disk
        self.failing = failing
        self.waiting: list[tuple[defer.Deferred[Any], str, int, Any]] = []

    @property
    def size(self) -> int:
        return self.disk.size

    @property
    def read_only(self) -> bool:
        return self.disk.read_only

    def read(self, offset: int, length: int) -> defer.Deferred[bytes]:
        d: defer.Deferred[bytes] = defer.Deferred()
        self.waiting.append((d, "read", offset, length))
        return d

    def write(self, offset: int, data: bytes) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.waiting.append((d, "write", offset, bytes(data)))
        return d

    def flush(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def close(self) -> None:
        pass

    def complete(self, index: int) -> None:
        """Complete the ``index``-th operation still waiting."""
        d, kind, offset, what = self.waiting.pop(index)
        length = what if kind == "read" else len(what)
        if self.failing and offset + length > BAD_SECTOR * SECTOR_SIZE:
            d.errback(OSError(errno.EIO, "bad sector"))
        elif kind == "read":
            d.callback(self.disk.read(offset, what))
        else:
            self.disk.write(offset, what)
            d.callback(None)


def dispatcher(setup: Setup, fast_path: bool, mixed: bool = False) -> Dispatcher:
    """
    Return a dispatcher for disks at 1.0 and 1.1 configured as ``setup`` says:
    both asynchronous, or (``mixed``) 1.0 a synchronous memory disk.
    """
    targets = []
    for slot in (0, 1):
        memory = MemoryBackend(SECTORS * SECTOR_SIZE, read_only=setup.read_only)
        disk: Any = LaterDisk(memory, setup.failing)
        if mixed and slot == 0:
            disk = FailingBackend(memory) if setup.failing else memory
        acl = MemoryACLStore(mask_list=setup.mask, reserve_list=setup.reserve)
        targets.append(Target(1, slot, disk, acl=acl, max_sectors=setup.max_sectors))
    return Dispatcher(TARGET_MAC, targets, fast_path=fast_path)


class Run:
    """One dispatcher fed frames, its operations started and completed as the test says."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.replies: list[bytes] = []
        #: How many operations the fast path accepted (``FastPending``).
        self.accepted = 0

    def receive(self, frame: bytes, into: bool = False) -> None:
        """Decide about ``frame`` (as a ring slot, with ``into``) and start its operations."""
        dispatcher = self.dispatcher
        if into:
            slot = memoryview(bytearray(b"\xee") * 9014)
            rx = bytearray(frame)
            length = dispatcher.frame_received_into(memoryview(rx), slot)
            # The slot's bytes are reused: nothing may refer to them now.
            decision = dispatcher.general(memoryview(rx)) if not length else None
            rx[:] = b"\xee" * len(rx)
            if decision is None:
                self.replies.append(bytes(slot[:length]))
                return
        else:
            decision = dispatcher.frame_received(frame)
        self.replies.extend(decision.replies)
        for pending in decision.pending:
            self.accepted += isinstance(pending, FastPending)
            if not pending.target.asynchronous:
                self.replies.extend(self.dispatcher.settle(Decision(pending=(pending,))))
                continue
            d = submit(pending.io, pending.target.backend)
            d.addCallbacks(
                lambda result, pending=pending: self.done(pending, result, None),
                lambda failure, pending=pending: self.done(pending, None, failure.value),
            )

    def done(self, pending: Any, result: bytes | None, error: OSError | None) -> None:
        """An operation completed: keep its reply."""
        self.replies.extend(self.dispatcher.complete(pending, result, error, 0.001).replies)

    def waiting(self) -> list[int]:
        """How many operations each disk has waiting (none on a synchronous one)."""
        return [len(getattr(t.backend, "waiting", ())) for t in self.dispatcher.targets]

    def complete(self, slot: int, index: int) -> None:
        """Complete disk ``slot``'s ``index``-th waiting operation."""
        self.dispatcher.targets[slot].backend.complete(index)


class AsyncEquivalenceTests(SynchronousTestCase):
    """The fast path accepts plain requests to asynchronous disks as the general path answers."""

    def check(
        self, setup: Setup, sent: list[bytes], order: list[int], into: bool, mixed: bool = False
    ) -> None:
        fast = Run(dispatcher(setup, fast_path=True, mixed=mixed))
        general = Run(dispatcher(setup, fast_path=False, mixed=mixed))
        choices = iter(order)
        for frame in sent:
            fast.receive(frame, into)
            general.receive(frame)
            self.assertEqual(fast.waiting(), general.waiting())
            # Now and then complete some of what is waiting, in a drawn order.
            while fast.waiting() != [0, 0] and next(choices, 0) % 3 == 0:
                self.complete_one(fast, general, next(choices, 0))
        while fast.waiting() != [0, 0]:
            self.complete_one(fast, general, next(choices, 0))
        self.assertEqual(fast.replies, general.replies)
        self.assertEqual(fates(fast.dispatcher), fates(general.dispatcher))
        self.assertEqual(snapshots(fast.dispatcher), snapshots(general.dispatcher))
        self.assertEqual(disks_of(fast.dispatcher), disks_of(general.dispatcher))
        # Every plain request was the fast path's (none the general path's), and
        # only those: the counter says how many it took.
        self.assertEqual(general.accepted, 0)
        plain = [is_plain(frame, setup) for frame in sent]
        if mixed:
            # Plain requests to 1.0 are answered at once, to 1.1 accepted for later.
            self.assertEqual(fast.dispatcher.counters.fast, sum(plain))
            later = [p for p, frame in zip(plain, sent, strict=True) if frame[18:19] == b"\x01"]
            self.assertEqual(fast.accepted, sum(later))
        else:
            self.assertEqual(fast.dispatcher.counters.fast, fast.accepted)
            self.assertEqual(fast.accepted, sum(plain))

    def complete_one(self, fast: Run, general: Run, choice: int) -> None:
        """Complete the same operation on both: the ``choice``-th of all waiting, modulo."""
        places = [(slot, i) for slot, n in enumerate(fast.waiting()) for i in range(n)]
        slot, index = places[choice % len(places)]
        fast.complete(slot, index)
        general.complete(slot, index)

    @settings(max_examples=200)
    @given(setups(), st.lists(frames, min_size=1, max_size=8), st.lists(st.integers(0, 50)))
    def test_same_replies_counters_and_disks(
        self, setup: Setup, sent: list[bytes], order: list[int]
    ) -> None:
        """Any frames, completed in any order, give the same replies, counters and disks."""
        self.check(setup, sent, order, into=False)

    @settings(max_examples=100)
    @given(setups(), st.lists(frames, min_size=1, max_size=8), st.lists(st.integers(0, 50)))
    def test_from_a_ring_slot(self, setup: Setup, sent: list[bytes], order: list[int]) -> None:
        """
        The same from a ring slot that is overwritten once the frame is decided:
        a write's data is copied before the slot is reused.
        """
        self.check(setup, sent, order, into=True)

    @settings(max_examples=100)
    @given(setups(), st.lists(frames, min_size=1, max_size=8), st.lists(st.integers(0, 50)))
    def test_with_a_synchronous_disk_too(
        self, setup: Setup, sent: list[bytes], order: list[int]
    ) -> None:
        """
        Beside a synchronous disk (answered in place, into the slot) the same holds,
        from a ring slot and from bytes.
        """
        self.check(setup, sent, order, into=True, mixed=True)
        self.check(setup, sent, order, into=False, mixed=True)

    def test_reply_from_the_completing_dispatcher(self) -> None:
        """
        A request accepted before the interface's MAC changed (the server builds a
        new dispatcher) is answered from the new MAC, as the general path answers.
        """
        new_mac = bytes.fromhex("02bb00000001")
        frame = ethernet_frame(ata_request(int(ATACmdStatus.READ_48BIT), count=1, lba=3))
        replies = []
        for fast_path in (True, False):
            old = dispatcher(Setup(), fast_path=fast_path)
            (pending,) = old.frame_received(frame).pending
            new = Dispatcher(new_mac, old.targets, fast_path=fast_path)
            (reply,) = new.complete(pending, bytes(SECTOR_SIZE)).replies
            self.assertEqual(reply[6:12], new_mac)
            replies.append(reply)
        self.assertEqual(replies[0], replies[1])

    def test_plain_requests_take_the_fast_path(self) -> None:
        """Plain reads and writes to an asynchronous disk are accepted as ``FastPending``."""
        run = Run(dispatcher(Setup(max_sectors=2), fast_path=True))
        write = ethernet_frame(
            ata_request(int(ATACmdStatus.WRITE_48BIT), count=2, lba=4, aflags=0x41,
                        data=b"\x5a" * 1024)
        )
        read = ethernet_frame(ata_request(int(ATACmdStatus.READ_48BIT), count=2, lba=4))
        decision = run.dispatcher.frame_received(write)
        (pending,) = decision.pending
        self.assertIsInstance(pending, FastPending)
        self.assertTrue(pending.writes)
        self.assertEqual(run.dispatcher.counters.fast, 1)
        self.assertEqual(run.dispatcher.targets[0].stats.in_flight, 1)
        (pending,) = run.dispatcher.frame_received(read).pending
        self.assertIsInstance(pending, FastPending)
        self.assertFalse(pending.writes)
        self.assertEqual(run.dispatcher.counters.fast, 2)

    def test_written_and_refusal(self) -> None:
        """
        A completed write's decision names its target and, under ``sync``, carries
        the ABRT reply the general path would send if it cannot be made durable.
        """
        frame = ethernet_frame(
            ata_request(int(ATACmdStatus.WRITE_48BIT), count=1, lba=2, aflags=0x41,
                        data=b"\x01" * 512)
        )
        for hold in (False, True):
            fast = dispatcher(Setup(), fast_path=True)
            general = dispatcher(Setup(), fast_path=False)
            fast.hold_writes = general.hold_writes = hold
            (mine,) = fast.frame_received(frame).pending
            (theirs,) = general.frame_received(frame).pending
            ours = fast.complete(mine, None)
            reference = general.complete(theirs, None)
            self.assertIs(ours.written, fast.targets[0])
            self.assertEqual(ours.replies, reference.replies)
            self.assertEqual(ours.refusal, reference.refusal)
            self.assertEqual(bool(ours.refusal), hold)
            self.assertEqual(fast.refusal(mine), general.refusal(theirs))

    def test_targets_changed(self) -> None:
        """``add``, ``replace`` and ``remove`` keep the asynchronous index in step."""
        run = dispatcher(Setup(), fast_path=True)
        self.assertEqual(sorted(run.async_index), [(1, 0), (1, 1)])
        run.replace(Target(1, 0, MemoryBackend(SECTORS * SECTOR_SIZE)))
        self.assertEqual(sorted(run.async_index), [(1, 1)])
        self.assertEqual(sorted(run.fast_index), [(1, 0)])
        run.remove(1, 1)
        self.assertEqual(run.async_index, {})
        later = LaterDisk(MemoryBackend(SECTORS * SECTOR_SIZE), failing=False)
        verifyObject(IAsyncBlockBackend, later)
        run.add(Target(1, 2, later))
        self.assertEqual(sorted(run.async_index), [(1, 2)])
        run.replace(Target(1, 2, MemoryBackend(SECTORS * SECTOR_SIZE)))
        self.assertEqual(run.async_index, {})


def snapshots(dispatcher: Dispatcher) -> list[dict[str, Any]]:
    """
    Every target's figures: an asynchronous disk's service times included (each of
    its operations took 1 ms), a synchronous one's (real, different) but their count.
    """
    figures = []
    for target in dispatcher.targets:
        snapshot = target.stats.snapshot(target.address, "", 0.0)
        if not target.asynchronous:
            del snapshot["service_seconds"]["buckets"], snapshot["service_seconds"]["sum"]
        figures.append(snapshot)
    return figures


def is_plain(frame: bytes, setup: Setup) -> bool:
    """
    Whether ``frame`` is one the fast path answers for synchronous disks set up as
    ``setup`` says (``fast_reply``, tested against the general path in
    ``tests.test_fastpath``): the frames it must accept for asynchronous ones.
    """
    reference = setup.dispatcher(fast_path=True)
    reference.frame_received(frame)
    return reference.counters.fast == 1


def disks_of(dispatcher: Dispatcher) -> list[bytes]:
    """Return every target's memory disk's contents."""
    contents = []
    for target in dispatcher.targets:
        backend: Any = target.backend
        disk = backend if isinstance(backend, MemoryBackend) else backend.disk
        contents.append(disk.read(0, disk.size))
    return contents

