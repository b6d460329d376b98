# -*- test-case-name: tests.test_backends -*-
"""
What the built-in disks are called: the identities behind ``IDiskIdentity``.

An identity names a disk, not a path to it: the same bytes wherever and
whenever they are served, and only if a write through one server is seen at
once by a read through the other (the two promises of ``IDiskIdentity``).
The target hashes it into IDENTIFY's serial number and world-wide name.

- A file (``file_identity``): this host, the filesystem (its ``f_fsid``,
  which ext4 and btrfs derive from the filesystem's UUID, or its ``st_dev``
  where the filesystem gives no fsid) and the inode.  Stable across
  restarts, renames and hard links; the same for two servers on this host;
  different on another host even for a file on a shared filesystem, whose
  page caches are not one.
- A block device (``block_device_identity``): the device's own name from
  sysfs: a device-mapper UUID (LVM, multipath, dm-crypt), a registered WWID
  (``naa.``, ``eui.``, ``uuid.``, ``nvme.``), or else a T10 WWID or serial.
  The registered names and dm UUIDs mean the same disk on every host that
  sees it (a shared LUN), but only with ``--direct``: without it, this
  host's page cache sits in front of the disk and the identity is local to
  the host.  Partitions add their start to their disk's name, loop devices
  name their backing file, offset and limit; a device with no name of its
  own falls back to its major:minor and size, local to the host.
- A network disk (a plugin): its own id, e.g. the cluster fsid and RBD image
  id; ``host_local`` for one whose cache other hosts cannot see.

A memory disk has no identity: it is never shared, and without one it keeps
the serial ``shelf.slot``.
"""

from __future__ import annotations

import fcntl
import functools
import os
import socket
import struct
from pathlib import Path

__all__ = [
    "block_device_identity",
    "device_name",
    "file_identity",
    "host_local",
    "machine_id",
    "slice_identity",
]

#: Where a host's stable id is kept (systemd, then D-Bus's older copy).
_MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")

#: WWID prefixes whose names are unique by construction (IEEE registered or random UUIDs).
_REGISTERED_WWIDS = ("naa.", "eui.", "uuid.", "nvme.")

_LOOP_GET_STATUS64 = 0x4C05
"""``ioctl`` request: a loop device's ``struct loop_info64``."""

_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")
"""``lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit, lo_number``, then the rest."""


@functools.cache
def machine_id() -> bytes:
    """
    Return this host's stable id: ``/etc/machine-id``, or the host name without one.

    The same across restarts and for every process on the host; read once.
    """
    for name in _MACHINE_ID_FILES:
        try:
            value = Path(name).read_bytes().strip()
        except OSError:
            continue
        if value:
            return value
    return b"hostname:" + socket.gethostname().encode("utf-8", "replace")


def host_local(identity: bytes) -> bytes:
    """
    Return ``identity`` made local to this host: another host never has it.

    For a disk seen through something only this host sees (its page cache,
    its device numbers, a write-back cache of its own): two servers on this
    host still share the identity, two on different hosts do not.
    """
    return b"host=" + machine_id() + b" " + identity


def slice_identity(identity: bytes, offset: int, length: int) -> bytes:
    """
    Return the identity of ``length`` bytes from ``offset`` of the disk named ``identity``.

    A slice is a disk of its own: two slices of one file are two disks, and
    only the same slice of the same disk is the same disk.
    """
    return b"%s slice=%d+%d" % (identity, offset, length)


def file_identity(fd: int) -> bytes:
    """
    Return the identity of the regular file open as ``fd``: host, filesystem, inode.

    The filesystem is its ``f_fsid`` (``fstatvfs``) where it has one, else
    its device number; see the module docstring.
    """
    st = os.fstat(fd)
    try:
        fsid = os.fstatvfs(fd).f_fsid
    except OSError:
        fsid = 0
    if fsid:
        filesystem = b"fsid=%x" % fsid
    else:
        filesystem = b"dev=%d:%d" % (os.major(st.st_dev), os.minor(st.st_dev))
    return host_local(b"file %s ino=%d" % (filesystem, st.st_ino))


def block_device_identity(fd: int, *, direct: bool, sysfs: Path = Path("/sys")) -> bytes:
    """
    Return the identity of the block device open as ``fd``; ``direct`` if it is ``O_DIRECT``.

    Looks the device up under ``sysfs``/``dev/block/MAJOR:MINOR``; see the
    module docstring for what is used, in which order, and when the result
    is local to this host.  Never fails: a device sysfs knows nothing about
    is named by its number and size.
    """
    st = os.fstat(fd)
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    device = sysfs / "dev" / "block" / f"{major}:{minor}"
    if (device / "loop").is_dir():
        loop = _loop_identity(fd)
        if loop is not None:
            return loop
    named = device_name(device)
    if named is not None:
        name, shared = named
        return name if shared and direct else host_local(name)
    size = os.lseek(fd, 0, os.SEEK_END)
    return host_local(b"block dev=%d:%d size=%d" % (major, minor, size))


def device_name(device: Path) -> tuple[bytes, bool] | None:
    """
    Return a block device's own name from its sysfs directory, and whether other hosts share it.

    ``(name, True)`` for a device-mapper UUID or a registered WWID, which
    name the same disk on every host that sees it; ``(name, False)`` for a
    T10 WWID or a serial number, unique only on this host (a virtual disk's
    default T10 id is the same in every virtual machine); ``None`` if the
    device has none.  A partition is its disk's name and its start sector.
    """
    partition_start = _read(device / "start") if (device / "partition").exists() else None
    if partition_start is not None:
        disk = device_name(device.resolve().parent)
        if disk is None:
            return None
        return b"%s partition start=%s" % (disk[0], partition_start), disk[1]
    uuid = _read(device / "dm" / "uuid")
    if uuid:
        return b"dm-uuid:" + uuid, True
    for wwid_file in (device / "wwid", device / "device" / "wwid"):
        wwid = _read(wwid_file)
        if wwid:
            shared = wwid.decode("ascii", "replace").lower().startswith(_REGISTERED_WWIDS)
            return b"wwid:" + b" ".join(wwid.split()), shared
    for serial_file in (device / "serial", device / "device" / "serial"):
        serial = _read(serial_file)
        if serial:
            model = _read(serial_file.parent / "model") or b""
            return b"serial:%s/%s" % (b" ".join(model.split()), serial), False
    return None


def _read(path: Path) -> bytes | None:
    """Return a sysfs attribute's value without surrounding blanks, or ``None`` if unreadable."""
    try:
        return path.read_bytes().strip(b" \t\n\x00")
    except OSError:
        return None


def _loop_identity(fd: int) -> bytes | None:
    """
    Return a loop device's identity: this host, its number, its backing file, offset and limit.

    Its number is part of it because each loop device has a page cache of
    its own: two loop devices on one file are not coherent, so not one disk.
    ``None`` if the kernel will not say (``LOOP_GET_STATUS64`` fails).
    """
    try:
        raw = fcntl.ioctl(fd, _LOOP_GET_STATUS64, bytes(_LOOP_INFO64.size))
    except OSError:
        return None
    device, inode, _rdevice, offset, sizelimit, number = _LOOP_INFO64.unpack(raw)[:6]
    return host_local(
        b"loop%d file=%d:%d ino=%d offset=%d limit=%d"
        % (number, os.major(device), os.minor(device), inode, offset, sizelimit)
    )
