"""
Diskless boot through iPXE: Debian's ``ipxe.lkrn`` in QEMU runs ``sanboot aoe:eS.N``
against our ``twistd aoe`` and boots a boot sector that uses the disk through INT 13h.

iPXE is the first thing most machines that boot from AoE run.  It finds the
target with a config query, takes its size from IDENTIFY (words 100-103,
and LBA48 commands, only if word 83 bit 10 is set), hooks INT 13h and boots
the disk's first sector, reading 2 sectors per ATA command with one command
in flight.  The first sector here is ``tests.ipxeguest.boot_sector``: it
asks for the drive's parameters, reads one sector, eight sectors in one
call and one sector past LBA 2^28 of a 129 GiB sparse disk, writes one
sector past 2^28 and reads it back, and reports each step on the serial
port.  The test checks the reports against the data it put on the disk, the
image afterwards, and the server's log and counters.

Each combination of MTU (1500, 9000) and NIC model (e1000, virtio-net) is
one test with its own tap, server and image (a sparse file, made in no
time); a boot takes 2 to 4 seconds under TCG.  The tests skip, saying why,
without root, QEMU or the ``ipxe`` package, unless
``AOE_TWISTED_REQUIRE_INTEROP=1`` makes that a failure.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path

from twisted.trial import unittest

from tests import ipxeguest, linuxguest
from tests.test_linux_initiator import (
    TwistdTarget,
    log_problems,
    require_interop,
    twistd_unavailable_reason,
)

SECTOR = 512
#: More than 128 GiB: LBA28 (words 60-61, 0x0FFFFFFF sectors) cannot address all of it.
DISK_BYTES = 129 << 30
DISK_SECTORS = DISK_BYTES // SECTOR
SHELF = 3
SLOT = 7
_LBA28 = 1 << 28

PLAN = ipxeguest.BootPlan(
    read1=1,
    # An odd start: iPXE splits the 8 sectors into 2-sector commands at 33, 35, 37, 39.
    multi=33,
    multi_count=8,
    high=_LBA28 + 0x1234,
    write=_LBA28 + 0x4321,
    write_seed=0xA7,
)
"""What the boot sector reads and writes.  ``high`` and ``write`` are past 2^28:
cut to 28 bits they land on LBAs 0x1234 and 0x4321, which hold other data."""


def _sector(image: Path, lba: int) -> bytes:
    """Return sector ``lba`` of ``image``."""
    with image.open("rb") as f:
        f.seek(lba * SECTOR)
        return f.read(SECTOR)


class IpxeSanbootTests(unittest.TestCase):
    """iPXE boots from our target and reads and writes it through INT 13h."""

    def setUp(self) -> None:
        ipxeguest.skip_unless_available(self)
        require_interop(self, twistd_unavailable_reason())

    def _make_image(self, path: Path) -> dict[int, bytes]:
        """Write the boot sector and random sectors into a sparse disk; return them by LBA."""
        rng = random.Random(0x1DE)
        sectors = {0: ipxeguest.boot_sector(PLAN)}
        lbas = [
            PLAN.read1,
            *range(PLAN.multi, PLAN.multi + PLAN.multi_count),
            PLAN.high,
            # Where a server that kept only 28 bits of the LBA would read and write.
            PLAN.high % _LBA28,
            PLAN.write % _LBA28,
        ]
        for lba in lbas:
            sectors[lba] = rng.randbytes(SECTOR)
        with path.open("wb") as f:
            f.truncate(DISK_BYTES)
            for lba, data in sectors.items():
                f.seek(lba * SECTOR)
                f.write(data)
        return sectors

    def _sanboot(self, mtu: int, nic: str) -> None:
        """Boot iPXE with ``nic`` on a tap of ``mtu`` and check reports, image and server."""
        workdir = Path(self.mktemp())
        workdir.mkdir(parents=True)
        image = workdir / "disk.img"
        sectors = self._make_image(image)
        with linuxguest.GuestNetwork(mtu=mtu) as net:
            server = TwistdTarget(
                net.netns, net.tap, image, workdir / "twistd.log", shelf=SHELF, slot=SLOT
            )
            try:
                server.start()
                result = ipxeguest.run_ipxe(
                    net,
                    ipxeguest.sanboot_script(SHELF, SLOT),
                    nic=nic,
                    timeout=60,
                    console_log=workdir / "console.log",
                )
                alive = server.alive()
            finally:
                returncode = server.stop()
        self.assertTrue(result.done, f"the boot sector did not finish: {result.describe()}")
        reports = result.reports
        missing = {"EXT", "PARAMS", *ipxeguest.REPORTS} - set(reports)
        self.assertFalse(missing, f"no report of {missing}: {result.describe()}")

        # INT 13h extensions present (CF clear, BX=AA55h), and the size iPXE took
        # from IDENTIFY words 100-103: it reads them only if word 83 says LBA48.
        self.assertEqual(reports["EXT"]["S"][2:], "00", result.describe())
        self.assertEqual(reports["EXT"]["B"], "aa55")
        self.assertEqual(reports["PARAMS"]["S"], "0000")
        self.assertEqual(int(reports["PARAMS"]["Q"], 16), DISK_SECTORS)

        multi = b"".join(sectors[PLAN.multi + i] for i in range(PLAN.multi_count))
        written = ipxeguest.pattern(PLAN.write_seed)
        expected = {
            "READ1": (1, sectors[PLAN.read1]),
            "MULTI": (PLAN.multi_count, multi),
            "HIGH": (1, sectors[PLAN.high]),
            "WRITE": (1, written),
            "READBACK": (1, written),
        }
        for name, (count, data) in expected.items():
            self.assertEqual(
                reports[name],
                {"S": "0000", "N": f"{count:04x}", "C": f"{ipxeguest.checksum(data):04x}"},
                name,
            )

        # The image: the written sector where it belongs, nothing else changed.
        self.assertEqual(_sector(image, PLAN.write), written)
        for lba, data in sectors.items():
            self.assertEqual(_sector(image, lba), data, f"sector {lba} changed")
        self.assertEqual(image.stat().st_size, DISK_BYTES, "the backing file changed size")

        # The server answered every frame, logged no problem and stopped cleanly.
        log = server.log
        self.assertTrue(alive, f"twistd exited during the boot; log:\n{log}")
        self.assertIn(returncode, (0, -signal.SIGTERM), log)
        self.assertEqual(log_problems(log), [], log)
        counters = server.counters()
        self.assertTrue(counters, f"no 'stopped serving' counters in the log:\n{log}")
        self.assertEqual(counters["malformed"], 0, counters)
        self.assertEqual(counters["answered"], counters["received"], counters)
        print(
            f"\n  [iPXE sanboot, {nic}, mtu={mtu}] script at {result.script_seconds:.2f}s,"
            f" boot sector at {result.sanboot_seconds:.2f}s, done at"
            f" {result.done_seconds:.2f}s, qemu {result.total_seconds:.2f}s;"
            f" server {counters}",
            flush=True,
        )

    def test_e1000_mtu1500(self) -> None:
        """An e1000 NIC at MTU 1500: iPXE boots the disk and its INT 13h reads and writes work."""
        self._sanboot(1500, "e1000")

    def test_virtio_mtu1500(self) -> None:
        """A virtio-net NIC at MTU 1500: the same."""
        self._sanboot(1500, "virtio")

    def test_e1000_mtu9000(self) -> None:
        """
        An e1000 NIC at MTU 9000: the same, although the server advertises 17
        sectors per frame and iPXE ignores that and asks for 2.
        """
        self._sanboot(9000, "e1000")

    def test_virtio_mtu9000(self) -> None:
        """A virtio-net NIC at MTU 9000: the same."""
        self._sanboot(9000, "virtio")


class BootSectorTests(unittest.SynchronousTestCase):
    """The boot sector the iPXE tests boot is well formed (no QEMU needed)."""

    def test_signature_and_size(self) -> None:
        """It is one 512-byte sector ending in the 55 AA boot signature."""
        sector = ipxeguest.boot_sector(PLAN)
        self.assertEqual(len(sector), SECTOR)
        self.assertEqual(sector[510:], b"\x55\xaa")

    def test_disk_address_packets(self) -> None:
        """
        Its disk address packets (16 bytes: size, count, buffer, 64-bit LBA)
        hold the plan's LBAs in full, the ones past 2^28 included.
        """
        sector = ipxeguest.boot_sector(PLAN)
        for count, lba in ((1, PLAN.read1), (PLAN.multi_count, PLAN.multi), (1, PLAN.high)):
            head = bytes([0x10, 0, count, 0])
            self.assertIn(head, sector)
            self.assertIn(lba.to_bytes(8, "little"), sector)

    def test_checksum_is_order_sensitive(self) -> None:
        """``checksum`` tells two sectors apart when they are swapped."""
        rng = random.Random(7)
        a, b = rng.randbytes(SECTOR), rng.randbytes(SECTOR)
        self.assertNotEqual(ipxeguest.checksum(a + b), ipxeguest.checksum(b + a))
