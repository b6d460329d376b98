"""
Tests for ``aoe_twisted.initiator.cli``, the ``aoe-twisted`` command.

Three levels: argument parsing on its own; every command run in this
process against the real server over ``MemoryPacketSystem`` (a fake veth
pair) on a ``MemoryReactorClock``; and, as root, the real command in a
subprocess against ``twistd aoe`` on a real veth pair between two network
namespaces.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.core.acl import MemoryACLStore
from aoe_twisted.core.target import Target
from aoe_twisted.initiator import cli
from aoe_twisted.initiator.client import AoEClient, RetryPolicy
from aoe_twisted.server import AoEService
from aoe_twisted.testing import MemoryPacketSystem

MiB = 1 << 20


class ParseTests(SynchronousTestCase):
    """Sizes, target names and the command line."""

    def test_bytes(self) -> None:
        """
        Offsets and lengths are in ``aoe_twisted.units.parse_byte_count``'s grammar
        (tested in ``tests.test_units``): plain, hex, K/M/G/T with or without iB/B, sectors.
        """
        cases = {
            "0": 0,
            "4096": 4096,
            "0x200": 512,
            "4K": 4096,
            "4k": 4096,
            "64M": 64 * MiB,
            "1G": 1 << 30,
            "2T": 2 << 40,
            "1MiB": MiB,
            "1mb": MiB,
            "8s": 4096,
        }
        parser = cli.build_parser()
        for text, value in cases.items():
            args = parser.parse_args(["read", "e1.0", "-i", "eth0", "--length", text])
            self.assertEqual(args.length, value, text)
        for bad in ("", "-1", "1.5M", "4X", "M", "0x"):
            self.assertRaises(
                cli.UsageError, parser.parse_args, ["read", "e1.0", "-i", "eth0", "--offset", bad]
            )

    def test_target(self) -> None:
        """``e1.0`` and ``1.0`` name shelf 1 slot 0; wildcards and junk are refused."""
        parser = cli.build_parser()
        for text, address in (("e1.0", (1, 0)), ("1.0", (1, 0)), ("65534.254", (65534, 254))):
            self.assertEqual(parser.parse_args(["info", text, "-i", "eth0"]).target, address)
        for bad in ("e1", "e1.0.0", "x1.0", "e65535.0", "e1.255", "e-1.0", ""):
            self.assertRaises(cli.UsageError, parser.parse_args, ["info", bad, "-i", "eth0"])

    def test_read_arguments(self) -> None:
        """``read`` takes the target, interface, namespace, offset, length and output."""
        args = cli.build_parser().parse_args(
            [
                "read",
                "e2.3",
                "-i",
                "veth0",
                "--netns",
                "ns1",
                "--offset",
                "1M",
                "--length",
                "8s",
                "-o",
                "out.bin",
                "--timeout",
                "0.2",
                "--retries",
                "1",
            ]
        )
        self.assertEqual(
            (
                args.command,
                args.target,
                args.iface,
                args.netns,
                args.offset,
                args.length,
                args.output,
                args.timeout,
                args.retries,
                args.hexdump,
            ),
            ("read", (2, 3), "veth0", "ns1", MiB, 4096, "out.bin", 0.2, 1, False),
        )

    def test_defaults(self) -> None:
        """Unless told otherwise: no namespace, 0.5 s timeout, 4 retries, 16M bench."""
        args = cli.build_parser().parse_args(["bench", "e1.0", "-i", "eth0"])
        self.assertEqual(
            (args.netns, args.timeout, args.retries, args.size, args.write, args.count, args.depth),
            (None, 0.5, 4, 16 * MiB, False, None, None),
        )
        args = cli.build_parser().parse_args(["write", "e1.0", "-i", "eth0", "-"])
        self.assertEqual((args.file, args.offset, args.no_flush), ("-", 0, False))

    def test_usage_errors_are_one_line(self) -> None:
        """A bad command line is one line on stderr naming the problem, and exit status 2."""
        for argv, expected in [
            ([], "the following arguments are required: COMMAND"),
            (["read", "e1.0"], "the following arguments are required: -i/--iface"),
            (["read", "bogus", "-i", "eth0"], "not a target address: 'bogus'"),
            (["read", "e1.0", "-i", "eth0", "--offset", "12Q"], "not a size: '12Q'"),
            (["frobnicate"], "invalid choice: 'frobnicate'"),
            (["bench", "e1.0", "-i", "eth0", "--duration", "0"], "must be positive"),
        ]:
            stderr = io.StringIO()
            self.patch(sys, "stderr", stderr)
            with self.assertRaises(SystemExit) as raised:
                cli.main(argv)
            self.assertEqual(raised.exception.code, 2, argv)
            lines = stderr.getvalue().splitlines()
            self.assertEqual(len(lines), 1, lines)
            self.assertIn(expected, lines[0])
            self.assertTrue(lines[0].startswith("aoe-twisted"), lines[0])

    def test_twistd_command(self) -> None:
        """``serve`` runs twistd in the foreground, without a pid file, with the aoe plugin."""
        argv = cli.twistd_command(["--iface", "eth0"], python="/py")
        self.assertEqual(argv[0], "/py")
        self.assertEqual(argv[-5:], ["-n", "--pidfile=", "aoe", "--iface", "eth0"])
        self.assertIn("twisted.scripts.twistd import run", argv[2])


class FormatTests(SynchronousTestCase):
    """What the commands print."""

    def test_human(self) -> None:
        self.assertEqual(
            [cli.human(n) for n in (0, 1023, 1024, 64 * MiB, 3 << 40)],
            ["0 B", "1023 B", "1.0 KiB", "64.0 MiB", "3.0 TiB"],
        )

    def test_hexdump(self) -> None:
        """Like ``hexdump -C``, with the disk's own offsets."""
        lines = list(cli.hexdump(b"hello, AoE!\x00\x01" + bytes(range(0x41, 0x47)), 0x3F0))
        self.assertEqual(
            lines,
            [
                "000003f0  68 65 6c 6c 6f 2c 20 41  6f 45 21 00 01 41 42 43  |hello, AoE!..ABC|",
                "00000400  44 45 46                                          |DEF|",
            ],
        )

    def test_segments(self) -> None:
        """Pieces end on 4 MiB boundaries, so two in flight never share a sector."""
        seg = cli.SEGMENT
        self.assertEqual(
            list(cli._segments(100, 2 * seg)), [(100, seg - 100), (seg, seg), (2 * seg, 100)]
        )
        self.assertEqual(list(cli._segments(0, 10)), [(0, 10)])
        self.assertEqual(list(cli._segments(5, 0)), [])

    def test_progress_disabled(self) -> None:
        """A disabled progress bar writes nothing."""
        out = io.StringIO()
        progress = cli.Progress("read", 100, out, enabled=False)
        progress.advance(50)
        progress.close()
        self.assertEqual(out.getvalue(), "")

    def test_progress(self) -> None:
        """An enabled one redraws in place at most every 0.1 s and ends the line."""
        now = [0.0]
        out = io.StringIO()
        progress = cli.Progress("read e1.0", 4 * MiB, out, enabled=True, clock=lambda: now[0])
        now[0] = 1.0
        progress.advance(2 * MiB)
        progress.advance(MiB)  # too soon: not drawn
        now[0] = 2.0
        progress.close()
        frames = out.getvalue().split("\r")[1:]
        self.assertEqual(len(frames), 2)
        self.assertIn(" 50.0% 2.0 MiB / 4.0 MiB  2.1 MB/s", frames[0])
        self.assertTrue(frames[1].endswith("MB/s\n"))
        self.assertIn(" 75.0% 3.0 MiB / 4.0 MiB", frames[1])


