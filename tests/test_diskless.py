"""
A real diskless boot over AoE: iPXE ``sanboot``, SYSLINUX, Linux, root on AoE.

``tests/disklessimage.py`` builds a 64 MiB image (MBR + SYSLINUX on a FAT
partition with Debian's kernel and an initramfs holding ``aoe.ko``; an ext2
root on the second partition).  The boot tests serve it with ``twistd -n aoe
--backend file:IMAGE`` on a tap in a private namespace and boot Debian's
``ipxe.lkrn`` under QEMU (TCG) with the script ``ifopen net0; sanboot
aoe:e0.1``.  iPXE reads the MBR through INT 13h, SYSLINUX loads the kernel
and the initramfs through INT 13h too (so over AoE, two sectors per round
trip), and then Linux's ``aoe`` driver finds the same target, mounts its
second partition as the root and runs ``/sbin/init`` from it, which prints
the marker stored in the image and writes a file back.

The boot tests skip, saying why, where QEMU, root, busybox, the kernel,
``ipxe``, ``syslinux``, ``mtools`` or ``dosfstools`` are missing, unless
``AOE_TWISTED_REQUIRE_INTEROP=1`` makes that a failure.
"""

from __future__ import annotations

import re
import secrets
import signal
import subprocess

from tests import disklessimage, linuxguest
from tests.test_linux_initiator import (
    InteropTestCase,
    TwistdTarget,
    log_problems,
    require_interop,
)

BOOT_TIMEOUT = 90.0
"""Seconds from QEMU start until the root's marker must have appeared."""

# Milestones on the serial console, in boot order (SeaBIOS's serial console
# copies iPXE's and SYSLINUX's screen output to the serial port).
MILESTONES = {
    "ipxe": re.compile(r"iPXE initialising devices"),
    "sanboot": re.compile(r"Booting from SAN device"),
    "syslinux": re.compile(r"SYSLINUX \d"),
    "kernel loaded": re.compile(r"Loading /vmlinuz"),
    "initrd loaded": re.compile(r"Loading /initrd\.gz"),
    "linux": re.compile(r"Linux version"),
    "initramfs": re.compile(re.escape(disklessimage.INITRAMFS_MARK)),
    "aoe found": re.compile(r"aoe: .* e0\.1 v\w+ has \d+ sectors"),
    "root": disklessimage.ROOT_MARK_RE,
}
_AOE_FRAMES_RE = re.compile(r"aoe: e0\.1: setting (\d+) byte data frames")


