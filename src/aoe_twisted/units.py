# -*- test-case-name: tests.test_units,tests.test_backends -*-
"""
The units of the protocol as people write them: sizes and target addresses.

One grammar for each, shared by every command line: ``twistd aoe``'s
``--backend memory:64M`` and ``--target 1.2=...``, and ``aoe-twisted``'s
``--length 64M`` and ``e1.2``.  The grammars are documented once, in
docs/options.md ("Sizes and addresses").  This module imports neither the
server nor the initiator, so both can use it.
"""

from __future__ import annotations

import re

from aoe_twisted.core.wire.constants import BROADCAST_MAJOR, BROADCAST_MINOR, SECTOR_SIZE
from aoe_twisted.errors import BackendSpecError

__all__ = [
    "SECTOR_SIZE",
    "check_disk_size",
    "parse_address",
    "parse_byte_count",
    "parse_size",
]

#: A number: decimal (leading zeros allowed) or ``0x`` hexadecimal, ASCII digits only.
_NUMBER = r"0x[0-9a-f]+|[0-9]+"
_MULTIPLIERS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "s": SECTOR_SIZE}
#: A bare ``B`` is no unit: ``0x1b`` is the hex number 27, not 1 byte.
_SIZE = re.compile(rf"({_NUMBER})(?:([kmgt])(?:i?b)?|(s))?", re.ASCII | re.IGNORECASE)
_ADDRESS = re.compile(rf"e?({_NUMBER})\.({_NUMBER})", re.ASCII | re.IGNORECASE)


def _number(digits: str) -> int:
    """Return the value of a ``_NUMBER`` match (``int(text, 0)`` refuses leading zeros)."""
    if digits[:2].lower() == "0x":
        return int(digits, 16)
    return int(digits, 10)


def parse_byte_count(text: str) -> int:
    """
    Return the number of bytes that ``text`` names (zero or more).

    ``text`` is a number, decimal or ``0x`` hexadecimal, optionally followed
    by a unit: ``K``, ``M``, ``G`` or ``T`` (powers of 1024, also written
    ``KiB`` or ``KB``, ...) or ``s`` (512-byte sectors); any case, no spaces.
    ``"64M"``, ``"64MiB"`` and ``"64mb"`` are 67108864, ``"0x200"`` and
    ``"1s"`` are 512.

    @raise ValueError: with a one-line message quoting ``text`` if it is none
        of these.
    """
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"not a size: {text!r} (give a number of bytes, or a number followed by K, M, G "
            "or T (powers of 1024) or s (512-byte sectors), e.g. 4096, 0x1000, 64M or 8s)"
        )
    number, unit, sectors = match.groups()
    return _number(number) * _MULTIPLIERS.get((unit or sectors or "").lower(), 1)


def parse_size(text: str) -> int:
    """
    Return the size of a disk that ``text`` names, as ``--backend memory:64M`` gives it.

    ``text`` is in the grammar of ``parse_byte_count``; the result must be a
    whole, positive multiple of 512.

    @raise BackendSpecError: (a ``ValueError``) with a one-line message if it is not.
    """
    try:
        size = parse_byte_count(text)
    except ValueError as e:
        raise BackendSpecError(str(e)) from None
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


def parse_address(text: str) -> tuple[int, int]:
    """
    Return ``(shelf, slot)`` of a target address: ``SHELF.SLOT`` or ``eSHELF.SLOT``.

    Each part is a number as ``parse_byte_count`` reads it (decimal or ``0x``
    hex); ``e1.0``, ``1.0`` and ``0x10.0`` all work.  The wildcard addresses
    (shelf 65535, slot 255) name no one target and are refused.

    @raise ValueError: with a one-line message quoting ``text`` if it is not
        an address or names a wildcard.
    """
    match = _ADDRESS.fullmatch(text)
    if match is None:
        raise ValueError(
            f"not a target address: {text!r} (expected SHELF.SLOT or eSHELF.SLOT, e.g. e1.0)"
        )
    shelf, slot = _number(match.group(1)), _number(match.group(2))
    if shelf >= BROADCAST_MAJOR or slot >= BROADCAST_MINOR:
        raise ValueError(
            f"{text!r}: the shelf must be 0..{BROADCAST_MAJOR - 1} and the slot "
            f"0..{BROADCAST_MINOR - 1}"
        )
    return shelf, slot
