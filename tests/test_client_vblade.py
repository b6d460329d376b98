"""
Interoperability: our initiator (``aoe_twisted.initiator.client``) against ``vblade``.

``vblade`` (Coraid's reference AoE target in C, packaged by Debian) serves a
backing file on the server end of a veth pair between two private network
namespaces (``tests.netns``); ``AoEClient`` listens on the client end, in
this process, on the trial reactor.  The tests discover the target, read and
write it across frame boundaries, check the backing file on the host, and
check the failures vblade can produce: IDNF past the end, FLUSH CACHE EXT
(which vblade does not implement) and silence when its MAC mask excludes us.

What vblade 25 does, from its source (``aoe.c``, ``ata.c``) and checked here:

- its config reply says buffer count 16, firmware version ``0x4019``
  (``0x4000 + 25``) and sector count ``(MTU - 36) // 512``: 2 at MTU 1500,
  17 at MTU 9000;
- IDENTIFY word 83 is ``0x5400``: LBA48 and FLUSH CACHE (0xE7), but *not*
  FLUSH CACHE EXT (0xEA, bit 13), which it aborts (status ``ERR|DRDY``,
  error ABRT); it answers 0xE7 with status 0 (not even DRDY) and does not
  sync the file;
- ``-m MAC`` makes it ignore every frame from any other source.

Root and vblade only: without them the tests skip, or fail under
``AOE_TWISTED_REQUIRE_INTEROP=1``.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aoe_twisted.core.identify import build_identify
from aoe_twisted.core.wire import (
    ETHERTYPE,
    SECTOR_SIZE,
    ATAArg,
    ATACmdStatus,
    Command,
    EthernetFrame,
    Header,
)
from aoe_twisted.initiator.client import (
    AoEClient,
    AoETimeout,
    ATAError,
    RemoteDisk,
    RetryPolicy,
    TargetInfo,
    TargetNotFound,
    parse_identify,
)
from tests.netns import VethPair, require, run
from tests.test_identify import vblade_identify_page

Gen = Generator[defer.Deferred[Any], Any, None]

SHELF = 3
SLOT = 7
#: An odd size (1 MiB and one sector), so the last sector is not on a round boundary.
DISK_SECTORS = 2049
DISK_BYTES = DISK_SECTORS * SECTOR_SIZE
#: vblade 25's config reply: buffer count and firmware version (0x4000 + version).
VBLADE_BUFFERS = 16
VBLADE_FIRMWARE = 0x4019
#: Sectors per command vblade offers: ``(MTU - 36) // 512``.
VBLADE_SECTORS = {1500: 2, 9000: 17}
#: A locally administered MAC that no interface here has.
STRANGER = "02:00:5e:00:00:01"
#: Gives up after 0.5 + 1 + 2 + 2 + 2 s, well inside a test's timeout.
RETRY = RetryPolicy(initial_timeout=0.5, max_timeout=2.0, retries=4)
#: The policy of the test that expects silence: gives up after 0.1 + 0.2 + 0.2 s.
SHORT_RETRY = RetryPolicy(initial_timeout=0.1, max_timeout=0.2, retries=2)
_STARTUP_TIMEOUT = 5.0
_DRDY = int(ATACmdStatus.READY_STATUS)
_ERR_DRDY = int(ATACmdStatus.ERR_STATUS) | _DRDY
_ABRT = 0x04


def pattern(size: int, seed: int) -> bytes:
    """Return ``size`` reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


def vblade_missing() -> str | None:
    """Return why vblade cannot be run, or ``None`` if it is installed."""
    if shutil.which("vblade") is None:
        return "needs vblade (apt install vblade)"
    return None


def interface_mac(namespace: str, interface: str) -> bytes:
    """Return the MAC address of ``interface`` in ``namespace``."""
    words = run("ip", "-n", namespace, "-o", "link", "show", "dev", interface).split()
    return bytes.fromhex(words[words.index("link/ether") + 1].replace(":", ""))