class InProcessCase(SynchronousTestCase):
    """
    The real server, and commands run against it through ``AoEPort`` on a fake veth pair.

    ``aoe`` drives the fake reactor: it lets every port read what waits for
    it, and moves the clock on only when nothing does.  ``make_target``
    builds the served target (subclasses change it); ``step``, if set, runs
    before each turn, and ``interrupt_when``, if set, cancels the command
    (what SIGINT does) the first turn it returns true.
    """

    def make_target(self) -> Target:
        """The target the server exports: ``e1.0``, 4 MiB in memory, config string "demo"."""
        return Target(
            1, 0, MemoryBackend(4 * MiB), acl=MemoryACLStore(config_string=b"demo"), buffer_count=8
        )

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.system = MemoryPacketSystem()
        self.system.add_veth("srv0", "cli0", netns="server", peer_netns="client")
        self.target = self.make_target()
        self.service = AoEService(
            "srv0", [self.target], netns="server", reactor=self.clock, system=self.system
        )
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
        self.stderr = io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)

        def open_client(reactor: Any, args: Any) -> AoEClient:
            return AoEClient.listen(
                args.iface,
                reactor=reactor,
                netns=args.netns,
                system=self.system,
                retry=RetryPolicy(args.timeout, args.timeout * 8, args.retries),
            )

        self.patch(cli, "_open_client", open_client)
        self.step: Any = None
        self.interrupt_when: Any = None

    @property
    def client_mac(self) -> bytes:
        """The MAC of the client's end of the fake veth pair."""
        return bytes(self.system.interfaces[("client", "cli0")].mac)

    @property
    def server_mac(self) -> bytes:
        """The MAC of the server's end of the fake veth pair."""
        return bytes(self.system.interfaces[("server", "srv0")].mac)

    def aoe(self, *argv: str) -> tuple[int, str, str]:
        """Run ``aoe-twisted ARGV`` in the client namespace; return status, stdout, stderr."""
        args = cli.build_parser().parse_args([*argv, "-i", "cli0", "--netns", "client"])
        d = Deferred.fromCoroutine(cli.run_command(self.clock, args))
        outcome: list[object] = []
        d.addBoth(outcome.append)
        interrupted = False
        while not outcome:
            if self.step is not None:
                self.step()
            if not interrupted and self.interrupt_when is not None and self.interrupt_when():
                interrupted = True
                d.cancel()
                continue
            readers = list(self.clock.getReaders())
            for reader in readers:
                reader.doRead()
            if any(self.system.socket_for(reader).inbound for reader in self.clock.getReaders()):
                continue
            calls = self.clock.getDelayedCalls()
            if not calls:
                break
            self.clock.advance(max(0.0, min(c.getTime() for c in calls) - self.clock.seconds()))
        self.assertEqual(len(outcome), 1, "the command did not finish")
        status = outcome[0]
        self.assertIsInstance(status, int)
        self.stdout.flush()
        out = self.stdout.buffer.getvalue().decode("utf-8", "replace")  # type: ignore[attr-defined]
        self.stdout.buffer.seek(0)
        self.stdout.buffer.truncate()
        err = self.stderr.getvalue()
        self.stderr.seek(0)
        self.stderr.truncate()
        return status, out, err


