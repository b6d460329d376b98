# -*- test-case-name: tests.test_linuxguest_vblade -*-
"""
Boot the real Linux AoE initiator (Debian's ``aoe.ko``) in QEMU and run a
shell script in the guest.

The guest is a Debian 12 kernel with a busybox-static initramfs, started
under TCG with one virtio-net NIC attached to a tap device that lives in a
private network namespace.  A caller starts its AoE target on that tap (with
``ip netns exec``) before the guest boots::

    with GuestNetwork(mtu=9000) as net:
        net.spawn(["vblade", "0", "1", net.tap, "disk.img"])
        result = net.boot("aoe_wait_disk e0.1 && echo SIZE=$(cat '/sys/block/etherd!e0.1/size')")
        result.check()
        print(result.values["SIZE"], result.boot_seconds)

``net.spawn`` runs ``ip netns exec NETNS argv...``; use ``net.command(argv)``
to build such a command line yourself (e.g. for ``reactor.spawnProcess``).
The guest script runs under busybox ``sh`` after ``GUEST_HELPERS`` (``now_us``,
``wait_for_path``, ``aoe_wait_disk``); lines ``KEY=value`` it prints end up
in ``result.values``.

Everything is pure stdlib.  The kernel comes from ``apt-get download`` and is
unpacked with ``dpkg -x`` (never installed); the prepared ``vmlinux`` and
modules are cached outside the checkout, in ``$AOE_TWISTED_CACHE`` or
``/var/cache/aoe-twisted``.
"""

from __future__ import annotations

import bz2
import contextlib
import fcntl
import functools
import gzip
import json
import lzma
import os
import re
import secrets
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
import unittest
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

__all__ = [
    "CACHE_ENV",
    "DEFAULT_GUEST_MAC",
    "GUEST_HELPERS",
    "REQUIRE_ENV",
    "GuestError",
    "GuestNetwork",
    "GuestResult",
    "Kernel",
    "KernelUnavailable",
    "build_initramfs",
    "cache_dir",
    "extract_vmlinux",
    "obtain_kernel",
    "remove_stale_networks",
    "run_guest",
    "skip_unless_available",
    "terminate",
    "unavailable_reason",
]

CACHE_ENV = "AOE_TWISTED_CACHE"
"""Environment variable naming the artifact cache directory."""

REQUIRE_ENV = "AOE_TWISTED_REQUIRE_INTEROP"
"""When set to ``1``, a missing prerequisite fails the test instead of skipping it."""

KERNEL_PACKAGE_ENV = "AOE_TWISTED_KERNEL_PACKAGE"
"""Optional: pin the kernel package (e.g. ``linux-image-6.1.0-56-amd64``)."""

DEFAULT_CACHE = Path("/var/cache/aoe-twisted")
DEFAULT_GUEST_MAC = "52:54:00:a0:e0:01"
QEMU = "qemu-system-x86_64"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")

# Modules the guest needs, as roots of the dependency closure.  aoe.ko is
# shipped too but loaded last, after eth0 is up (see build_initramfs).
_ROOT_MODULES = ("virtio_pci", "virtio_net", "ext4", "crc32c_generic")
_AOE_MODULE = "aoe"
# modinfo softdep names that are aliases rather than module names.
_SOFTDEP_ALIASES = {"crypto-crc32c": "crc32c_generic", "crc32c": "crc32c_generic"}

_MARK_INIT = "@@AOE-GUEST-INIT@@"
_MARK_BEGIN = "@@AOE-GUEST-BEGIN@@"
_MARK_END_RE = re.compile(r"@@AOE-GUEST-END rc=(\d+)@@")
_MARK_SETUP_RE = re.compile(r"@@AOE-GUEST-SETUP-FAILED: (.*?)@@")
_POWEROFF_GRACE = 10.0

