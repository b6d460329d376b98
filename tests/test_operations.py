# -*- test-case-name: tests.test_operations -*-
"""
Operations end to end (#12): the config file, the control socket, reload and metrics.

Every test runs the real ``twistd -n aoe --config FILE`` (a subprocess) in
the server namespace of a veth pair the test creates, and talks to it the
ways an administrator and an initiator would:

- the user-space initiator (``AoEClient``) in this process, in the client
  namespace, discovers, opens, reads and writes the targets; ``tests.peer.Peer``
  sends single raw requests where a test must see one reply (or none);
- ``aoe-twisted ctl --socket PATH ...`` is the real command, run in a
  subprocess (a UNIX socket path is reachable from any network namespace);
- ``SIGHUP`` is a real signal to the server process;
- ``/metrics`` is fetched over HTTP from inside the server namespace (the
  endpoint listens on that namespace's loopback), and parsed with
  ``prometheus_client``'s own parser.

Each test starts its own server (under a second: the changes one test makes
must not leak into another), and ``tearDown`` stops it with SIGTERM and
checks it stopped cleanly with no traceback in its log.  The malformed
config files are checked against ``twistd aoe --config`` without a network:
start-up stops before any interface is opened.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aoe_twisted.control import ctl
from aoe_twisted.core.wire import SECTOR_SIZE, ATACmdStatus, ConfigCommand, format_mac
from aoe_twisted.core.wire import ATAError as ATAErrorBit
from aoe_twisted.initiator.client import AoEClient, ATAError, RemoteDisk
from tests.netns import VethPair, require, run
from tests.peer import Peer, Reply
from tests.test_twistd import TWISTD, child_pids

MiB = 1 << 20
#: An ATA reply's status when the command failed: ERR with DRDY.
ERR_DRDY = int(ATACmdStatus.ERR_STATUS) | int(ATACmdStatus.READY_STATUS)
#: How long a raw request waits before the test calls the target silent.
SILENCE = 0.4
#: A MAC no interface of the tests has (locally administered).
STRANGER = "02:00:5e:00:00:99"


def pattern(size: int, seed: int) -> bytes:
    """Return ``size`` reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


def sleep(seconds: float) -> defer.Deferred[None]:
    """Fire after ``seconds`` without blocking the reactor."""
    return task.deferLater(reactor, seconds, lambda: None)