class IdentifyFlushTests(SynchronousTestCase):
    """Which flush command the client picks from an IDENTIFY page (no root needed)."""

    def test_vblade_page(self) -> None:
        """vblade's page (word 83 ``0x5400``) advertises LBA48 but not FLUSH CACHE EXT."""
        identity = parse_identify(vblade_identify_page())
        self.assertEqual((identity.lba48, identity.flush_ext), (True, False))
        info = TargetInfo(SHELF, SLOT, bytes(6), 16, 2, VBLADE_FIRMWARE, b"")
        self.assertFalse(info.with_identity(identity).flush_ext)

    def test_our_page(self) -> None:
        """Our own target's page advertises FLUSH CACHE EXT, so it keeps getting 0xEA."""
        identity = parse_identify(build_identify(DISK_SECTORS))
        self.assertEqual((identity.lba48, identity.flush_ext), (True, True))

    def test_invalid_word_83(self) -> None:
        """Bit 13 of word 83 counts only when bits 15:14 say the word is valid (01)."""
        page = bytearray(build_identify(DISK_SECTORS))
        for word83, expected in ((0x6400, True), (0x2400, False), (0xE400, False),
                                 (0xFFFF, False), (0x4400, False)):
            page[166:168] = word83.to_bytes(2, "little")
            self.assertEqual(parse_identify(bytes(page)).flush_ext, expected, hex(word83))


class VbladeCase(TestCase):
    """Start vblade on a fresh veth pair and our client on its other end."""

    timeout = 20

    def setUp(self) -> None:
        require(self)
        require(self, vblade_missing())

    @defer.inlineCallbacks
    def start(self, mtu: int = 1500, mask: Sequence[str] = (), mask_us: bool = False,
              retry: RetryPolicy = RETRY) -> Gen:
        """
        Serve a patterned image with vblade as ``eSHELF.SLOT``; listen with ``self.client``.

        The client listens first, so nothing vblade sends is missed.  ``mask``
        (and our own MAC, with ``mask_us``) is passed to vblade as ``-m``.  The
        cleanups kill vblade, close the client and delete the namespaces, in
        that order.
        """
        self.pair = VethPair.create(self, mtu=mtu)
        self.workdir = Path(self.mktemp())
        self.workdir.mkdir(parents=True)
        self.image = self.workdir / "disk.img"
        self.original = pattern(DISK_BYTES, seed=mtu)
        self.image.write_bytes(self.original)
        self.client = AoEClient.listen(
            self.pair.client_if, reactor=reactor, netns=self.pair.client_ns, retry=retry
        )
        self.addCleanup(self.client.close)
        self.server_mac = interface_mac(self.pair.server_ns, self.pair.server_if)
        macs = list(mask)
        if mask_us:
            macs.append(":".join(f"{b:02x}" for b in self.client.protocol.mac))
        yield self.spawn_vblade(macs)

    @defer.inlineCallbacks
    def spawn_vblade(self, mask: list[str]) -> Gen:
        """
        Run vblade in the server namespace and wait until it listens.

        It counts as up once it printed its ``pid N: eS.L, ...`` line, which
        it does after opening its socket.
        """
        log_path = self.workdir / "vblade.log"
        argv = ["ip", "netns", "exec", self.pair.server_ns, "vblade"]
        if mask:
            argv += ["-m", ",".join(mask)]
        argv += [str(SHELF), str(SLOT), self.pair.server_if, str(self.image)]
        with log_path.open("wb") as log:
            # ``ip netns exec`` execs vblade: the child's pid is vblade's own.
            self.vblade = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.addCleanup(self.stop_vblade, self.vblade)
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while b"pid " not in log_path.read_bytes():
            if self.vblade.poll() is not None or time.monotonic() > deadline:
                self.fail(f"vblade did not start (exit {self.vblade.returncode}): "
                          f"{log_path.read_text(errors='replace')!r}")
            yield task.deferLater(reactor, 0.01, lambda: None)

    def stop_vblade(self, process: subprocess.Popen[bytes]) -> None:
        """Kill ``process`` (vblade keeps nothing worth a gentler stop) and reap it."""
        if process.poll() is None:
            process.kill()
        process.wait(5)

    @defer.inlineCallbacks
    def open_disk(self) -> Generator[defer.Deferred[Any], Any, RemoteDisk]:
        """Open vblade's target with our client."""
        disk = yield self.client.open(SHELF, SLOT)
        return disk

    def image_bytes(self, offset: int, length: int) -> bytes:
        """Return ``length`` bytes of the backing file from ``offset``, read on the host."""
        with self.image.open("rb") as f:
            f.seek(offset)
            return f.read(length)

    def sent_headers(self) -> list[Header]:
        """Start recording every AoE frame our client sends; return the list it fills."""
        port = self.client.port
        sent: list[Header] = []
        write = port.write

        def record(frame: bytes) -> None:
            ethernet = EthernetFrame.from_bytes(frame)
            if ethernet.ethertype == ETHERTYPE:
                sent.append(Header.from_bytes(ethernet.payload))
            write(frame)

        self.patch(port, "write", record)
        return sent


