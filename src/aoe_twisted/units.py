# -*- test-case-name: tests.test_backends -*-
"""Disk sizes: the sector size, ``--backend memory:64M`` size parsing, size checks."""

from __future__ import annotations

import re

from aoe_twisted.errors import BackendSpecError
from aoe_twisted.wire.constants import SECTOR_SIZE

__all__ = ["SECTOR_SIZE", "check_disk_size", "parse_size"]

_MULTIPLIERS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"([0-9]+)(?:([kmgt])(?:ib)?)?", re.ASCII | re.IGNORECASE)


def parse_size(text: str) -> int:
    """
    Return the number of bytes that ``text`` names.

    ``text`` is a plain number of bytes (``"1048576"``) or a number followed
    by ``K``, ``M``, ``G`` or ``T`` (powers of 1024; ``KiB``, ``MiB``, ...
    too; any case): ``"64M"`` is 67108864.  The result must be a whole,
    positive multiple of 512.

    @raise BackendSpecError: (a ``ValueError``) if it is not.
    """
    match = _SIZE.fullmatch(text)
    if match is None:
        raise BackendSpecError(
            f"{text!r} is not a size: give a number of bytes, or a number followed by "
            "K, M, G or T (powers of 1024), e.g. 64M"
        )
    number, unit = match.groups()
    size = int(number) * _MULTIPLIERS[(unit or "").lower()]
    return check_disk_size(size, repr(text))


def check_disk_size(size: int, what: str) -> int:
    """
    Return ``size`` if it is a whole, positive number of sectors.

    @param what: names the disk in the error message, e.g. its path.
    @raise BackendSpecError: with a one-line message naming ``what`` and
        ``size`` if it is not.
    """
    if size <= 0:
        raise BackendSpecError(
            f"{what}: size {size} bytes is too small; a disk holds at least one "
            f"{SECTOR_SIZE}-byte sector"
        )
    if size % SECTOR_SIZE:
        raise BackendSpecError(
            f"{what}: size {size} bytes is not a whole multiple of {SECTOR_SIZE}"
        )
    return size