GUEST_HELPERS = r"""
# --- helpers provided by tests/linuxguest.py ---
# now_us: wall clock in microseconds (busybox date has no %N).
now_us() {
    adjtimex | awk '/tv_sec/ {s = $2} /tv_usec/ {u = $2} END {printf "%d%06d\n", s, u}'
}
# wait_for_path PATH [SECONDS]: poll until PATH exists.
wait_for_path() {
    _n=0; _lim=$(( ${2:-10} * 10 ))
    while [ ! -e "$1" ]; do
        _n=$((_n + 1))
        if [ "$_n" -ge "$_lim" ]; then echo "wait_for_path: $1 missing" >&2; return 1; fi
        usleep 100000
    done
}
# aoe_wait_disk eSHELF.SLOT [SECONDS]: discover (again every second) until
# /dev/etherd/eSHELF.SLOT is a block device.
aoe_wait_disk() {
    wait_for_path /dev/etherd/discover 10 || return 1
    _n=0; _lim=$(( ${2:-20} * 10 ))
    while [ ! -b "/dev/etherd/$1" ]; do
        if [ $((_n % 10)) -eq 0 ]; then echo > /dev/etherd/discover; fi
        _n=$((_n + 1))
        if [ "$_n" -ge "$_lim" ]; then echo "aoe_wait_disk: $1 not found" >&2; return 1; fi
        usleep 100000
    done
}
# --- end of helpers ---
"""
"""Shell functions prepended to every guest script."""


class KernelUnavailable(RuntimeError):
    """The Debian kernel could not be obtained or prepared."""


class GuestError(RuntimeError):
    """The guest failed to boot, timed out, or its script failed."""


# --------------------------------------------------------------------------
# Kernel acquisition


@dataclass(frozen=True)
class Kernel:
    """A prepared guest kernel: an image to boot and modules in load order."""

    package: str
    package_version: str
    release: str
    image: Path
    modules: tuple[Path, ...]
    aoe_module: Path

    @property
    def is_pvh_vmlinux(self) -> bool:
        """True when ``image`` is an uncompressed ELF vmlinux (PVH boot)."""
        return self.image.name == "vmlinux"


def cache_dir() -> Path:
    """Return the artifact cache directory (not created)."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def _run(argv: Sequence[str], cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output, without raising on failure."""
    return subprocess.run(list(argv), capture_output=True, text=True, check=False, cwd=cwd)


def _apt_candidate(package: str) -> tuple[str, str, str] | None:
    """Return (package, version, depends) of the apt candidate of ``package``."""
    proc = _run(["apt-cache", "show", "--no-all-versions", package])
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    fields = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith(" "):
            fields[key] = value.strip()
    return fields.get("Package", package), fields.get("Version", ""), fields.get("Depends", "")


_IMAGE_DEPENDS_RE = re.compile(r"(linux-image-[0-9][^\s,()]*-amd64)\s*\(=\s*([^)\s]+)\)")


def _resolve_kernel_package(update: bool = False) -> tuple[str, str]:
    """Find the Debian kernel image package name and version with ``apt-cache``.

    ``linux-image-amd64`` depends on exactly one ``linux-image-<abi>-amd64``;
    ``$AOE_TWISTED_KERNEL_PACKAGE`` pins another.  With ``update``, run
    ``apt-get update`` first (network).
    """
    if shutil.which("apt-cache") is None:
        raise KernelUnavailable("apt-cache not found (not a Debian system?)")
    if update:
        _run(["apt-get", "update", "-qq"])
    pinned = os.environ.get(KERNEL_PACKAGE_ENV)
    if pinned:
        info = _apt_candidate(pinned)
        if info and info[1]:
            return info[0], info[1]
    else:
        meta = _apt_candidate("linux-image-amd64")
        match = _IMAGE_DEPENDS_RE.search(meta[2]) if meta else None
        if match:
            return match.group(1), match.group(2)
    raise KernelUnavailable(f"apt cannot resolve {pinned or 'linux-image-amd64'}")


