# -*- test-case-name: tests.test_crash -*-
"""
Crash tests: ``twistd aoe`` killed with SIGKILL in the middle of a stream of writes.

The server runs as a subprocess in the server namespace of a fresh veth pair;
this process drives it from the client namespace with ``tests.peer.Peer``.
Several lanes keep writes in flight (each sector records its LBA and a
sequence number, and the rest of it is derived from both, so a torn or stale
sector is recognised), one of them interleaves FLUSH CACHE EXT and changes
to the target's state (config string, MAC mask list, reserve list, kept by
``--state-dir``).  When enough writes have been acknowledged the server is
killed with SIGKILL, writes still in flight.  It is then started again on
the same image and state directory, and every sector is read back, over the
wire and from the file, and checked:

- every write acknowledged before the last acknowledged FLUSH is there (or a
  later write to the same sector), intact;
- with ``--sync``, every acknowledged write is there;
- in every mode, since SIGKILL kills only the process and the kernel's page
  cache survives it, every acknowledged write is there too;
- no sector holds anything that was never sent;
- the config string, mask list and reserve list are what was last
  acknowledged (or the change in flight at the kill, which the state file
  may already hold).

A kernel crash or power loss cannot be staged here; ``docs/durability.md``
says what each mode survives of those.  Root only (namespaces, raw sockets).
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

from attrs import define, field
from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from aoe_twisted.core.wire import (
    SECTOR_SIZE,
    ATAArg,
    ATACmdStatus,
    ConfigCommand,
    Directive,
    DirectiveCommand,
    MACMaskCommand,
    ReserveReleaseCommand,
)
from aoe_twisted.tap import Options
from tests.netns import VethPair, require
from tests.peer import Peer
from tests.test_twistd import TWISTD

SHELF, SLOT = 5, 1
#: The sectors the stream writes, round and round: far more than are ever in flight.
REGION = 1024
#: The image: more than the region, so the sectors after it must stay zero.
IMAGE_SECTORS = 2048
#: Writes in flight at once (the Linux initiator keeps up to 16 with the default buffer count).
LANES = 12
#: How long a request may go unanswered; after the kill, every request in flight times out.
TIMEOUT = 1.0
#: The writes one lane sends between a FLUSH and a state change of the control lane.
FLUSH_EVERY = 10
STATE_EVERY = 25

_DRDY = int(ATACmdStatus.READY_STATUS)


def _has_state_dir() -> bool:
    """Whether this ``twistd aoe`` has ``--state-dir`` (persistent target state)."""
    return any(row[0] == "state-dir" for row in Options.optParameters)


def sector(lba: int, seq: int) -> bytes:
    """The sector that write ``seq`` puts at ``lba``: both numbers, then bytes derived from them."""
    head = struct.pack(">QQ", lba, seq)
    body = hashlib.sha256(f"{lba}:{seq}".encode()).digest() * 16
    return (head + body)[:SECTOR_SIZE]


def sequence_of(lba: int, data: bytes) -> int | None:
    """The write that ``data`` (read at ``lba``) is intact from, 0 for zeros, ``None`` if torn."""
    if data == bytes(SECTOR_SIZE):
        return 0
    found_lba, seq = struct.unpack(">QQ", data[:16])
    if found_lba != lba or data != sector(lba, seq):
        return None
    return int(seq)


@define
class Ledger:
    """What the client sent and what the server acknowledged, per sector and for the state."""

    sent: dict[int, list[int]] = field(factory=dict)
    acked: dict[int, int] = field(factory=dict)
    flushed: dict[int, int] = field(factory=dict)
    acked_writes: int = 0
    flushes: int = 0
    config: list[bytes] = field(factory=lambda: [b""])
    masks: list[tuple[bytes, ...]] = field(factory=lambda: [()])
    reserves: list[tuple[bytes, ...]] = field(factory=lambda: [()])


class CrashTests(TestCase):
    """SIGKILL mid-stream, restart, and every acknowledged byte and state change is still there."""

    timeout = 180

    def setUp(self) -> None:
        require(self)
        self.pair = VethPair.create(self)
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir(parents=True)
        self.image = self.work / "disk.img"
        with open(self.image, "wb") as f:
            f.truncate(IMAGE_SECTORS * SECTOR_SIZE)
        self.state_dir = self.work / "state"
        self.peer = Peer(self.pair.client_if, self.pair.client_ns)
        self.peer.start()
        self.addCleanup(self.peer.stop)
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    # -- the server ------------------------------------------------------------

    def start_server(self, *options: str) -> None:
        """Start ``twistd -n aoe`` on the image (its output to ``serverN.log``)."""
        self.runs += 1
        argv = [*TWISTD, "-n", "--pidfile=", "aoe", "--iface", self.pair.server_if,
                "--backend", f"file:{self.image}", "--shelf", str(SHELF), "--slot", str(SLOT),
                *options]
        if _has_state_dir():
            argv += ["--state-dir", str(self.state_dir)]
        log = open(self.work / f"server{self.runs}.log", "wb")  # noqa: SIM115
        self.addCleanup(log.close)
        # ip netns exec execs the command: the pid is the server's own.
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.pair.server_ns, *argv],
            stdout=log, stderr=subprocess.STDOUT, cwd=str(self.work),
        )
        self.addCleanup(self._reap, self.proc)

    @staticmethod
    def _reap(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    def server_log(self) -> str:
        """Every run's output, for failure messages."""
        return "\n".join(
            (self.work / f"server{n}.log").read_text(errors="replace")
            for n in range(1, self.runs + 1)
        )

    @defer.inlineCallbacks
    def find_server(self) -> defer.Generator[Any, Any, bytes]:
        """Discover the target; return the server's MAC."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            replies = yield self.peer.discover(SHELF, SLOT, timeout=0.3)
            if replies:
                return replies[0].src
            assert self.proc is not None
            if self.proc.poll() is not None:
                self.fail(f"twistd exited early:\n{self.server_log()}")
        self.fail(f"the server never answered discovery:\n{self.server_log()}")

    @defer.inlineCallbacks
    def stop_server(self) -> defer.Generator[Any, Any, None]:
        """SIGTERM the server and wait until it exits."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        for _ in range(400):
            if self.proc.poll() is not None:
                return
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.fail("twistd did not exit after SIGTERM")

    # -- the stream --------------------------------------------------------------

    @defer.inlineCallbacks
    def stream(self, server: bytes, kill_at: int) -> defer.Generator[Any, Any, Ledger]:
        """
        Write, flush and change state until ``kill_at`` writes are acknowledged, then SIGKILL.

        Returns once every request in flight at the kill has been answered or
        has timed out.
        """
        ledger = Ledger()
        seqs = iter(range(1, 10**9))
        killed = False
        peer = self.peer
        fake = [bytes.fromhex(f"02000000{n:04x}") for n in range(1, 5)]

        def kill() -> None:
            nonlocal killed
            if not killed:
                killed = True
                assert self.proc is not None
                os.kill(self.proc.pid, signal.SIGKILL)

        @defer.inlineCallbacks
        def write_one() -> defer.Generator[Any, Any, bool]:
            """Write the next sequence number; return whether it was acknowledged."""
            seq = next(seqs)
            lba = seq % REGION
            ledger.sent.setdefault(lba, []).append(seq)
            replies = yield peer.write(server, SHELF, SLOT, lba, sector(lba, seq),
                                       timeout=TIMEOUT)
            if replies and replies[0].arg.cmd_status == _DRDY:
                if seq > ledger.acked.get(lba, 0):
                    ledger.acked[lba] = seq
                ledger.acked_writes += 1
                if ledger.acked_writes >= kill_at:
                    kill()
                return True
            return False

        @defer.inlineCallbacks
        def flush() -> defer.Generator[Any, Any, None]:
            # A FLUSH covers every write acknowledged before it was sent.
            covered = dict(ledger.acked)
            arg = ATAArg(flag_lba48_extended=True, cmd_status=ATACmdStatus.FLUSH_EXT)
            replies = yield peer.ata(server, SHELF, SLOT, arg, timeout=TIMEOUT)
            if replies and replies[0].arg.cmd_status == _DRDY:
                for lba, seq in covered.items():
                    ledger.flushed[lba] = max(seq, ledger.flushed.get(lba, 0))
                ledger.flushes += 1

        @defer.inlineCallbacks
        def change_state(n: int) -> defer.Generator[Any, Any, None]:
            # Each change is sent only after the one before it was answered, so
            # at the kill at most one is in flight: the last entry of each list.
            config = f"generation {n}".encode()
            ledger.config.append(config)
            replies = yield peer.config(server, SHELF, SLOT, ConfigCommand.FORCE_SET, config,
                                        timeout=TIMEOUT)
            if not replies:
                return
            ledger.config = [config]
            # The mask list always holds the peer (else it would lock itself out).
            add, drop = fake[n % 4], fake[(n + 2) % 4]
            directives = [Directive(DirectiveCommand.ADD, peer.mac),
                          Directive(DirectiveCommand.ADD, add),
                          Directive(DirectiveCommand.DELETE, drop)]
            current = [mac for mac in ledger.masks[0] if mac != drop]
            for mac in (peer.mac, add):
                if mac not in current:
                    current.append(mac)
            ledger.masks.append(tuple(current))
            replies = yield peer.mask(server, SHELF, SLOT, MACMaskCommand.EDIT, directives,
                                      timeout=TIMEOUT)
            if not replies or replies[0].header.flag_error:
                return
            ledger.masks = [tuple(d.mac for d in replies[0].arg.directives)]
            reserve = (peer.mac, fake[n % 4])
            ledger.reserves.append(reserve)
            replies = yield peer.reserve(server, SHELF, SLOT, ReserveReleaseCommand.FORCE_SET,
                                         reserve, timeout=TIMEOUT)
            if replies and not replies[0].header.flag_error:
                ledger.reserves = [reserve]

        @defer.inlineCallbacks
        def lane(number: int) -> defer.Generator[Any, Any, None]:
            # A lane goes on writing after the kill until a write of its own
            # goes unanswered: the server dies with writes in flight, however
            # quickly it answered the ones before.
            done = 0
            while True:
                acknowledged = yield write_one()
                if killed and not acknowledged:
                    return
                done += 1
                if number == 0 and done % FLUSH_EVERY == 0:
                    yield flush()
                if number == 0 and _has_state_dir() and done % STATE_EVERY == 0:
                    yield change_state(done // STATE_EVERY)

        yield defer.gatherResults([lane(n) for n in range(LANES)], consumeErrors=True)
        return ledger

    # -- checking ------------------------------------------------------------------

    @defer.inlineCallbacks
    def read_back(self, server: bytes) -> defer.Generator[Any, Any, dict[int, bytes]]:
        """Read every sector of the image over the wire, a few at a time."""
        found: dict[int, bytes] = {}
        lbas = iter(range(IMAGE_SECTORS))

        @defer.inlineCallbacks
        def reader() -> defer.Generator[Any, Any, None]:
            for lba in lbas:
                for _ in range(5):
                    replies = yield self.peer.read(server, SHELF, SLOT, lba, timeout=TIMEOUT)
                    if replies:
                        break
                else:
                    self.fail(f"no answer reading sector {lba}")
                self.assertEqual(replies[0].arg.cmd_status, _DRDY)
                found[lba] = replies[0].arg.data[:SECTOR_SIZE]

        yield defer.gatherResults([reader() for _ in range(8)], consumeErrors=True)
        return found

    def check_sectors(self, ledger: Ledger, sectors: dict[int, bytes], sync: bool,
                      where: str) -> None:
        """Check every sector against what was sent, acknowledged and flushed."""
        problems = []
        for lba in range(IMAGE_SECTORS):
            seq = sequence_of(lba, sectors[lba])
            sent = ledger.sent.get(lba, [])
            if seq is None:
                problems.append(f"sector {lba} is torn or foreign")
                continue
            if seq and seq not in sent:
                problems.append(f"sector {lba} holds write {seq}, never sent there")
            flushed = ledger.flushed.get(lba, 0)
            acked = ledger.acked.get(lba, 0)
            if seq < flushed:
                problems.append(f"sector {lba}: write {flushed} was flushed, found {seq}")
            if seq < acked:
                mode = "--sync" if sync else "a process crash (page cache kept)"
                problems.append(f"sector {lba}: write {acked} was acknowledged, found {seq}; "
                                f"{mode} must keep it")
        self.assertEqual(problems[:20], [], f"{where}: {len(problems)} problems")

    @defer.inlineCallbacks
    def check_state(self, server: bytes, ledger: Ledger) -> defer.Generator[Any, Any, None]:
        """The config string, mask list and reserve list are as last acknowledged (or newer)."""
        replies = yield self.peer.config(server, SHELF, SLOT, ConfigCommand.READ)
        self.assertIn(replies[0].arg.string, ledger.config)
        replies = yield self.peer.mask(server, SHELF, SLOT, MACMaskCommand.READ)
        masks = tuple(d.mac for d in replies[0].arg.directives)
        self.assertIn(masks, ledger.masks)
        replies = yield self.peer.reserve(server, SHELF, SLOT, ReserveReleaseCommand.READ)
        self.assertIn(tuple(replies[0].arg.macs), ledger.reserves)

    # -- the scenario ------------------------------------------------------------------

    @defer.inlineCallbacks
    def crash_and_check(self, *options: str) -> defer.Generator[Any, Any, None]:
        """Stream, SIGKILL, restart with the same ``options``, check everything."""
        sync = "--sync" in options
        rng = random.Random()
        seed = rng.randrange(1 << 32)
        rng.seed(seed)
        kill_at = rng.randrange(1500, 3000)
        self.start_server(*options)
        server = yield self.find_server()
        ledger = yield self.stream(server, kill_at)
        assert self.proc is not None
        for _ in range(100):
            if self.proc.poll() is not None:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.proc.returncode, -signal.SIGKILL, self.server_log())
        self.assertGreaterEqual(ledger.acked_writes, kill_at)
        self.assertGreater(ledger.flushes, 0)
        unacked = sum(len(s) for s in ledger.sent.values()) - ledger.acked_writes
        self.assertGreater(unacked, 0, "the kill came after the stream, not during it")
        if _has_state_dir():
            self.assertIn(b"generation", ledger.config[0])

        self.start_server(*options)
        server = yield self.find_server()
        sectors = yield self.read_back(server)
        self.check_sectors(ledger, sectors, sync, f"over the wire (seed {seed})")
        if _has_state_dir():
            yield self.check_state(server, ledger)
        # TODO(state): without --state-dir (not in this twistd aoe) the state
        # part of the check cannot run: the target forgets it on restart.
        yield self.stop_server()
        data = self.image.read_bytes()
        from_file = {lba: data[lba * SECTOR_SIZE : (lba + 1) * SECTOR_SIZE]
                     for lba in range(IMAGE_SECTORS)}
        self.check_sectors(ledger, from_file, sync, f"in the image file (seed {seed})")

    def test_default(self) -> None:
        """Default mode: flushed writes survive SIGKILL, and (page cache) acknowledged ones."""
        return self.crash_and_check()

    def test_sync(self) -> None:
        """--sync: every acknowledged write survives SIGKILL."""
        return self.crash_and_check("--sync")

    def test_direct_sync(self) -> None:
        """--direct --sync: the same, with the page cache bypassed."""
        return self.crash_and_check("--direct", "--sync")