class InProcessTests(InProcessCase):
    """Each command against the real server, in this process."""

    def test_discover(self) -> None:
        """``discover`` prints a table with the target, its MAC, size, limits and config."""
        status, out, err = self.aoe("discover")
        self.assertEqual((status, err), (0, ""))
        header, row = out.splitlines()
        self.assertEqual(
            header.split(), ["TARGET", "MAC", "SIZE", "BUFFERS", "SECTORS", "FIRMWARE", "CONFIG"]
        )
        mac = self.system.interfaces[("server", "srv0")].mac
        self.assertEqual(
            row.split(),
            ["e1.0", ":".join(f"{b:02x}" for b in mac), "4.0", "MiB", "8", "2", "0x0001", "'demo'"],
        )

    def test_discover_nothing(self) -> None:
        """No target answering is one line on stderr and status 1."""
        self.service.stopService()
        status, out, err = self.aoe("discover", "--wait", "0.5")
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(
            err, "aoe-twisted: no AoE target answered on cli0 in client within 0.5 s\n"
        )

    def test_info(self) -> None:
        status, out, _err = self.aoe("info", "e1.0")
        self.assertEqual(status, 0)
        self.assertIn("size:              4194304 bytes (4.0 MiB, 8192 sectors)\n", out)
        self.assertIn("config string:     'demo'\n", out)
        self.assertIn("window:            8 requests in flight\n", out)

    def test_write_then_read(self) -> None:
        """A file written at an unaligned offset reads back, and is on the target's disk."""
        directory = tempfile.mkdtemp()
        self.addCleanup(
            lambda: (
                [os.remove(os.path.join(directory, f)) for f in os.listdir(directory)]
                and os.rmdir(directory)
            )
        )
        source = os.path.join(directory, "in.bin")
        data = b"a message on the disk\n" + os.urandom(5000)
        with open(source, "wb") as f:
            f.write(data)
        status, out, err = self.aoe("write", "e1.0", "--offset", "1000", source)
        self.assertEqual((status, out), (0, ""))
        self.assertEqual(err, f"wrote {len(data)} bytes to e1.0 at offset 1000, flushed\n")
        self.assertEqual(self.target.backend.read(1000, len(data)), data)
        output = os.path.join(directory, "out.bin")
        status, out, err = self.aoe(
            "read", "e1.0", "--offset", "1000", "--length", str(len(data)), "-o", output
        )
        self.assertEqual((status, out, err), (0, "", ""))
        with open(output, "rb") as f:
            self.assertEqual(f.read(), data)

    def test_read_to_stdout(self) -> None:
        """Without ``-o`` the bytes go to standard output; ``--hexdump`` dumps them."""
        self.target.backend.write(512, b"hello")
        status, out, err = self.aoe("read", "e1.0", "--offset", "512", "--length", "5")
        self.assertEqual((status, out, err), (0, "hello", ""))
        status, out, err = self.aoe("read", "e1.0", "--offset", "512", "--length", "5", "--hexdump")
        self.assertEqual(out, f"00000200  {'68 65 6c 6c 6f':<48}  |hello|\n")

    def test_read_whole_disk(self) -> None:
        """Without ``--length`` a read goes to the end of the disk."""
        status, out, _err = self.aoe("read", "e1.0", "--offset", str(4 * MiB - 1024))
        self.assertEqual((status, len(out)), (0, 1024))

    def test_past_the_end(self) -> None:
        """A range past the end of the disk is refused before anything is sent."""
        status, _out, err = self.aoe("read", "e1.0", "--offset", "4M", "--length", "1")
        self.assertEqual(status, 1)
        self.assertEqual(
            err,
            "aoe-twisted: e1.0: 1 B at offset 4194304 runs past the end of "
            "the disk (4194304 bytes)\n",
        )

    def test_target_not_found(self) -> None:
        status, _out, err = self.aoe("info", "e7.7", "--timeout", "0.1", "--retries", "1")
        self.assertEqual(
            (status, err), (1, "aoe-twisted: e7.7: no such AoE target answered on cli0\n")
        )

    def test_reserved_is_aoe_error(self) -> None:
        """An AoE error from the target is one line naming the error."""
        self.target.acl.set_reserve_list((bytes.fromhex("02ffffffff01"),))
        status, _out, err = self.aoe("read", "e1.0", "--length", "512")
        self.assertEqual(status, 1)
        self.assertEqual(
            err,
            "aoe-twisted: e1.0: read of LBA 0+1 refused: AoE error 6 "
            "(target is reserved by another host)\n",
        )

    def test_timeout(self) -> None:
        """A target that stops answering in the middle of a read: a one-line timeout."""
        client_end = self.system.interfaces[("client", "cli0")]

        def cut_after_identify() -> None:
            assert self.service.protocol is not None
            assert self.service.protocol.dispatcher is not None
            if self.service.protocol.dispatcher.counters["answered"] >= 3:
                client_end.peer = None

        self.step = cut_after_identify
        started = self.clock.seconds()
        status, _out, err = self.aoe(
            "read",
            "e1.0",
            "--length",
            "64K",
            "-o",
            os.devnull,
            "--timeout",
            "0.1",
            "--retries",
            "2",
        )
        self.assertEqual(status, 1)
        self.assertRegex(
            err,
            r"^aoe-twisted: e1\.0: timed out: no answer to read of LBA "
            r"[0-9]+\+2 after 3 tries in 0\.7 s\n$",
        )
        self.assertLess(self.clock.seconds() - started, 1)

    def test_missing_interface(self) -> None:
        """A missing interface is one line, status 1."""
        args = cli.build_parser().parse_args(["discover", "-i", "nope0", "--netns", "client"])
        d = Deferred.fromCoroutine(cli.run_command(self.clock, args))
        self.assertEqual(self.successResultOf(d), 1)
        self.assertEqual(
            self.stderr.getvalue(),
            "aoe-twisted: cannot open interface nope0 in "
            "network namespace client: no such interface\n",
        )

    def test_missing_input_file(self) -> None:
        status, _out, err = self.aoe("write", "e1.0", "/nonexistent/file")
        self.assertEqual(
            (status, err),
            (1, "aoe-twisted: cannot open /nonexistent/file: No such file or directory\n"),
        )

    def test_bench(self) -> None:
        """``bench`` prints sequential and random figures; writes only with ``--write``."""
        status, out, err = self.aoe("bench", "e1.0", "--size", "64K", "--count", "20")
        self.assertEqual((status, err), (0, ""))
        tests = [line.split("  ")[0] for line in out.splitlines()[2:]]
        self.assertEqual(
            tests, ["sequential read", "random read 1 sector", "random read 2 sectors"]
        )
        self.assertEqual(out.splitlines()[1].split()[-2:], ["CPU", "us/op"])
        for line in out.splitlines()[2:]:
            self.assertGreater(float(line.split()[-1]), 0.0, line)  # this process's CPU per op
        self.target.backend.write(0, b"x" * 512)
        status, out, err = self.aoe("bench", "e1.0", "--size", "64K", "--count", "20", "--write")
        self.assertEqual(status, 0)
        self.assertIn("sequential write", out)
        self.assertIn("random write 2 sectors", out)
        self.assertNotEqual(self.target.backend.read(0, 512), b"x" * 512)


