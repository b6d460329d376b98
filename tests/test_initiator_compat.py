"""
What the Windows initiators and iPXE rely on, sent as they send it, to ``twistd aoe``.

Each test starts ``twistd -n aoe`` (a subprocess, as users run it) in the
server namespace of a new veth pair, serving three targets: e1.1 on a sparse
129 GiB file (more than LBA28's 128 GiB) and two small memory disks, e1.2 and
e7.3.  ``tests.peer.Peer`` sends raw frames from the client namespace, built
the way each initiator builds them (as their sources show):

- WinVBlock and WinAoE (``Sha0/winvblock``, ``src/aoe/driver.c``) discover
  with an ATA IDENTIFY DEVICE to shelf 0xffff, slot 0xff at the broadcast
  MAC, E flag clear, sector count 1; every reply whose tag matches becomes a
  disk, at the address *in the reply*, of the size in IDENTIFY words 100-103
  (``reply->Data[200]``).  They then find the frame size by reading 1, 2,
  3 ... sectors until a reply is shorter than asked (or none comes).
- iPXE (``src/net/aoe.c``, ``src/drivers/block/ata.c``) sends IDENTIFY with
  E clear and the device register (0xE0) in LBA byte 3, and takes the size
  from words 100-103 and uses READ/WRITE SECTORS EXT (0x24/0x34, E set) only
  if word 83 bit 10 is set; otherwise words 60-61 and the 28-bit commands
  (0x20/0x30, E clear, 0xE0 | LBA bits 24-27 in LBA byte 3).  At most 2
  sectors per command.

The tests skip without root or ``ip`` (fail under
``AOE_TWISTED_REQUIRE_INTEROP=1``).
"""

from __future__ import annotations

import random
import signal
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from aoe_twisted.core.wire import (
    BROADCAST_MAC,
    BROADCAST_MAJOR,
    BROADCAST_MINOR,
    SECTOR_SIZE,
    ATAArg,
    ATACmdStatus,
    Command,
    Header,
)
from aoe_twisted.testing import ata_arg
from tests.netns import VethPair, require
from tests.peer import Peer, Reply
from tests.test_linux_initiator import (
    TwistdTarget,
    log_problems,
    require_interop,
    twistd_unavailable_reason,
)

Gen = Generator[defer.Deferred[Any], Any, None]

_DRDY = int(ATACmdStatus.READY_STATUS)
#: More than LBA28 addresses (2^28 sectors, 128 GiB), as a sparse file.
BIG_BYTES = 129 << 30
BIG_SECTORS = BIG_BYTES // SECTOR_SIZE
#: (shelf, slot) -> size in bytes of the targets every test serves.
TARGETS = {(1, 1): BIG_BYTES, (1, 2): 1 << 20, (7, 3): 3 << 20}
BIG = (1, 1)
#: How long a broadcast collects replies.
COLLECT = 0.5

#: LBAs on the big disk that the read tests fill with random data.
LBA48_READ = (1 << 28) + 0x1235  # past 2^28, odd
LBA28_READ = 0x0ABC_DEF1  # bits 24-27 not zero: iPXE puts them in LBA byte 3
LBA28_WRITE = 0x0F00_0123
FILLED = (0, 1, 2, LBA48_READ, LBA48_READ + 1, LBA28_READ, LBA28_READ + 1)


def ipxe_lba28(lba: int) -> int:
    """The LBA field iPXE sends with a 28-bit command: 0xE0 | bits 24-27 in byte 3."""
    return (0xE0 | (lba >> 24) & 0x0F) << 24 | lba & 0xFF_FFFF


def words(page: bytes) -> list[int]:
    """The 256 little-endian 16-bit words of an IDENTIFY page."""
    return [int.from_bytes(page[i : i + 2], "little") for i in range(0, len(page), 2)]


