"""
End-to-end tests of duplicate-address detection: two real ``twistd aoe`` on one segment.

The segment is a Linux bridge in a namespace of its own; each host (server
A, server B, the client C) is a namespace with one veth port on that bridge,
so every host has its own MAC and hears the others' broadcasts, as on a
switch.  The servers run as ``twistd -n aoe --control SOCKET`` and are looked
at with ``aoe-twisted ctl list --json`` (run in this process against the real
socket); the client is ``tests.peer.Peer``, which shows every MAC that
answers.

What each side does (``aoe_twisted.core.duplicates``, ``AoEProtocol``): a
server starting to serve an address broadcasts a config query for it and
waits ``--duplicate-wait`` seconds ("probing").  Any response for that
address from another MAC -- an answer to the probe, or later another
server's start-up announcement -- makes it ask that server for IDENTIFY and
compare disk identities: the same disk (the same file on this host) is a
second path, listed in ``paths``; another disk is a duplicate, and the
address is then not served (or no longer served) here, with a critical line
naming both MACs, and listed as state ``duplicate``.  Only responses count:
a server that merely probes, or that refused the address, says nothing the
other side can hear, so the side that refuses is the one that heard the other.
With ``--workers`` the main process probes and judges for every process:
the others must not answer for an address it has not settled or refused.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from attrs import frozen
from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from aoe_twisted.control import ctl
from aoe_twisted.core.wire import SECTOR_SIZE, ATACmdStatus, format_mac
from aoe_twisted.net.fanout import fanout_index
from aoe_twisted.net.netns import NETNS_RUN_DIR
from tests.netns import require, run
from tests.peer import Peer, Reply
from tests.test_twistd import TwistdProcessMixin, _twistd

SHELF, SLOT = 5, 0
#: How long a server may take to start and settle on a loaded machine.
SETTLE_TIMEOUT = 30.0
#: The critical line's start (``AoEProtocol._judged``) as twistd's log shows it: level and text.
CRITICAL = "#critical] duplicate address on aoe0:"

_counter = itertools.count(1)


@frozen
class Host:
    """One host on the segment: its namespace, its interface and that interface's MAC."""

    name: str
    netns: str
    interface: str
    mac: bytes


def _delete_namespace(name: str) -> None:
    """Delete namespace ``name`` if it is still there (and the interfaces in it)."""
    if os.path.exists(os.path.join(NETNS_RUN_DIR, name)):
        run("ip", "netns", "delete", name)


def make_segment(case: TestCase, *names: str) -> dict[str, Host]:
    """
    Make a bridge in a new namespace and one new namespace per name, each with a port on it.

    Each host's interface is ``aoe0`` with the MAC ``02:00:00:00:0d:NN``
    (NN: its place in ``names``, from 1); the bridge's ports are up with no
    STP, so they forward at once.  ``case``'s cleanup deletes every namespace.
    """
    require(case)
    base = f"aoe-t-{os.getpid()}-dup{next(_counter)}"
    bridge_ns = f"{base}-seg"
    run("ip", "netns", "add", bridge_ns)
    case.addCleanup(_delete_namespace, bridge_ns)
    run("ip", "-n", bridge_ns, "link", "add", "br0", "type", "bridge", "stp_state", "0")
    run("ip", "-n", bridge_ns, "link", "set", "br0", "up")
    hosts = {}
    for number, name in enumerate(names, start=1):
        host = Host(name, f"{base}-{name}", "aoe0", bytes([2, 0, 0, 0, 0x0D, number]))
        port = f"port{number}"
        run("ip", "netns", "add", host.netns)
        case.addCleanup(_delete_namespace, host.netns)
        run(
            "ip", "-n", bridge_ns, "link", "add", port, "type", "veth", "peer", "name",
            host.interface, "netns", host.netns, "address", format_mac(host.mac),
        )  # fmt: skip
        run("ip", "-n", bridge_ns, "link", "set", port, "master", "br0", "up")
        run("ip", "-n", host.netns, "link", "set", host.interface, "up")
        hosts[name] = host
    deadline = time.monotonic() + 10
    ends = [(bridge_ns, f"port{n}") for n in range(1, len(names) + 1)]
    ends += [(h.netns, h.interface) for h in hosts.values()]
    while True:
        states = [run("ip", "-n", ns, "-o", "link", "show", "dev", dev) for ns, dev in ends]
        if all(" state UP " in state for state in states):
            return hosts
        if time.monotonic() > deadline:
            raise RuntimeError(f"the segment did not come up: {states}")
        time.sleep(0.02)