def _elf_sections(data: bytes) -> dict[str, bytes]:
    """Return the named sections of a little-endian ELF64 file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = []
    for i in range(shnum):
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize
        )
        headers.append((name, offset, size))
    _, stroff, strsize = headers[shstrndx]
    strtab = data[stroff : stroff + strsize]
    sections = {}
    for name, offset, size in headers:
        end = strtab.index(b"\0", name)
        sections[strtab[name:end].decode()] = data[offset : offset + size]
    return sections


def _modinfo(data: bytes) -> dict[str, list[str]]:
    """Parse a kernel module's ``.modinfo`` section into key -> values."""
    info: dict[str, list[str]] = {}
    for entry in _elf_sections(data).get(".modinfo", b"").split(b"\0"):
        key, sep, value = entry.decode(errors="replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


def _elf_has_pvh_note(data: bytes) -> bool:
    """True if an ELF64 vmlinux carries XEN_ELFNOTE_PHYS32_ENTRY (QEMU PVH boot)."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            name = data[pos + 12 : pos + 12 + namesz]
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
            if name == b"Xen\0" and ntype == 18:
                return True
    return False


def _decompress_at(blob: bytes, offset: int, method: str) -> bytes | None:
    """Try to decompress one stream starting at ``offset``; None on failure."""
    try:
        if method == "xz":
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(blob[offset:])
        if method == "lzma":
            return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(blob[offset:])
        if method == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(blob[offset:])
        if method == "bzip2":
            return bz2.BZ2Decompressor().decompress(blob[offset:])
        if method == "zstd":
            if shutil.which("zstd") is None:
                return None
            proc = subprocess.run(
                ["zstd", "-dc"], input=blob[offset:], capture_output=True, check=False
            )
            # zstd complains about trailing garbage but still writes the frame.
            return proc.stdout or None
    except (lzma.LZMAError, zlib.error, OSError, EOFError, ValueError):
        return None
    return None


_COMPRESSION_MAGIC = (
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x1f\x8b\x08", "gzip"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00\x00", "lzma"),
)


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """Return the ELF vmlinux inside a bzImage (scripts/extract-vmlinux), or None."""
    for magic, method in _COMPRESSION_MAGIC:
        start = 0
        while (pos := bzimage.find(magic, start)) >= 0:
            out = _decompress_at(bzimage, pos, method)
            if out and out[:4] == b"\x7fELF":
                return out
            start = pos + 1
    return None


def _read_module(path: Path) -> bytes:
    """Return the ELF bytes of a possibly compressed ``.ko`` file."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        if shutil.which("zstd") is None:
            raise KernelUnavailable(f"{path.name} needs the zstd tool (apt-get install zstd)")
        proc = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True)
        return proc.stdout
    return data


def _module_index(moddir: Path) -> dict[str, Path]:
    """Map module name (underscored) to its file under ``moddir``."""
    index = {}
    for path in moddir.rglob("*.ko*"):
        if re.search(r"\.ko(\.xz|\.gz|\.zst)?$", path.name):
            name = path.name.split(".ko")[0].replace("-", "_")
            index[name] = path
    return index


def _module_closure(
    roots: Iterable[str], index: Mapping[str, Path], builtin: set[str]
) -> list[tuple[str, bytes]]:
    """Return (name, ELF bytes) for ``roots`` and dependencies, dependencies first."""
    order: list[tuple[str, bytes]] = []
    done: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        name = _SOFTDEP_ALIASES.get(name, name).replace("-", "_")
        if name in done or name in builtin:
            return
        if name in stack:
            raise KernelUnavailable(f"module dependency cycle: {(*stack, name)}")
        if name not in index:
            raise KernelUnavailable(f"kernel module {name!r} not found (needed by {stack})")
        data = _read_module(index[name])
        info = _modinfo(data)
        deps = [d for v in info.get("depends", []) for d in v.split(",") if d]
        for softdep in info.get("softdep", []):
            # "pre: a b post: c" -> load the "pre" ones first
            pre = re.search(r"pre:\s*([^:]*?)(?:\s+post:|$)", softdep)
            if pre:
                deps.extend(pre.group(1).split())
        for dep in deps:
            visit(dep, (*stack, name))
        done.add(name)
        order.append((name, data))

    for root in roots:
        visit(root, ())
    return order


