# -*- test-case-name: tests.test_diskless -*-
"""
Build a disk image that boots Linux diskless over AoE, and boot it with iPXE.

The image is what a lab administrator exports, one per client (see
``docs/diskless-boot.md``)::

    sector 0        SYSLINUX's MBR code (mbr.bin) + an MBR partition table
    partition 1     FAT16, active: SYSLINUX (ldlinux.sys, ldlinux.c32),
                    syslinux.cfg, the kernel (bzImage) and initrd.gz
    partition 2     ext2, the client's root file system: a static busybox,
                    /sbin/init, /etc/diskless-marker

iPXE's ``sanboot aoe:eS.N`` hooks INT 13h and runs the MBR; the MBR chains to
SYSLINUX's boot sector, and SYSLINUX loads the kernel and the initramfs
through INT 13h, i.e. over AoE, two sectors per round trip.  The initramfs
then loads Debian's ``aoe.ko``, brings the NICs up, waits for
``/dev/etherd/eS.NpP`` (the *same* target, now found by the Linux driver),
mounts it and ``switch_root``s into it.  The root's ``/sbin/init`` prints
``@@DISKLESS-ROOT <marker> on <device>@@`` (the marker is read from the
mounted root), writes ``/var/diskless-wrote``, remounts ``/`` read-only and
powers off.

Nothing is mounted on the host and no loop device is used: the partition
table is written here, ``mkfs.fat --offset`` / ``syslinux --offset`` /
``mcopy -i IMAGE@@OFFSET`` build the FAT partition and ``mke2fs -d -E
offset=`` the root; ``debugfs`` and ``e2fsck`` read it back with
``IMAGE?offset=``.  The kernel and its modules come from
``tests/linuxguest.py``'s cache (its ``vmlinuz`` is the bzImage a BIOS boot
loader needs; the ``vmlinux`` next to it is only for QEMU's PVH ``-kernel``).

Run ``python -m tests.disklessimage IMAGE [eS.N]`` to build an image by hand.
"""

from __future__ import annotations

import contextlib
import gzip
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from tests import ipxeguest, linuxguest

__all__ = [
    "MBR_BIN",
    "ROOT_MARK_RE",
    "BootLog",
    "DisklessImage",
    "boot_ipxe",
    "build_disk_image",
    "build_initramfs",
    "bzimage_of",
    "ipxe_script",
    "missing_tools",
    "read_root_file",
    "root_fsck",
]

SECTOR = 512
MIB = 1024 * 1024
MBR_BIN = Path("/usr/lib/syslinux/mbr/mbr.bin")
TOOLS = {
    "syslinux": "syslinux",
    "mkfs.fat": "dosfstools",
    "mcopy": "mtools",
    "mke2fs": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
}
"""Host tools the image builder runs, with the Debian package of each."""

ROOT_MARK_RE = re.compile(r"@@DISKLESS-ROOT (\S+) on (\S+)@@")
"""What the AoE root's ``/sbin/init`` prints: the marker read from the root, and the root device."""
INITRAMFS_MARK = "@@DISKLESS-INITRAMFS@@"
FAILED_MARK_RE = re.compile(
    r"@@DISKLESS-FAILED: (.*?)@@|@@IPXE-FAILED|Could not (?:open SAN device|boot)|Boot failed"
    r"|No bootable device"
)
"""Console lines after which the boot cannot succeed any more (initramfs, iPXE or BIOS)."""
ROOT_WROTE = "/var/diskless-wrote"
"""File the client writes on its root; the host reads it back from the image."""

# Busybox applets the root's /sbin/init uses (the root has no --install run).
_ROOT_APPLETS = ("sh", "cat", "echo", "awk", "mount", "sync", "uname", "poweroff", "ls")