def toml_value(value: object) -> str:
    """Write ``value`` (bool, number, string or list of them) as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(value)


def toml(server: Mapping[str, object], targets: Sequence[Mapping[str, object]]) -> str:
    """A config file: ``[server]`` with ``server``'s keys, then one ``[[target]]`` each."""
    lines = ["[server]"] + [f"{key} = {toml_value(value)}" for key, value in server.items()]
    for target in targets:
        lines += ["", "[[target]]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in target.items()]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename: a reload never reads half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def by_target(listing: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Index a ``ctl list``/``stats`` list of targets by their name."""
    return {entry["target"]: entry for entry in listing}


class ServedConfig:
    """
    ``twistd -n aoe --config FILE`` in the server namespace of ``pair``.

    ``directory`` holds the config file, the control socket and the server's
    log (its standard output and error): a short path under /tmp, since a
    socket path is at most 107 bytes.
    """

    def __init__(self, case: TestCase, pair: VethPair, directory: Path) -> None:
        self.case = case
        self.pair = pair
        self.directory = directory
        self.config = directory / "aoe.toml"
        self.socket = str(directory / "control.sock")
        self.log_path = directory / "twistd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    def server_keys(self, **extra: object) -> dict[str, object]:
        """The ``[server]`` table every test uses, with ``extra`` keys."""
        keys: dict[str, object] = {
            "interfaces": [self.pair.server_if],
            "control": self.socket,
            "duplicate_wait": 0.2,
        }
        keys.update(extra)
        return keys

    def write(self, targets: Sequence[Mapping[str, object]], **server: object) -> None:
        """Write the config file: the test's targets and ``[server]`` keys."""
        write_atomically(self.config, toml(self.server_keys(**server), targets))

    def log(self) -> str:
        """Everything the server wrote so far."""
        return self.log_path.read_text(errors="replace")

    async def start(self) -> list[dict[str, Any]]:
        """Start the server; return ``ctl list --json`` once every target is serving."""
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 (closed in kill())
        argv = ["ip", "netns", "exec", self.pair.server_ns, *TWISTD, "-n", "--pidfile=",
                "aoe", "--config", str(self.config)]
        self.proc = subprocess.Popen(argv, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     cwd=str(self.directory))
        self.case.addCleanup(self.kill)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.case.fail(f"twistd exited ({self.proc.returncode}) early:\n{self.log()}")
            if os.path.exists(self.socket):
                try:
                    listing: list[dict[str, Any]] = await self.ctl_json("list")
                except ctl.CtlError:
                    pass  # not listening yet
                else:
                    if all(t["state"] == "serving" for t in listing):
                        return listing
            await sleep(0.05)
        self.case.fail(f"twistd was not serving within 30 s:\n{self.log()}")

    def ctl(self, *argv: str) -> defer.Deferred[subprocess.CompletedProcess[str]]:
        """Run the real ``aoe-twisted ctl --socket PATH ARGV`` (in a thread)."""
        return deferToThread(
            subprocess.run,
            [sys.executable, "-m", "aoe_twisted", "ctl", "--socket", self.socket, *argv],
            capture_output=True, text=True, timeout=60, check=False,
        )

    async def ctl_json(self, *argv: str, real: bool = False) -> Any:
        """
        Run ``ctl ARGV --json``; check it succeeded; return its answer.

        By default ``ctl`` runs in this process (``ctl.run``, the command's
        own code on this reactor: a subprocess costs a Python start-up);
        ``real`` runs the installed command.
        """
        if real:
            result = await self.ctl(*argv, "--json")
            self.case.assertEqual(
                (result.returncode, result.stderr), (0, ""), f"ctl {' '.join(argv)}: {result}")
            text = result.stdout
        else:
            out = io.StringIO()
            args = ctl.build_parser().parse_args(["--socket", self.socket, *argv, "--json"])
            self.case.assertEqual(await ctl.run(reactor, args, out), 0)
            text = out.getvalue()
        lines = text.splitlines()
        self.case.assertEqual(len(lines), 1, text)
        return json.loads(lines[0])

    async def ctl_fails(self, *argv: str) -> str:
        """Run ``ctl ARGV``; check it failed with one line and no output; return the line."""
        result = await self.ctl(*argv)
        self.case.assertEqual(result.returncode, 1, result)
        self.case.assertEqual(result.stdout, "", result)
        lines = result.stderr.splitlines()
        self.case.assertEqual(len(lines), 1, result.stderr)
        self.case.assertNotIn("Traceback", result.stderr)
        return lines[0]

    async def wait_for_log(self, text: str, timeout: float = 10.0) -> None:
        """Wait until the server's log holds ``text``."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                self.case.fail(f"{text!r} not in the server's log within {timeout} s:\n"
                               f"{self.log()}")
            await sleep(0.02)

    def running(self) -> bool:
        """Whether the server process is still running."""
        return self.proc is not None and self.proc.poll() is None

    async def stop(self) -> str:
        """SIGTERM; check the server stopped cleanly with no traceback; return its log."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.case.fail("twistd did not exit within 20 s of SIGTERM")
            await sleep(0.05)
        log = self.log()
        self.case.assertIn(self.proc.returncode, (0, -signal.SIGTERM), log)
        self.case.assertNotIn("Traceback", log)
        self.case.assertIn("Main loop terminated", log)
        self.case.assertFalse(os.path.exists(self.socket), "the control socket was left behind")
        return log

    def kill(self) -> None:
        """Make sure the server is gone when the test ends, and close its log."""
        if self.proc is not None and self.proc.poll() is None:
            for child in child_pids(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


class OperationsCase(TestCase):
    """
    One served config per test: a veth pair, ``twistd aoe --config``, a client, a peer.

    The images: ``a.img`` (4 MiB) and ``b.img`` (8 MiB), each filled with
    its own pattern; ``target_a``/``slice_b``/``memory`` are the three
    targets of the issue's example (a writable file, a read-only slice of
    another file, a memory disk).
    """

    timeout = 60
    A_SIZE = 4 * MiB
    B_SIZE = 8 * MiB
    SLICE_OFFSET = 1 * MiB
    SLICE_LENGTH = 2 * MiB

    server: ServedConfig | None = None

    def setUp(self) -> None:
        require(self)

    def tearDown(self) -> Any:
        """Stop the server (if the test left it running) and check it stopped cleanly."""
        if self.server is not None and self.server.running():
            return defer.Deferred.fromCoroutine(self.server.stop())
        return None

    # -- the pieces -------------------------------------------------------------

    def make_images(self, directory: Path) -> None:
        """Write ``a.img`` and ``b.img`` in ``directory``, each with its own pattern."""
        self.a_img = directory / "a.img"
        self.b_img = directory / "b.img"
        self.a_data = pattern(self.A_SIZE, 1)
        self.b_data = pattern(self.B_SIZE, 2)
        self.a_img.write_bytes(self.a_data)
        self.b_img.write_bytes(self.b_data)

    def target_a(self, **extra: object) -> dict[str, object]:
        return {"address": "1.0", "backend": f"file:{self.a_img}", **extra}

    def slice_b(self, **extra: object) -> dict[str, object]:
        return {"address": "1.1", "backend": f"file:{self.b_img}", "read_only": True,
                "offset": "1M", "length": "2M", **extra}

    def memory(self, address: str = "1.2", size: str = "4M") -> dict[str, object]:
        return {"address": address, "backend": f"memory:{size}"}

    async def serve(
        self,
        targets: Callable[[], Sequence[Mapping[str, object]]] | None = None,
        **server: object,
    ) -> list[dict[str, Any]]:
        """
        Serve a config (by default the three targets) on a new veth pair.

        Also opens ``self.client`` (an ``AoEClient``) and ``self.peer`` on the
        client end.  Returns the ``ctl list --json`` of the started server.
        """
        self.pair = VethPair.create(self)
        run("ip", "-n", self.pair.server_ns, "link", "set", "dev", "lo", "up")
        directory = Path(tempfile.mkdtemp(prefix="aoeops-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, directory, True)
        self.directory = directory
        self.make_images(directory)
        self.server = ServedConfig(self, self.pair, directory)
        chosen = targets() if targets is not None else [
            self.target_a(), self.slice_b(), self.memory()]
        self.server.write(chosen, **server)
        listing = await self.server.start()
        self.client = AoEClient.listen(self.pair.client_if, reactor=reactor,
                                       netns=self.pair.client_ns)
        self.addCleanup(self.client.close)
        self.peer = Peer(self.pair.client_if, self.pair.client_ns)
        self.peer.start()
        self.addCleanup(self.peer.stop)
        return listing

    def image(self, path: Path, offset: int, length: int) -> bytes:
        """``length`` bytes of the file at ``path`` from ``offset``."""
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def retransmits(self) -> int:
        """The client's retransmissions so far (every interface)."""
        return sum(link.protocol.retransmits for link in self.client.links)

    # -- checks -------------------------------------------------------------------

    def one_reply(self, replies: list[Reply], server: bytes) -> Reply:
        """The one reply in ``replies``, which came from ``server``."""
        self.assertEqual(len(replies), 1, replies)
        self.assertEqual(replies[0].src, server)
        return replies[0]

    def assert_ata_ok(self, replies: list[Reply], server: bytes) -> bytes:
        """One successful ATA reply from ``server``; return its data."""
        reply = self.one_reply(replies, server)
        self.assertFalse(reply.header.flag_error)
        self.assertEqual(reply.arg.cmd_status, int(ATACmdStatus.READY_STATUS))
        return bytes(reply.arg.data)

    def assert_ata_error(self, replies: list[Reply], server: bytes, error: ATAErrorBit) -> None:
        """One ATA reply from ``server`` with ``ERR`` and ``error`` in the error register."""
        reply = self.one_reply(replies, server)
        self.assertFalse(reply.header.flag_error)
        self.assertEqual(reply.arg.cmd_status, ERR_DRDY)
        self.assertEqual(reply.arg.err_feature, int(error))

    async def assert_write_refused(self, disk: RemoteDisk, lba: int, data: bytes) -> None:
        """Writing ``data`` at ``lba`` fails with an ATA ``ABRT`` error."""
        try:
            await disk.write(lba, data)
        except ATAError as e:
            self.assertIn("ABRT", e.names)
        else:
            self.fail(f"{disk.info.name}: the write at LBA {lba} was accepted")


# -- 1. the config file ---------------------------------------------------------------------


class ConfigFileTests(OperationsCase):
    """Three targets from one config file: a writable file, a read-only slice, a memory disk."""

    async def test_three_targets(self) -> None:
        """
        Each is discovered with its size (the slice's is its length); the
        slice's sectors are the file's bytes at its offset, and it ends where
        its length does; its writes are refused and the file is unchanged;
        writes to the writable file land in the file; ``ctl list`` shows each
        as configured.
        """
        listing = await self.serve()
        assert self.server is not None
        self.assertEqual(os.stat(self.server.socket).st_mode & 0o777, 0o600)
        found = {(t.shelf, t.slot): t for t in await self.client.discover()}
        self.assertEqual(sorted(found), [(1, 0), (1, 1), (1, 2)])
        self.assertEqual({key: t.size for key, t in found.items()},
                         {(1, 0): self.A_SIZE, (1, 1): self.SLICE_LENGTH, (1, 2): 4 * MiB})

        listed = by_target(listing)
        self.assertEqual(sorted(listed), ["e1.0", "e1.1", "e1.2"])
        self.assertEqual(
            {key: listed["e1.1"][key] for key in
             ("backend", "size", "read_only", "offset", "length", "interfaces", "state")},
            {"backend": f"file:{self.b_img}", "size": self.SLICE_LENGTH, "read_only": True,
             "offset": self.SLICE_OFFSET, "length": self.SLICE_LENGTH,
             "interfaces": [self.pair.server_if], "state": "serving"})
        self.assertEqual((listed["e1.0"]["read_only"], listed["e1.0"]["size"]),
                         (False, self.A_SIZE))
        self.assertEqual((listed["e1.2"]["backend"], listed["e1.2"]["size"]),
                         ("memory:4M", 4 * MiB))

        # The slice: its sectors are the file's from offset on, and it ends at its length.
        sliced = await self.client.open(1, 1)
        last = self.SLICE_LENGTH // SECTOR_SIZE
        start = self.SLICE_OFFSET
        self.assertEqual(await sliced.read(0, 8), self.b_data[start:start + 8 * SECTOR_SIZE])
        self.assertEqual(await sliced.read(1000, 3),
                         self.b_data[start + 1000 * SECTOR_SIZE:start + 1003 * SECTOR_SIZE])
        end = start + self.SLICE_LENGTH
        self.assertEqual(await sliced.read(last - 2, 2), self.b_data[end - 2 * SECTOR_SIZE:end])
        server = sliced.info.mac
        replies = await self.peer.read(server, 1, 1, last)
        self.assert_ata_error(replies, server, ATAErrorBit.IDNF)
        await self.assert_write_refused(sliced, 5, b"\xee" * SECTOR_SIZE)
        self.assertEqual(self.b_img.read_bytes(), self.b_data)

        # The writable file: a write lands in it and reads back.
        disk = await self.client.open(1, 0)
        data = pattern(16 * SECTOR_SIZE, 3)
        await disk.write(100, data)
        self.assertEqual(self.image(self.a_img, 100 * SECTOR_SIZE, len(data)), data)
        self.assertEqual(await disk.read(100, 16), data)
        self.assertEqual(await disk.read(0, 4), self.a_data[:4 * SECTOR_SIZE])

        # The memory disk: writable, reads back what was written.
        memory = await self.client.open(1, 2)
        await memory.write(8191, data[:SECTOR_SIZE])
        self.assertEqual(await memory.read(8191, 1), data[:SECTOR_SIZE])


# -- 2. ctl against the running server ---------------------------------------------------------


class ControlTests(OperationsCase):
    """``aoe-twisted ctl`` against the real ``twistd aoe``."""

    async def test_add(self) -> None:
        """
        ``ctl add`` serves a new target at once: the client discovers and opens
        it and it answers I/O; per-target options (a read-only slice) apply.
        """
        await self.serve()
        added = await self.server.ctl_json("add", "2.0=memory:1M", "config_string=added",
                                           real=True)
        self.assertEqual((added["target"], added["backend"], added["size"],
                          added["config_string"]), ("e2.0", "memory:1M", MiB, "added"))
        option = f"2.1=file:{self.b_img},ro,offset=1M,length=512K"
        added = await self.server.ctl_json("add", option)
        self.assertEqual(
            (added["target"], added["read_only"], added["offset"], added["length"],
             added["size"]), ("e2.1", True, MiB, 512 << 10, 512 << 10))

        disk = await self.client.open(2, 0)
        self.assertEqual(disk.size, MiB)
        self.assertEqual(disk.info.config_string, b"added")
        data = pattern(4 * SECTOR_SIZE, 4)
        await disk.write(2044, data)
        self.assertEqual(await disk.read(2044, 4), data)

        sliced = await self.client.open(2, 1)
        self.assertEqual(sliced.size, 512 << 10)
        self.assertEqual(await sliced.read(0, 2), self.b_data[MiB:MiB + 2 * SECTOR_SIZE])
        await self.assert_write_refused(sliced, 0, data[:SECTOR_SIZE])

        found = {(t.shelf, t.slot): t.size for t in await self.client.discover(0.5)}
        self.assertEqual(found, {(1, 0): self.A_SIZE, (1, 1): self.SLICE_LENGTH,
                                 (1, 2): 4 * MiB, (2, 0): MiB, (2, 1): 512 << 10})
        listed = by_target(await self.server.ctl_json("list"))
        self.assertEqual(sorted(listed), ["e1.0", "e1.1", "e1.2", "e2.0", "e2.1"])
        self.assertEqual(listed["e2.0"]["state"], "serving")

        line = await self.server.ctl_fails("add", "2.0=memory:1M")
        self.assertIn("e2.0 is already served", line)
        # Removed, then added again within removed_grace: served, not answered as removed.
        await self.server.ctl_json("remove", "e2.0")
        await self.server.ctl_json("add", "2.0=memory:2M")
        again = await self.client.open(2, 0)
        self.assertEqual(again.size, 2 * MiB)
        self.assertEqual(await again.read(2044, 4), bytes(4 * SECTOR_SIZE))
        line = await self.server.ctl_fails("add", f"3.0=file:{self.directory}/missing.img")
        self.assertIn("missing.img", line)

    async def test_remove(self) -> None:
        """
        After ``ctl remove`` the address answers ATA requests with an error
        (the client's I/O fails at once) and no config query, until
        ``removed_grace`` has passed; then it is silent.  The others serve on.
        """
        grace = 2.5
        await self.serve(removed_grace=grace)
        disk = await self.client.open(1, 2)
        server = disk.info.mac
        await disk.write(0, b"\x11" * SECTOR_SIZE)

        removed_at = time.monotonic()
        removed = await self.server.ctl_json("remove", "e1.2")
        answered_at = time.monotonic()
        self.assertEqual((removed["target"], removed["state"]), ("e1.2", "removed"))
        self.assert_ata_error(await self.peer.read(server, 1, 2, 0), server, ATAErrorBit.ABRT)
        self.assert_ata_error(await self.peer.write(server, 1, 2, 0, b"\x22" * SECTOR_SIZE),
                              server, ATAErrorBit.ABRT)
        try:
            await disk.read(0, 1)
        except ATAError as e:
            self.assertIn("ABRT", e.names)
        else:
            self.fail("a read of a removed target succeeded")
        self.assertLess(time.monotonic() - removed_at, grace, "too slow to check the grace")
        self.assertEqual(await self.peer.discover(1, 2, timeout=SILENCE), [])
        self.assertEqual(sorted(by_target(await self.server.ctl_json("list"))),
                         ["e1.0", "e1.1"])

        await sleep(max(0.0, answered_at + grace + 0.5 - time.monotonic()))
        self.assertEqual(await self.peer.read(server, 1, 2, 0, timeout=SILENCE), [])
        silent = await self.peer.config(server, 1, 2, ConfigCommand.READ, timeout=SILENCE)
        self.assertEqual(silent, [])
        other = await self.client.open(1, 0)
        self.assertEqual(await other.read(0, 2), self.a_data[:2 * SECTOR_SIZE])

        line = await self.server.ctl_fails("remove", "e1.2")
        self.assertIn("no target is served at e1.2", line)
        self.assertIn("removed e1.2", await self.server.stop())

    async def test_set_read_only(self) -> None:
        """
        ``ctl set read_only=on`` makes writes fail (ABRT, the file unchanged)
        while reads go on; ``read_only=off`` makes them land again.  A bad
        value is one line and changes nothing.
        """
        await self.serve()
        disk = await self.client.open(1, 0)
        changed = await self.server.ctl_json("set", "e1.0", "read_only=on", real=True)
        self.assertEqual((changed["target"], changed["read_only"]), ("e1.0", True))
        data = pattern(2 * SECTOR_SIZE, 5)
        await self.assert_write_refused(disk, 40, data)
        self.assertEqual(self.image(self.a_img, 40 * SECTOR_SIZE, len(data)),
                         self.a_data[40 * SECTOR_SIZE:42 * SECTOR_SIZE])
        self.assertEqual(await disk.read(40, 2), self.a_data[40 * SECTOR_SIZE:42 * SECTOR_SIZE])

        line = await self.server.ctl_fails("set", "e1.0", "read_only=maybe")
        self.assertIn("read_only", line)
        self.assertTrue(by_target(await self.server.ctl_json("list"))["e1.0"]["read_only"])

        changed = await self.server.ctl_json("set", "e1.0", "read_only=off")
        self.assertFalse(changed["read_only"])
        await disk.write(40, data)
        self.assertEqual(self.image(self.a_img, 40 * SECTOR_SIZE, len(data)), data)

    async def test_set_reopens(self) -> None:
        """
        ``ctl set`` of a slice's offset and length, or of a target's backend,
        serves the new disk at once (and IDENTIFY says its size); a new
        buffer count is what the config query advertises.  The target's
        counters go on.
        """
        await self.serve()
        sliced = await self.client.open(1, 1)
        await sliced.read(0, 2)
        changed = await self.server.ctl_json("set", "e1.1", "offset=3M", "length=1M")
        self.assertEqual((changed["offset"], changed["length"], changed["size"]),
                         (3 * MiB, MiB, MiB))
        moved = await self.client.open(1, 1)
        self.assertEqual(moved.size, MiB)
        self.assertEqual(await moved.read(10, 2),
                         self.b_data[3 * MiB + 10 * SECTOR_SIZE:3 * MiB + 12 * SECTOR_SIZE])
        reads = by_target((await self.server.ctl_json("stats"))["targets"])["e1.1"]["requests"]
        self.assertEqual(reads["read"], 2)

        changed = await self.server.ctl_json("set", "e1.2", f"backend=file:{self.a_img}",
                                             "buffer_count=8")
        self.assertEqual((changed["backend"], changed["size"], changed["buffer_count"]),
                         (f"file:{self.a_img}", self.A_SIZE, 8))
        other = await self.client.open(1, 2)
        self.assertEqual((other.size, other.info.buffer_count), (self.A_SIZE, 8))
        self.assertEqual(await other.read(6, 2), self.a_data[6 * SECTOR_SIZE:8 * SECTOR_SIZE])

    async def test_set_mask(self) -> None:
        """
        ``ctl set mask=MAC`` leaves out every other initiator (no answer at
        all, as AoEr11 says); the client's own MAC lets it in again; ``mask=``
        empties the list.
        """
        await self.serve()
        disk = await self.client.open(1, 2)
        server = disk.info.mac
        mine = format_mac(self.peer.mac)

        changed = await self.server.ctl_json("set", "e1.2", f"mask={STRANGER}")
        self.assertEqual(changed["mask"], [STRANGER])
        self.assertEqual(await self.peer.read(server, 1, 2, 0, timeout=SILENCE), [])
        self.assertEqual(await self.peer.discover(1, 2, timeout=SILENCE), [])
        # Only the masked target: another one still answers.
        self.assert_ata_ok(await self.peer.read(server, 1, 0, 0), server)

        changed = await self.server.ctl_json("set", "e1.2", f"mask={STRANGER}", f"mask={mine}")
        self.assertEqual(changed["mask"], [STRANGER, mine])
        self.assert_ata_ok(await self.peer.read(server, 1, 2, 0), server)

        changed = await self.server.ctl_json("set", "e1.2", f"mask={STRANGER}")
        self.assertEqual(await self.peer.read(server, 1, 2, 0, timeout=SILENCE), [])
        changed = await self.server.ctl_json("set", "e1.2", "mask=")
        self.assertEqual(changed["mask"], [])
        self.assert_ata_ok(await self.peer.read(server, 1, 2, 0), server)
        self.assertEqual(len(await disk.read(0, 2)), 2 * SECTOR_SIZE)

    async def test_reload(self) -> None:
        """
        ``ctl reload --json`` after the file changed (one target added, one
        removed, one changed, one left alone, a restart-only key changed)
        reports exactly that, and each change is in effect; a target added
        with ``ctl add`` since is removed (the file is what a reload restores).
        """
        await self.serve()
        before = by_target(await self.server.ctl_json("list"))
        disk = await self.client.open(1, 0)
        server = disk.info.mac
        # A target added by ctl is not in the file: the reload removes it too.
        await self.server.ctl_json("add", "2.0=memory:1M")
        self.server.write([self.target_a(read_only=True), self.slice_b(),
                           self.memory("1.3", "1M")], workers=2)
        result = await self.server.ctl_json("reload", real=True)
        message = result.pop("message")
        self.assertEqual(result, {"added": ["e1.3"], "removed": ["e1.2", "e2.0"],
                                  "changed": ["e1.0"], "unchanged": 1, "restart": ["workers"]})
        self.assertIn("added e1.3", message)
        self.assertIn("workers take effect at the next restart", message)

        after = by_target(await self.server.ctl_json("list"))
        self.assertEqual(sorted(after), ["e1.0", "e1.1", "e1.3"])
        self.assertTrue(after["e1.0"]["read_only"])
        self.assertEqual(after["e1.1"], before["e1.1"])
        await self.assert_write_refused(disk, 0, b"\x33" * SECTOR_SIZE)
        self.assertEqual(self.a_img.read_bytes(), self.a_data)
        self.assertEqual(await disk.read(7, 1), self.a_data[7 * SECTOR_SIZE:8 * SECTOR_SIZE])
        added = await self.client.open(1, 3)
        self.assertEqual(added.size, MiB)
        await added.write(3, b"\x44" * SECTOR_SIZE)
        self.assertEqual(await added.read(3, 1), b"\x44" * SECTOR_SIZE)
        # Removed, within the default grace: ATA requests fail at once.
        self.assert_ata_error(await self.peer.read(server, 1, 2, 0), server, ATAErrorBit.ABRT)

        # The same file again: nothing to do.
        result = await self.server.ctl_json("reload")
        self.assertEqual((result["added"], result["removed"], result["changed"],
                          result["unchanged"]), ([], [], [], 3))

    async def test_reload_broken_file(self) -> None:
        """
        A reload from a broken file (by ``ctl reload`` or SIGHUP) is one line
        naming the file and the problem and changes nothing: not even the
        targets of the same file that could have been added.  The server
        serves on.
        """
        await self.serve()
        before = await self.server.ctl_json("list")
        disk = await self.client.open(1, 0)

        self.server.write([self.target_a(), self.slice_b(), self.memory(),
                           {**self.memory("1.3"), "bogus": 1}])
        line = await self.server.ctl_fails("reload")
        self.assertTrue(line.startswith("aoe-twisted ctl: reload: "), line)
        for part in (str(self.server.config), "[[target]] #4", "bogus", "nothing changed"):
            self.assertIn(part, line)

        missing = self.directory / "missing.img"
        self.server.write([self.target_a(), self.slice_b(), self.memory(), self.memory("1.3"),
                           {"address": "1.4", "backend": f"file:{missing}"}])
        line = await self.server.ctl_fails("reload")
        for part in (str(self.server.config), "e1.4", str(missing), "nothing changed"):
            self.assertIn(part, line)
        self.assertEqual(await self.server.ctl_json("list"), before)

        assert self.server.proc is not None
        self.server.proc.send_signal(signal.SIGHUP)
        await self.server.wait_for_log("SIGHUP: reload: ")
        self.assertTrue(self.server.running())
        self.assertEqual(await self.server.ctl_json("list"), before)
        self.assertEqual(await disk.read(9, 2), self.a_data[9 * SECTOR_SIZE:11 * SECTOR_SIZE])

        log = await self.server.stop()
        hangups = [line for line in log.splitlines() if "SIGHUP" in line]
        self.assertEqual(len(hangups), 1, log)
        for part in (str(self.server.config), "e1.4", "nothing changed"):
            self.assertIn(part, hangups[0])

    async def test_stats_and_initiators(self) -> None:
        """
        ``ctl stats --json`` counts exactly what the client sent (N reads of
        k sectors, M writes of one), on that target only; ``ctl initiators
        --json`` names the client's MAC, the target it used and its frames.
        """
        await self.serve()
        disk = await self.client.open(1, 2)
        server = disk.info.mac
        before = by_target((await self.server.ctl_json("stats"))["targets"])["e1.2"]
        reads, sectors, writes = 25, 2, 5
        data = pattern(SECTOR_SIZE, 6)
        for n in range(reads):
            await disk.read(n * 7, sectors)
        for n in range(writes):
            await disk.write(100 + n, data)
        self.assertEqual(self.retransmits(), 0)
        stats = await self.server.ctl_json("stats", real=True)
        targets = by_target(stats["targets"])
        after = targets["e1.2"]

        def delta(section: str, key: str) -> int:
            return after[section][key] - before[section][key]  # type: ignore[no-any-return]

        self.assertEqual((delta("requests", "read"), delta("requests", "write")), (reads, writes))
        self.assertEqual((delta("bytes", "read"), delta("bytes", "write")),
                         (reads * sectors * SECTOR_SIZE, writes * SECTOR_SIZE))
        self.assertEqual(after["requests"]["identify"], 1)
        self.assertGreaterEqual(after["requests"]["config"], 1)
        self.assertEqual((after["errors"], after["in_flight"], after["retransmits"]),
                         ({"ata": 0}, 0, 0))
        self.assertGreaterEqual(after["service_seconds"]["count"], reads + writes)
        # The other targets saw nothing of it.
        for name in ("e1.0", "e1.1"):
            self.assertEqual(set(targets[name]["requests"].values()), {0}, name)
            self.assertEqual(targets[name]["initiators"], [])
        [interface] = stats["interfaces"]
        self.assertEqual((interface["interface"], interface["mac"], interface["mtu"]),
                         (self.pair.server_if, format_mac(server), 1500))
        self.assertGreaterEqual(interface["received"], reads + writes + 2)
        self.assertGreaterEqual(interface["sent"], reads + writes + 2)

        mine = format_mac(self.client.protocol.mac)
        [initiator] = await self.server.ctl_json("initiators", real=True)
        frames = sum(after["requests"].values())
        self.assertEqual((initiator["mac"], initiator["targets"], initiator["frames"]),
                         (mine, ["e1.2"], frames))
        self.assertEqual([(p["mac"], p["frames"]) for p in after["initiators"]], [(mine, frames)])
        self.assertLessEqual(initiator["last_seen"], stats["time"] + 5)
        self.assertGreater(initiator["last_seen"], time.time() - 60)

        text = await self.server.ctl("initiators")
        self.assertEqual(text.returncode, 0, text)
        self.assertIn(mine, text.stdout)

    async def test_garbage_on_the_control_socket(self) -> None:
        """Bytes that are not AMP lose their connection; the server and ctl carry on."""
        await self.serve()
        disk = await self.client.open(1, 0)

        def send_garbage() -> bytes:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
                peer.settimeout(10)
                peer.connect(self.server.socket)
                peer.sendall(b"GET /metrics HTTP/1.0\r\n\r\n" + bytes(range(256)) * 16)
                received = b""
                while chunk := peer.recv(4096):
                    received += chunk
                return received

        await deferToThread(send_garbage)
        self.assertTrue(self.server.running())
        self.assertEqual(sorted(by_target(await self.server.ctl_json("list"))),
                         ["e1.0", "e1.1", "e1.2"])
        self.assertEqual(await disk.read(2, 2), self.a_data[2 * SECTOR_SIZE:4 * SECTOR_SIZE])
        log = await self.server.stop()
        closed = [line for line in log.splitlines() if "not AMP" in line]
        self.assertEqual(len(closed), 1, log)
        self.assertIn(self.server.socket, closed[0])


# -- 3. reload while I/O runs -----------------------------------------------------------------


class ReloadUnderLoadTests(OperationsCase):
    """SIGHUP and ``ctl reload`` while an unchanged target has a window of requests in flight."""

    WINDOW = 16
    #: Seconds of I/O before the first reload and after the last.
    AROUND = 1.0

    async def test_no_request_lost_or_retransmitted(self) -> None:
        """
        16 reads and writes stay in flight on e1.0 while a SIGHUP adds e1.2
        and removes e1.1, then ``ctl reload`` adds e1.3 and removes e1.2 (I/O
        runs 1 s before the first and 1 s after the last): every request
        succeeds, reads return what was written, requests complete while
        each reload is applied, the client retransmits nothing and the
        server counts no retransmission and exactly the requests the client
        made.
        """
        await self.serve(lambda: [self.target_a(), self.memory("1.1", "1M")])
        disk = await self.client.open(1, 0)
        sectors = 2
        self.assertGreaterEqual(disk.sectors_per_frame, sectors)  # one frame per request
        before = by_target((await self.server.ctl_json("stats"))["targets"])["e1.0"]
        retransmitted = self.retransmits()
        running = [True]
        done = {"reads": 0, "writes": 0}
        failures: list[str] = []
        slowest = [0.0]
        progress: list[int] = []

        async def worker(index: int) -> None:
            rng = random.Random(index)
            region = index * 128
            while running[0]:
                lba = region + rng.randrange(0, 128 - sectors)
                data = rng.randbytes(sectors * SECTOR_SIZE)
                started = time.monotonic()
                try:
                    await disk.write(lba, data)
                    done["writes"] += 1
                    back = await disk.read(lba, sectors)
                    done["reads"] += 1
                except Exception as e:
                    failures.append(f"worker {index} LBA {lba}: {type(e).__name__}: {e}")
                    continue
                slowest[0] = max(slowest[0], time.monotonic() - started)
                if back != data:
                    failures.append(f"worker {index} LBA {lba}: read back other data")

        async def reloads() -> dict[str, Any]:
            await sleep(self.AROUND)
            progress.append(done["writes"])
            self.server.write([self.target_a(), self.memory("1.2", "1M")])
            assert self.server.proc is not None
            self.server.proc.send_signal(signal.SIGHUP)
            await self.server.wait_for_log("reload: added e1.2; removed e1.1; 1 unchanged")
            progress.append(done["writes"])
            await sleep(0.3)
            self.server.write([self.target_a(), self.memory("1.3", "1M")])
            result = await self.server.ctl_json("reload", real=True)
            progress.append(done["writes"])
            await sleep(self.AROUND)
            progress.append(done["writes"])
            running[0] = False
            return result  # type: ignore[no-any-return]

        workers = [defer.Deferred.fromCoroutine(worker(i)) for i in range(self.WINDOW)]
        reloaded = defer.Deferred.fromCoroutine(reloads())
        *_, result = await defer.gatherResults([*workers, reloaded], consumeErrors=True)

        self.assertEqual(failures, [])
        self.assertEqual(self.retransmits() - retransmitted, 0,
                         f"slowest write+read {slowest[0]:.3f} s")
        # I/O went on before, through and after each reload.
        self.assertEqual(progress, sorted(set(progress)), progress)
        self.assertGreater(progress[0], self.WINDOW, progress)
        after = by_target((await self.server.ctl_json("stats"))["targets"])
        self.assertEqual(sorted(after), ["e1.0", "e1.3"])
        served = after["e1.0"]
        self.assertEqual(
            (served["requests"]["read"] - before["requests"]["read"],
             served["requests"]["write"] - before["requests"]["write"]),
            (done["reads"], done["writes"]))
        self.assertEqual((served["retransmits"], served["in_flight"], served["errors"]),
                         (0, 0, {"ata": 0}))
        self.assertEqual((result["added"], result["removed"], result["unchanged"]),
                         (["e1.3"], ["e1.2"], 1))


# -- 4. the metrics endpoint ---------------------------------------------------------------------


def scrape(namespace: str, port: int) -> str:
    """GET http://127.0.0.1:PORT/metrics from inside ``namespace`` (where the server listens)."""
    fetch = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
             f"'http://127.0.0.1:{port}/metrics', timeout=20).read().decode())")
    return run("ip", "netns", "exec", namespace, sys.executable, "-c", fetch)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape by (name, labels), parsed by ``prometheus_client``."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class MetricsTests(OperationsCase):
    """A real scrape of ``/metrics`` (``[server] metrics``), from inside the server namespace."""

    async def test_scrape(self) -> None:
        """
        After N reads, M writes and R refused writes, the scrape's counters are
        exactly those; its frame counters are those of ``ctl stats``; the
        client's last-seen time is the time of its I/O.
        """
        # The server namespace is the test's own: any port is free in it.
        port = random.randrange(20000, 60000)
        await self.serve(metrics=f"127.0.0.1:{port}")
        started = time.time()
        disk = await self.client.open(1, 0)
        sliced = await self.client.open(1, 1)
        reads, sectors, writes, refused = 20, 2, 7, 3
        for n in range(reads):
            await disk.read(3 * n, sectors)
        for n in range(writes):
            await disk.write(500 + n, b"\x55" * SECTOR_SIZE)
        for n in range(refused):
            await self.assert_write_refused(sliced, n, b"\x66" * SECTOR_SIZE)
        self.assertEqual(self.retransmits(), 0)

        text = await deferToThread(scrape, self.pair.server_ns, port)
        scraped = time.time()
        stats = await self.server.ctl_json("stats")
        metrics = samples(text)

        def value(name: str, **labels: str) -> float:
            key = (name, frozenset(labels.items()))
            self.assertIn(key, metrics, f"{name}{labels} not in the scrape:\n{text}")
            return metrics[key]

        self.assertEqual(value("aoe_target_requests_total", target="e1.0", kind="read"), reads)
        self.assertEqual(value("aoe_target_requests_total", target="e1.0", kind="write"), writes)
        self.assertEqual(value("aoe_target_requests_total", target="e1.0", kind="identify"), 1)
        self.assertEqual(value("aoe_target_requests_total", target="e1.2", kind="read"), 0)
        self.assertEqual(value("aoe_target_bytes_total", target="e1.0", direction="read"),
                         reads * sectors * SECTOR_SIZE)
        self.assertEqual(value("aoe_target_bytes_total", target="e1.0", direction="write"),
                         writes * SECTOR_SIZE)
        self.assertEqual(value("aoe_target_requests_total", target="e1.1", kind="write"),
                         refused)
        self.assertEqual(value("aoe_target_bytes_total", target="e1.1", direction="write"), 0)
        self.assertEqual(value("aoe_target_errors_total", target="e1.1", kind="ata"), refused)
        self.assertEqual(value("aoe_target_errors_total", target="e1.0", kind="ata"), 0)
        count = value("aoe_target_request_seconds_count", target="e1.0")
        self.assertGreaterEqual(count, reads + writes)
        self.assertEqual(value("aoe_target_request_seconds_bucket", target="e1.0", le="+Inf"),
                         count)
        self.assertEqual(value("aoe_target_retransmits_total", target="e1.0"), 0)

        # Nothing was sent between the scrape and ctl stats: the frame counts agree.
        [interface] = stats["interfaces"]
        name = self.pair.server_if
        for direction in ("received", "sent", "ignored", "dropped", "malformed"):
            self.assertEqual(value("aoe_interface_frames_total", interface=name,
                                   direction=direction), interface[direction], direction)
        requests = reads + writes + refused
        self.assertGreaterEqual(value("aoe_interface_frames_total", interface=name,
                                      direction="received"), requests)
        self.assertGreaterEqual(value("aoe_interface_frames_total", interface=name,
                                      direction="sent"), requests)
        self.assertEqual(value("aoe_interface_frames_total", interface=name,
                               direction="dropped"), 0)

        mine = format_mac(self.client.protocol.mac)
        for target in ("e1.0", "e1.1"):
            seen = value("aoe_initiator_last_seen_timestamp_seconds", target=target,
                         initiator=mine)
            self.assertTrue(started <= seen <= scraped, (started, seen, scraped))
        self.assertNotIn(("aoe_initiator_last_seen_timestamp_seconds",
                          frozenset({"target": "e1.2", "initiator": mine}.items())), metrics)


# -- 5. malformed config files ---------------------------------------------------------------------


class BadConfigTests(SynchronousTestCase):
    """
    Every malformed config file stops ``twistd aoe --config`` with exit
    status 1 and exactly one line on standard error naming the file and the
    problem: no traceback, nothing else.  No interface is opened (the server
    never gets that far); ``nosuch0`` would not exist anyway.
    """

    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="aoebad-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.directory.chmod(0o755)
        self.image = self.directory / "disk.img"
        self.image.write_bytes(bytes(MiB))
        self.config = self.directory / "aoe.toml"

    def twistd(self, config: Path, user: Sequence[str] = ()) -> tuple[int, str, str]:
        """Run ``twistd -n aoe --config CONFIG``; return its status, output and error output."""
        argv = [*user, *TWISTD, "-n", "--pidfile=", "aoe", "--config", str(config)]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                                cwd=str(self.directory), check=False)
        return result.returncode, result.stdout, result.stderr

    def assert_refused(self, text: str | None, *parts: str, config: Path | None = None,
                       user: Sequence[str] = ()) -> str:
        """Write ``text`` as the config; check the one-line refusal holds every one of ``parts``."""
        config = config or self.config
        if text is not None:
            config.write_text(text)
        status, out, err = self.twistd(config, user)
        self.assertEqual((status, out), (1, ""), err)
        lines = err.splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertNotIn("Traceback", err)
        self.assertTrue(lines[0].startswith(f"twistd aoe: {config}: "), lines[0])
        for part in parts:
            self.assertIn(part, lines[0])
        return lines[0]

    def good(self, **extra: object) -> dict[str, object]:
        return {"address": "1.0", "backend": f"file:{self.image}", **extra}

    def server(self, **extra: object) -> dict[str, object]:
        return {"interfaces": ["nosuch0"], **extra}

    def test_unknown_server_key(self) -> None:
        """A key ``[server]`` does not have."""
        self.assert_refused(toml(self.server(colour="blue"), [self.good()]),
                            "[server] colour: unknown key")

    def test_unknown_target_key(self) -> None:
        """A key ``[[target]]`` does not have, with the one meant suggested."""
        self.assert_refused(toml(self.server(), [self.good(readonly=True)]),
                            "[[target]] #1 (e1.0) readonly: unknown key", "read_only")

    def test_wrong_type(self) -> None:
        """A string for a boolean or an integer; an offset that is not whole sectors."""
        self.assert_refused(toml(self.server(), [self.good(read_only="yes")]),
                            "[[target]] #1 (e1.0) read_only:", "'yes'")
        self.assert_refused(toml(self.server(workers="2"), [self.good()]),
                            "[server] workers:", "'2'")
        self.assert_refused(toml(self.server(), [self.good(offset=1000)]),
                            "[[target]] #1 (e1.0) offset:", "multiple of 512")

    def test_bad_address(self) -> None:
        """A slot out of range; not an address at all."""
        self.assert_refused(toml(self.server(), [self.good(address="1.300")]),
                            "[[target]] #1 address:", "1.300")
        self.assert_refused(toml(self.server(), [self.good(address="x")]),
                            "[[target]] #1 address:")

    def test_duplicate_address(self) -> None:
        """One address twice, written two ways."""
        self.assert_refused(
            toml(self.server(), [self.good(), {"address": "e1.0", "backend": "memory:1M"}]),
            "[[target]] #2 (e1.0) address:", "also [[target]] #1")

    def test_slice_past_the_end(self) -> None:
        """A slice that ends, or starts, past the end of its backend file."""
        self.assert_refused(toml(self.server(), [self.good(offset="512K", length="1M")]),
                            "e1.0", "past the end", str(self.image))
        self.assert_refused(toml(self.server(), [self.good(offset="2M")]),
                            "e1.0", "past the end")

    def test_not_toml(self) -> None:
        """A TOML syntax error; bytes that are not UTF-8."""
        self.assert_refused("[server\n", "invalid TOML")
        self.assert_refused(None, "not UTF-8", config=self._bytes(b"\xff[server]\n"))

    def _bytes(self, data: bytes) -> Path:
        path = self.directory / "binary.toml"
        path.write_bytes(data)
        return path

    def test_missing_backend(self) -> None:
        """A ``file:`` backend that does not exist."""
        missing = self.directory / "missing.img"
        self.assert_refused(toml(self.server(), [self.good(backend=f"file:{missing}")]),
                            str(missing), "No such file or directory")

    def test_unreadable_config(self) -> None:
        """A missing file, a directory, and (as another user) a file it may not read."""
        self.assert_refused(None, "No such file or directory",
                            config=self.directory / "none.toml")
        self.assert_refused(None, "Is a directory", config=self.directory)
        user = self._another_user()
        self.config.write_text(toml(self.server(), [self.good()]))
        self.config.chmod(0)
        self.assert_refused(None, "Permission denied", user=user)

    def test_unreadable_backend(self) -> None:
        """A backend file the server's user may not open."""
        user = self._another_user()
        self.image.chmod(0)
        config = self.directory / "readable.toml"
        config.write_text(toml(self.server(), [self.good()]))
        config.chmod(0o644)
        self.assert_refused(None, "e1.0", str(self.image), "Permission denied",
                            config=config, user=user)

    def _another_user(self) -> list[str]:
        """``setpriv`` arguments running a command as ``nobody`` (skip if that cannot be)."""
        from tests.test_control import NOBODY, NOGROUP, _unprivileged_problem

        problem = _unprivileged_problem()
        if problem is not None:
            require(self, problem)
        return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOGROUP}", "--clear-groups"]
