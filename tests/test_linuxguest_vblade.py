"""
End-to-end check of the Linux guest harness (``tests/linuxguest.py``) with
Coraid's ``vblade`` as the AoE target.

The real ``aoe.ko`` in a QEMU guest discovers ``e0.1`` exported by vblade on
a tap device in a private network namespace, writes and reads a pattern with
direct I/O, and builds, fills and remounts an ext2 file system.  The host then
checks the backing file.  Skipped when the harness cannot run here, unless
``AOE_TWISTED_REQUIRE_INTEROP=1``.
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

DISK_BYTES = 64 * 1024 * 1024
MIB = 1024 * 1024
PATTERN_OFFSET_MIB = 32
PATTERN_MIB = 4
SPEED_OFFSET_MIB = 40
SPEED_MIB = 24
FS_BLOCKS_1K = 16 * 1024  # the ext2 file system covers only the first 16 MiB

# Data bytes per AoE frame the initiator settles on: sectors per frame is
# (MTU - 22) // 512 (the notes' formula; vblade's own limit is not lower).
EXPECTED_PAYLOAD = {1500: 1024, 9000: 8704}

GUEST_SCRIPT = r"""
D=/dev/etherd/e0.1
S='/sys/block/etherd!e0.1'
md5() { set -- $(md5sum "$1"); echo "$1"; }
aoe_wait_disk e0.1 20 || exit 10
echo SIZE=$(cat "$S/size") PAYLOAD=$(cat "$S/payload") NETIF=$(cat "$S/netif")
echo PATTERN_MD5=$(md5 /pattern.bin)

t0=$(now_us)
dd if=/pattern.bin of=$D bs=1M seek=__POFF__ oflag=direct 2>/dev/null || exit 11
t1=$(now_us)
dd if=$D of=/tmp/readback bs=1M skip=__POFF__ count=__PMIB__ iflag=direct 2>/dev/null || exit 12
t2=$(now_us)
echo READBACK_MD5=$(md5 /tmp/readback)
echo PATTERN_WRITE_US=$((t1 - t0)) PATTERN_READ_US=$((t2 - t1))

t0=$(now_us)
dd if=/dev/zero of=$D bs=1M seek=__SOFF__ count=__SMIB__ oflag=direct 2>/dev/null || exit 13
t1=$(now_us)
dd if=$D of=/dev/null bs=1M skip=__SOFF__ count=__SMIB__ iflag=direct 2>/dev/null || exit 14
t2=$(now_us)
echo SPEED_WRITE_US=$((t1 - t0)) SPEED_READ_US=$((t2 - t1))

mke2fs -q -b 1024 $D __FSBLOCKS__ || exit 20
mount -t ext2 $D /mnt || exit 21
echo "hello from the linux aoe initiator" > /mnt/hello.txt || exit 22
cp /pattern.bin /mnt/pattern.bin || exit 23
umount /mnt || exit 24
echo 3 > /proc/sys/vm/drop_caches
mount -t ext2 $D /mnt || exit 25
echo FS_HELLO=$(cat /mnt/hello.txt)
echo FS_PATTERN_MD5=$(md5 /mnt/pattern.bin)
umount /mnt || exit 26
"""


def _script() -> str:
    """Return the guest script with the layout constants filled in."""
    script = GUEST_SCRIPT
    for key, value in {
        "__POFF__": PATTERN_OFFSET_MIB,
        "__PMIB__": PATTERN_MIB,
        "__SOFF__": SPEED_OFFSET_MIB,
        "__SMIB__": SPEED_MIB,
        "__FSBLOCKS__": FS_BLOCKS_1K,
    }.items():
        script = script.replace(key, str(value))
    return script


def _mbps(mib: int, micros: str) -> float:
    """MB/s (10**6 bytes) for ``mib`` MiB moved in ``micros`` microseconds."""
    return mib * MIB / max(int(micros), 1)


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
        image = workdir / "disk.img"
        with image.open("wb") as f:
            f.truncate(DISK_BYTES)
        pattern = random.Random(0xA0E).randbytes(PATTERN_MIB * MIB)
        pattern_md5 = hashlib.md5(pattern).hexdigest()

        with linuxguest.GuestNetwork(mtu=mtu) as net, (workdir / "vblade.log").open("wb") as log:
            vblade = net.spawn(
                ["vblade", "0", "1", net.tap, str(image)], stdout=log, stderr=subprocess.STDOUT
            )
            result = net.boot(
                _script(),
                timeout=90,
                extra_files={"/pattern.bin": pattern},
                console_log=workdir / "console.log",
            )
            vblade_alive = vblade.poll() is None
        result.check()
        self.assertTrue(vblade_alive, "vblade exited during the run")
        v = result.values

        self.assertEqual(v["SIZE"], str(DISK_BYTES // 512))
        self.assertEqual(v["PAYLOAD"], str(EXPECTED_PAYLOAD[mtu]))
        self.assertEqual(v["NETIF"], "eth0")
        self.assertEqual(v["PATTERN_MD5"], pattern_md5)
        self.assertEqual(v["READBACK_MD5"], pattern_md5)
        self.assertEqual(v["FS_HELLO"], "hello from the linux aoe initiator")
        self.assertEqual(v["FS_PATTERN_MD5"], pattern_md5)

        with image.open("rb") as f:
            f.seek(PATTERN_OFFSET_MIB * MIB)
            on_disk = f.read(PATTERN_MIB * MIB)
        self.assertEqual(hashlib.md5(on_disk).hexdigest(), pattern_md5)
        if shutil.which("e2fsck"):
            fsck = subprocess.run(
                ["e2fsck", "-fn", str(image)], capture_output=True, text=True, check=False
            )
            self.assertEqual(fsck.returncode, 0, fsck.stdout + fsck.stderr)
        if shutil.which("debugfs"):
            cat = subprocess.run(
                ["debugfs", "-R", "cat /hello.txt", str(image)],
                capture_output=True,
                text=True,
                check=False,
            )
            self.assertEqual(cat.stdout.strip(), "hello from the linux aoe initiator")

        print(
            f"\n  [linuxguest vblade mtu={mtu}] kernel {result.kernel_seconds:.1f}s,"
            f" boot {result.boot_seconds:.1f}s,"
            f" script {result.script_seconds:.1f}s, qemu {result.total_seconds:.1f}s;"
            f" direct I/O {SPEED_MIB} MiB write {_mbps(SPEED_MIB, v['SPEED_WRITE_US']):.0f}"
            f" MB/s, read {_mbps(SPEED_MIB, v['SPEED_READ_US']):.0f} MB/s;"
            f" {PATTERN_MIB} MiB pattern write"
            f" {_mbps(PATTERN_MIB, v['PATTERN_WRITE_US']):.0f} MB/s,"
            f" read {_mbps(PATTERN_MIB, v['PATTERN_READ_US']):.0f} MB/s",
            flush=True,
        )

    def test_mtu1500(self) -> None:
        """At MTU 1500 the guest sees a 64 MiB disk, 2-sector frames, intact data and fs."""
        self._exercise(1500)

    def test_mtu9000(self) -> None:
        """At MTU 9000 the guest uses 17-sector (8704-byte) frames; data and fs intact."""
        self._exercise(9000)