_INIT = r"""#!/bin/sh
# initramfs /init: find the AoE root disk, mount it, switch_root into it.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "@@DISKLESS-INITRAMFS@@"
fail() {
    echo "@@DISKLESS-FAILED: $*@@"
    dmesg | tail -n 30
    usleep 200000
    poweroff -f
}
# The root device: aoeroot=eS.NpP on the kernel command line.
root=
for arg in $(cat /proc/cmdline); do
    case "$arg" in aoeroot=*) root=${arg#aoeroot=} ;; esac
done
[ -n "$root" ] || fail "no aoeroot= on the kernel command line"
for m in __MODULES__; do
    insmod "/lib/modules/$m.ko" || fail "insmod $m"
done
# Every NIC up; aoe.ko then discovers on all of them.
for dev in /sys/class/net/*; do
    [ "${dev##*/}" = lo ] || ip link set "${dev##*/}" up
done
insmod /lib/modules/aoe.ko || fail "insmod aoe"
n=0
while [ ! -b "/dev/etherd/$root" ]; do
    if [ $((n % 10)) -eq 0 ]; then echo > /dev/etherd/discover; fi
    n=$((n + 1))
    [ "$n" -lt __WAIT_TENTHS__ ] || fail "/dev/etherd/$root did not appear"
    usleep 100000
done
mkdir -p /newroot
# ext4.ko mounts ext2, ext3 and ext4 alike.
mount -t ext4 "/dev/etherd/$root" /newroot || fail "mount /dev/etherd/$root"
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot /sbin/init
"""

_ROOT_INIT = r"""#!/bin/sh
# /sbin/init of the AoE root: prove we run from it, write to it, power off.
export PATH=/bin
dev=$(awk '$2 == "/" && $1 != "rootfs" {print $1}' /proc/mounts)
echo "@@DISKLESS-ROOT $(cat /etc/diskless-marker) on $dev@@"
echo "$(cat /etc/diskless-marker) written by $(uname -r)" > /var/diskless-wrote
sync
mount -o remount,ro /
poweroff -f
"""

_SYSLINUX_CFG = """\
PROMPT 0
TIMEOUT 0
DEFAULT linux
LABEL linux
  LINUX /vmlinuz
  INITRD /initrd.gz
  APPEND {append}
"""


def missing_tools() -> list[str]:
    """Return what the image builder or the iPXE boot lacks here, as "tool (package)" strings."""
    missing = [f"{tool} ({pkg})" for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if not MBR_BIN.exists():
        missing.append(f"{MBR_BIN} (syslinux-common)")
    if not ipxeguest.ipxe_image().is_file():
        missing.append(f"{ipxeguest.ipxe_image()} (ipxe)")
    return missing


def bzimage_of(kernel: linuxguest.Kernel) -> Path:
    """Return the bzImage of ``kernel``: linuxguest caches it as ``vmlinuz`` next to the image."""
    path = kernel.image.parent / "vmlinuz"
    if not path.exists():
        raise linuxguest.KernelUnavailable(f"no bzImage in the kernel cache: {path}")
    return path


def _busybox() -> Path:
    busybox = linuxguest._find_busybox()
    if busybox is None:
        raise linuxguest.GuestError("no statically linked busybox (install busybox-static)")
    return busybox


def build_initramfs(kernel: linuxguest.Kernel, dest: Path, *, wait_seconds: int = 30) -> Path:
    """Write the gzip'd initramfs whose ``/init`` mounts the AoE root and switches to it.

    It holds a static busybox, the modules linuxguest prepared (virtio-net,
    ext4 and their dependencies) and ``aoe.ko``; ``/init`` waits up to
    ``wait_seconds`` for the root device named by ``aoeroot=`` on the kernel
    command line.
    """
    init = _INIT.replace("__MODULES__", " ".join(p.stem for p in kernel.modules)).replace(
        "__WAIT_TENTHS__", str(int(wait_seconds * 10))
    )
    archive = linuxguest._Cpio()
    for directory in ("bin", "dev", "proc", "sys", "tmp", "lib/modules"):
        archive.mkdir(directory)
    archive.chardev("dev/console", 5, 1)
    archive.chardev("dev/null", 1, 3)
    archive.file("bin/busybox", _busybox().read_bytes(), 0o755)
    archive.symlink("bin/sh", "busybox")
    archive.file("init", init.encode(), 0o755)
    for module in (*kernel.modules, kernel.aoe_module):
        archive.file(f"lib/modules/{module.name}", module.read_bytes())
    dest.write_bytes(gzip.compress(archive.getvalue(), compresslevel=9, mtime=0))
    return dest


def _build_root_tree(tree: Path, marker: str) -> None:
    """Populate ``tree`` with the client's root file system."""
    for directory in ("bin", "sbin", "dev", "proc", "sys", "etc", "var", "tmp"):
        (tree / directory).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_busybox(), tree / "bin" / "busybox")
    (tree / "bin" / "busybox").chmod(0o755)
    for applet in _ROOT_APPLETS:
        (tree / "bin" / applet).symlink_to("busybox")
    (tree / "sbin" / "init").write_text(_ROOT_INIT)
    (tree / "sbin" / "init").chmod(0o755)
    (tree / "etc" / "diskless-marker").write_text(marker + "\n")


