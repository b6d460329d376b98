"""
Tests for the initiator's per-request path (``aoe_twisted.initiator.client``).

A ``RemoteDisk``'s requests share one retransmission timer per timeout
(``_Deadlines``) instead of a ``DelayedCall`` each, are encoded without
building message objects, and their replies are read from the frame's fixed
fields.  These tests pin what that must not change: each request is still
retransmitted at its own deadline, a late reply is still stale, the frames
on the wire are the ones the message classes encode, and unusual replies
still get the full decoding.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from aoe_twisted.core.wire import (
    ETHERTYPE,
    VERSION,
    ATAArg,
    ATACmdStatus,
    Command,
    EthernetFrame,
    Header,
)
from aoe_twisted.initiator.client import (
    AoEClient,
    AoEProtocolError,
    AoETimeout,
    ATAError,
    BadReply,
    RemoteDisk,
    RetryPolicy,
)
from tests.test_client import FakeHost, FakeNetwork, mac, make_target, pattern, run

_POLICY = RetryPolicy(0.5, 4.0, 4)


class HotPathCase(SynchronousTestCase):
    """One target on a fake network, its disk open; requests can be held back."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.net = FakeNetwork(self.clock)
        self.target = make_target(1, 0, buffer_count=64)
        self.host: FakeHost = self.net.add_host(1, self.target)
        self.client = AoEClient(self.net.connect(_POLICY), interface="fake0")
        self.disk: RemoteDisk = self.successResultOf(run(self.clock, self.client.open(1, 0)))
        self.protocol = self.client.protocol

    def sends(self) -> list[tuple[float, int]]:
        """Record (time, LBA) of every ATA request sent from now on; return the list."""
        sent: list[tuple[float, int]] = []
        original = self.net.write

        def record(frame: bytes) -> None:
            header = Header.from_bytes(EthernetFrame.from_bytes(frame).payload)
            if isinstance(header.arg, ATAArg):
                sent.append((round(self.clock.seconds(), 6), header.arg.lba))
            original(frame)

        self.net.write = record  # type: ignore[method-assign]
        return sent

    def assertNoTimersLeft(self) -> None:
        """Nothing is scheduled any more: no request left behind."""
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def rewrite_replies(self, change: Callable[[bytearray], bytes]) -> None:
        """Pass every ATA reply frame through ``change`` before the client gets it."""
        original = self.net.deliver

        def deliver(frame: bytes) -> None:
            original(change(bytearray(frame)))

        self.net.deliver = deliver  # type: ignore[method-assign]


class DeadlineTests(HotPathCase):
    """Requests share a timer per timeout, but each one times out at its own deadline."""

    def test_each_request_at_its_own_deadline(self) -> None:
        """
        Three reads sent 0.1 s apart, all lost the first time: each is sent
        again 0.5 s after its own first copy, not when the first one's timer fires.
        """
        self.host.silent = True
        sent = self.sends()
        start = self.clock.seconds()
        reads = []
        for i in range(3):
            reads.append(self.disk.read(10 * i, 1))
            self.clock.advance(0.1)
        self.host.silent = False
        for d in reads:
            run(self.clock, d)
            self.successResultOf(d)
        times = [(round(t - start, 6), lba) for t, lba in sent]
        self.assertEqual(times, [(0.0, 0), (0.1, 10), (0.2, 20), (0.5, 0), (0.6, 10), (0.7, 20)])
        self.assertEqual(self.protocol.retransmits, 3)
        self.assertNoTimersLeft()

    def test_answered_oldest_leaves_others_on_time(self) -> None:
        """
        The oldest request is answered: the one sent after it still times
        out 0.5 s after it was sent (the shared timer is set again for it).
        """
        sent = self.sends()
        start = self.clock.seconds()
        lost = [20]

        def lose_once(header: Header) -> bool:
            if isinstance(header.arg, ATAArg) and header.arg.lba in lost:
                lost.remove(header.arg.lba)
                return True
            return False

        self.net.drop_request = lose_once
        slow = [0.3]
        self.net.reply_delay = lambda header: slow.pop() if slow else None
        first = self.disk.read(0, 1)
        self.clock.advance(0.001)  # the host answers; its reply takes 0.3 s more
        self.clock.advance(0.199)
        second = self.disk.read(20, 1)
        run(self.clock, first)
        self.successResultOf(first)
        self.assertEqual(round(self.clock.seconds() - start, 6), 0.301)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        run(self.clock, second)
        self.successResultOf(second)
        times = [(round(t - start, 6), lba) for t, lba in sent]
        self.assertEqual(times, [(0.0, 0), (0.2, 20), (0.7, 20)])
        self.assertNoTimersLeft()

    def test_backoff_alongside_new_requests(self) -> None:
        """
        A request on its second timeout (1 s) and new requests on their first
        (0.5 s) each keep their own back-off: 0.5, then 1, then 2 s after each copy.
        """
        sent = self.sends()
        start = self.clock.seconds()
        drops = {0: 3, 10: 1}

        def lose(header: Header) -> bool:
            lba = header.arg.lba if isinstance(header.arg, ATAArg) else -1
            if drops.get(lba, 0) > 0:
                drops[lba] -= 1
                return True
            return False

        self.net.drop_request = lose
        old = self.disk.read(0, 1)
        self.clock.advance(0.5)  # the old one goes again and waits 1 s now
        self.clock.advance(0.1)
        new = self.disk.read(10, 1)
        for d in (old, new):
            run(self.clock, d)
            self.successResultOf(d)
        times = sorted((round(t - start, 6), lba) for t, lba in sent)
        self.assertEqual(times, [(0.0, 0), (0.5, 0), (0.6, 10), (1.1, 10), (1.5, 0), (3.5, 0)])
        self.assertEqual(self.protocol.retransmits, 4)
        self.assertNoTimersLeft()

    def test_one_timer_for_a_window(self) -> None:
        """A full window of unanswered requests is timed by one timer, not one each."""
        self.host.silent = True
        d = self.disk.read(0, 2 * 32)
        self.assertEqual(self.disk.in_flight, 32)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        d.cancel()
        self.failureResultOf(d)
        self.assertNoTimersLeft()

    def test_times_out_after_every_retry(self) -> None:
        """A silent target still fails a read after 0.5+1+2+4+4 s with five copies sent."""
        self.host.silent = True
        sent = self.sends()
        start = self.clock.seconds()
        failure = self.failureResultOf(run(self.clock, self.disk.read(0, 1)), AoETimeout)
        self.assertAlmostEqual(self.clock.seconds() - start, 11.5)
        self.assertEqual([round(t - start, 6) for t, _ in sent], [0.0, 0.5, 1.5, 3.5, 7.5])
        self.assertEqual(failure.value.attempts, 5)
        self.assertNoTimersLeft()