class SubprocessTests(SynchronousTestCase):
    """The command as a user runs it: ``python -m aoe_twisted``."""

    def aoe(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "aoe_twisted", *argv],
            capture_output=True,
            timeout=timeout,
            check=False,
        )

    def test_usage_error(self) -> None:
        result = self.aoe("read")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)

    def test_missing_interface(self) -> None:
        """No such interface (or, without root, no permission): one line, status 1."""
        result = self.aoe("discover", "-i", "aoe-nope-0")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertRegex(
            result.stderr.decode(),
            r"^aoe-twisted: cannot open interface aoe-nope-0: "
            r"(no such interface|needs CAP_NET_RAW)",
        )

    def test_missing_namespace(self) -> None:
        result = self.aoe("discover", "-i", "eth0", "--netns", "aoe-no-such-ns")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn(b"aoe-no-such-ns", result.stderr)


class RealNetworkTests(SynchronousTestCase):
    """
    ``python -m aoe_twisted`` against ``aoe-twisted serve`` (``twistd aoe``) on a real
    veth pair between two private network namespaces.  Root only.
    """

    def setUp(self) -> None:
        from tests.netns import VethPair

        self.pair = VethPair.create(self)
        log = os.path.abspath(self.mktemp())
        output = open(log, "wb")  # noqa: SIM115 - the server writes it until the cleanup
        self.addCleanup(output.close)
        self.server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "aoe_twisted",
                "serve",
                "--netns",
                self.pair.server_ns,
                "--iface",
                self.pair.server_if,
                "--backend",
                "memory:8M",
                "--shelf",
                "3",
                "--slot",
                "2",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        self.addCleanup(self.stop_server)
        deadline = time.monotonic() + 30
        while True:
            result = self.aoe("discover", "--wait", "0.3")
            if result.returncode == 0:
                break
            if self.server.poll() is not None or time.monotonic() > deadline:
                with open(log) as f:
                    self.fail(f"the server did not come up: {f.read()}")

    def stop_server(self) -> None:
        if self.server.poll() is None:
            self.server.terminate()
            self.server.wait(10)

    def aoe(self, *argv: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "aoe_twisted",
                *argv,
                "-i",
                self.pair.client_if,
                "--netns",
                self.pair.client_ns,
            ],
            input=stdin,
            capture_output=True,
            timeout=120,
            check=False,
        )

    def test_discover_write_read(self) -> None:
        """Discover the target, write bytes from stdin at an offset, read them back."""
        result = self.aoe("discover")
        self.assertEqual(result.returncode, 0, result.stderr)
        rows = result.stdout.decode().splitlines()
        self.assertEqual(rows[1].split()[0], "e3.2")
        self.assertIn("8.0 MiB", rows[1])
        data = b"over a real veth pair\n" + os.urandom(300_000)
        result = self.aoe("write", "e3.2", "--offset", "12345", "-", stdin=data)
        self.assertEqual(result.returncode, 0, result.stderr)
        result = self.aoe("read", "e3.2", "--offset", "12345", "--length", str(len(data)))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, data)

    def test_errors(self) -> None:
        """A missing target and a range past the end are one line each, status 1."""
        result = self.aoe("info", "e9.9", "--timeout", "0.1", "--retries", "1")
        self.assertEqual(
            (result.returncode, result.stderr.decode()),
            (1, f"aoe-twisted: e9.9: no such AoE target answered on {self.pair.client_if}\n"),
        )
        result = self.aoe("read", "e3.2", "--offset", "8M", "--length", "512")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(len(result.stderr.splitlines()), 1)

    def test_server_gone(self) -> None:
        """A target whose server stopped is not found: one line, not a hang."""
        self.stop_server()
        started = time.monotonic()
        result = self.aoe("info", "e3.2", "--timeout", "0.1", "--retries", "2")
        self.assertLess(time.monotonic() - started, 20)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)


