"""
End-to-end check of the Linux guest harness (``tests/linuxguest.py``) with
Coraid's ``vblade`` as the AoE target.

The real ``aoe.ko`` in a QEMU guest discovers ``e0.1`` exported by vblade on
a tap device in a private network namespace and runs the same script as
``tests/test_linux_initiator.py`` does against our server: a pattern written
and read back with direct I/O, an ext2 file system built, filled and
remounted.  The host then checks the backing file.  Skipped when the harness
cannot run here, unless ``AOE_TWISTED_REQUIRE_INTEROP=1``.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from pathlib import Path

from twisted.trial import unittest

from tests import linuxguest
from tests.test_linux_initiator import (
    DISK_BYTES,
    EXPECTED_PAYLOAD,
    HELLO,
    MIB,
    PATTERN_MIB,
    SECTOR,
    SPEED_MIB,
    check_image,
    data_script,
    make_image,
    mbps,
)


class VbladeLinuxGuestTests(unittest.TestCase):
    """The Linux initiator in a QEMU guest uses a vblade export correctly."""

    def setUp(self) -> None:
        linuxguest.skip_unless_available()
        if shutil.which("vblade") is None:
            if os.environ.get(linuxguest.REQUIRE_ENV) == "1":
                self.fail("vblade not installed")
            raise unittest.SkipTest("vblade not installed")

    def _exercise(self, mtu: int) -> None:
        """Run the guest script against vblade at ``mtu`` and check both sides."""
        workdir = Path(self.mktemp())
        workdir.mkdir(parents=True)
        image = make_image(workdir / "disk.img")
        pattern = random.Random(0xA0E).randbytes(PATTERN_MIB * MIB)
        pattern_md5 = hashlib.md5(pattern).hexdigest()

        with linuxguest.GuestNetwork(mtu=mtu) as net, (workdir / "vblade.log").open("wb") as log:
            vblade = net.spawn(
                ["vblade", "0", "1", net.tap, str(image)], stdout=log, stderr=subprocess.STDOUT
            )
            result = net.boot(
                data_script(),
                timeout=90,
                extra_files={"/pattern.bin": pattern},
                console_log=workdir / "console.log",
            )
            vblade_alive = vblade.poll() is None
        result.check()
        self.assertTrue(vblade_alive, "vblade exited during the run")
        v = result.values

        self.assertEqual(v["SIZE"], str(DISK_BYTES // SECTOR))
        self.assertEqual(v["PAYLOAD"], str(EXPECTED_PAYLOAD[mtu]))
        self.assertEqual(v["NETIF"], "eth0")
        self.assertEqual(v["PATTERN_MD5"], pattern_md5)
        self.assertEqual(v["READBACK_MD5"], pattern_md5)
        self.assertEqual(v["FS_HELLO"], HELLO)
        self.assertEqual(v["FS_PATTERN_MD5"], pattern_md5)
        check_image(self, image, pattern_md5)

        print(
            f"\n  [linuxguest vblade mtu={mtu}] kernel {result.kernel_seconds:.1f}s,"
            f" boot {result.boot_seconds:.1f}s,"
            f" script {result.script_seconds:.1f}s, qemu {result.total_seconds:.1f}s;"
            f" direct I/O {SPEED_MIB} MiB write"
            f" {mbps(SPEED_MIB * MIB, v['SPEED_WRITE_US']):.0f} MB/s,"
            f" read {mbps(SPEED_MIB * MIB, v['SPEED_READ_US']):.0f} MB/s",
            flush=True,
        )

    def test_mtu1500(self) -> None:
        """At MTU 1500 the guest sees the whole disk, 2-sector frames, intact data and fs."""
        self._exercise(1500)

    def test_mtu9000(self) -> None:
        """At MTU 9000 the guest uses 17-sector (8704-byte) frames; data and fs intact."""
        self._exercise(9000)
