"""
Tests for the initiator's paths (``aoe_twisted.initiator.client``): several local
interfaces and server MACs for one target, spread, failover and probing.

The first part is pure and fast: two ``FakeNetwork`` segments from
``tests.test_client`` on one ``MemoryReactorClock``, one per local interface,
each with a ``FakeHost`` of its own MAC serving the *same* ``Target`` (one
disk, two server MACs).  The second part is real: two ``AoEService``s in
this process, each on its own veth pair, serving the same image file through
two ``FileBackend``s, and an ``AoEClient`` on the two client ends in another
namespace; one client link is taken down in the middle of a transfer and
brought back.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Generator
from pathlib import Path as FilePath
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aoe_twisted.core.wire import SECTOR_SIZE, ATAArg, Command, Header
from aoe_twisted.initiator.client import (
    AoEClient,
    AoEClientError,
    AoETimeout,
    Link,
    PathPolicy,
    RemoteDisk,
    RetryPolicy,
)
from tests.netns import require, run
from tests.test_client import FakeHost, FakeNetwork, mac, make_target
from tests.test_client import run as run_clock

Gen = Generator[defer.Deferred[Any], Any, None]


def data_requests(host: FakeHost) -> list[ATAArg]:
    """The READ/WRITE requests ``host`` received (IDENTIFY and config queries left out)."""
    return [
        h.arg for h in host.requests
        if isinstance(h.arg, ATAArg) and h.arg.cmd_status in (0x24, 0x34, 0x20, 0x30)
    ]


def pattern(length: int, seed: int) -> bytes:
    """``length`` reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(length)


class TwoPathCase(SynchronousTestCase):
    """A target served by two server MACs, each on its own segment, and a client on both."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.target = make_target(1, 0, 1 << 20, buffer_count=4)
        self.net_a = FakeNetwork(self.clock, mac=bytes.fromhex("02cc00000001"))
        self.net_b = FakeNetwork(self.clock, mac=bytes.fromhex("02cc00000002"))
        self.host_a = self.net_a.add_host(1, self.target)
        self.host_b = self.net_b.add_host(2, self.target)

    def client(
        self, retry: RetryPolicy | None = None, policy: PathPolicy | None = None
    ) -> AoEClient:
        links = [Link("a", self.net_a.connect(retry)), Link("b", self.net_b.connect(retry))]
        return AoEClient(links=links, path_policy=policy)

    def open_disk(self, client: AoEClient) -> RemoteDisk:
        disk: RemoteDisk = self.successResultOf(run_clock(self.clock, client.open(1, 0)))
        return disk

    def settle(self) -> None:
        """Let every scheduled call run (late replies, probes)."""
        run_clock(self.clock, defer.Deferred())


class DiscoveryTests(TwoPathCase):
    """Every server MAC that answers on every interface is a path."""

    def test_open_finds_both_paths(self) -> None:
        """``open`` waits for the second interface's answer: two paths, windows added up."""
        disk = self.open_disk(self.client())
        self.assertEqual(
            [(p.interface, p.mac, p.max_window) for p in disk.paths.paths],
            [("a", mac(1), 4), ("b", mac(2), 4)],
        )
        self.assertEqual(disk.window, 8)

    def test_two_macs_on_one_interface(self) -> None:
        """Two servers of one target on one segment are two paths through one interface."""
        self.net_a.add_host(3, self.target)
        client = AoEClient(self.net_a.connect(), interface="a")
        disk = self.open_disk(client)
        self.settle()
        self.assertEqual(sorted(p.mac for p in disk.paths.paths), [mac(1), mac(3)])

    def test_discover_lists_each_interface(self) -> None:
        """``discover`` asks on both interfaces and names the interface of each answer."""
        found = self.successResultOf(
            run_clock(self.clock, self.client().discover(identify=False))
        )
        self.assertEqual([(t.name, t.mac, t.interface) for t in found],
                         [("e1.0", mac(1), "a"), ("e1.0", mac(2), "b")])

    def test_slow_interface_joins_later(self) -> None:
        """An interface that answers after ``path_wait`` still becomes a path when it does."""
        self.net_b.latency = 1.0
        client = self.client()
        client.path_wait = 0.1
        disk = self.open_disk(client)
        self.assertEqual(len(disk.paths.paths), 1)
        run_clock(self.clock, disk.read(0, 64))
        self.settle()
        self.assertEqual([p.interface for p in disk.paths.paths], ["a", "b"])