class LateReplyTests(HotPathCase):
    """A reply to a tag that is no longer outstanding is stale, whatever it carries."""

    def test_late_reply_after_completion_ignored(self) -> None:
        """
        The first copy's reply comes after the retransmission's completed the
        read: it is counted stale and changes nothing (the read fired once).
        """
        frames: list[bytes] = []
        original = self.net.deliver

        def hold_first(frame: bytes) -> None:
            if not frames:
                frames.append(frame)  # the first reply is late: kept back
                return
            original(frame)

        self.net.deliver = hold_first  # type: ignore[method-assign]
        data = pattern(512)
        self.target.backend.write(0, data)
        results: list[bytes] = []
        d = self.disk.read(0, 1)
        d.addCallback(lambda value: results.append(value) or value)
        run(self.clock, d)
        self.assertEqual(self.successResultOf(d), data)
        self.assertEqual(self.protocol.retransmits, 1)
        self.assertEqual(self.disk.in_flight, 0)
        original(frames[0])
        self.assertEqual(self.protocol.stale_replies, 1)
        self.assertEqual(results, [data])
        self.assertEqual(self.disk.in_flight, 0)
        self.assertEqual(self.disk.paths.in_flight, 0)
        self.assertNoTimersLeft()


class EncodingTests(HotPathCase):
    """The request frames are byte for byte what the message classes encode."""

    def expected(self, frame: bytes, arg: ATAArg) -> bytes:
        """The frame ``Header``/``ATAArg``/``EthernetFrame`` encode, with ``frame``'s tag."""
        tag = Header.from_bytes(EthernetFrame.from_bytes(frame).payload).tag
        header = Header(VERSION, False, False, 0, 1, 0, Command.ISSUE_ATA_COMMAND, tag, arg)
        return EthernetFrame(mac(1), self.net.mac, ETHERTYPE, header.to_bytes()).to_bytes(
            pad=True
        )

    def test_read_and_write_frames(self) -> None:
        """READ and WRITE SECTORS EXT (LBA48): frames as the message classes make them."""
        before = len(self.net.frames)
        self.successResultOf(run(self.clock, self.disk.read(5, 2)))
        data = pattern(1024, seed=3)
        self.successResultOf(run(self.clock, self.disk.write(7, data)))
        read, write = self.net.frames[before:]
        self.assertEqual(read, self.expected(read, ATAArg(
            flag_lba48_extended=True, sector_count=2, cmd_status=ATACmdStatus.READ_48BIT, lba=5,
        )))
        self.assertEqual(len(read), 60)
        self.assertEqual(write, self.expected(write, ATAArg(
            flag_lba48_extended=True, flag_write=True, sector_count=2,
            cmd_status=ATACmdStatus.WRITE_48BIT, lba=7, data=data,
        )))

    def test_lba28_frames(self) -> None:
        """With ``use_lba28``, READ/WRITE SECTORS carry the device register in LBA byte 3."""
        disk = RemoteDisk(self.protocol, self.disk.info, use_lba28=True)
        before = len(self.net.frames)
        self.successResultOf(run(self.clock, disk.read(9, 1)))
        self.successResultOf(run(self.clock, disk.write(9, bytes(512))))
        read, write = self.net.frames[before:]
        self.assertEqual(read, self.expected(read, ATAArg(
            sector_count=1, cmd_status=ATACmdStatus.READ_28BIT, lba=9 | 0xE0 << 24,
        )))
        self.assertEqual(write, self.expected(write, ATAArg(
            flag_write=True, sector_count=1, cmd_status=ATACmdStatus.WRITE_28BIT,
            lba=9 | 0xE0 << 24, data=bytes(512),
        )))


