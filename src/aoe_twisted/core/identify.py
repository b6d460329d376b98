# -*- test-case-name: tests.test_identify -*-
"""
The default ATA IDENTIFY DEVICE page: what a disk tells its initiator about itself.

An AoE initiator learns a disk's size from IDENTIFY alone.  The Linux driver
(``aoecmd.c ataid_complete``) reads the LBA48 capacity from words 100-103 when
word 83 (or 86) has bit 10 set, and otherwise the LBA28 capacity from words
60-61 and the CHS geometry from words 54-56; iPXE does the same with word 83.
The serial, firmware and model strings end up in ``HDIO_GET_IDENTITY``.

The page follows vblade's (the Coraid reference target) and adds what vblade
leaves out: a CHS geometry for clients that only speak LBA28, FLUSH CACHE EXT,
the ATA version and the integrity word (255) with its checksum.

Words are little-endian, as ATA transfers them.  ATA strings hold two
characters per word, the first in the high byte, so on the wire each pair of
characters is swapped.
"""

from __future__ import annotations

import struct

from attrs import Factory, field, frozen
from zope.interface import implementer

from aoe_twisted import __version__
from aoe_twisted.interfaces import IIdentifier

__all__ = ["IDENTIFY_SIZE", "LBA28_MAX_SECTORS", "DefaultIdentifier", "build_identify"]

#: Bytes in an IDENTIFY DEVICE page: 256 16-bit words.
IDENTIFY_SIZE = 512

#: The most sectors words 60-61 report; ATA caps a larger disk's LBA28 capacity at this.
LBA28_MAX_SECTORS = 0x0FFFFFFF

#: Words 100-103 hold the LBA48 capacity; a 48-bit LBA cannot address more sectors.
_LBA48_MAX_SECTORS = 1 << 48

# The CHS translation ATA-6 prescribes for disks over 8.4 GB (and uses for all here):
# 16 heads, 63 sectors per track, at most 16383 cylinders.
_HEADS = 16
_SECTORS_PER_TRACK = 63
_MAX_CYLINDERS = 16383

# Command set bits of words 82-87.
_VALID = 0x4000  # words 83, 84, 87: bit 14 one, bit 15 zero means "this word is valid"
_NOP = 0x4000  # words 82, 85: NOP (the command always aborts, as the ATA standard says)
_LBA48 = 0x0400  # words 83, 86: the 48-bit address feature set
_FLUSH_CACHE = 0x1000  # words 83, 86: FLUSH CACHE (0xE7)
_FLUSH_CACHE_EXT = 0x2000  # words 83, 86: FLUSH CACHE EXT (0xEA)

# The words that do not depend on the disk: index -> value.
_FIXED_WORDS = {
    # General configuration: an ATA device (bit 15 zero), fixed, not removable (bit 6).
    0: 0x0040,
    # READ/WRITE MULTIPLE: bits 15:8 must be 0x80; bits 7:0 are the most sectors per
    # DRQ block, and 0 says READ/WRITE MULTIPLE is not supported.  That is the truth
    # (0xC4/0xC5/0x29/0x39 abort), so this is vblade's 0x8000 rather than 0x8001.
    47: 0x8000,
    # Capabilities: LBA supported (bit 9).  No DMA: AoE moves data without it.
    49: 0x0200,
    # Capabilities: bit 14 one, bit 15 zero (the word is valid).
    50: 0x4000,
    # Words 54-58 (the current CHS translation) are valid.
    53: 0x0001,
    # Major version: ATA/ATAPI-6 (bit 6, which brought LBA48), ATA/ATAPI-7, ATA8-ACS.
    80: 0x01C0,
    # Command sets supported (82-84) and enabled (85-87).  Bits 15:14 of word 86 are
    # reserved in ATA-6/7 (bit 15 means something else in ATA8-ACS), so it has no
    # validity bit, as in vblade.
    82: _NOP,
    83: _VALID | _FLUSH_CACHE_EXT | _FLUSH_CACHE | _LBA48,
    84: _VALID,
    85: _NOP,
    86: _FLUSH_CACHE_EXT | _FLUSH_CACHE | _LBA48,
    87: _VALID,
    # Physical/logical sector size: valid (bit 14), one 512-byte logical sector per
    # physical sector (bits 12 and 3:0 zero).
    106: 0x4000,
}