class InitiatorCompatTests(TestCase):
    """Our target answers Windows initiators and iPXE the way they expect."""

    timeout = 60

    def setUp(self) -> None:
        require(self)
        require_interop(self, twistd_unavailable_reason())
        workdir = Path(self.mktemp())
        workdir.mkdir(parents=True)
        self.image = workdir / "big.img"
        rng = random.Random(0xC0)
        self.sectors = {lba: rng.randbytes(SECTOR_SIZE) for lba in FILLED}
        with self.image.open("wb") as f:
            f.truncate(BIG_BYTES)
            for lba, data in self.sectors.items():
                f.seek(lba * SECTOR_SIZE)
                f.write(data)
        self.pair = VethPair.create(self)
        extra = [
            arg
            for (shelf, slot), size in TARGETS.items()
            if (shelf, slot) != BIG
            for arg in ("--target", f"{shelf}.{slot}=memory:{size}")
        ]
        self.server = TwistdTarget(
            self.pair.server_ns,
            self.pair.server_if,
            self.image,
            workdir / "twistd.log",
            shelf=BIG[0],
            slot=BIG[1],
            extra_args=extra,
        )
        # Every target served before the first request: a broadcast asks them all.
        self.server.start(targets=len(TARGETS))
        self.addCleanup(self._stop_server)
        self.peer = Peer(self.pair.client_if, self.pair.client_ns)
        self.peer.start()
        self.addCleanup(self.peer.stop)
        self.server_mac = bytes.fromhex(self.server.mac.replace(":", ""))

    def _stop_server(self) -> None:
        """Stop the server; it must stop cleanly, having logged no problem."""
        returncode = self.server.stop()
        log = self.server.log
        self.assertIn(returncode, (0, -signal.SIGTERM), log)
        self.assertEqual(log_problems(log), [], log)

    def ata(
        self,
        arg: ATAArg,
        shelf: int = BIG[0],
        slot: int = BIG[1],
        dst: bytes | None = None,
        timeout: float = 2.0,
    ) -> defer.Deferred[list[Reply]]:
        """Send one ATA command (to the server's MAC unless ``dst``); collect the replies."""
        header = Header(
            major=shelf,
            minor=slot,
            command=Command.ISSUE_ATA_COMMAND,
            tag=self.peer.next_tag(),
            arg=arg,
        )
        return self.peer.request(header, dst or self.server_mac, timeout=timeout)

    def ok(self, replies: list[Reply]) -> ATAArg:
        """The ATA argument of the one successful reply (DRDY) from the server."""
        self.assertEqual(len(replies), 1, replies)
        reply = replies[0]
        self.assertEqual(reply.src, self.server_mac)
        self.assertFalse(reply.header.flag_error)
        arg = reply.arg
        assert isinstance(arg, ATAArg)
        self.assertEqual(arg.cmd_status, _DRDY, f"ATA status {arg.cmd_status:#x}")
        return arg

    def on_disk(self, lba: int, count: int = 1) -> bytes:
        """Sectors ``lba`` .. ``lba + count - 1`` of the big disk's file."""
        with self.image.open("rb") as f:
            f.seek(lba * SECTOR_SIZE)
            return f.read(count * SECTOR_SIZE)

    # -- WinVBlock / WinAoE ------------------------------------------------

    @defer.inlineCallbacks
    def test_broadcast_identify_every_target(self) -> Gen:
        """
        An IDENTIFY to shelf 0xffff, slot 0xff at the broadcast MAC (WinVBlock's
        probe: E clear, count 1) gets one good reply per target, each from the
        server's MAC with the target's own address (WinVBlock names the disk
        from the reply) and its size in words 100-103.
        """
        arg = ata_arg(ATACmdStatus.IDENTIFY, count=1, extended=False)
        replies = yield self.ata(
            arg, BROADCAST_MAJOR, BROADCAST_MINOR, dst=BROADCAST_MAC, timeout=COLLECT
        )
        found = {}
        for reply in replies:
            page = self.ok([reply]).data
            self.assertEqual(len(page), SECTOR_SIZE)
            found[reply.header.major, reply.header.minor] = int.from_bytes(page[200:208], "little")
        expected = {address: size // SECTOR_SIZE for address, size in TARGETS.items()}
        self.assertEqual(found, expected)
        self.assertEqual(len(replies), len(TARGETS), "a target answered twice")

    @defer.inlineCallbacks
    def test_frame_size_probe(self) -> Gen:
        """
        WinVBlock's frame-size probe at MTU 1500 settles on 2 sectors: reads
        of 1 and 2 sectors (0x24, E set) come back whole, and a read of 3
        comes back shorter than 3 sectors (aborted), which is where it stops.
        """
        for count in (1, 2):
            arg = self.ok((yield self.ata(ata_arg(ATACmdStatus.READ_48BIT, count=count))))
            self.assertEqual(arg.data, self.on_disk(0, count))
        replies = yield self.ata(ata_arg(ATACmdStatus.READ_48BIT, count=3))
        self.assertEqual(len(replies), 1, replies)
        data = replies[0].arg.data
        self.assertLess(len(data), 3 * SECTOR_SIZE)

    # -- IDENTIFY words ----------------------------------------------------

    @defer.inlineCallbacks
    def _identify_as_ipxe(self, shelf: int, slot: int) -> Generator[Any, Any, list[int]]:
        """IDENTIFY as iPXE sends it (E clear, count 1, 0xE0 in LBA byte 3): the page's words."""
        arg = ata_arg(ATACmdStatus.IDENTIFY, count=1, extended=False, lba=0xE000_0000)
        page = self.ok((yield self.ata(arg, shelf, slot))).data
        self.assertEqual(len(page), SECTOR_SIZE)
        return words(page)

    @defer.inlineCallbacks
    def test_identify_lba48_supported_and_enabled(self) -> Gen:
        """
        Word 83 bit 10 (LBA48 supported: what iPXE checks before it uses the
        EXT commands and words 100-103) and word 86 bit 10 (enabled) are set.
        """
        w = yield self._identify_as_ipxe(*BIG)
        self.assertTrue(w[83] & 0x0400, f"word 83 = {w[83]:#06x}")
        self.assertTrue(w[86] & 0x0400, f"word 86 = {w[86]:#06x}")

    @defer.inlineCallbacks
    def test_identify_capacity_big_disk(self) -> Gen:
        """
        For a disk over 128 GiB, words 60-61 (the LBA28 capacity) hold
        0x0FFFFFFF, as ATA says, and words 100-103 the whole size.
        """
        w = yield self._identify_as_ipxe(*BIG)
        self.assertEqual(w[60] | w[61] << 16, 0x0FFF_FFFF)
        self.assertEqual(sum(w[100 + i] << (16 * i) for i in range(4)), BIG_SECTORS)

    @defer.inlineCallbacks
    def test_identify_capacity_small_disk(self) -> Gen:
        """For a disk under 128 GiB, words 60-61 and 100-103 both hold its size."""
        w = yield self._identify_as_ipxe(1, 2)
        sectors = TARGETS[1, 2] // SECTOR_SIZE
        self.assertEqual(w[60] | w[61] << 16, sectors)
        self.assertEqual(sum(w[100 + i] << (16 * i) for i in range(4)), sectors)

    # -- iPXE's reads and writes at MTU 1500 -------------------------------

    @defer.inlineCallbacks
    def test_ipxe_lba48_read(self) -> Gen:
        """
        A 2-sector READ SECTORS EXT as iPXE sends it on an LBA48 disk (0x24,
        AFlags 0x40: E only) past 2^28 returns those two sectors.
        """
        arg = ata_arg(ATACmdStatus.READ_48BIT, count=2, lba=LBA48_READ, extended=True)
        got = self.ok((yield self.ata(arg)))
        self.assertEqual(got.data, self.on_disk(LBA48_READ, 2))
        self.assertEqual(got.data[:SECTOR_SIZE], self.sectors[LBA48_READ])

    @defer.inlineCallbacks
    def test_ipxe_lba28_read(self) -> Gen:
        """
        A 2-sector READ SECTORS as iPXE sends it without LBA48 (0x20, E
        clear, LBA byte 3 = 0xE0 | bits 24-27) reads the 28-bit LBA: the
        device register bits are not part of the address.
        """
        arg = ata_arg(ATACmdStatus.READ_28BIT, count=2, lba=ipxe_lba28(LBA28_READ))
        self.assertFalse(arg.flag_lba48_extended)
        got = self.ok((yield self.ata(arg)))
        self.assertEqual(got.data, self.sectors[LBA28_READ] + self.sectors[LBA28_READ + 1])

    @defer.inlineCallbacks
    def test_ipxe_lba28_write(self) -> Gen:
        """
        A WRITE SECTORS as iPXE sends it without LBA48 (0x30, E clear, W set,
        0xE0 | bits 24-27 in LBA byte 3) writes the 28-bit LBA and nothing else.
        """
        data = random.Random(0x30).randbytes(SECTOR_SIZE)
        arg = ata_arg(ATACmdStatus.WRITE_28BIT, lba=ipxe_lba28(LBA28_WRITE), data=data)
        self.ok((yield self.ata(arg)))
        self.assertEqual(self.on_disk(LBA28_WRITE), data)
        self.assertEqual(self.on_disk(LBA28_WRITE & 0xFF_FFFF), bytes(SECTOR_SIZE))