class DiscoveryTests(VbladeCase):
    """Our discovery and IDENTIFY understand vblade's answers."""

    @defer.inlineCallbacks
    def check_discovery(self, mtu: int) -> Gen:
        """Discover vblade at ``mtu`` and check everything its answers say."""
        yield self.start(mtu=mtu)
        infos = yield self.client.discover(0.5)
        self.assertEqual(len(infos), 1, infos)
        [info] = infos
        self.assertEqual((info.shelf, info.slot, info.name), (SHELF, SLOT, f"e{SHELF}.{SLOT}"))
        self.assertEqual(info.mac, self.server_mac)
        self.assertEqual(
            (info.buffer_count, info.firmware_version, info.sector_count),
            (VBLADE_BUFFERS, VBLADE_FIRMWARE, VBLADE_SECTORS[mtu]),
        )
        self.assertEqual(info.config_string, b"")
        self.assertEqual(info.size, os.path.getsize(self.image))
        self.assertEqual(info.size, DISK_BYTES)
        self.assertTrue(info.lba48)
        self.assertEqual(info.model, "Coraid EtherDrive vblade")
        self.assertEqual(info.firmware, f"V{VBLADE_FIRMWARE & 0xFF}")

        disk = yield self.open_disk()
        self.assertEqual(disk.info, info)
        self.assertEqual((disk.sectors, disk.window), (DISK_SECTORS, VBLADE_BUFFERS))
        self.assertEqual(disk.sectors_per_frame, VBLADE_SECTORS[mtu])
        page = yield disk.identify()
        self.assertEqual(parse_identify(page).size, DISK_BYTES)

    def test_discover_mtu1500(self) -> Any:
        """
        At MTU 1500 discovery finds vblade's ``e3.7`` from its MAC: buffer count 16,
        firmware 0x4019, 2 sectors per frame, and IDENTIFY gives the file's size.
        """
        return self.check_discovery(1500)

    def test_discover_mtu9000(self) -> Any:
        """At MTU 9000 vblade offers 17 sectors per command and the disk uses 17 a frame."""
        return self.check_discovery(9000)

    @defer.inlineCallbacks
    def test_discover_by_address(self) -> Gen:
        """A query for another shelf finds nothing; one for vblade's address finds it alone."""
        yield self.start()
        none = yield self.client.discover(0.3, shelf=SHELF + 1, identify=False)
        self.assertEqual(none, [])
        [info] = yield self.client.discover(0.3, shelf=SHELF, slot=SLOT, identify=False)
        self.assertEqual((info.name, info.size), (f"e{SHELF}.{SLOT}", None))


