# -*- test-case-name: tests.test_stats -*-
"""Tests for ``aoe_twisted.core.stats``: what a target counts, and how snapshots add up."""

from __future__ import annotations

import errno
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.core.dispatch import Dispatcher
from aoe_twisted.core.stats import (
    RECENT_TAGS,
    SERVICE_BUCKETS,
    TargetStats,
    failure_cause,
    merge_snapshots,
)
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import ATACmdStatus, Error
from aoe_twisted.testing.frames import (
    INITIATOR_MAC,
    OTHER_MAC,
    TARGET_MAC,
    ata_request,
    config_request,
    ethernet_frame,
    mask_request,
    reserve_request,
)


def served(*frames: bytes, src: bytes = INITIATOR_MAC, **target: Any) -> Target:
    """Serve ``frames`` to a 64-sector memory target e1.0; return it."""
    disk = Target(1, 0, MemoryBackend(64 * 512), spec="memory:32K", **target)
    dispatcher = Dispatcher(TARGET_MAC, [disk])
    for frame in frames:
        dispatcher.serve(frame)
    return disk


def read(lba: int = 0, count: int = 1, tag: bytes = b"\0\0\0\1") -> bytes:
    """A READ SECTORS EXT frame."""
    return ethernet_frame(
        ata_request(ATACmdStatus.READ_48BIT, count=count, lba=lba, tag=tag, shelf=1, slot=0)
    )


def write(lba: int = 0, count: int = 1, tag: bytes = b"\0\0\0\2") -> bytes:
    """A WRITE SECTORS EXT frame."""
    return ethernet_frame(
        ata_request(
            ATACmdStatus.WRITE_48BIT, count=count, lba=lba, tag=tag, shelf=1, slot=0,
            data=bytes(512 * count), aflags=0x41,
        )
    )


class CountingTests(SynchronousTestCase):
    """Each kind of request is counted once, with its bytes and errors."""

    def test_kinds(self) -> None:
        """Reads, writes, IDENTIFY, FLUSH, other ATA, config, mask and reserve each count."""
        tags = (i.to_bytes(4, "big") for i in range(100))
        frames = [
            read(0, 2, next(tags)),
            read(4, 1, next(tags)),
            write(8, 3, next(tags)),
            ethernet_frame(ata_request(ATACmdStatus.IDENTIFY, tag=next(tags), shelf=1, slot=0)),
            ethernet_frame(ata_request(ATACmdStatus.FLUSH_EXT, tag=next(tags), shelf=1, slot=0)),
            ethernet_frame(ata_request(0xE5, tag=next(tags), shelf=1, slot=0)),
            ethernet_frame(config_request(tag=next(tags), shelf=1, slot=0)),
            ethernet_frame(mask_request(tag=next(tags), shelf=1, slot=0)),
            ethernet_frame(reserve_request(tag=next(tags), shelf=1, slot=0)),
        ]
        stats = served(*frames).stats
        self.assertEqual(
            stats.requests(),
            {
                "read": 2, "write": 1, "identify": 1, "flush": 1, "other_ata": 1,
                "config": 1, "mask": 1, "reserve": 1,
            },
        )
        self.assertEqual((stats.read_bytes, stats.write_bytes), (3 * 512, 3 * 512))
        self.assertEqual(stats.in_flight, 0)
        self.assertEqual(stats.retransmits, 0)
        # Reads, writes and the flush took the disk: three timed operations plus the flush.
        self.assertEqual(stats.histogram()["count"], 4)

    def test_ata_error(self) -> None:
        """A read past the end is an ATA error, and no bytes."""
        stats = served(read(63, 2)).stats
        self.assertEqual(stats.errors(), {"ata": 1})
        self.assertEqual(stats.read_bytes, 0)

    def test_aoe_error(self) -> None:
        """An AoE error reply is counted by code."""
        frame = ethernet_frame(
            ata_request(ATACmdStatus.READ_48BIT, count=1, shelf=1, slot=0, tag=b"abcd")
        )
        target = served(
            ethernet_frame(reserve_request(command=2, macs=(OTHER_MAC,), shelf=1, slot=0)),
            frame,
        )
        self.assertEqual(target.stats.errors()["aoe_target_reserved"], 1)
        self.assertEqual(Error.TARGET_IS_RESERVED, 6)

    def test_backend_failure_by_cause(self) -> None:
        """A disk's OSError is counted by errno name, with its words kept for the log."""
        stats = TargetStats()
        stats.failed("write", OSError(errno.ENOSPC, "No space left on device"))
        stats.failed("write", OSError(errno.ENOSPC, "No space left on device"))
        stats.failed("read", None)
        self.assertEqual(stats.backend_errors, {"ENOSPC": 2, "short_read": 1})
        self.assertEqual(stats.failures["ENOSPC"], "write: No space left on device")
        self.assertEqual(stats.errors(), {"ata": 0, "backend_ENOSPC": 2, "backend_short_read": 1})

    def test_failure_cause(self) -> None:
        """Causes are errno names; no errno and no error have names of their own."""
        self.assertEqual(failure_cause(OSError(errno.EIO, "x")), "EIO")
        self.assertEqual(failure_cause(OSError("x")), "os_error")
        self.assertEqual(failure_cause(None), "short_read")