class DisklessImageTests(InteropTestCase):
    """The image builder lays out a disk that BIOS, SYSLINUX and Linux can use."""

    def setUp(self) -> None:
        super().setUp()
        missing = disklessimage.missing_tools()
        require_interop(self, f"missing {', '.join(missing)}" if missing else None)

    def test_layout(self) -> None:
        """MBR code, an active FAT16 boot partition with SYSLINUX, kernel, initrd, and an ext2
        root carrying the marker: what iPXE, SYSLINUX and the initramfs each rely on."""
        workdir = self.workdir()
        kernel = linuxguest.obtain_kernel()
        image = disklessimage.build_disk_image(workdir / "disk.img", kernel, "layout-marker")
        data = image.path.read_bytes()
        self.assertEqual(data[:440], disklessimage.MBR_BIN.read_bytes()[:440])
        self.assertEqual(data[510:512], b"\x55\xaa")
        boot, root = data[446:462], data[462:478]
        self.assertEqual((boot[0], boot[4]), (0x80, 0x06))
        self.assertEqual((root[0], root[4]), (0x00, 0x83))
        self.assertEqual(int.from_bytes(root[8:12], "little"), image.root_start)
        # SYSLINUX's boot sector in the FAT partition, the files it loads.
        vbr = data[image.boot_start * 512 : image.boot_start * 512 + 512]
        self.assertEqual(vbr[3:11], b"SYSLINUX")
        listing = subprocess.run(
            ["mdir", "-a", "-b", "-i", f"{image.path}@@{image.boot_start * 512}", "::"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.lower()
        for name in ("ldlinux.sys", "ldlinux.c32", "vmlinuz", "initrd.gz", "syslinux.cfg"):
            self.assertIn(f"::/{name}", listing)
        self.assertEqual(
            disklessimage.read_root_file(image, "/etc/diskless-marker"), "layout-marker\n"
        )
        self.assertEqual(disklessimage.root_fsck(image).returncode, 0)
        # Sparse: a 64 MiB image needs only what the files take.
        self.assertLess(image.path.stat().st_blocks * 512, 32 * 1024 * 1024)


class DisklessBootTests(InteropTestCase):
    """iPXE sanboots our target, SYSLINUX loads Linux over AoE, and Linux's root is the target."""

    def setUp(self) -> None:
        super().setUp()
        missing = disklessimage.missing_tools()
        require_interop(self, f"missing {', '.join(missing)}" if missing else None)

    def _boot(self, mtu: int) -> tuple[disklessimage.BootLog, disklessimage.DisklessImage]:
        """Serve a fresh image at ``mtu``, boot it with iPXE and check the boot and the server."""
        workdir = self.workdir()
        marker = f"diskless-{secrets.token_hex(8)}"
        image = disklessimage.build_disk_image(
            workdir / "disk.img", linuxguest.obtain_kernel(), marker
        )
        with linuxguest.GuestNetwork(mtu=mtu) as net:
            server = TwistdTarget(net.netns, net.tap, image.path, workdir / "twistd.log")
            try:
                server.start()
                boot = disklessimage.boot_ipxe(
                    net,
                    disklessimage.ipxe_script(image.target),
                    timeout=BOOT_TIMEOUT,
                    stop=disklessimage.ROOT_MARK_RE,
                )
                alive = server.alive()
            finally:
                returncode = server.stop()
        (workdir / "console.log").write_text(boot.text + "\n" + boot.stderr)

        root = boot.first(disklessimage.ROOT_MARK_RE)
        self.assertIsNotNone(root, f"no root marker within {BOOT_TIMEOUT}s:\n{boot.tail()}")
        assert root is not None
        # Read from the mounted root (the initramfs does not hold it), and that root is
        # the second partition of the very target iPXE booted from.
        self.assertEqual(root[1].group(1), marker)
        self.assertEqual(root[1].group(2), f"/dev/etherd/{image.root_device}")
        self.assertEqual(boot.returncode, 0, f"QEMU did not power off cleanly:\n{boot.tail()}")
        # The client wrote to its root through AoE, and left it consistent.
        wrote = disklessimage.read_root_file(image, disklessimage.ROOT_WROTE) or ""
        self.assertTrue(wrote.startswith(f"{marker} written by "), wrote)
        fsck = disklessimage.root_fsck(image)
        self.assertEqual(fsck.returncode, 0, fsck.stdout + fsck.stderr)

        log = server.log
        self.assertTrue(alive, f"twistd exited during the boot; log:\n{log}")
        self.assertIn(returncode, (0, -signal.SIGTERM), f"twistd did not stop cleanly:\n{log}")
        self.assertEqual(log_problems(log), [], f"twistd logged problems:\n{log}")
        counters = server.counters()
        self.assertTrue(counters, f"no 'stopped serving' counters in the log:\n{log}")
        self.assertEqual(counters["malformed"], 0, counters)
        self.assertEqual(counters["answered"], counters["received"], counters)

        times = {name: boot.first(regex) for name, regex in MILESTONES.items()}
        missing = [name for name, found in times.items() if found is None]
        self.assertEqual(missing, [], f"boot milestones not seen:\n{boot.tail()}")
        stamps = " ".join(f"{name} {found[0]:.1f}s" for name, found in times.items() if found)
        print(
            f"\n  [diskless boot, twistd aoe, mtu={mtu}] {stamps};"
            f" kernel {image.kernel_bytes / 2**20:.1f} MiB + initrd"
            f" {image.initrd_bytes / 2**20:.1f} MiB through iPXE;"
            f" {counters['received']} frames; qemu {boot.total_seconds:.1f}s",
            flush=True,
        )
        return boot, image

    def test_mtu1500(self) -> None:
        """At MTU 1500 the whole chain boots: iPXE, SYSLINUX, kernel and initramfs over
        INT 13h, then Linux mounts its root from the same target with 1 KiB frames."""
        boot, _ = self._boot(1500)
        frames = boot.first(_AOE_FRAMES_RE)
        self.assertIsNotNone(frames, boot.tail())
        assert frames is not None
        self.assertEqual(frames[1].group(1), "1024")

    def test_mtu9000(self) -> None:
        """At MTU 9000 iPXE still boots (it ignores the sector count, 2 sectors per
        command) and Linux then mounts its root with 8704-byte jumbo frames."""
        boot, _ = self._boot(9000)
        frames = boot.first(_AOE_FRAMES_RE)
        self.assertIsNotNone(frames, boot.tail())
        assert frames is not None
        self.assertEqual(frames[1].group(1), "8704")