class SpreadTests(TwoPathCase):
    """Frames go over both paths, each within its own window."""

    def test_read_uses_both_paths(self) -> None:
        """A long read is split about evenly over the two server MACs and reads right."""
        data = pattern(400 * SECTOR_SIZE, 1)
        self.target.backend.write(0, data)
        disk = self.open_disk(self.client())
        self.assertEqual(self.successResultOf(run_clock(self.clock, disk.read(0, 400))), data)
        a, b = len(data_requests(self.host_a)), len(data_requests(self.host_b))
        self.assertEqual(a + b, 200)
        self.assertGreater(min(a, b), 80)
        self.assertEqual([p.sent for p in disk.paths.paths], [a, b])

    def test_write_over_both_lands_once(self) -> None:
        """A write spread over both paths puts every byte on the one disk."""
        disk = self.open_disk(self.client())
        data = pattern(300 * SECTOR_SIZE, 2)
        run_clock(self.clock, disk.write(10, data))
        self.assertEqual(self.target.backend.read(10 * SECTOR_SIZE, len(data)), data)
        self.assertTrue(data_requests(self.host_a) and data_requests(self.host_b))

    def test_window_per_path(self) -> None:
        """Each path keeps at most its own buffer count in flight; together, their sum."""
        self.net_a.latency = self.net_b.latency = 0.01
        disk = self.open_disk(self.client())
        run_clock(self.clock, disk.read(0, 400))
        self.assertEqual((self.host_a.peak, self.host_b.peak), (4, 4))
        self.assertEqual((self.host_a.overflowed, self.host_b.overflowed), (0, 0))
        self.assertEqual(disk.peak_in_flight, 8)

    def test_slow_path_gets_less(self) -> None:
        """A path ten times slower carries fewer frames: a full window is skipped."""
        self.net_a.latency, self.net_b.latency = 0.001, 0.01
        disk = self.open_disk(self.client())
        run_clock(self.clock, disk.read(0, 400))
        self.assertGreater(len(data_requests(self.host_a)), 3 * len(data_requests(self.host_b)))
        fast, slow = disk.paths.paths
        assert fast.srtt is not None and slow.srtt is not None
        self.assertLess(fast.srtt, slow.srtt)


