"""
End-to-end tests of ``twistd aoe`` with ``[server] workers = 2`` and the operations features.

The server runs as a real ``twistd -n aoe --config FILE`` in the server
namespace of a veth pair, with a control socket; ``aoe-twisted ctl`` runs in
this process against that socket.  The client (``tests.peer.Peer``) forges
initiator MACs that the fanout program gives to one worker or the other
(``fanout_index``: the parent serves share 0, the worker process share 1),
so that every figure and every change is seen through both processes.
When the worker process is up is read from twistd's log file (the worker's
"AoE port open" lines); a change must not restart it.

What ``--workers`` promises here: ``ctl stats`` is the sum of both
processes' figures (each worker reports once a second to the parent); ``ctl
add``, ``remove`` and ``set`` are applied by every worker (over its channel
from the parent) before ``ctl`` is answered, with no worker restarted, so
after a change every initiator, whichever worker its frames go to, sees the
same target, no request is lost, and the figures go on.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from aoe_twisted.control import ctl
from aoe_twisted.core.wire import SECTOR_SIZE, ATACmdStatus, format_mac
from aoe_twisted.net.fanout import fanout_index
from tests.netns import VethPair, require
from tests.peer import Peer, Reply
from tests.test_twistd import TwistdProcessMixin, _twistd

FILE = (1, 1)
ADDED = (1, 2)
WORKERS = 2
#: How long anything (start-up, a worker's restart, a stats report) may take on a loaded machine.
PATIENCE = 30.0
#: Initiators per worker in the rounds that check every worker serves a target.
PER_WORKER = 3


def initiators(worker: int, shelf: int, slot: int, count: int = 1) -> list[bytes]:
    """Return ``count`` unicast MACs whose frames for ``shelf``.``slot`` go to ``worker``."""
    found = []
    for last in range(1, 256):
        mac = bytes([2, 0, 0, 0, 0x57, last])
        if fanout_index(mac, shelf, slot, WORKERS) == worker:
            found.append(mac)
            if len(found) == count:
                return found
    raise AssertionError("not enough MACs found")


def _name(address: tuple[int, int]) -> str:
    return f"e{address[0]}.{address[1]}"


def _target(stats: dict[str, Any], address: tuple[int, int]) -> dict[str, Any] | None:
    """Return ``address``'s entry in a stats snapshot, or ``None``."""
    for entry in stats["targets"]:
        if entry["target"] == _name(address):
            return entry  # type: ignore[no-any-return]
    return None


def _counts(stats: dict[str, Any], address: tuple[int, int]) -> tuple[int, int, int, int]:
    """Return ``(reads, writes, bytes read, bytes written)`` of ``address`` (zeros if absent)."""
    entry = _target(stats, address)
    if entry is None:
        return (0, 0, 0, 0)
    return (
        entry["requests"]["read"],
        entry["requests"]["write"],
        entry["bytes"]["read"],
        entry["bytes"]["write"],
    )