def _chs(lba: int) -> bytes:
    """CHS bytes of ``lba`` in a 255-head, 63-sector geometry (1023/254/63 past its end)."""
    cylinder, rest = divmod(lba, 255 * 63)
    if cylinder > 1023:
        return b"\xfe\xff\xff"
    head, sector = divmod(rest, 63)
    return bytes((head, ((cylinder >> 2) & 0xC0) | (sector + 1), cylinder & 0xFF))


def partition_table(partitions: Sequence[tuple[int, int, int, bool]]) -> bytes:
    """Return the 66 bytes at offset 446 of an MBR: entries (type, start, sectors, active)."""
    entries = b""
    for ptype, start, count, active in partitions:
        entries += (
            bytes((0x80 if active else 0,))
            + _chs(start)
            + bytes((ptype,))
            + _chs(start + count - 1)
            + struct.pack("<II", start, count)
        )
    return entries.ljust(64, b"\0") + b"\x55\xaa"


def _run(argv: Sequence[str]) -> None:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")


@dataclass(frozen=True)
class DisklessImage:
    """A built image: where it is, its layout, and what the client will print."""

    path: Path
    target: str
    marker: str
    boot_start: int
    boot_sectors: int
    root_start: int
    root_sectors: int
    kernel_bytes: int
    initrd_bytes: int

    @property
    def root_device(self) -> str:
        """The name of the root partition under ``/dev/etherd`` in the client."""
        return f"{self.target}p2"

    @property
    def root_offset(self) -> int:
        """Byte offset of the root file system in the image."""
        return self.root_start * SECTOR