class FailoverTests(TwoPathCase):
    """A path that stops answering is routed around, marked dead, probed and brought back."""

    def test_transfer_survives_silent_path(self) -> None:
        """
        Path b goes silent mid-read: its frames time out and go again over a with
        new tags; the read completes with the right data, and b is dead.
        """
        data = pattern(400 * SECTOR_SIZE, 3)
        self.target.backend.write(0, data)
        disk = self.open_disk(self.client(RetryPolicy(0.5, 2.0, 2)))
        d = disk.read(0, 400)
        self.clock.advance(0.005)
        self.host_b.silent = True
        self.assertEqual(self.successResultOf(run_clock(self.clock, d)), data)
        path_a, path_b = disk.paths.paths
        self.assertTrue(path_b.dead)
        self.assertFalse(path_a.dead)
        self.assertGreaterEqual(disk.paths.failovers, 3)
        self.assertEqual(disk.in_flight, 0)
        self.assertEqual((path_a.in_flight, path_b.in_flight), (0, 0))

    def test_dead_after_n_timeouts(self) -> None:
        """With ``dead_after=3`` the third timeout in a row kills the path, not the second."""
        disk = self.open_disk(self.client(policy=PathPolicy(dead_after=3)))
        path_b = disk.paths.paths[1]
        for expected in (False, False, True):
            disk.paths.timed_out(path_b)
            self.assertEqual(path_b.dead, expected)
        self.assertEqual((path_b.timeouts, path_b.deaths, path_b.window), (3, 1, 1))

    def test_answer_resets_timeouts(self) -> None:
        """An answer between timeouts resets the count: scattered losses kill no path."""
        disk = self.open_disk(self.client(policy=PathPolicy(dead_after=2)))
        path = disk.paths.paths[0]
        for _ in range(5):
            disk.paths.timed_out(path)
            disk.paths.answered(path, 0.001)
        self.assertFalse(path.dead)
        self.assertEqual(path.timeouts_total, 5)

    def test_window_halves_and_grows_back(self) -> None:
        """A timeout halves a path's window; a window's worth of answers adds one back."""
        disk = self.open_disk(self.client())
        path = disk.paths.paths[0]
        disk.paths.timed_out(path)
        self.assertEqual(path.window, 2)
        for _ in range(2):
            disk.paths.answered(path, 0.001)
        self.assertEqual(path.window, 3)
        for _ in range(10):
            disk.paths.answered(path, 0.001)
        self.assertEqual(path.window, path.max_window)

    def test_dead_path_gets_no_new_frames(self) -> None:
        """Once b is dead, new frames go over a only (b sees only probes)."""
        disk = self.open_disk(self.client(policy=PathPolicy(probe_interval=1000.0)))
        path_b = disk.paths.paths[1]
        for _ in range(3):
            disk.paths.timed_out(path_b)
        self.assertTrue(path_b.dead)
        before = len(data_requests(self.host_b))
        run_clock(self.clock, disk.read(0, 100))
        self.assertEqual(len(data_requests(self.host_b)), before)

    def test_probe_brings_path_back(self) -> None:
        """
        A dead path is sent a config query each probe interval while the disk is
        busy; once it answers, frames flow on it again.
        """
        disk = self.open_disk(self.client(RetryPolicy(0.5, 2.0, 2), PathPolicy(probe_interval=1.0)))
        self.host_b.silent = True
        run_clock(self.clock, disk.read(0, 400))
        path_b = disk.paths.paths[1]
        self.assertTrue(path_b.dead)
        self.host_b.silent = False
        before = len(data_requests(self.host_b))
        self.clock.advance(2.0)
        self.successResultOf(run_clock(self.clock, disk.read(0, 400)))
        probes = [h for h in self.host_b.requests if h.command == Command.QUERY_CONFIG_INFORMATION]
        self.assertTrue(probes)
        self.assertFalse(path_b.dead)
        self.assertGreater(len(data_requests(self.host_b)), before)

    def test_late_reply_completes_once(self) -> None:
        """
        A reply slower than the timeout on path a: the request goes again on b with
        a new tag; b's answer completes it, and a's late one is stale.
        """
        disk = self.open_disk(self.client(RetryPolicy(0.5, 2.0, 2)))
        slow = [True]

        def first_slow(header: Header) -> float | None:
            if slow and isinstance(header.arg, ATAArg):
                slow.pop()
                return 0.8
            return None

        self.net_a.reply_delay = first_slow
        disk.paths._next = 0
        completions: list[bytes] = []
        d = disk.read(0, 1)
        d.addCallback(lambda data: completions.append(data) or data)
        run_clock(self.clock, d)
        self.settle()
        self.assertEqual(len(completions), 1)
        self.assertEqual(self.net_a.protocol.stale_replies, 1)
        self.assertEqual(disk.paths.failovers, 1)
        self.assertEqual(len(data_requests(self.host_b)), 1)

    def test_both_silent_times_out(self) -> None:
        """With every path silent the retry policy still decides: ``AoETimeout``."""
        disk = self.open_disk(self.client(RetryPolicy(0.5, 1.0, 2)))
        self.host_a.silent = self.host_b.silent = True
        self.failureResultOf(run_clock(self.clock, disk.read(0, 20)), AoETimeout)
        self.assertEqual(disk.in_flight, 0)

    def test_closed_port_fails_over_and_reopens(self) -> None:
        """
        Interface b's port closes under the client: its requests move to a at once,
        and a later probe reopens the port and finds the path again.
        """
        opened: list[int] = []

        def reopen(protocol: Any) -> FakeNetwork:
            protocol.makeConnection(self.net_b)
            opened.append(1)
            return self.net_b

        client = self.client(RetryPolicy(0.5, 2.0, 2), PathPolicy(probe_interval=1.0))
        client.links[1].opener = reopen
        disk = self.open_disk(client)
        data = pattern(400 * SECTOR_SIZE, 5)
        self.target.backend.write(0, data)
        d = disk.read(0, 400)
        self.clock.advance(0.003)
        self.net_b.protocol.doStop()
        self.assertEqual(self.successResultOf(run_clock(self.clock, d)), data)
        self.assertFalse(client.links[1].up)
        self.clock.advance(1.5)
        self.successResultOf(run_clock(self.clock, disk.read(0, 400)))
        self.assertEqual(opened, [1])
        self.assertTrue(client.links[1].up)
        self.assertTrue(disk.paths.paths[1].usable)

    def test_close_fails_outstanding(self) -> None:
        """``close()`` is not a failure to route around: outstanding requests fail."""
        disk = self.open_disk(self.client())
        self.net_a.latency = self.net_b.latency = 1.0
        d = disk.read(0, 100)
        self.net_a.protocol.closing = self.net_b.protocol.closing = True
        self.net_a.protocol.doStop()
        self.net_b.protocol.doStop()
        self.failureResultOf(d)