def _image(path: Path, fill: bytes) -> Path:
    """Write a 1 MiB disk image whose every sector is ``fill`` repeated; return its path."""
    path.write_bytes(fill * ((1 << 20) // len(fill)))
    return path


class Server:
    """A ``twistd aoe`` serving e5.0 on one host, with a control socket."""

    def __init__(self, case: DuplicatesTests, host: Host, backend: str, *options: str) -> None:
        self.case = case
        self.host = host
        self.socket = os.path.join(case.directory, f"{host.name}.sock")
        self.proc: subprocess.Popen[str] = _twistd(
            "aoe", "--iface", host.interface, "--target", f"{SHELF}.{SLOT}={backend}",
            "--control", self.socket, *options,
            netns=host.netns,
        )  # fmt: skip
        case.addCleanup(case._kill, self.proc)

    @defer.inlineCallbacks
    def listing(self) -> Any:
        """Return e5.0's ``ctl list --json`` entry (waiting for the control socket to be there)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                self.case.fail(f"server {self.host.name} exited: {self.proc.communicate()[0]}")
            out = io.StringIO()
            args = ctl.build_parser().parse_args(["--socket", self.socket, "list", "--json"])
            try:
                yield defer.Deferred.fromCoroutine(ctl.run(reactor, args, out))
            except ctl.CtlError as e:
                if "cannot connect" not in str(e) or time.monotonic() > deadline:
                    raise
                yield task.deferLater(reactor, 0.1, lambda: None)
                continue
            [entry] = json.loads(out.getvalue())
            return entry

    def settled(self) -> Any:
        """Wait until e5.0 is no longer ``probing`` here; fire with its listing."""
        return self.until(lambda entry: entry["state"] != "probing", "the end of probing")

    @defer.inlineCallbacks
    def until(self, check: Any, what: str) -> Any:
        """Poll the listing until ``check(entry)`` holds; return the entry."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            entry = yield self.listing()
            if check(entry):
                return entry
            if time.monotonic() > deadline:
                self.case.fail(f"server {self.host.name}: {what} never came: {entry}")
            yield task.deferLater(reactor, 0.1, lambda: None)

    def stop(self) -> Any:
        """Stop the server cleanly; fire with its whole output."""
        return self.case.stop_cleanly(self.proc)


class DuplicatesTests(TwistdProcessMixin, TestCase):
    """Servers A and B and the client C on one bridged segment, e5.0 served by A and/or B."""

    timeout = 120

    def setUp(self) -> None:
        require(self)
        self.hosts = make_segment(self, "a", "b", "c")
        # A short path: a UNIX socket's name is at most 107 bytes.
        self.directory = tempfile.mkdtemp(prefix="aoedup-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.x = _image(Path(self.directory) / "x.img", b"X")
        self.y = _image(Path(self.directory) / "y.img", b"Y")
        client = self.hosts["c"]
        self.peer = Peer(client.interface, client.netns)
        self.peer.start()
        self.addCleanup(self.peer.stop)

    @property
    def a(self) -> Host:
        return self.hosts["a"]

    @property
    def b(self) -> Host:
        return self.hosts["b"]

    @defer.inlineCallbacks
    def answering(self) -> Any:
        """Return the MACs that answer a broadcast config query for e5.0 (asked twice)."""
        macs: set[bytes] = set()
        for _ in range(2):
            replies = yield self.peer.discover(SHELF, SLOT, timeout=0.7)
            macs.update(reply.src for reply in replies)
        return macs

    @defer.inlineCallbacks
    def read_sector(self, server: bytes, timeout: float = 3.0, src: bytes | None = None) -> Any:
        """Read e5.0's sector 7 from ``server``; return its bytes, or ``None`` if unanswered."""
        replies: list[Reply] = yield self.peer.read(
            server, SHELF, SLOT, 7, src=src, timeout=timeout
        )
        if not replies:
            return None
        self.assertFalse(replies[0].header.flag_error, replies[0])
        self.assertEqual(replies[0].arg.cmd_status, ATACmdStatus.READY_STATUS)
        return replies[0].arg.data[:SECTOR_SIZE]

    def critical_lines(self, out: str) -> list[str]:
        """The duplicate-address lines in a server's output."""
        return [line for line in out.splitlines() if CRITICAL in line]

    @defer.inlineCallbacks
    def test_different_disk_is_refused(self) -> Any:
        """
        A serves e5.0 = file X; B then starts e5.0 = file Y on the segment.
        B's probe is answered by A, B asks A for IDENTIFY, finds another disk,
        and refuses: one critical line naming A's and B's MACs, ``ctl list``
        state ``duplicate`` with ``duplicate_of`` A.  A hears nothing from B
        (B never answers for e5.0) and keeps serving.  The client sees A's
        MAC alone answer for e5.0 and reads X; B does not answer a read.
        """
        a = Server(self, self.a, f"file:{self.x}")
        entry = yield a.settled()
        self.assertEqual(entry["state"], "serving")
        b = Server(self, self.b, f"file:{self.y}")
        entry = yield b.settled()
        self.assertEqual(entry["state"], "duplicate", entry)
        self.assertEqual(entry["duplicate_of"], format_mac(self.a.mac))
        self.assertEqual(entry["paths"], [])

        macs = yield self.answering()
        self.assertEqual(macs, {self.a.mac})
        data = yield self.read_sector(self.a.mac)
        self.assertEqual(data, b"X" * SECTOR_SIZE)
        data = yield self.read_sector(self.b.mac, timeout=1.0)
        self.assertIsNone(data, "B answered a read for an address it refused")

        entry = yield a.listing()
        self.assertEqual(
            (entry["state"], entry["duplicate_of"], entry["paths"]), ("serving", None, [])
        )
        out_b = yield b.stop()
        out_a = yield a.stop()
        [line] = self.critical_lines(out_b)
        self.assertIn(f"{format_mac(self.a.mac)} also answers for this address", line)
        self.assertIn(f"not serving it from {format_mac(self.b.mac)}", line)
        self.assertIn("a different disk", line)
        self.assertIn(f"e{SHELF}.{SLOT} = file:{self.y}", line)
        self.assertEqual(self.critical_lines(out_a), [])
        self.assertNotIn(f"serving e{SHELF}.{SLOT}", out_b)

    @defer.inlineCallbacks
    def test_same_disk_is_a_second_path(self) -> Any:
        """
        A and B both serve e5.0 = the same file X (same host, device and
        inode: the same disk identity).  B's probe is answered by A, whose
        IDENTIFY shows the same disk: B serves, with A in its ``paths``;
        B's start-up announcement makes A find B the same way.  No critical
        line.  The client sees both MACs answer for e5.0 (multipath), reads
        the same data from both, and a write through one is read through the
        other.
        """
        a = Server(self, self.a, f"file:{self.x}")
        entry = yield a.settled()
        self.assertEqual(entry["state"], "serving")
        b = Server(self, self.b, f"file:{self.x}")
        entry = yield b.settled()
        self.assertEqual(entry["state"], "serving", entry)
        self.assertIsNone(entry["duplicate_of"])
        self.assertEqual(entry["paths"], [format_mac(self.a.mac)])
        entry = yield a.until(lambda e: e["paths"], "A learning of B")
        self.assertEqual(
            (entry["state"], entry["duplicate_of"], entry["paths"]),
            ("serving", None, [format_mac(self.b.mac)]),
        )

        macs = yield self.answering()
        self.assertEqual(macs, {self.a.mac, self.b.mac})
        for server in (self.a.mac, self.b.mac):
            data = yield self.read_sector(server)
            self.assertEqual(data, b"X" * SECTOR_SIZE, format_mac(server))
        payload = os.urandom(SECTOR_SIZE)
        replies = yield self.peer.write(self.b.mac, SHELF, SLOT, 7, payload)
        self.assertEqual(replies[0].arg.cmd_status, ATACmdStatus.READY_STATUS)
        data = yield self.read_sector(self.a.mac)
        self.assertEqual(data, payload)

        out_b = yield b.stop()
        out_a = yield a.stop()
        for out in (out_a, out_b):
            self.assertEqual(self.critical_lines(out), [])
        self.assertIn(f"{format_mac(self.a.mac)} serves the same disk (a second path)", out_b)
        self.assertIn(f"{format_mac(self.b.mac)} serves the same disk (a second path)", out_a)

    @defer.inlineCallbacks
    def test_later_server_refuses(self) -> Any:
        """
        B serves e5.0 = file Y first; A starts later with e5.0 = a memory
        disk (which has no identity, so it cannot be the same disk as
        anything).  A's probe is answered by B: A refuses (critical line,
        state ``duplicate`` of B) and never answers.  B only ever hears A's
        requests (its probe, its IDENTIFY), never a response, so B keeps
        serving and knows of no duplicate: the client sees B alone.
        """
        b = Server(self, self.b, f"file:{self.y}")
        entry = yield b.settled()
        self.assertEqual(entry["state"], "serving")
        a = Server(self, self.a, "memory:1M")
        entry = yield a.settled()
        self.assertEqual(entry["state"], "duplicate", entry)
        self.assertEqual(entry["duplicate_of"], format_mac(self.b.mac))

        macs = yield self.answering()
        self.assertEqual(macs, {self.b.mac})
        data = yield self.read_sector(self.b.mac)
        self.assertEqual(data, b"Y" * SECTOR_SIZE)
        entry = yield b.listing()
        self.assertEqual(
            (entry["state"], entry["duplicate_of"], entry["paths"]), ("serving", None, [])
        )
        out_a = yield a.stop()
        out_b = yield b.stop()
        [line] = self.critical_lines(out_a)
        self.assertIn(f"{format_mac(self.b.mac)} also answers for this address", line)
        self.assertIn(f"not serving it from {format_mac(self.a.mac)}", line)
        self.assertIn("world-wide name", line)
        self.assertEqual(self.critical_lines(out_b), [])

    @defer.inlineCallbacks
    def test_serving_server_hears_announcement(self) -> Any:
        """
        B serves e5.0 = file Y first, with a mask list holding only the
        client's MAC, so it does not answer A's probe; A then starts with
        e5.0 = file X, hears nobody in its probe, serves and announces.  B,
        still watching, hears A's announcement, asks A for IDENTIFY, finds
        another disk and stops serving e5.0 (critical line, state
        ``duplicate`` of A): B cannot tell who came first, and an address
        answered by two disks is the one outcome not allowed.  A heard no
        response from B (masked), so A serves on: exactly one server is
        left, and the client reads A's disk.
        """
        client = format_mac(self.hosts["c"].mac)
        b = Server(self, self.b, f"file:{self.y},mask={client}")
        entry = yield b.settled()
        self.assertEqual(entry["state"], "serving")
        self.assertEqual(entry["mask"], [client])
        a = Server(self, self.a, f"file:{self.x}")
        entry = yield a.settled()
        self.assertEqual(entry["state"], "serving", "A heard B despite B's mask")
        entry = yield b.until(lambda e: e["state"] != "serving", "B noticing A")
        self.assertEqual(entry["state"], "duplicate", entry)
        self.assertEqual(entry["duplicate_of"], format_mac(self.a.mac))

        macs = yield self.answering()
        self.assertEqual(macs, {self.a.mac})
        data = yield self.read_sector(self.a.mac)
        self.assertEqual(data, b"X" * SECTOR_SIZE)
        entry = yield a.listing()
        self.assertEqual((entry["state"], entry["duplicate_of"]), ("serving", None))
        out_b = yield b.stop()
        out_a = yield a.stop()
        [line] = self.critical_lines(out_b)
        self.assertIn(f"{format_mac(self.a.mac)} also answers for this address", line)
        self.assertIn(f"not serving it from {format_mac(self.b.mac)}", line)
        self.assertEqual(self.critical_lines(out_a), [])

    @defer.inlineCallbacks
    def test_no_wait_never_two_disks(self) -> Any:
        """
        B serves e5.0 = file Y; A starts with e5.0 = file X and
        ``--duplicate-wait 0``: it serves at once and announces, while its
        probe is still out.  Both then hear the other: A hears B's answer to
        its probe, B hears A's announcement, and each refuses the address
        (the issue's rule: whoever hears another server with another disk
        stops answering for it, loudly).  What must never happen is two
        disks answering for one address: the client's reads would alternate
        between them.  Each asks again later (``DUPLICATE_RECHECK``, staggered
        by MAC), so one of them serves again once it is alone.
        """
        b = Server(self, self.b, f"file:{self.y}")
        entry = yield b.settled()
        self.assertEqual(entry["state"], "serving")
        a = Server(self, self.a, f"file:{self.x}", "--duplicate-wait", "0")
        yield a.settled()
        # Let both sides finish judging (IDENTIFY, or its 1 s timeout).
        yield task.deferLater(reactor, 2.0, lambda: None)
        entry_a = yield a.listing()
        entry_b = yield b.listing()
        macs = yield self.answering()
        out_b = yield b.stop()
        out_a = yield a.stop()
        states = {"A": entry_a["state"], "B": entry_b["state"]}
        self.assertNotEqual(sorted(states.values()), ["serving", "serving"], states)
        self.assertLessEqual(len(macs), 1, "two servers answer for one address")
        for name, state in states.items():
            if state == "duplicate":
                out = out_a if name == "A" else out_b
                self.assertEqual(len(self.critical_lines(out)), 1, name)

    @defer.inlineCallbacks
    def test_workers_server_refuses(self) -> Any:
        """
        As ``test_later_server_refuses``, with the later server started
        ``--workers 2``: B serves e5.0 = file Y; A starts ``--workers 2
        --duplicate-wait 3`` with e5.0 = file X.  A's main process probes
        and judges for all of A's processes: no process of A answers for
        e5.0 while it probes, whichever of them the fanout gives an
        initiator's frames to; it hears B's answers even though the fanout
        hash of B's MAC and e5.0 gives B's frames to A's worker process;
        then A refuses, and still no process of A answers for e5.0.
        """
        self.assertEqual(fanout_index(self.b.mac, SHELF, SLOT, 2), 1)
        b = Server(self, self.b, f"file:{self.y}")
        entry = yield b.settled()
        self.assertEqual(entry["state"], "serving")
        a = Server(self, self.a, f"file:{self.x}", "--workers", "2", "--duplicate-wait", "3")
        shares = [
            next(
                bytes([2, 0, 0, 0, 0x5D, last])
                for last in range(1, 256)
                if fanout_index(bytes([2, 0, 0, 0, 0x5D, last]), SHELF, SLOT, 2) == worker
            )
            for worker in range(2)
        ]
        answered = {}
        entry = yield a.listing()
        while entry["state"] == "probing":
            for worker, src in enumerate(shares):
                replies = yield self.peer.read(self.a.mac, SHELF, SLOT, 7, src=src, timeout=0.3)
                if replies:
                    answered[f"process {worker} while probing"] = True
            entry = yield a.listing()
        self.assertEqual(entry["state"], "duplicate", entry)
        self.assertEqual(entry["duplicate_of"], format_mac(self.b.mac))
        for worker, src in enumerate(shares):
            replies = yield self.peer.read(self.a.mac, SHELF, SLOT, 7, src=src, timeout=1.0)
            if replies:
                answered[f"process {worker} once refused"] = True
        macs = yield self.answering()
        out_a = yield a.stop()
        yield b.stop()
        self.assertEqual(answered, {}, f"A answered for e{SHELF}.{SLOT}")
        self.assertEqual(macs, {self.b.mac})
        [line] = self.critical_lines(out_a)
        self.assertIn(f"not serving it from {format_mac(self.a.mac)}", line)

    @defer.inlineCallbacks
    def test_workers_server_probes_and_watches(self) -> Any:
        """
        A serves e5.0 = file X with ``--workers 2 --duplicate-wait 3`` and a
        mask list of the client's MACs only.  While A probes, none of A's
        processes answers for e5.0, whichever of them the fanout gives an
        initiator's frames to.  Then B starts with e5.0 = file Y: A is
        masked to it, so B hears nobody, serves and announces.  A's main
        process, which watches for all of A's processes, must hear that
        announcement even though the fanout hash of B's MAC and e5.0 gives
        it to A's worker process: A then refuses e5.0, as a single process
        does (``test_serving_server_hears_announcement``), and B is left
        alone answering for it.
        """
        self.assertEqual(fanout_index(self.b.mac, SHELF, SLOT, 2), 1)
        shares = [
            next(
                bytes([2, 0, 0, 0, 0x5D, last])
                for last in range(1, 256)
                if fanout_index(bytes([2, 0, 0, 0, 0x5D, last]), SHELF, SLOT, 2) == worker
            )
            for worker in range(2)
        ]
        allowed = [self.hosts["c"].mac, *shares]
        mask = ",".join(f"mask={format_mac(mac)}" for mac in allowed)
        a = Server(self, self.a, f"file:{self.x},{mask}", "--workers", "2", "--duplicate-wait", "3")
        answered_while_probing = []
        entry = yield a.listing()
        while entry["state"] == "probing":
            for worker, src in enumerate(shares):
                replies = yield self.peer.read(self.a.mac, SHELF, SLOT, 7, src=src, timeout=0.3)
                if replies:
                    answered_while_probing.append(worker)
            entry = yield a.listing()
        self.assertEqual(entry["state"], "serving", entry)
        for src in shares:
            data = yield self.read_sector(self.a.mac, src=src)
            self.assertEqual(data, b"X" * SECTOR_SIZE)

        b = Server(self, self.b, f"file:{self.y}")
        entry = yield b.settled()
        self.assertEqual(entry["state"], "serving", "B heard A despite A's mask")
        # Time for A to ask B for IDENTIFY and judge (or for its 1 s timeout).
        yield task.deferLater(reactor, 2.0, lambda: None)
        entry = yield a.listing()
        macs = yield self.answering()
        yield a.stop()
        yield b.stop()
        self.assertEqual(
            sorted(set(answered_while_probing)), [], "A's processes that answered while probing"
        )
        self.assertEqual(
            (entry["state"], entry["duplicate_of"]), ("duplicate", format_mac(self.b.mac))
        )
        self.assertEqual(macs, {self.b.mac})