def build_disk_image(
    dest: Path,
    kernel: linuxguest.Kernel,
    marker: str,
    *,
    target: str = "e0.1",
    size_mib: int = 64,
    boot_mib: int = 32,
    append: str = "",
) -> DisklessImage:
    """Build a sparse bootable image of ``size_mib`` MiB at ``dest`` and describe it.

    ``target`` (``eS.N``) is the AoE target the image will be served as: the
    kernel command line names its second partition as the root.  ``append``
    is added to that command line.
    """
    if not re.fullmatch(r"e\d+\.\d+", target):
        raise ValueError(f"target must look like e0.1, not {target!r}")
    boot_start = 2048
    boot_sectors = boot_mib * MIB // SECTOR
    root_start = boot_start + boot_sectors
    root_sectors = size_mib * MIB // SECTOR - root_start
    if root_sectors < 8 * MIB // SECTOR:
        raise ValueError("image too small for an 8 MiB root")
    with dest.open("wb") as f:
        f.truncate(size_mib * MIB)
        f.write(MBR_BIN.read_bytes()[:440].ljust(446, b"\0"))
        f.write(partition_table([(0x06, boot_start, boot_sectors, True),
                                 (0x83, root_start, root_sectors, False)]))  # fmt: skip
    cmdline = f"console=ttyS0,115200 aoeroot={target}p2 panic=-1 {append}".strip()
    with tempfile.TemporaryDirectory(prefix="aoe-diskless-") as work:
        workdir = Path(work)
        kernel_file = bzimage_of(kernel)
        initrd = build_initramfs(kernel, workdir / "initrd.gz")
        cfg = workdir / "syslinux.cfg"
        cfg.write_text(_SYSLINUX_CFG.format(append=cmdline))
        fat = f"{dest}@@{boot_start * SECTOR}"
        _run(["mkfs.fat", "-F", "16", "-n", "AOEBOOT", "--offset", str(boot_start),
              "-h", str(boot_start), str(dest), str(boot_sectors // 2)])  # fmt: skip
        _run(["syslinux", "--offset", str(boot_start * SECTOR), "--install", str(dest)])
        env_files = [(kernel_file, "vmlinuz"), (initrd, "initrd.gz"), (cfg, "syslinux.cfg")]
        for src, name in env_files:
            _run(["mcopy", "-o", "-i", fat, str(src), f"::{name}"])
        tree = workdir / "root"
        _build_root_tree(tree, marker)
        _run(["mke2fs", "-q", "-F", "-t", "ext2", "-L", "aoeroot", "-d", str(tree),
              "-E", f"offset={root_start * SECTOR}", str(dest),
              f"{root_sectors // 2}k"])  # fmt: skip
        return DisklessImage(
            path=dest,
            target=target,
            marker=marker,
            boot_start=boot_start,
            boot_sectors=boot_sectors,
            root_start=root_start,
            root_sectors=root_sectors,
            kernel_bytes=kernel_file.stat().st_size,
            initrd_bytes=initrd.stat().st_size,
        )


def read_root_file(image: DisklessImage, path: str) -> str | None:
    """Return the text of ``path`` on the image's root file system (debugfs), None if absent."""
    proc = subprocess.run(
        ["debugfs", "-R", f"cat {path}", f"{image.path}?offset={image.root_offset}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or "File not found" in proc.stderr:
        return None
    return proc.stdout


def root_fsck(image: DisklessImage) -> subprocess.CompletedProcess[str]:
    """Run a read-only ``e2fsck -fn`` on the image's root file system."""
    return subprocess.run(
        ["e2fsck", "-fn", f"{image.path}?offset={image.root_offset}"],
        capture_output=True,
        text=True,
        check=False,
    )


# --------------------------------------------------------------------------
# Booting it: iPXE in QEMU


def ipxe_script(target: str) -> str:
    """The iPXE script of the test: open the NIC and ``sanboot aoe:eS.N`` (no DHCP here).

    ``tests/ipxeguest.py``'s script; it echoes ``@@IPXE-FAILED errno@@`` if ``sanboot`` returns.
    """
    shelf, slot = (int(x) for x in target[1:].split("."))
    return ipxeguest.sanboot_script(shelf, slot)


@dataclass
class BootLog:
    """The serial console of one boot, each line with its host time since QEMU started."""

    lines: list[tuple[float, str]] = field(default_factory=list)
    timed_out: bool = False
    returncode: int | None = None
    stderr: str = ""
    total_seconds: float = 0.0

    @property
    def text(self) -> str:
        """The whole console."""
        return "\n".join(line for _, line in self.lines)

    def first(self, pattern: str | re.Pattern[str]) -> tuple[float, re.Match[str]] | None:
        """Return (seconds, match) of the first line matching ``pattern``, or None."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        for when, line in self.lines:
            match = regex.search(line)
            if match:
                return when, match
        return None

    def tail(self, count: int = 60) -> str:
        """The last ``count`` console lines and QEMU's stderr, for failure messages."""
        return "\n".join(line for _, line in self.lines[-count:]) + "\n" + self.stderr


def boot_ipxe(
    network: linuxguest.GuestNetwork,
    script: str,
    *,
    timeout: float = 100.0,
    memory_mib: int = 512,
    nic: str = "virtio-net-pci",
    mac: str = linuxguest.DEFAULT_GUEST_MAC,
    stop: re.Pattern[str] | None = None,
) -> BootLog:
    """Boot Debian's ``ipxe.lkrn`` with ``script`` as its initrd on ``network.tap`` (TCG).

    Returns when QEMU exits (the client powers off; ``-no-reboot`` turns a
    reset into an exit), ``timeout`` seconds pass, or ``stop`` has matched a
    line (or a failure, ``FAILED_MARK_RE``) and 10 more seconds have passed.
    Each console line keeps its time, so a caller can time every stage.
    ``graphics=off`` makes SeaBIOS copy the screen output of SeaBIOS, iPXE
    and SYSLINUX to the serial port; ``romfile=`` keeps the NIC's own iPXE
    option ROM out: ``ipxe.lkrn`` (``tests/ipxeguest.py``'s) is the iPXE
    that boots.  Unlike ``ipxeguest.run_ipxe``, which waits for its boot
    sector's report, this waits for Linux to power off.
    """
    # virtio-net tells the guest the tap's MTU, so Linux's eth0 comes up with it.
    mtu_option = f",host_mtu={network.mtu}" if nic.startswith("virtio") else ""
    with tempfile.TemporaryDirectory(prefix="aoe-ipxe-") as work:
        script_path = Path(work) / "boot.ipxe"
        script_path.write_text(script)
        argv = [
            linuxguest.QEMU, "-accel", "tcg", "-m", str(memory_mib),
            "-machine", "graphics=off",
            "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
            "-serial", "stdio", "-no-reboot",
            "-kernel", str(ipxeguest.ipxe_image()), "-initrd", str(script_path),
            "-netdev", f"tap,id=n0,ifname={network.tap},script=no,downscript=no",
            "-device", f"{nic},netdev=n0,mac={mac},romfile={mtu_option}",
        ]  # fmt: skip
        with (Path(work) / "qemu.stderr").open("w+b") as stderr:
            log = _run_qemu(network.command(argv), timeout, stderr, stop)
            stderr.seek(0)
            log.stderr = stderr.read().decode(errors="replace")
    return log


_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z]|\x1bc")


def _run_qemu(
    argv: list[str], timeout: float, stderr: BinaryIO, stop: re.Pattern[str] | None
) -> BootLog:
    log = BootLog()
    stopped = threading.Event()
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)

    def reader() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            text = _ANSI_RE.sub("", raw.decode(errors="replace")).rstrip("\r\n")
            for line in text.split("\r"):
                if line.strip():
                    log.lines.append((time.monotonic() - start, line))
                    if stop is not None and (stop.search(line) or FAILED_MARK_RE.search(line)):
                        stopped.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    deadline = start + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if stopped.wait(0.1):
                deadline = min(deadline, time.monotonic() + 10.0)
        log.timed_out = proc.poll() is None and not stopped.is_set()
    finally:
        linuxguest.terminate(proc, grace=2.0)
        thread.join(5.0)
    log.returncode = proc.returncode
    log.total_seconds = time.monotonic() - start
    return log


def main(argv: Sequence[str]) -> int:
    """``python -m tests.disklessimage IMAGE [eS.N [MARKER]]``: build an image by hand."""
    if not 1 <= len(argv) <= 3:
        print(main.__doc__, file=sys.stderr)
        return 2
    missing = missing_tools()
    if missing:
        print(f"missing: {', '.join(missing)}", file=sys.stderr)
        return 1
    target = argv[1] if len(argv) > 1 else "e0.1"
    marker = argv[2] if len(argv) > 2 else f"hello-from-{target}"
    image = build_disk_image(Path(argv[0]), linuxguest.obtain_kernel(), marker, target=target)
    print(
        f"{image.path}: serve it as {image.target}; root on /dev/etherd/{image.root_device}; "
        f"kernel {image.kernel_bytes} B, initrd {image.initrd_bytes} B"
    )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main(sys.argv[1:]))