class HeldRetransmissionTests(TwoPathCase):
    """
    A retransmission held because every other path's window is full goes out as
    soon as room appears, whether or not new frames are queued behind it.
    """

    def narrow_disk(self, client: AoEClient | None = None) -> RemoteDisk:
        """A disk whose two paths take one frame each (``max_in_flight=1``), a first."""
        if client is None:
            client = self.client(RetryPolicy(0.5, 2.0, 3), PathPolicy(probe_interval=1000.0))
        disk: RemoteDisk = self.successResultOf(
            run_clock(self.clock, client.open(1, 0, max_in_flight=1))
        )
        self.assertEqual([p.window for p in disk.paths.paths], [1, 1])
        disk.paths._next = 0
        return disk

    def lose_first_request(self, network: FakeNetwork) -> None:
        """Lose the first READ/WRITE request ``network`` carries (its reply never comes)."""
        lost: list[bool] = []

        def drop(header: Header) -> bool:
            if isinstance(header.arg, ATAArg) and not lost:
                lost.append(True)
                return True
            return False

        network.drop_request = drop

    def hold_one(self, disk: RemoteDisk) -> tuple[defer.Deferred[bytes], defer.Deferred[bytes]]:
        """
        Read LBA 0+2 over a (lost), then LBA 2+2 over b (answered 0.4 s later); stop
        just after a's timeout, when the first is held (b is full) and nothing is queued.

        Return the two reads' Deferreds.
        """
        self.lose_first_request(self.net_a)
        self.net_b.reply_delay = lambda header: 0.4 if isinstance(header.arg, ATAArg) else None
        first = disk.read(0, 2)
        self.wait(0.3)
        second = disk.read(2, 2)
        self.wait(0.25)
        self.assertEqual([r.what for r in disk.paths._held], ["read of LBA 0+2"])
        self.assertEqual([p.in_flight for p in disk.paths.paths], [0, 1])
        self.assertFalse(disk._queue)
        return first, second

    def wait(self, seconds: float) -> None:
        """Let ``seconds`` pass, each scheduled call running at its own time."""
        end = self.clock.seconds() + seconds
        while True:
            due = [c.getTime() for c in self.clock.getDelayedCalls() if c.getTime() <= end]
            if not due:
                break
            self.clock.advance(max(0.0, min(due) - self.clock.seconds()))
        self.clock.advance(end - self.clock.seconds())

    def frames(self) -> int:
        """Frames sent on both segments so far."""
        return len(self.net_a.sent) + len(self.net_b.sent)

    def test_answer_sends_held(self) -> None:
        """
        The frame on a is lost while b's is slow: at a's timeout b is full and the
        retransmission is held; b's reply, with nothing queued, sends it.
        """
        data = pattern(4 * SECTOR_SIZE, 21)
        self.target.backend.write(0, data)
        disk = self.narrow_disk()
        first, second = self.hold_one(disk)
        self.assertEqual(self.successResultOf(run_clock(self.clock, second)), data[1024:])
        self.assertEqual(self.successResultOf(run_clock(self.clock, first)), data[:1024])
        self.assertEqual(len(disk.paths._held), 0)
        self.assertEqual(disk.paths.failovers, 1)
        self.assertEqual((disk.in_flight, disk.paths.in_flight), (0, 0))

    def test_timeout_sends_held(self) -> None:
        """
        Both first frames are lost: a's retransmission is held (b is full); b's then
        moves to a, and the room it leaves on b takes the held one at once.
        """
        data = pattern(4 * SECTOR_SIZE, 22)
        self.target.backend.write(0, data)
        disk = self.narrow_disk()
        self.lose_first_request(self.net_a)
        self.lose_first_request(self.net_b)
        d = disk.read(0, 4)
        self.wait(0.5)
        self.assertEqual(len(disk.paths._held), 0)
        self.assertEqual([p.in_flight for p in disk.paths.paths], [1, 1])
        self.assertEqual(self.successResultOf(run_clock(self.clock, d)), data)
        self.assertEqual(disk.paths.failovers, 2)
        self.assertEqual((disk.in_flight, disk.paths.in_flight), (0, 0))

    def test_held_of_failed_operation_not_sent(self) -> None:
        """
        A held retransmission whose operation failed meanwhile (here: cancelled) is
        dropped, not sent when room appears.
        """
        disk = self.narrow_disk()
        first, second = self.hold_one(disk)
        before = self.frames()
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        self.assertEqual(len(disk.paths._held), 0)
        self.successResultOf(run_clock(self.clock, second))
        self.settle()
        self.assertEqual(self.frames(), before)
        self.assertEqual((disk.in_flight, disk.paths.in_flight), (0, 0))

    def test_failing_operation_sends_none_of_its_held(self) -> None:
        """
        An operation failing with one frame in flight and a later one held: the room
        the first leaves is not given to the second (which is dropped), and no frame goes.
        """
        links = [Link("a", self.net_a.connect(RetryPolicy(0.5, 2.0, 3))),
                 Link("b", self.net_b.connect(RetryPolicy(2.0, 4.0, 3)))]
        disk = self.narrow_disk(AoEClient(links=links,
                                          path_policy=PathPolicy(probe_interval=1000.0)))
        disk.paths._next = 1
        self.lose_first_request(self.net_a)
        self.net_b.reply_delay = lambda header: 1.0 if isinstance(header.arg, ATAArg) else None
        d = disk.read(0, 4)
        self.wait(0.6)
        self.assertEqual([r.what for r in disk.paths._held], ["read of LBA 2+2"])
        self.assertEqual([p.in_flight for p in disk.paths.paths], [0, 1])
        before = self.frames()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.frames(), before)
        self.assertEqual(len(disk.paths._held), 0)
        self.assertEqual((disk.in_flight, disk.paths.in_flight), (0, 0))

    def test_all_silent_held_times_out(self) -> None:
        """
        Every path silent, retransmissions held: each operation still fails with
        ``AoETimeout`` when its retries run out, and nothing is left held or timed.
        """
        disk = self.narrow_disk()
        self.host_a.silent = self.host_b.silent = True
        reads = [disk.read(lba, 2) for lba in range(0, 8, 2)]
        run_clock(self.clock, defer.DeferredList(reads), limit=60.0)
        for d in reads:
            failure = self.failureResultOf(d, AoETimeout)
            self.assertEqual(failure.value.attempts, 4)
        self.assertGreater(disk.paths.failovers, 0)
        self.assertEqual(len(disk.paths._held), 0)
        self.assertEqual((disk.in_flight, disk.paths.in_flight), (0, 0))
        self.assertEqual([p.dead for p in disk.paths.paths], [True, True])

    def test_close_fails_held(self) -> None:
        """``close()`` fails an operation whose only frame is held, rather than leave it."""
        client = self.client(RetryPolicy(0.5, 2.0, 3), PathPolicy(probe_interval=1000.0))
        disk = self.narrow_disk(client)
        first, second = self.hold_one(disk)
        before = self.frames()
        client.close()
        self.failureResultOf(first, AoEClientError)
        self.assertEqual(len(disk.paths._held), 0)
        self.net_a.protocol.doStop()
        self.net_b.protocol.doStop()
        self.failureResultOf(second, AoEClientError)
        self.settle()
        self.assertEqual(self.frames(), before)
        self.assertEqual((disk.in_flight, disk.paths.in_flight), (0, 0))