class InterruptTests(InProcessCase):
    """
    A command cancelled in the middle (what ``main`` does on SIGINT): one line saying
    how far it got, status 130.  Pieces are 64 KiB here, so a transfer has several.
    """

    def setUp(self) -> None:
        super().setUp()
        self.patch(cli, "SEGMENT", 64 * 1024)

    def answered(self) -> int:
        """How many requests the server has answered so far."""
        assert self.service.protocol is not None
        assert self.service.protocol.dispatcher is not None
        return int(self.service.protocol.dispatcher.counters["answered"])

    def after(self, frames: int) -> Any:
        """An ``interrupt_when`` that fires once the server answered ``frames`` requests."""
        return lambda: self.answered() >= frames

    def test_read(self) -> None:
        """
        An interrupted read names the bytes received and the bytes written out, in
        order from the offset; the output file holds exactly those, as on the disk.
        """
        data = os.urandom(4 * MiB)
        self.target.backend.write(0, data)
        output = self.mktemp()
        self.interrupt_when = self.after(300)
        status, out, err = self.aoe("read", "e1.0", "--offset", "1000", "-o", output)
        self.assertEqual((status, out), (130, ""))
        match = re.fullmatch(
            r"aoe-twisted: interrupted: (\d+) of (\d+) bytes read from e1\.0 \(.*\); "
            r"the (\d+) bytes from offset 1000 to (\d+) are written to (.*)\n", err)
        assert match is not None, err
        received, total, written, end, where = match.groups()
        self.assertEqual((int(total), int(end), where), (4 * MiB - 1000, 1000 + int(written),
                                                         output))
        self.assertGreater(int(written), 0)
        self.assertLess(int(written), int(received))
        self.assertLess(int(received), int(total))
        with open(output, "rb") as f:
            self.assertEqual(f.read(), data[1000 : 1000 + int(written)])

    def test_write(self) -> None:
        """
        An interrupted write names the bytes the target acknowledged and the range
        known written whole: those bytes are on the disk; it was not flushed.
        """
        source = self.mktemp()
        data = os.urandom(3 * MiB)
        with open(source, "wb") as f:
            f.write(data)
        self.interrupt_when = self.after(500)
        status, out, err = self.aoe("write", "e1.0", "--offset", "777", source)
        self.assertEqual((status, out), (130, ""))
        match = re.fullmatch(
            r"aoe-twisted: interrupted: (\d+) of (\d+) bytes acknowledged by e1\.0 \(.*\); "
            r"the (\d+) bytes from offset 777 to (\d+) are all written; not flushed\n", err)
        assert match is not None, err
        acknowledged, total, whole, end = (int(g) for g in match.groups())
        self.assertEqual((total, end), (len(data), 777 + whole))
        self.assertGreater(whole, 0)
        self.assertLessEqual(whole, acknowledged)
        self.assertLess(acknowledged, total)
        self.assertEqual(self.target.backend.read(777, whole), data[:whole])

    def test_write_acknowledged_counts_only_data(self) -> None:
        """
        The count is of the caller's bytes: an unaligned write that ends early does not
        count the rest of its first sector, read and written back with it.
        """
        source = self.mktemp()
        with open(source, "wb") as f:
            f.write(os.urandom(2 * MiB))
        self.interrupt_when = self.after(200)
        status, _out, err = self.aoe("write", "e1.0", "--offset", "100", source)
        self.assertEqual(status, 130)
        acknowledged = int(err.split("interrupted: ")[1].split()[0])
        # Frames of 2 sectors: whole frames but the first, which carries 1024 - 100 bytes.
        self.assertEqual((acknowledged + 100) % 1024, 0, err)

    def test_bench(self) -> None:
        """An interrupted bench names the test it was in and the bytes done."""
        self.interrupt_when = self.after(1024 + 3 + 200)  # the sequential read is 1024 frames
        status, out, err = self.aoe("bench", "e1.0", "--size", "1M", "--duration", "30")
        self.assertEqual(status, 130)
        self.assertIn("sequential read", out)
        self.assertRegex(
            err, r"^aoe-twisted: interrupted during random read 1 sector: e1\.0 acknowledged "
                 r"\d+ bytes read and 0 bytes written\n$")

    def test_other_commands(self) -> None:
        """A command that transfers nothing is just "interrupted"."""
        self.interrupt_when = lambda: True
        status, out, err = self.aoe("info", "e1.0")
        self.assertEqual((status, out, err), (130, "", "aoe-twisted: interrupted\n"))


