"""
An example third-party backend plugin: ``pattern:SIZE``.

A read-only disk of ``SIZE`` bytes whose every sector holds its own sector
number (LBA), 8 bytes big-endian, repeated 64 times.  Whatever an initiator
reads, it can check that it got the sectors it asked for.

This file is the whole plugin.  Put it in a ``twisted/plugins/`` directory
on ``sys.path`` (never add an ``__init__.py`` there) and
``--backend pattern:64M`` works.  The test suite finds it through
``tests.plugintools.use_test_plugins``.
"""

from __future__ import annotations

import errno

from zope.interface import implementer

from aoe_twisted.interfaces import IBackendFactory, IBlockBackend
from aoe_twisted.units import SECTOR_SIZE, parse_size


def pattern_sector(lba: int) -> bytes:
    """Return the 512 bytes of sector ``lba``: the LBA as 8 big-endian bytes, 64 times."""
    return lba.to_bytes(8, "big") * (SECTOR_SIZE // 8)


@implementer(IBlockBackend)
class PatternBackend:
    """A read-only disk of ``size`` bytes; sector ``n`` is ``pattern_sector(n)``."""

    read_only = True

    def __init__(self, size: int) -> None:
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        first, skip = divmod(offset, SECTOR_SIZE)
        end = -(-(offset + length) // SECTOR_SIZE)  # round up to a whole sector
        data = b"".join(pattern_sector(lba) for lba in range(first, end))
        return data[skip : skip + length]

    def write(self, offset: int, data: bytes) -> None:
        raise OSError(errno.EROFS, "the pattern disk is read-only")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


@implementer(IBackendFactory)
class PatternBackendFactory:
    """Opens ``pattern:SIZE``; the disk is read-only whatever ``read_only`` says."""

    scheme = "pattern"
    spec_format = "SIZE"
    description = "a read-only disk whose every sector holds its own number, e.g. pattern:1M"

    def open(self, spec: str, read_only: bool = False) -> IBlockBackend:
        return PatternBackend(parse_size(spec))


pattern = PatternBackendFactory()