# -- real: two servers, two veth pairs, one client with two interfaces ---------------

SHELF, SLOT = 4, 2
DISK_BYTES = 32 << 20
#: Short timeouts, so that a cut path is noticed within a second.
REAL_RETRY = RetryPolicy(initial_timeout=0.2, max_timeout=1.0, retries=6)


def link_stats(namespace: str, interface: str) -> tuple[int, int]:
    """Return (frames received, frames sent) by ``interface`` in ``namespace`` (kernel counters)."""
    [info] = json.loads(run("ip", "-j", "-s", "-n", namespace, "link", "show", "dev", interface))
    stats = info["stats64"]
    return stats["rx"]["packets"], stats["tx"]["packets"]


class TwoVethTopology:
    """
    Namespaces ``srv`` and ``cli`` joined by two veth pairs: ``s0``-``c0`` and ``s1``-``c1``.

    Made only inside the namespaces this object creates; ``case``'s cleanups
    delete them (and every interface in them).
    """

    _count = 0

    def __init__(self, case: TestCase) -> None:
        require(case)
        TwoVethTopology._count += 1
        base = f"aoe-mp-{os.getpid()}-{TwoVethTopology._count}"
        self.server_ns, self.client_ns = f"{base}-srv", f"{base}-cli"
        for ns in (self.server_ns, self.client_ns):
            run("ip", "netns", "add", ns)
            case.addCleanup(run, "ip", "netns", "delete", ns)
        self.pairs = [("s0", "c0"), ("s1", "c1")]
        for server_if, client_if in self.pairs:
            run("ip", "link", "add", server_if, "netns", self.server_ns, "type", "veth",
                "peer", "name", client_if, "netns", self.client_ns)
            run("ip", "-n", self.server_ns, "link", "set", "dev", server_if, "up")
            run("ip", "-n", self.client_ns, "link", "set", "dev", client_if, "up")

    def set_client_link(self, interface: str, up: bool) -> None:
        """Take a client-side interface down or bring it up."""
        run("ip", "-n", self.client_ns, "link", "set", "dev", interface,
            "up" if up else "down")

    def wait_up(self) -> Gen:
        """Wait until every end reports ``state UP`` (frames are dropped before)."""
        for _ in range(500):
            states = [run("ip", "-n", ns, "-o", "link", "show", "dev", name)
                      for pair in self.pairs
                      for ns, name in zip((self.server_ns, self.client_ns), pair, strict=True)]
            if all(" state UP " in state for state in states):
                return
            yield task.deferLater(reactor, 0.01, lambda: None)
        raise RuntimeError(f"links did not come up: {states}")