class RetransmissionTests(SynchronousTestCase):
    """The same tag again from the same initiator is a retransmission."""

    def test_same_tag_twice(self) -> None:
        """A request sent twice counts once as a retransmission; the initiator's frames, twice."""
        stats = served(read(tag=b"tag1"), read(tag=b"tag1"), read(tag=b"tag2")).stats
        self.assertEqual(stats.retransmits, 1)
        stats.absorb()  # with the compiled lane, its book of initiators
        self.assertEqual(stats.peers[INITIATOR_MAC].frames, 3)

    def test_other_initiator_same_tag(self) -> None:
        """Another initiator may use the same tag: not a retransmission."""
        stats = TargetStats()
        stats.seen(INITIATOR_MAC, b"tag1")
        stats.seen(OTHER_MAC, b"tag1")
        self.assertEqual(stats.retransmits, 0)

    @given(st.lists(st.integers(0, 5000), min_size=1, max_size=3000))
    def test_recent_tags_remembered(self, tags: list[int]) -> None:
        """
        A tag seen among an initiator's last ``RECENT_TAGS`` distinct tags is always
        recognised; a tag never seen before never is.
        """
        stats = TargetStats()
        seen: list[int] = []
        for tag in tags:
            before = stats.retransmits
            stats.seen(INITIATOR_MAC, tag.to_bytes(4, "big"))
            counted = stats.retransmits - before
            if tag not in seen:
                self.assertEqual(counted, 0)
                seen.append(tag)
            elif tag in seen[-RECENT_TAGS:]:
                self.assertEqual(counted, 1)


class HistogramTests(SynchronousTestCase):
    """Service times land in power-of-two microsecond buckets."""

    @given(st.floats(0, 5.0))
    def test_bucket_bounds(self, elapsed: float) -> None:
        """A time is counted in the first bucket whose bound is not below it."""
        stats = TargetStats()
        stats.served(elapsed)
        histogram = stats.histogram()
        for bound, cumulative in histogram["buckets"]:
            if bound == "+Inf":
                self.assertEqual(cumulative, 1)
            elif elapsed <= bound * 0.999999:
                self.assertEqual(cumulative, 1, (elapsed, bound))
            elif elapsed >= bound * 1.000001:
                self.assertEqual(cumulative, 0, (elapsed, bound))
        self.assertEqual(histogram["count"], 1)
        self.assertEqual(histogram["sum"], elapsed)
        self.assertEqual(len(histogram["buckets"]), len(SERVICE_BUCKETS) + 1)


class SweepTests(SynchronousTestCase):
    """An initiator's last-seen time moves only when it sent frames since the last sweep."""

    def test_last_seen(self) -> None:
        stats = TargetStats()
        stats.seen(INITIATOR_MAC, b"tag1")
        stats.sweep(100.0)
        stats.sweep(200.0)
        self.assertEqual(stats.peers[INITIATOR_MAC].last_seen, 100.0)
        stats.seen(INITIATOR_MAC, b"tag2")
        stats.sweep(300.0)
        self.assertEqual(stats.peers[INITIATOR_MAC].last_seen, 300.0)


class SnapshotTests(SynchronousTestCase):
    """Snapshots carry the figures; several processes' add up."""

    def test_snapshot(self) -> None:
        target = served(read(0, 2, b"t001"), write(0, 1, b"t002"))
        snap = target.stats.snapshot("e1.0", "memory:32K", 42.0)
        self.assertEqual(snap["target"], "e1.0")
        self.assertEqual(snap["backend"], "memory:32K")
        self.assertEqual(snap["bytes"], {"read": 1024, "write": 512})
        self.assertEqual(
            snap["initiators"], [{"mac": "02:00:00:00:00:01", "frames": 2, "last_seen": 42.0}]
        )

    def test_merge_sums(self) -> None:
        """Two workers' snapshots of one target add up, histograms and initiators included."""
        one = served(read(0, 1, b"t001")).stats.snapshot("e1.0", "m", 10.0)
        two = served(read(0, 1, b"t002"), read(0, 1, b"t003")).stats.snapshot("e1.0", "m", 20.0)
        iface = {"interface": "eth0", "mac": "x", "mtu": 1500, "received": 1, "sent": 2,
                 "ignored": 0, "dropped": 0, "malformed": 0}
        merged = merge_snapshots(
            [
                {"time": 10.0, "targets": [one], "interfaces": [iface]},
                {"time": 20.0, "targets": [two], "interfaces": [dict(iface, received=5)]},
            ]
        )
        (target,) = merged["targets"]
        self.assertEqual(target["requests"]["read"], 3)
        self.assertEqual(target["bytes"]["read"], 3 * 512)
        self.assertEqual(target["service_seconds"]["count"], 3)
        self.assertEqual(target["service_seconds"]["buckets"][-1][1], 3)
        self.assertEqual(target["initiators"][0]["frames"], 3)
        self.assertEqual(target["initiators"][0]["last_seen"], 20.0)
        self.assertEqual(merged["interfaces"][0]["received"], 6)
        self.assertEqual(merged["time"], 20.0)
        self.assertEqual(merged["initiators"][0]["targets"], ["e1.0"])
        # The inputs are left as they were.
        self.assertEqual(one["requests"]["read"], 1)