class UnusualReplyTests(HotPathCase):
    """Replies the fixed-field reading does not take are decoded in full, as before."""

    def test_aoe_error(self) -> None:
        """A reply with the error flag fails the read with ``AoEProtocolError``."""
        def error(frame: bytearray) -> bytes:
            frame[14] |= 0x04
            frame[15] = 2
            return bytes(frame)

        self.rewrite_replies(error)
        failure = self.failureResultOf(run(self.clock, self.disk.read(0, 1)), AoEProtocolError)
        self.assertEqual(failure.value.code, 2)
        self.assertNoTimersLeft()

    def test_ata_error(self) -> None:
        """A read past the end of the disk fails with ATA error IDNF."""
        end = self.disk.sectors
        assert end is not None
        failure = self.failureResultOf(run(self.clock, self.disk.read(end, 1)), ATAError)
        self.assertEqual(failure.value.names, ("IDNF",))
        self.assertEqual(self.disk.in_flight, 0)

    def test_short_reply(self) -> None:
        """A read reply that carries fewer bytes than asked fails with ``BadReply``."""
        self.rewrite_replies(lambda frame: bytes(frame[: 36 + 100]))
        failure = self.failureResultOf(run(self.clock, self.disk.read(0, 2)), BadReply)
        self.assertIn("carried 100 bytes, expected 1024", str(failure.value))

    def test_reserved_bytes_set(self) -> None:
        """
        A reply whose ATA reserved bytes are not zero does not decode: it is
        ignored, and the request is sent again.
        """
        bad = [True]

        def reserved(frame: bytearray) -> bytes:
            if bad:
                bad.pop()
                frame[34] = 1
            return bytes(frame)

        self.rewrite_replies(reserved)
        data = pattern(512, seed=5)
        self.target.backend.write(0, data)
        ignored = self.protocol.ignored
        self.assertEqual(self.successResultOf(run(self.clock, self.disk.read(0, 1))), data)
        self.assertEqual(self.protocol.ignored, ignored + 1)
        self.assertEqual(self.protocol.retransmits, 1)


class GarbageTests(HotPathCase):
    """An answered operation is freed by reference counting, not left to the cyclic collector."""

    def test_no_cycles_left(self) -> None:
        """Reads and writes leave no operation or chunk in a reference cycle."""
        gc.collect()
        self.addCleanup(gc.set_debug, gc.get_debug())
        gc.set_debug(gc.DEBUG_SAVEALL)
        self.addCleanup(gc.garbage.clear)
        for lba in range(0, 40, 4):
            self.successResultOf(run(self.clock, self.disk.read(lba, 4)))
            self.successResultOf(run(self.clock, self.disk.write(lba, bytes(2048))))
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage
                if type(o).__name__ in ("_Operation", "_Chunk", "_Request")]
        self.assertEqual(left, [])

    def test_no_cycles_left_by_failures(self) -> None:
        """A failed operation (an ATA error on one of its frames) leaves no cycle either."""
        gc.collect()
        self.addCleanup(gc.set_debug, gc.get_debug())
        gc.set_debug(gc.DEBUG_SAVEALL)
        self.addCleanup(gc.garbage.clear)
        self.rewrite_replies(lambda frame: bytes(frame[:27]) + b"\x41" + bytes(frame[28:]))
        for lba in range(0, 40, 4):
            self.failureResultOf(run(self.clock, self.disk.read(lba, 4)), ATAError)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage
                if type(o).__name__ in ("_Operation", "_Chunk", "_Request")]
        self.assertEqual(left, [])