class RealMultipathTests(TestCase):
    """Two in-process servers of one image on two veth pairs; a client on both."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self) -> Gen:
        from aoe_twisted.backends.file import FileBackend
        from aoe_twisted.core.target import Target
        from aoe_twisted.server import AoEService

        self.net = TwoVethTopology(self)
        yield from self.net.wait_up()
        self.image = FilePath(self.mktemp())
        self.image.parent.mkdir(parents=True, exist_ok=True)
        self.original = pattern(DISK_BYTES, 11)
        self.image.write_bytes(self.original)
        self.services = []
        for server_if, _ in self.net.pairs:
            target = Target(SHELF, SLOT, FileBackend.open(str(self.image)), buffer_count=16)
            service = AoEService(server_if, [target], netns=self.net.server_ns)
            service.privilegedStartService()
            service.startService()
            self.addCleanup(service.stopService)
            self.services.append(service)
        self.client = AoEClient.listen(
            [client_if for _, client_if in self.net.pairs], reactor=reactor,
            netns=self.net.client_ns, retry=REAL_RETRY,
            path_policy=PathPolicy(dead_after=3, probe_interval=0.5),
        )
        self.addCleanup(self.client.close)
        self.disk = yield self.client.open(SHELF, SLOT)

    def image_bytes(self, offset: int, length: int) -> bytes:
        with self.image.open("rb") as f:
            f.seek(offset)
            return f.read(length)

    def server_frames(self) -> list[int]:
        """Frames each server interface received so far (the kernel's count)."""
        return [link_stats(self.net.server_ns, s)[0] for s, _ in self.net.pairs]

    def test_both_paths_found(self) -> None:
        """``open`` finds one path per client interface, to that pair's server MAC."""
        self.assertEqual([p.interface for p in self.disk.paths.paths], ["c0", "c1"])
        macs = {p.mac for p in self.disk.paths.paths}
        self.assertEqual(macs, {s.port.mac for s in self.services})

    @defer.inlineCallbacks
    def test_write_read_over_both(self) -> Gen:
        """Random data written over both paths lands in the file and reads back over both."""
        before = self.server_frames()
        data = os.urandom(8 << 20)
        yield self.disk.write(2048, data)
        self.assertEqual(self.image_bytes(2048 * SECTOR_SIZE, len(data)), data)
        self.assertEqual((yield self.disk.read(2048, len(data) // SECTOR_SIZE)), data)
        after = self.server_frames()
        frames = len(data) // SECTOR_SIZE // self.disk.sectors_per_frame
        per_path = [b - a for a, b in zip(before, after, strict=True)]
        self.assertGreater(min(per_path), frames // 2, per_path)
        self.assertEqual([p.sent > frames // 2 for p in self.disk.paths.paths], [True, True])

    @defer.inlineCallbacks
    def test_link_down_mid_transfer(self) -> Gen:
        """
        ``c1`` goes down in the middle of a write: the write completes over ``c0``
        with the right data; once ``c1`` is up again, frames flow on it again.
        """
        data = os.urandom(16 << 20)
        d = self.disk.write(0, data)
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(d.called, "the transfer ended before the link went down")
        self.net.set_client_link("c1", False)
        yield d
        self.assertEqual(self.image_bytes(0, len(data)), data)
        self.assertEqual((yield self.disk.read(0, len(data) // SECTOR_SIZE)), data)
        path_c1 = self.disk.paths.paths[1]
        self.assertFalse(path_c1.usable)
        self.assertGreater(self.disk.paths.failovers, 0)

        self.net.set_client_link("c1", True)
        yield from self.net.wait_up()
        sent = path_c1.sent
        for _ in range(50):
            yield self.disk.read(0, 4096)
            if path_c1.usable and path_c1.sent > sent + 100:
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertTrue(path_c1.usable, path_c1.state())
        self.assertGreater(path_c1.sent, sent + 100, path_c1.state())
        more = os.urandom(1 << 20)
        yield self.disk.write(8192, more)
        self.assertEqual(self.image_bytes(8192 * SECTOR_SIZE, len(more)), more)

    def aoe(self, *argv: str) -> defer.Deferred[Any]:
        """Run ``python -m aoe_twisted ARGV`` on both client interfaces, in a thread."""
        import subprocess
        import sys

        from twisted.internet.threads import deferToThread

        return deferToThread(
            subprocess.run,
            [sys.executable, "-m", "aoe_twisted", *argv, "-i", "c0", "-i", "c1",
             "--netns", self.net.client_ns],
            capture_output=True, timeout=30, check=False,
        )

    @defer.inlineCallbacks
    def test_command_line_paths(self) -> Gen:
        """
        ``aoe-twisted info`` with ``-i`` twice lists both paths; ``read`` reads the
        image over both and names them, with what each carried, on standard error.
        """
        yield self.client.close()
        info = yield self.aoe("info", f"e{SHELF}.{SLOT}")
        self.assertEqual(info.returncode, 0, info.stderr)
        lines = info.stdout.decode().splitlines()
        self.assertIn("interfaces:        c0, c1", lines)
        paths = [line for line in lines if line.startswith("path:")]
        self.assertEqual([line.split()[1] for line in paths], ["c0", "c1"])
        read = yield self.aoe("read", f"e{SHELF}.{SLOT}", "--offset", "1M", "--length", "2M")
        self.assertEqual(read.returncode, 0, read.stderr)
        self.assertEqual(read.stdout, self.original[1 << 20 : 3 << 20])
        report = read.stderr.decode()
        self.assertIn("2 path(s): c0 -> ", report)
        self.assertEqual(report.count("  path c"), 2, report)
