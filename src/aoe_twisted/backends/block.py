# -*- test-case-name: tests.test_backends -*-
"""``block:/dev/XXX``: a block device served as a disk."""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from typing import ClassVar

from attrs import define
from zope.interface import implementer

from aoe_twisted.backends._fd import FDBackend
from aoe_twisted.backends.identity import block_device_identity
from aoe_twisted.interfaces import IDiskIdentity

__all__ = ["BlockDeviceBackend"]

_BLKROGET = 0x125E
"""``ioctl`` request ``_IO(0x12, 94)``: is the block device read-only? (an ``int``)."""

_BLKSSZGET = 0x1268
"""``ioctl`` request ``_IO(0x12, 104)``: the device's logical block size (an ``int``)."""


@implementer(IDiskIdentity)
@define
class BlockDeviceBackend(FDBackend):
    """
    A block device (a disk, partition, LVM volume or loop device).

    Open it with ``BlockDeviceBackend.open(path, read_only=False)``.  Its size
    is the size the kernel reports.  A device the kernel holds read-only can
    only be opened with ``read_only=True``.  With ``direct=True`` I/O is done
    in whole logical blocks (``BLKSSZGET``: 512 or 4096 bytes), by
    read-modify-write where a request does not cover whole blocks.

    Its identity (``IDiskIdentity``) is the device's own name from sysfs
    (``identity.block_device_identity``): with ``direct``, a shared LUN's
    WWID or a dm UUID names the disk on every host that sees it, so two
    gateways of one LUN present one disk; without it, the identity is local
    to this host, whose page cache the other hosts cannot see.
    """

    kind: ClassVar[str] = "block device"

    @classmethod
    def _check_type(cls, path: str, mode: int) -> str | None:
        if stat.S_ISBLK(mode):
            return None
        if stat.S_ISREG(mode):
            return f"not a block device (serve an image file with file:{path})"
        return "not a block device"

    @classmethod
    def _identify(cls, fd: int, direct: bool) -> bytes | None:
        return block_device_identity(fd, direct=direct)

    @classmethod
    def _measure(cls, fd: int) -> int:
        # The same number as ioctl(BLKGETSIZE64), without the ioctl.
        return os.lseek(fd, 0, os.SEEK_END)

    @classmethod
    def _logical_block_size(cls, fd: int) -> int | None:
        """Ask the kernel for the device's logical block size, what ``O_DIRECT`` needs."""
        (size,) = struct.unpack("i", fcntl.ioctl(fd, _BLKSSZGET, bytes(4)))
        return int(size)

    @classmethod
    def _kernel_read_only(cls, fd: int) -> bool:
        # Linux lets a read-only device (losetup -r, blockdev --setro) be
        # opened O_RDWR and fails each write with EPERM; ask it up front.
        (flag,) = struct.unpack("i", fcntl.ioctl(fd, _BLKROGET, bytes(4)))
        return bool(flag)