class WorkersOperationsTests(TwistdProcessMixin, TestCase):
    """``workers = 2``, a file target e1.1, and the control socket."""

    timeout = 120

    def setUp(self) -> None:
        require(self)
        self.pair = VethPair.create(self)
        # A short path: a UNIX socket's name is at most 107 bytes.
        self.directory = Path(tempfile.mkdtemp(prefix="aoewrk-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.image = self.directory / "disk.img"
        self.image.write_bytes(bytes(range(256)) * (1 << 12))
        self.socket = str(self.directory / "control.sock")
        config = self.directory / "aoe.toml"
        config.write_text(
            "[server]\n"
            f'interfaces = ["{self.pair.server_if}"]\n'
            f'control = "{self.socket}"\n'
            f"workers = {WORKERS}\n"
            "removed_grace = 60\n"
            "\n[[target]]\n"
            f'address = "{FILE[0]}.{FILE[1]}"\n'
            f'backend = "file:{self.image}"\n'
        )
        self.log = self.directory / "twistd.log"
        self.proc: subprocess.Popen[str] = _twistd(
            "--logfile",
            str(self.log),
            "aoe",
            "--config",
            str(config),
            netns=self.pair.server_ns,
        )
        self.addCleanup(self._kill, self.proc)
        self.peer = Peer(self.pair.client_if, self.pair.client_ns)
        self.peer.start()
        self.addCleanup(self.peer.stop)

    # -- helpers ----------------------------------------------------------------

    @defer.inlineCallbacks
    def ctl(self, *argv: str) -> Any:
        """Run ``ctl ARGV --json``; return its answer (waiting for the socket to be there)."""
        deadline = time.monotonic() + PATIENCE
        while True:
            if self.proc.poll() is not None:
                self.fail(f"twistd exited: {self.output()}")
            out = io.StringIO()
            args = ctl.build_parser().parse_args(["--socket", self.socket, *argv, "--json"])
            try:
                yield defer.Deferred.fromCoroutine(ctl.run(reactor, args, out))
            except ctl.CtlError as e:
                if "cannot connect" not in str(e):
                    raise
                if time.monotonic() > deadline:
                    raise
                yield task.deferLater(reactor, 0.1, lambda: None)
                continue
            return json.loads(out.getvalue())

    @defer.inlineCallbacks
    def stats_until(self, check: Callable[[dict[str, Any]], bool], what: str) -> Any:
        """Poll ``ctl stats`` until ``check(stats)`` holds; return those stats."""
        deadline = time.monotonic() + PATIENCE
        while True:
            stats = yield self.ctl("stats")
            if check(stats):
                return stats
            if time.monotonic() > deadline:
                self.fail(f"{what} never came: {json.dumps(stats)[:2000]}")
            yield task.deferLater(reactor, 0.2, lambda: None)

    @defer.inlineCallbacks
    def server_mac(self) -> Any:
        """Wait until the server answers a broadcast query for e1.1; return its MAC."""
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            replies = yield self.peer.discover(*FILE, timeout=0.5)
            if replies:
                return replies[0].src
            if self.proc.poll() is not None:
                self.fail(f"twistd exited early: {self.output()}")
        self.fail("e1.1 did not answer")

    def output(self) -> str:
        """What twistd wrote: its output and its log file."""
        out = self.proc.communicate()[0] if self.proc.poll() is not None else ""
        log = self.log.read_text() if self.log.exists() else ""
        return out + log

    def worker_ports(self) -> int:
        """How many times a worker process has opened its port (mapped its receive ring)."""
        if not self.log.exists():
            return 0
        return self.log.read_text().count(f"[aoe worker {WORKERS - 1}] AoE port open on")

    @defer.inlineCallbacks
    def worker_up(self, opened: int = 1) -> Any:
        """
        Wait until the worker process has opened its port ``opened`` times in all.

        Until the worker has mapped its receive ring, the kernel's fanout
        group does not yet hold the sockets in their final order (mapping a
        ring takes a socket out of the group and puts it back last), so an
        initiator's frames may go to the other process or be lost.
        """
        deadline = time.monotonic() + PATIENCE
        while self.worker_ports() < opened:
            if self.proc.poll() is not None:
                self.fail(f"twistd exited early: {self.output()}")
            if time.monotonic() > deadline:
                self.fail(f"the worker did not start: {self.output()}")
            yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def first_reply(
        self,
        request: Callable[[], defer.Deferred[list[Reply]]],
        accept: Callable[[Reply], bool],
        within: float,
    ) -> Any:
        """Repeat ``request()`` until a reply ``accept`` takes; return the replies seen."""
        deadline = time.monotonic() + within
        seen: list[Reply] = []
        while time.monotonic() < deadline:
            replies = yield request()
            seen += replies
            if any(accept(reply) for reply in replies):
                break
        return seen

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """Stop twistd with SIGTERM: it must stop cleanly, with no traceback in its log."""
        yield self.stop_cleanly(self.proc)
        log = self.log.read_text()
        self.assertNotIn("Traceback", log)
        return log

    def renewed(self, before: int) -> defer.Deferred[None]:
        """
        After a ``ctl`` change: the worker applied it already, and was not restarted for it.

        ``ctl`` is answered once every worker has applied the change over
        its channel; the worker keeps its port (``before`` opens so far).
        """
        self.assertEqual(self.worker_ports(), before, "the worker was restarted for a change")
        return defer.succeed(None)

    @defer.inlineCallbacks
    def answered(
        self,
        request: Callable[[], defer.Deferred[list[Reply]]],
        accept: Callable[[Reply], bool],
        what: str,
    ) -> Any:
        """Repeat ``request()`` until a reply that ``accept`` takes comes; return it."""
        deadline = time.monotonic() + PATIENCE
        last: list[Reply] = []
        while time.monotonic() < deadline:
            last = yield request()
            if last and accept(last[0]):
                return last[0]
            if not last:
                continue
            yield task.deferLater(reactor, 0.2, lambda: None)
        self.fail(f"{what}: never answered as expected (last: {last})")

    def ok(self, replies: list[Reply], what: str) -> Reply:
        """Assert one successful ATA reply; return it."""
        self.assertEqual(len(replies), 1, f"{what}: no reply")
        self.assertFalse(replies[0].header.flag_error, what)
        self.assertEqual(replies[0].arg.cmd_status, ATACmdStatus.READY_STATUS, what)
        return replies[0]

    def refused(self, replies: list[Reply], what: str) -> None:
        """Assert one ATA error reply (a refused write)."""
        self.assertEqual(len(replies), 1, f"{what}: no reply")
        self.assertTrue(replies[0].arg.cmd_status & ATACmdStatus.ERR_STATUS, what)

    @defer.inlineCallbacks
    def traffic(
        self,
        server: bytes,
        sources: list[bytes],
        until: defer.Deferred[Any],
        interval: float = 0.04,
    ) -> Any:
        """
        Read e1.1 through ``sources`` in turn, one request every ``interval`` s, until ``until``.

        Each request waits up to 5 s for its reply (``Peer`` does not
        retransmit); returns ``(seconds after the start it was sent, the
        source, its reply time or None)`` for every request.
        """
        started = time.monotonic()
        sent: list[tuple[float, bytes, defer.Deferred[list[Reply]]]] = []
        answered: dict[int, float] = {}
        number = 0
        while not until.called:
            src = sources[number % len(sources)]
            d = self.peer.read(server, *FILE, number % 64, src=src, timeout=5.0)
            d.addCallback(
                lambda replies, n=number: (
                    answered.setdefault(n, time.monotonic()) if replies else None
                )
            )
            sent.append((time.monotonic() - started, src, d))
            number += 1
            yield task.deferLater(reactor, interval, lambda: None)
        yield defer.gatherResults([d for _, _, d in sent])
        return [
            (at, src, answered[n] - started - at if n in answered else None)
            for n, (at, src, _) in enumerate(sent)
        ]

    # -- tests ------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_stats_add_and_restart(self) -> Any:
        """
        ``ctl stats`` sums both processes: 3 reads and 1 write through the
        parent's share and 5 reads and 2 writes through the worker's show as
        8 and 3, bytes and initiators alike, and stay so (no report counted
        twice).  ``ctl add`` of e1.2 restarts the worker with it: then every
        initiator, of either share, writes e1.2 and reads back through the
        other share what it wrote, and those requests show in the sum.  The
        figures go on after the restart, and e1.1's counters stay where they
        were (a counter never goes back, or Prometheus takes it for a reset)
        and grow with new requests through both shares.
        """
        server = yield self.server_mac()
        yield self.worker_up()
        [first], [second] = initiators(0, *FILE), initiators(1, *FILE)
        for src, reads, writes in ((first, 3, 1), (second, 5, 2)):
            for n in range(reads):
                replies = yield self.peer.read(server, *FILE, n, src=src)
                self.ok(replies, f"read through {format_mac(src)}")
            for n in range(writes):
                replies = yield self.peer.write(server, *FILE, 100 + n, bytes(SECTOR_SIZE), src=src)
                self.ok(replies, f"write through {format_mac(src)}")
        expected = (8, 3, 8 * SECTOR_SIZE, 3 * SECTOR_SIZE)
        stats = yield self.stats_until(lambda s: _counts(s, FILE) == expected, "the sum")
        entry = _target(stats, FILE)
        assert entry is not None
        frames = {p["mac"]: p["frames"] for p in entry["initiators"]}
        self.assertEqual(frames.get(format_mac(first)), 4, frames)
        self.assertEqual(frames.get(format_mac(second)), 7, frames)
        heard = {p["mac"]: p for p in stats["initiators"]}
        self.assertEqual(heard[format_mac(second)]["targets"], [_name(FILE)])
        [interface] = stats["interfaces"]
        self.assertEqual(interface["interface"], self.pair.server_if)
        self.assertGreaterEqual(interface["sent"], 11)
        yield task.deferLater(reactor, 2.1, lambda: None)  # two more reports of the worker
        stats = yield self.ctl("stats")
        self.assertEqual(_counts(stats, FILE), expected, "a report counted twice")

        # ctl add: the parent serves e1.2 at once, the worker once restarted with it.
        before = self.worker_ports()
        listing = yield self.ctl("add", f"{ADDED[0]}.{ADDED[1]}=memory:1M")
        self.assertEqual(listing["target"], _name(ADDED))
        self.assertIn(listing["state"], ("probing", "serving"))
        yield self.renewed(before)
        shares = [initiators(w, *ADDED, PER_WORKER) for w in range(WORKERS)]
        for src in (shares[0][0], shares[1][0]):
            yield self.answered(
                lambda src=src: self.peer.read(server, *ADDED, 0, src=src, timeout=0.5),
                lambda reply: reply.arg.cmd_status == ATACmdStatus.READY_STATUS,
                f"{_name(ADDED)} through {format_mac(src)}",
            )
        yield task.deferLater(reactor, 1.5, lambda: None)  # the worker's report of those
        stats = yield self.ctl("stats")
        base = _counts(stats, ADDED)
        # Every initiator, either share: a write, read back through the other share.
        for worker in range(WORKERS):
            for number, src in enumerate(shares[worker]):
                lba = 10 * worker + number
                payload = os.urandom(SECTOR_SIZE)
                replies = yield self.peer.write(server, *ADDED, lba, payload, src=src)
                self.ok(replies, f"write of {_name(ADDED)} through {format_mac(src)}")
                reader = shares[1 - worker][number]
                replies = yield self.peer.read(server, *ADDED, lba, src=reader)
                reply = self.ok(replies, f"read of {_name(ADDED)} through {format_mac(reader)}")
                self.assertEqual(reply.arg.data[:SECTOR_SIZE], payload, f"lba {lba}")
        sent = WORKERS * PER_WORKER
        expected_added = (
            base[0] + sent,
            base[1] + sent,
            base[2] + sent * SECTOR_SIZE,
            base[3] + sent * SECTOR_SIZE,
        )
        yield self.stats_until(
            lambda s: _counts(s, ADDED) == expected_added, f"{_name(ADDED)}'s sum"
        )

        # e1.1's figures after the restart: new requests through both shares count...
        for src in (first, second):
            replies = yield self.peer.read(server, *FILE, 0, src=src)
            self.ok(replies, f"read through {format_mac(src)} after the restart")

        def both_heard(stats: dict[str, Any]) -> bool:
            entry = _target(stats, FILE)
            macs = {p["mac"] for p in entry["initiators"]} if entry else set()
            return {format_mac(first), format_mac(second)} <= macs

        yield self.stats_until(both_heard, "e1.1's initiators after the restart")
        yield task.deferLater(reactor, 1.5, lambda: None)
        stats = yield self.ctl("stats")
        yield self.stop()
        # ... on top of what was counted before it.
        self.assertEqual(
            _counts(stats, FILE),
            (10, 3, 10 * SECTOR_SIZE, 3 * SECTOR_SIZE),
            "e1.1's summed counters went back when the worker was restarted",
        )

    @defer.inlineCallbacks
    def test_add_loses_no_request(self) -> Any:
        """
        Reads of the unchanged e1.1 through both shares, one every 40 ms,
        go on while ``ctl add`` of e1.2 restarts the worker: every one is
        answered (issue #12: with ``--workers`` every command applies to all
        workers, and unchanged targets keep serving with no lost request).
        """
        server = yield self.server_mac()
        yield self.worker_up()
        sources = [mac for w in range(WORKERS) for mac in initiators(w, *FILE, 2)]
        for src in sources:
            replies = yield self.peer.read(server, *FILE, 0, src=src)
            self.ok(replies, f"read through {format_mac(src)} before")
        done: defer.Deferred[None] = defer.Deferred()
        running = self.traffic(server, sources, done)
        yield task.deferLater(reactor, 0.3, lambda: None)
        before = self.worker_ports()
        yield self.ctl("add", f"{ADDED[0]}.{ADDED[1]}=memory:1M")
        yield self.renewed(before)
        yield task.deferLater(reactor, 1.0, lambda: None)
        done.callback(None)
        results = yield running
        yield self.stop()
        lost = [f"{at:.2f} s through {format_mac(src)}" for at, src, rtt in results if rtt is None]
        slowest = max(rtt for _, _, rtt in results if rtt is not None)
        self.assertEqual(
            lost,
            [],
            f"{len(lost)} of {len(results)} reads of the unchanged {_name(FILE)} were never "
            f"answered while the worker restarted (slowest answer {slowest:.2f} s)",
        )

    @defer.inlineCallbacks
    def test_set_read_only(self) -> Any:
        """
        ``ctl set e1.1 read_only=on`` applies in both processes: once the
        worker is restarted, a write through any initiator of either share
        is refused (ATA error) while reads go on, and the file is unchanged.
        No write sent after ``ctl`` answered is acknowledged or reaches the
        file, even while the worker restarts.
        """
        server = yield self.server_mac()
        yield self.worker_up()
        shares = [initiators(w, *FILE, PER_WORKER) for w in range(WORKERS)]
        for worker in range(WORKERS):
            replies = yield self.peer.write(
                server,
                *FILE,
                50 + worker,
                bytes([0xA0 + worker]) * SECTOR_SIZE,
                src=shares[worker][0],
            )
            self.ok(replies, f"write through worker {worker} before read_only")

        before = self.worker_ports()
        listing = yield self.ctl("set", _name(FILE), "read_only=on")
        self.assertTrue(listing["read_only"])
        right_after = [
            self.peer.write(server, *FILE, 60, b"\xee" * SECTOR_SIZE, src=src, timeout=5.0)
            for src in shares[1]
        ]
        yield self.renewed(before)
        yield self.answered(
            lambda: self.peer.write(
                server, *FILE, 61, b"\xee" * SECTOR_SIZE, src=shares[1][0], timeout=0.5
            ),
            lambda reply: bool(reply.arg.cmd_status & ATACmdStatus.ERR_STATUS),
            "a refused write through the restarted worker",
        )
        for worker in range(WORKERS):
            for src in shares[worker]:
                replies = yield self.peer.write(server, *FILE, 62, b"\xff" * SECTOR_SIZE, src=src)
                self.refused(replies, f"write through {format_mac(src)} (worker {worker})")
                replies = yield self.peer.read(server, *FILE, 50, count=2, src=src)
                reply = self.ok(replies, f"read through {format_mac(src)}")
                self.assertEqual(
                    reply.arg.data[: 2 * SECTOR_SIZE], b"\xa0" * SECTOR_SIZE + b"\xa1" * SECTOR_SIZE
                )
        acknowledged = [
            format_mac(replies[0].dst)
            for replies in (yield defer.gatherResults(right_after))
            if replies and replies[0].arg.cmd_status == ATACmdStatus.READY_STATUS
        ]
        yield self.stop()
        disk = self.image.read_bytes()
        self.assertEqual(disk[62 * SECTOR_SIZE : 63 * SECTOR_SIZE], bytes(range(256)) * 2)
        self.assertEqual(
            (acknowledged, disk[60 * SECTOR_SIZE : 61 * SECTOR_SIZE] == bytes(range(256)) * 2),
            ([], True),
            "writes sent through the worker's share right after `ctl set read_only=on` "
            "answered were acknowledged, and written",
        )

    @defer.inlineCallbacks
    def test_remove(self) -> Any:
        """
        ``ctl remove e1.1`` applies in both processes: once the worker is
        restarted, ``ctl list`` and ``ctl stats`` have no e1.1 and no
        initiator of either share is served it.  During ``removed_grace``
        (60 s here) each of them, whichever process its frames go to, gets
        an ATA error at once, as with one process (so that a Linux
        initiator's I/O to the removed disk fails instead of hanging until
        ``aoe_deadsecs``).
        """
        server = yield self.server_mac()
        yield self.worker_up()
        shares = [initiators(w, *FILE, PER_WORKER) for w in range(WORKERS)]
        for worker in range(WORKERS):
            replies = yield self.peer.read(server, *FILE, 0, src=shares[worker][0])
            self.ok(replies, f"read through worker {worker} before the remove")
        before = self.worker_ports()
        listing = yield self.ctl("remove", _name(FILE))
        self.assertEqual(listing["state"], "removed")
        yield self.renewed(before)
        listed = yield self.ctl("list")
        self.assertEqual(listed, [])
        yield self.stats_until(lambda s: _target(s, FILE) is None, "stats without e1.1")
        # Each initiator asks (again and again, for up to 5 s) until it gets an answer.
        sources = [(worker, src) for worker in range(WORKERS) for src in shares[worker]]
        seen = yield defer.gatherResults(
            [
                self.first_reply(
                    lambda src=src: self.peer.read(server, *FILE, 0, src=src, timeout=0.5),
                    lambda reply: True,
                    within=5.0,
                )
                for _, src in sources
            ]
        )
        answers = {}
        for (worker, src), replies in zip(sources, seen, strict=True):
            served = [
                r
                for r in replies
                if not r.header.flag_error and r.arg.cmd_status == ATACmdStatus.READY_STATUS
            ]
            self.assertEqual(served, [], f"e1.1 still served to {format_mac(src)}")
            answers[f"worker {worker} {format_mac(src)}"] = "error" if replies else "silence"
        yield self.stop()
        self.assertEqual(
            set(answers.values()),
            {"error"},
            f"during removed_grace each initiator should get an error, got {answers}",
        )