class SigintTests(SynchronousTestCase):
    """
    Ctrl-C, for real: ``python -m aoe_twisted read/write/bench`` against ``twistd aoe``
    serving a file on a veth pair between two namespaces, sent SIGINT in the middle of
    a transfer.  One line on standard error, no traceback, exit status 130.  Root only.
    """

    #: The served file: big enough that no transfer ends before the signal.
    DISK = 512 * MiB

    def setUp(self) -> None:
        from tests.netns import VethPair

        self.pair = VethPair.create(self)
        self.image = os.path.abspath(self.mktemp())
        with open(self.image, "wb") as f:
            f.truncate(self.DISK)
        log = os.path.abspath(self.mktemp())
        output = open(log, "wb")  # noqa: SIM115 - the server writes it until the cleanup
        self.addCleanup(output.close)
        self.server = subprocess.Popen(
            [sys.executable, "-m", "aoe_twisted", "serve", "--netns", self.pair.server_ns,
             "--iface", self.pair.server_if, "--backend", f"file:{self.image}",
             "--shelf", "3", "--slot", "2"],
            stdout=output, stderr=subprocess.STDOUT,
        )
        self.addCleanup(self.stop_server)
        deadline = time.monotonic() + 30
        while True:
            probe = subprocess.run(self.argv("discover", "--wait", "0.3"), capture_output=True,
                                   timeout=30, check=False)
            if probe.returncode == 0:
                break
            if self.server.poll() is not None or time.monotonic() > deadline:
                with open(log) as f:
                    self.fail(f"the server did not come up: {f.read()}")

    def stop_server(self) -> None:
        if self.server.poll() is None:
            self.server.terminate()
            self.server.wait(10)

    def argv(self, *argv: str) -> list[str]:
        return [sys.executable, "-m", "aoe_twisted", *argv, "-i", self.pair.client_if,
                "--netns", self.pair.client_ns]

    def interrupt(self, process: subprocess.Popen[bytes], started: Any,
                  timeout: float = 60) -> tuple[bytes, bytes]:
        """Send SIGINT to ``process`` once ``started()`` is true; return its output."""
        deadline = time.monotonic() + timeout
        while not started():
            if process.poll() is not None:
                self.fail(f"finished before the signal: {process.communicate()}")
            if time.monotonic() > deadline:
                process.kill()
                self.fail("the transfer did not start")
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
        self.assertEqual(process.returncode, 130, err)
        self.assertNotIn(b"Traceback", err)
        self.assertEqual(len(err.splitlines()), 1, err)
        return out, err

    def test_read(self) -> None:
        """
        ``read -o FILE`` interrupted: the line names the bytes received and those
        written to FILE, which holds exactly them, as in the served file.
        """
        data = os.urandom(MiB)
        with open(self.image, "r+b") as f:
            for offset in range(0, 64 * MiB, MiB):
                f.seek(offset)
                f.write(data[offset // MiB :] + data[: offset // MiB])
        output = os.path.abspath(self.mktemp())
        process = subprocess.Popen(self.argv("read", "e3.2", "-o", output),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _out, err = self.interrupt(
            process, lambda: os.path.exists(output) and os.path.getsize(output) > 4 * MiB)
        match = re.fullmatch(
            rb"aoe-twisted: interrupted: (\d+) of 536870912 bytes read from e3\.2 \(.*\); "
            rb"the (\d+) bytes from offset 0 to (\d+) are written to (.*)\n", err)
        assert match is not None, err
        received, written, end = (int(g) for g in match.groups()[:3])
        self.assertEqual((written, match.group(4).decode()), (end, output))
        self.assertGreater(written, 4 * MiB)
        self.assertLessEqual(written, received)
        self.assertLess(received, self.DISK)
        self.assertEqual(os.path.getsize(output), written)
        with open(output, "rb") as f, open(self.image, "rb") as image:
            self.assertEqual(f.read(), image.read(written))

    def test_write(self) -> None:
        """
        ``write`` from standard input interrupted: the line names the bytes the target
        acknowledged and the range written whole, which the served file holds.
        """
        block = os.urandom(MiB)
        process = subprocess.Popen(self.argv("write", "e3.2", "--offset", "4096", "-"),
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        assert process.stdin is not None

        def feed() -> None:
            assert process.stdin is not None
            try:
                for _ in range(256):
                    process.stdin.write(block)
            except (BrokenPipeError, ValueError):
                pass

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        _out, err = self.interrupt(
            process, lambda: os.stat(self.image).st_blocks * 512 > 8 * MiB)
        if not process.stdin.closed:
            process.stdin.close()
        match = re.fullmatch(
            rb"aoe-twisted: interrupted: (\d+) bytes acknowledged by e3\.2 \(.*\); "
            rb"the (\d+) bytes from offset 4096 to (\d+) are all written; not flushed\n", err)
        assert match is not None, err
        acknowledged, whole, end = (int(g) for g in match.groups())
        self.assertEqual(end, 4096 + whole)
        self.assertGreater(whole, 0)
        self.assertLessEqual(whole, acknowledged)
        with open(self.image, "rb") as f:
            f.seek(4096)
            written = f.read(whole)
        self.assertEqual(written, (block * (whole // MiB + 1))[:whole])

    def test_bench(self) -> None:
        """``bench`` interrupted: the rows so far, then one line naming the test."""
        process = subprocess.Popen(self.argv("bench", "e3.2", "--size", "256M",
                                             "--duration", "30"),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        began = time.monotonic()
        out, err = self.interrupt(process, lambda: time.monotonic() - began > 3)
        self.assertTrue(out.startswith(b"bench e3.2 on "), out)
        self.assertRegex(err, rb"^aoe-twisted: interrupted during (sequential|random) read.*: "
                              rb"e3\.2 acknowledged \d+ bytes read and 0 bytes written\n$")