# Strings: (first word, length in characters).
_SERIAL = (10, 20)
_FIRMWARE = (23, 8)
_MODEL = (27, 40)

_WORDS = struct.Struct("<256H")
_INTEGRITY_SIGNATURE = 0xA5


def _ata_string(text: str, length: int) -> bytes:
    """
    Encode ``text`` as an ATA string field of ``length`` bytes (``length`` even).

    The text is cut to ``length`` characters and padded with spaces; anything
    but printable ASCII becomes ``?``, since ATA strings are ASCII.  Then each
    pair of characters is swapped, because ATA puts the first character of a
    word in its high byte and words travel little-endian.
    """
    raw = text.encode("ascii", "replace")[:length].ljust(length, b" ")
    raw = bytes(c if 0x20 <= c < 0x7F else 0x3F for c in raw)
    swapped = bytearray(length)
    swapped[0::2] = raw[1::2]
    swapped[1::2] = raw[0::2]
    return bytes(swapped)


def build_identify(
    sectors: int, *, serial: str = "", model: str = "aoe-twisted", firmware: str = __version__
) -> bytes:
    """
    Return the 512-byte IDENTIFY DEVICE page of a disk of ``sectors`` 512-byte sectors.

    Words 60-61 carry the LBA28 capacity, capped at ``0x0FFFFFFF`` as ATA
    requires for larger disks, and words 100-103 the full LBA48 capacity; word
    83 advertises LBA48, so the Linux initiator takes the size from words
    100-103.  Strings longer than their field (serial 20, firmware 8, model 40
    characters) are cut.  Word 255 holds the integrity signature 0xA5 and a
    checksum that makes all 512 bytes sum to 0 modulo 256.

    @raise ValueError: if ``sectors`` is negative or more than a 48-bit LBA addresses.
    """
    if not 0 <= sectors <= _LBA48_MAX_SECTORS:
        raise ValueError(f"a disk of {sectors} sectors cannot be described by IDENTIFY")
    words = [0] * 256
    for index, value in _FIXED_WORDS.items():
        words[index] = value

    # Default (1, 3, 6) and current (54-56) CHS translation, and its capacity (57-58).
    cylinders = min(sectors // (_HEADS * _SECTORS_PER_TRACK), _MAX_CYLINDERS)
    words[1] = words[54] = cylinders
    words[3] = words[55] = _HEADS
    words[6] = words[56] = _SECTORS_PER_TRACK
    chs_sectors = cylinders * _HEADS * _SECTORS_PER_TRACK
    words[57] = chs_sectors & 0xFFFF
    words[58] = chs_sectors >> 16

    lba28 = min(sectors, LBA28_MAX_SECTORS)
    words[60] = lba28 & 0xFFFF
    words[61] = lba28 >> 16
    for i in range(4):
        words[100 + i] = (sectors >> (16 * i)) & 0xFFFF

    page = bytearray(_WORDS.pack(*words))
    for (word, length), text in ((_SERIAL, serial), (_FIRMWARE, firmware), (_MODEL, model)):
        page[2 * word : 2 * word + length] = _ata_string(text, length)
    page[510] = _INTEGRITY_SIGNATURE
    page[511] = -sum(page[:511]) & 0xFF
    return bytes(page)


@implementer(IIdentifier)
@frozen
class DefaultIdentifier:
    """
    The IDENTIFY page of a disk of ``sectors`` sectors, built once by ``build_identify``.

    The page is constant, so it is built when the identifier is made and every
    ``identify()`` returns the same ``bytes``.
    """

    sectors: int
    serial: str = ""
    model: str = "aoe-twisted"
    firmware: str = __version__
    _page: bytes = field(
        init=False,
        repr=False,
        eq=False,
        default=Factory(
            lambda self: build_identify(
                self.sectors, serial=self.serial, model=self.model, firmware=self.firmware
            ),
            takes_self=True,
        ),
    )

    def identify(self) -> bytes:
        """Return the 512-byte page."""
        return self._page