def _prepare_kernel(package: str, version: str, dest: Path) -> None:
    """Download ``package``, unpack it and write vmlinux + modules into ``dest``."""
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".work-") as work:
        workdir = Path(work)
        argv = ["apt-get", "download", "-o", "APT::Sandbox::User=root", f"{package}={version}"]
        proc = _run(argv, cwd=work)
        if proc.returncode != 0:
            _run(["apt-get", "update", "-qq"])
            proc = _run(argv, cwd=work)
        debs = list(workdir.glob("*.deb"))
        if proc.returncode != 0 or not debs:
            raise KernelUnavailable(f"apt-get download {package} failed: {proc.stderr.strip()}")
        root = workdir / "root"
        proc = _run(["dpkg", "-x", str(debs[0]), str(root)])
        if proc.returncode != 0:
            raise KernelUnavailable(f"dpkg -x failed: {proc.stderr.strip()}")
        vmlinuz = next((root / "boot").glob("vmlinuz-*"), None)
        moddirs = list((root / "lib" / "modules").glob("*"))
        if vmlinuz is None or len(moddirs) != 1:
            raise KernelUnavailable(f"{package} has no vmlinuz or module tree")
        release = moddirs[0].name
        builtin = set()
        builtin_list = moddirs[0] / "modules.builtin"
        if builtin_list.exists():
            for line in builtin_list.read_text().split():
                builtin.add(Path(line).name.split(".ko")[0].replace("-", "_"))
        index = _module_index(moddirs[0] / "kernel")
        # aoe.ko is the last root, so everything it needs is loaded before it.
        closure = _module_closure([*_ROOT_MODULES, _AOE_MODULE], index, builtin)
        modules = [m for m in closure if m[0] != _AOE_MODULE]

        staging = workdir / "out"
        (staging / "modules").mkdir(parents=True)
        bzimage = vmlinuz.read_bytes()
        (staging / "vmlinuz").write_bytes(bzimage)
        vmlinux = extract_vmlinux(bzimage)
        image = "vmlinuz"
        if vmlinux is not None and _elf_has_pvh_note(vmlinux):
            (staging / "vmlinux").write_bytes(vmlinux)
            image = "vmlinux"
        for name, data in closure:
            (staging / "modules" / f"{name}.ko").write_bytes(data)
        meta = {
            "package": package,
            "package_version": version,
            "release": release,
            "image": image,
            "modules": [name for name, _ in modules],
            "aoe_module": _AOE_MODULE,
        }
        (staging / "kernel.json").write_text(json.dumps(meta, indent=2) + "\n")
        staging.rename(dest)


def _load_kernel(path: Path) -> Kernel:
    """Load a prepared kernel directory."""
    meta = json.loads((path / "kernel.json").read_text())
    return Kernel(
        package=meta["package"],
        package_version=meta["package_version"],
        release=meta["release"],
        image=path / meta["image"],
        modules=tuple(path / "modules" / f"{m}.ko" for m in meta["modules"]),
        aoe_module=path / "modules" / f"{meta['aoe_module']}.ko",
    )


def obtain_kernel(cache: Path | None = None) -> Kernel:
    """Return the prepared Debian kernel, downloading it on first use.

    The current package is found with ``apt-cache`` (no network); a cache hit
    does no download.  If apt cannot tell, the newest cached kernel is used.
    Raises ``KernelUnavailable``.
    """
    base = (cache or cache_dir()) / "kernels"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            package, version = _resolve_kernel_package()
        except KernelUnavailable:
            # Offline or apt lists missing: any cached kernel will do, else update.
            cached = sorted(base.glob("*/kernel.json"), key=lambda p: p.stat().st_mtime)
            if cached:
                return _load_kernel(cached[-1].parent)
            package, version = _resolve_kernel_package(update=True)
        dest = base / f"{package}_{version.replace(':', '%')}"
        if not (dest / "kernel.json").exists():
            if dest.exists():
                shutil.rmtree(dest)
            _prepare_kernel(package, version, dest)
        return _load_kernel(dest)