class ReadWriteTests(VbladeCase):
    """Data written through vblade lands in its backing file and reads back."""

    @defer.inlineCallbacks
    def test_first_and_last_sector(self) -> Gen:
        """Writes to LBA 0 and the last LBA read back and are in the file; the rest is intact."""
        yield self.start()
        disk = yield self.open_disk()
        first, last = pattern(SECTOR_SIZE, 10), pattern(SECTOR_SIZE, 11)
        yield disk.write(0, first)
        yield disk.write(DISK_SECTORS - 1, last)
        self.assertEqual((yield disk.read(0, 1)), first)
        self.assertEqual((yield disk.read(DISK_SECTORS - 1, 1)), last)
        self.assertEqual(self.image_bytes(0, SECTOR_SIZE), first)
        self.assertEqual(self.image_bytes(DISK_BYTES - SECTOR_SIZE, SECTOR_SIZE), last)
        self.assertEqual(self.image_bytes(SECTOR_SIZE, DISK_BYTES - 2 * SECTOR_SIZE),
                         self.original[SECTOR_SIZE:-SECTOR_SIZE])
        self.assertEqual(os.path.getsize(self.image), DISK_BYTES)
        # The untouched pattern reads back as it was written on the host.
        self.assertEqual((yield disk.read(1, 3)), self.original[SECTOR_SIZE : 4 * SECTOR_SIZE])

    @defer.inlineCallbacks
    def check_multi_frame(self, mtu: int, lba: int) -> Gen:
        """Write 64 KiB at ``lba`` at ``mtu``, read it back and check the file around it."""
        yield self.start(mtu=mtu)
        disk = yield self.open_disk()
        data = pattern(64 * 1024, seed=lba)
        count = len(data) // SECTOR_SIZE
        yield disk.write(lba, data)
        self.assertEqual(disk.peak_in_flight, min(VBLADE_BUFFERS, -(-count // VBLADE_SECTORS[mtu])))
        # One sector either side, to catch a frame written one sector off.
        start = (lba - 1) * SECTOR_SIZE
        around = yield disk.read(lba - 1, count + 2)
        expected = (self.original[start : start + SECTOR_SIZE] + data
                    + self.original[start + len(data) + SECTOR_SIZE : start + len(data)
                                    + 2 * SECTOR_SIZE])
        self.assertEqual(around, expected)
        self.assertEqual(self.image_bytes(start, len(expected)), expected)
        # Unaligned bytes across frame boundaries, through read_at/write_at.
        offset = lba * SECTOR_SIZE + 1000
        message = b"vblade interop " * 300
        yield disk.write_at(offset, message)
        self.assertEqual((yield disk.read_at(offset, len(message))), message)
        self.assertEqual(self.image_bytes(offset, len(message)), message)
        self.assertEqual(self.client.protocol.retransmits, 0)

    def test_multi_frame_mtu1500(self) -> Any:
        """64 KiB at odd LBA 1001 at MTU 1500: 64 frames, 16 in flight, byte-exact in the file."""
        return self.check_multi_frame(1500, 1001)

    def test_multi_frame_mtu9000(self) -> Any:
        """64 KiB at odd LBA 333 at MTU 9000: 17-sector frames and a short last one."""
        return self.check_multi_frame(9000, 333)


class ErrorTests(VbladeCase):
    """vblade's failures reach the caller as the client's exceptions."""

    @defer.inlineCallbacks
    def test_out_of_range(self) -> Gen:
        """
        A read or write at or across the end fails with ``ATAError`` naming IDNF,
        and a write that fails so leaves the file as it was.
        """
        yield self.start()
        disk = yield self.open_disk()
        for attempt in (
            lambda: disk.read(DISK_SECTORS, 1),
            lambda: disk.read(DISK_SECTORS - 1, 2),
            lambda: disk.write(DISK_SECTORS, pattern(SECTOR_SIZE, 1)),
        ):
            error = yield self.assertFailure(attempt(), ATAError)
            self.assertEqual(error.names, ("IDNF",))
            self.assertEqual((error.status, error.error), (_ERR_DRDY, 0x10))
            self.assertIn("IDNF", str(error))
            self.assertIn(f"e{SHELF}.{SLOT}", str(error))
            self.assertEqual(len(str(error).splitlines()), 1)
        self.assertEqual(self.image.read_bytes(), self.original)
        # The disk is still usable after the errors.
        self.assertEqual((yield disk.read(DISK_SECTORS - 1, 1)), self.original[-SECTOR_SIZE:])

    @defer.inlineCallbacks
    def test_flush(self) -> Gen:
        """
        ``flush`` succeeds against vblade: its IDENTIFY does not advertise FLUSH
        CACHE EXT, so the client sends FLUSH CACHE (0xE7), which vblade answers
        with status 0.  (vblade aborts 0xEA, as the raw requests show.)
        """
        yield self.start()
        disk = yield self.open_disk()
        self.assertTrue(disk.info.lba48)
        sent = self.sent_headers()
        data = pattern(4 * SECTOR_SIZE, 5)
        yield disk.write(10, data)
        self.assertIsNone((yield disk.flush()))
        flushes = [h.arg for h in sent if isinstance(h.arg, ATAArg) and not h.arg.flag_write]
        self.assertEqual([(a.cmd_status, a.flag_lba48_extended) for a in flushes],
                         [(int(ATACmdStatus.FLUSH), False)])
        self.assertEqual(self.image_bytes(10 * SECTOR_SIZE, len(data)), data)

        # What vblade itself answers to each flush command.
        protocol = self.client.protocol
        answers = {}
        for command in (ATACmdStatus.FLUSH, ATACmdStatus.FLUSH_EXT):
            reply = yield protocol.request(
                self.server_mac, SHELF, SLOT, Command.ISSUE_ATA_COMMAND,
                ATAArg(flag_lba48_extended=command == ATACmdStatus.FLUSH_EXT,
                       cmd_status=command),
            )
            self.assertFalse(reply.header.flag_error)
            answers[int(command)] = (reply.header.arg.cmd_status, reply.header.arg.err_feature)
        self.assertEqual(answers, {0xE7: (0, 0), 0xEA: (_ERR_DRDY, _ABRT)})


class MaskTests(VbladeCase):
    """vblade's ``-m`` MAC mask: silence for others, service for the listed MAC."""

    @defer.inlineCallbacks
    def test_masked_out_times_out(self) -> Gen:
        """
        With ``-m`` naming another MAC vblade ignores us: discovery finds nothing,
        ``open`` says no such target, and a request sent straight to its MAC fails
        with ``AoETimeout`` after the retry policy's tries, with nothing left pending.
        """
        yield self.start(mask=[STRANGER], retry=SHORT_RETRY)
        started = time.monotonic()
        self.assertEqual((yield self.client.discover(0.3)), [])
        error = yield self.assertFailure(self.client.open(SHELF, SLOT), TargetNotFound)
        self.assertIn(f"e{SHELF}.{SLOT}", str(error))

        info = TargetInfo(SHELF, SLOT, self.server_mac, VBLADE_BUFFERS, 2, VBLADE_FIRMWARE,
                          b"", size=DISK_BYTES)
        disk = RemoteDisk(self.client.protocol, info)
        timeout = yield self.assertFailure(disk.read(0, 8), AoETimeout)
        self.assertEqual(timeout.attempts, SHORT_RETRY.retries + 1)
        self.assertAlmostEqual(timeout.waited, sum(SHORT_RETRY.timeouts()))
        self.assertIn("timed out", str(timeout))
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual((self.client.protocol.in_flight, disk.in_flight), (0, 0))
        self.assertEqual(self.image.read_bytes(), self.original)

    @defer.inlineCallbacks
    def test_masked_in(self) -> Gen:
        """With ``-m`` naming another MAC and ours, vblade serves us as usual."""
        yield self.start(mask=[STRANGER], mask_us=True)
        disk = yield self.open_disk()
        data = pattern(3 * SECTOR_SIZE, 9)
        yield disk.write(5, data)
        self.assertEqual((yield disk.read(5, 3)), data)
        self.assertEqual(self.image_bytes(5 * SECTOR_SIZE, len(data)), data)


class CommandLineTests(VbladeCase):
    """The ``aoe-twisted`` command line against vblade."""

    @defer.inlineCallbacks
    def test_write_flushes_and_reads(self) -> Gen:
        """
        ``aoe-twisted write`` (which flushes unless ``--no-flush``) and ``read``
        work against vblade; the bytes land in the backing file.
        """
        yield self.start()
        yield self.client.close()
        data = b"written by aoe-twisted\n" + pattern(5000, 21)
        offset = 777_777
        common = ["-i", self.pair.client_if, "--netns", self.pair.client_ns]
        written = yield self.aoe("write", f"e{SHELF}.{SLOT}", "--offset", str(offset), "-",
                                 *common, stdin=data)
        self.assertEqual(written.returncode, 0, written.stderr)
        self.assertIn(b"flushed", written.stderr)
        self.assertEqual(self.image_bytes(offset, len(data)), data)
        read = yield self.aoe("read", f"e{SHELF}.{SLOT}", "--offset", str(offset),
                              "--length", str(len(data)), *common)
        self.assertEqual(read.returncode, 0, read.stderr)
        self.assertEqual(read.stdout, data)

    def aoe(self, *argv: str, stdin: bytes = b"") -> defer.Deferred[Any]:
        """Run ``python -m aoe_twisted ARGV`` in a thread; fire with its ``CompletedProcess``."""
        from twisted.internet.threads import deferToThread

        return deferToThread(
            subprocess.run, [sys.executable, "-m", "aoe_twisted", *argv], input=stdin,
            capture_output=True, timeout=15, check=False,
        )