# --------------------------------------------------------------------------
# Initramfs


def _find_busybox() -> Path | None:
    """Return a statically linked busybox binary, or None."""
    for candidate in BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.is_file() and _is_static_elf(path.read_bytes()):
            return path
    return None


def _is_static_elf(data: bytes) -> bool:
    """True for an ELF64 executable without a PT_INTERP program header."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    return 3 not in types  # PT_INTERP


class _Cpio:
    """Writer for an uncompressed ``newc`` cpio archive."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        nlink = 2 if mode & 0o170000 == 0o040000 else 1
        # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._ino += 1
        self._parts.append(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self._parts.append(data + b"\0" * (-len(data) % 4))

    def mkdir(self, name: str) -> None:
        """Add a directory and its parents."""
        name = name.strip("/")
        parent = name.rpartition("/")[0]
        if parent:
            self.mkdir(parent)
        if name and name not in self._dirs:
            self._dirs.add(name)
            self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file (parents created)."""
        name = name.strip("/")
        self.mkdir(name.rpartition("/")[0])
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        """Add a symbolic link."""
        name = name.strip("/")
        self.mkdir(name.rpartition("/")[0])
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        """Add a character device node."""
        name = name.strip("/")
        self.mkdir(name.rpartition("/")[0])
        self._entry(name, 0o020600, rdev=(major, minor))

    def getvalue(self) -> bytes:
        """Return the archive including its trailer."""
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)


_INIT_TEMPLATE = r"""#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "@@AOE-GUEST-INIT@@"
fail() {
    echo "@@AOE-GUEST-SETUP-FAILED: $*@@"
    dmesg | tail -n 30
    usleep 200000
    poweroff -f
}
for m in __MODULES__; do
    insmod "/lib/modules/$m.ko" || fail "insmod $m"
done
ip link set lo up
ip link set eth0 mtu __MTU__ || fail "cannot set eth0 mtu __MTU__"
ip link set eth0 up || fail "eth0 up"
if [ __LOAD_AOE__ = 1 ]; then
    insmod /lib/modules/aoe.ko __AOE_PARAMS__ || fail "insmod aoe"
fi
echo "@@AOE-GUEST-BEGIN@@"
/bin/sh /test.sh
rc=$?
echo "@@AOE-GUEST-END rc=$rc@@"
if [ "$rc" != 0 ]; then dmesg | tail -n 30; fi
sync
usleep 100000
poweroff -f
"""


def build_initramfs(
    kernel: Kernel,
    script: str,
    dest: Path,
    *,
    mtu: int = 1500,
    load_aoe: bool = True,
    aoe_params: str = "aoe_iflist=eth0",
    extra_files: Mapping[str, bytes] | None = None,
    busybox: Path | None = None,
) -> Path:
    """Write a busybox initramfs running ``script`` to ``dest`` and return it.

    ``/init`` loads the modules, sets eth0 to ``mtu`` and brings it up, loads
    ``aoe.ko`` with ``aoe_params`` (unless ``load_aoe`` is false; it stays at
    ``/lib/modules/aoe.ko``), runs ``/test.sh`` (``GUEST_HELPERS`` + ``script``),
    prints an end marker with its exit code and powers off.  ``extra_files``
    maps absolute guest paths to contents.
    """
    busybox = busybox or _find_busybox()
    if busybox is None:
        raise GuestError("no statically linked busybox (install busybox-static)")
    if "\n" in aoe_params or "'" in aoe_params:
        raise ValueError("aoe_params must be a single line without quotes")
    init = (
        _INIT_TEMPLATE.replace("__MODULES__", " ".join(p.stem for p in kernel.modules))
        .replace("__MTU__", str(int(mtu)))
        .replace("__LOAD_AOE__", "1" if load_aoe else "0")
        .replace("__AOE_PARAMS__", aoe_params)
    )
    archive = _Cpio()
    for directory in ("bin", "dev", "proc", "sys", "tmp", "mnt", "etc", "lib/modules"):
        archive.mkdir(directory)
    archive.chardev("dev/console", 5, 1)
    archive.chardev("dev/null", 1, 3)
    archive.file("bin/busybox", busybox.read_bytes(), 0o755)
    archive.symlink("bin/sh", "busybox")
    archive.file("init", init.encode(), 0o755)
    archive.file("test.sh", (GUEST_HELPERS + "\n" + script + "\n").encode(), 0o755)
    for module in (*kernel.modules, kernel.aoe_module):
        archive.file(f"lib/modules/{module.name}", module.read_bytes())
    for name, data in (extra_files or {}).items():
        archive.file(name, data, 0o755 if data.startswith(b"#!") else 0o644)
    dest.write_bytes(archive.getvalue())
    return dest


# --------------------------------------------------------------------------
# Availability


@functools.cache
def _static_unavailable_reason() -> str | None:
    """Reasons that do not involve obtaining the kernel."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tap devices)"
    for tool in (QEMU, "ip"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun missing"
    if _find_busybox() is None:
        return "no statically linked busybox (install busybox-static)"
    return None


@functools.cache
def _kernel_or_reason() -> Kernel | str:
    """Obtain the kernel once per process, or the reason it failed."""
    try:
        return obtain_kernel()
    except (KernelUnavailable, OSError, subprocess.SubprocessError) as e:
        return f"cannot obtain Debian kernel: {e}"


def unavailable_reason() -> str | None:
    """Say why the Linux guest cannot run here, or None if it can.

    May download and prepare the kernel on first call (cached afterwards).
    """
    reason = _static_unavailable_reason()
    if reason is not None:
        return reason
    kernel = _kernel_or_reason()
    return kernel if isinstance(kernel, str) else None


def skip_unless_available() -> None:
    """Raise SkipTest if the guest cannot run, or fail if ``AOE_TWISTED_REQUIRE_INTEROP=1``."""
    reason = unavailable_reason()
    if reason is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        raise AssertionError(f"{REQUIRE_ENV}=1 but Linux guest unavailable: {reason}")
    raise unittest.SkipTest(reason)


# --------------------------------------------------------------------------
# Running the guest


@dataclass
class GuestResult:
    """What a guest run produced.

    ``exit_code`` is the script's exit status, or None when the script never
    finished (boot failure, setup failure, timeout).  ``output`` is what the
    script printed; ``console`` is the whole serial console; ``values`` holds
    the ``KEY=value`` pairs the script printed.  Times are host seconds from
    QEMU start to ``/init`` running (``kernel_seconds``) and to the script
    starting, modules loaded and eth0 up (``boot_seconds``), the script's own
    run time (``script_seconds``) and QEMU's whole life (``total_seconds``).
    """

    exit_code: int | None
    output: str
    console: str
    timed_out: bool = False
    setup_error: str | None = None
    kernel_seconds: float | None = None
    boot_seconds: float | None = None
    script_seconds: float | None = None
    total_seconds: float = 0.0
    qemu_returncode: int | None = None
    values: dict[str, str] = field(default_factory=dict)
    qemu_stderr: str = ""

    def check(self) -> GuestResult:
        """Return self if the script exited 0, else raise GuestError with the console tail."""
        if self.exit_code == 0:
            return self
        if self.timed_out:
            what = "guest timed out"
        elif self.setup_error:
            what = f"guest setup failed: {self.setup_error}"
        elif self.exit_code is None:
            what = f"guest did not finish its script (qemu rc={self.qemu_returncode})"
        else:
            what = f"guest script exited {self.exit_code}"
        tail = "\n".join(self.console.splitlines()[-60:])
        raise GuestError(f"{what}; console tail:\n{tail}\n{self.qemu_stderr}".rstrip())


_VALUE_RE = re.compile(r"([A-Z][A-Z0-9_]*)=(.*)")


def _parse_values(output: str) -> dict[str, str]:
    """Collect ``KEY=value`` pairs (upper-case keys) from script output.

    A line is either one ``KEY=value with spaces`` or several
    space-separated ``KEY=value`` tokens.
    """
    values = {}
    for line in output.splitlines():
        tokens = line.split()
        if tokens and all(_VALUE_RE.fullmatch(t) for t in tokens):
            pairs = [t.split("=", 1) for t in tokens]
        else:
            match = _VALUE_RE.fullmatch(line.strip())
            pairs = [[match.group(1), match.group(2)]] if match else []
        for key, value in pairs:
            values[key] = value
    return values


_NETNS_PREFIX = "aoetw-"


def remove_stale_networks() -> list[str]:
    """Delete namespaces left by harness processes that died (e.g. SIGKILL).

    Only names ``aoetw-<pid>-<token>`` whose pid is gone are touched; the
    processes still inside them (an orphaned QEMU or target) are killed.
    Returns the names removed.
    """
    removed = []
    for line in _run(["ip", "netns", "list"]).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(rf"{_NETNS_PREFIX}(\d+)-[0-9a-f]+", name)
        if not match:
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        for pid in _run(["ip", "netns", "pids", name]).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        for link in _run(
            ["ip", "-n", name, "-o", "link", "show", "type", "tun"]
        ).stdout.splitlines():
            _run(["ip", "-n", name, "link", "del", link.split(":")[1].strip().split("@")[0]])
        _run(["ip", "netns", "del", name])
        removed.append(name)
    return removed


def terminate(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Stop a process: SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


class GuestNetwork:
    """A private network namespace holding one tap device for a QEMU guest.

    Use as a context manager.  ``netns`` and ``tap`` name the namespace and
    the tap; ``spawn`` starts a process (e.g. the AoE target) inside it.
    ``close`` stops spawned processes and QEMU and deletes tap and namespace.
    """

    def __init__(self, mtu: int = 1500) -> None:
        token = secrets.token_hex(4)
        self.mtu = mtu
        self.netns = f"{_NETNS_PREFIX}{os.getpid()}-{token}"
        self.tap = f"aoetap{token}"
        self._procs: list[subprocess.Popen[bytes]] = []
        self._created = False

    def __enter__(self) -> GuestNetwork:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _ip(self, *args: str) -> None:
        proc = _run(["ip", *args])
        if proc.returncode != 0:
            raise GuestError(f"ip {' '.join(args)}: {proc.stderr.strip()}")

    def open(self) -> None:
        """Create the namespace and the tap (MTU set, link up)."""
        self._ip("netns", "add", self.netns)
        self._created = True
        try:
            self._ip("-n", self.netns, "link", "set", "lo", "up")
            self._ip("-n", self.netns, "tuntap", "add", "dev", self.tap, "mode", "tap")
            self._ip("-n", self.netns, "link", "set", self.tap, "mtu", str(self.mtu), "up")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop everything started here and delete the tap and the namespace."""
        while self._procs:
            terminate(self._procs.pop())
        if self._created:
            _run(["ip", "-n", self.netns, "link", "del", self.tap])
            _run(["ip", "netns", "del", self.netns])
            self._created = False

    def command(self, argv: Sequence[str]) -> list[str]:
        """Return ``argv`` prefixed to run inside the namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def spawn(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside the namespace; it is terminated on ``close``.

        ``popen_kwargs`` go to ``subprocess.Popen`` (e.g. ``stdout=logfile``).
        """
        proc: subprocess.Popen[bytes] = subprocess.Popen(self.command(argv), **popen_kwargs)
        self._procs.append(proc)
        return proc

    def boot(self, script: str, **kwargs: Any) -> GuestResult:
        """Boot a guest on this tap and run ``script``; see ``run_guest``."""
        return run_guest(self, script, **kwargs)


def run_guest(
    network: GuestNetwork,
    script: str,
    *,
    timeout: float = 120.0,
    kernel: Kernel | None = None,
    memory_mib: int = 512,
    cpus: int = 1,
    mac: str = DEFAULT_GUEST_MAC,
    load_aoe: bool = True,
    aoe_params: str = "aoe_iflist=eth0",
    extra_files: Mapping[str, bytes] | None = None,
    append: str = "",
    quiet: bool = True,
    console_log: Path | None = None,
) -> GuestResult:
    """Boot QEMU on ``network.tap`` and run ``script`` in the guest.

    The guest's eth0 gets ``network.mtu``.  Returns when the guest powers off
    or after ``timeout`` seconds (QEMU is then killed; ``timed_out`` is set).
    Lines ``KEY=value`` printed by the script are parsed into ``values``.
    The whole console is also written to ``console_log`` if given.
    """
    if kernel is None:
        obtained = _kernel_or_reason()
        if isinstance(obtained, str):
            raise GuestError(obtained)
        kernel = obtained
    with tempfile.TemporaryDirectory(prefix="aoe-guest-") as work:
        initrd = build_initramfs(
            kernel,
            script,
            Path(work) / "initramfs.cpio",
            mtu=network.mtu,
            load_aoe=load_aoe,
            aoe_params=aoe_params,
            extra_files=extra_files,
        )
        cmdline = "console=ttyS0 panic=-1 mitigations=off"
        if quiet:
            cmdline += " quiet"
        if append:
            cmdline += " " + append
        argv = [
            QEMU, "-accel", "tcg", "-m", str(memory_mib), "-smp", str(cpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
            "-serial", "stdio", "-no-reboot",
            "-kernel", str(kernel.image), "-initrd", str(initrd), "-append", cmdline,
            "-netdev", f"tap,id=n0,ifname={network.tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=n0,mac={mac},host_mtu={network.mtu}",
        ]  # fmt: skip
        with (Path(work) / "qemu.stderr").open("w+b") as stderr:
            result = _run_qemu(network.command(argv), timeout, stderr)
            stderr.seek(0)
            result.qemu_stderr = stderr.read().decode(errors="replace")
    if console_log is not None:
        console_log.write_text(result.console + "\n" + result.qemu_stderr)
    return result


def _run_qemu(argv: list[str], timeout: float, stderr: BinaryIO) -> GuestResult:
    """Run QEMU, collect the serial console and the script markers."""
    lines: list[str] = []
    marks: dict[str, float] = {}
    end_seen = threading.Event()
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)

    def reader() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n").replace("\r", "")
            now = time.monotonic()
            lines.append(line)
            if _MARK_INIT in line:
                marks.setdefault("init", now)
            if _MARK_BEGIN in line:
                marks.setdefault("begin", now)
            if _MARK_END_RE.search(line) or _MARK_SETUP_RE.search(line):
                marks.setdefault("end", now)
                end_seen.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    deadline = start + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if end_seen.wait(0.1):
                # The guest powers off right after the marker; do not wait long.
                deadline = min(deadline, time.monotonic() + _POWEROFF_GRACE)
        timed_out = not end_seen.is_set() and proc.poll() is None
    finally:
        terminate(proc, grace=2.0)
        thread.join(5.0)
    total = time.monotonic() - start
    console = "\n".join(lines)
    exit_code = None
    setup_error = None
    output_lines: list[str] = []
    inside = False
    for line in lines:
        if _MARK_BEGIN in line:
            inside = True
            continue
        end = _MARK_END_RE.search(line)
        setup = _MARK_SETUP_RE.search(line)
        if setup:
            setup_error = setup.group(1)
            break
        if end:
            before = line[: end.start()]
            if inside and before:
                output_lines.append(before)
            exit_code = int(end.group(1))
            break
        if inside:
            output_lines.append(line)
    output = "\n".join(output_lines)
    init, begin, finish = marks.get("init"), marks.get("begin"), marks.get("end")
    return GuestResult(
        exit_code=exit_code,
        output=output,
        console=console,
        timed_out=timed_out,
        setup_error=setup_error,
        kernel_seconds=None if init is None else init - start,
        boot_seconds=None if begin is None else begin - start,
        script_seconds=None if begin is None or finish is None else finish - begin,
        total_seconds=total,
        qemu_returncode=proc.returncode,
        values=_parse_values(output),
    )
