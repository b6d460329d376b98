# -*- test-case-name: tests.test_identify -*-
"""
The default ATA IDENTIFY DEVICE page: what a disk tells its initiator about itself.

An AoE initiator learns a disk's size from IDENTIFY alone.  The Linux driver
(``aoecmd.c ataid_complete``) reads the LBA48 capacity from words 100-103 when
word 83 (or 86) has bit 10 set, and otherwise the LBA28 capacity from words
60-61 and the CHS geometry from words 54-56; iPXE does the same with word 83.
The serial, firmware and model strings end up in ``HDIO_GET_IDENTITY``
(``hdparm -i /dev/etherd/e1.0`` shows them; the driver puts none of them in
sysfs, and it groups paths by shelf.slot and MAC, never by serial).

The page follows vblade's (the Coraid reference target) and adds what vblade
leaves out: a CHS geometry for clients that only speak LBA28, FLUSH CACHE EXT,
the ATA version and the integrity word (255) with its checksum.

A disk that can name itself (``IDiskIdentity``) also gets a serial number
and a world-wide name derived from its identity (``disk_serial``,
``disk_wwn``): the same disk served by two servers shows the same serial and
WWN, so a server that hears another answer for its address can tell a second
path to its own disk from a different disk (``same_disk``).

Words are little-endian, as ATA transfers them.  ATA strings hold two
characters per word, the first in the high byte, so on the wire each pair of
characters is swapped.
"""

from __future__ import annotations

import hashlib
import struct

from attrs import Factory, field, frozen
from zope.interface import implementer

from aoe_twisted import __version__
from aoe_twisted.interfaces import IIdentifier

__all__ = [
    "IDENTIFY_SIZE",
    "LBA28_MAX_SECTORS",
    "WWN_OUI",
    "DefaultIdentifier",
    "build_identify",
    "disk_serial",
    "disk_wwn",
    "page_identity",
    "same_disk",
]

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
_WWN_SUPPORTED = 0x0100  # words 84, 87: words 108-111 hold the world-wide name (ATA8-ACS)

#: The first word of the world-wide name (words 108-111, most significant word first).
_WWN_WORD = 108

#: The NAA of the world-wide name: 5, "IEEE Registered", the only one ATA8-ACS allows.
_NAA_IEEE_REGISTERED = 5

WWN_OUI = 0x0288A2
"""
The 24-bit company identifier in the world-wide names this package makes.

ATA8-ACS requires an NAA 5 ("IEEE Registered") name in words 108-111: NAA,
then a 24-bit IEEE company identifier, then 36 bits the company assigns.
This package owns no registered OUI, so it uses a locally administered one:
the first octet 0x02 has the X (local) bit set and the multicast bit clear,
and the IEEE never assigns such a value to a company, so our names cannot
equal a real disk's.  ``88A2`` is AoE's EtherType.  NAA 3 ("locally
assigned") would say the same more directly, but ATA allows only 5 and
decoders (``hdparm -I``, udev's ``ata_id``) read the field as NAA 5.
"""

#: Prefixes the identity before hashing, so our names are not a bare hash of it.
_IDENTITY_DOMAIN = b"aoe-twisted disk identity\0"

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


def _identity_digest(identity: bytes) -> bytes:
    """Return the SHA-256 digest that ``disk_serial`` and ``disk_wwn`` both come from."""
    return hashlib.sha256(_IDENTITY_DOMAIN + identity).digest()


def disk_serial(identity: bytes) -> str:
    """
    Return the 20-character serial number of the disk whose identity is ``identity``.

    The first 80 bits of the identity's SHA-256, in upper-case hex: it fills
    words 10-19 exactly, and two different disks share one only by chance
    (about 1 in 2**80 a pair).  The first nine digits are the last nine of
    ``disk_wwn``, so the two are easy to match by eye.
    """
    return _identity_digest(identity)[:10].hex().upper()


def disk_wwn(identity: bytes) -> int:
    """
    Return the 64-bit world-wide name of the disk whose identity is ``identity``.

    NAA 5, the locally administered company identifier ``WWN_OUI`` and, as
    the 36-bit vendor-specific part, the first 36 bits of the identity's
    SHA-256 (the first nine hex digits of ``disk_serial``).
    """
    unique = int.from_bytes(_identity_digest(identity)[:5]) >> 4
    return _NAA_IEEE_REGISTERED << 60 | WWN_OUI << 36 | unique


def build_identify(
    sectors: int,
    *,
    serial: str = "",
    model: str = "aoe-twisted",
    firmware: str = __version__,
    wwn: int | None = None,
) -> bytes:
    """
    Return the 512-byte IDENTIFY DEVICE page of a disk of ``sectors`` 512-byte sectors.

    Words 60-61 carry the LBA28 capacity, capped at ``0x0FFFFFFF`` as ATA
    requires for larger disks, and words 100-103 the full LBA48 capacity; word
    83 advertises LBA48, so the Linux initiator takes the size from words
    100-103.  Strings longer than their field (serial 20, firmware 8, model 40
    characters) are cut.  Word 255 holds the integrity signature 0xA5 and a
    checksum that makes all 512 bytes sum to 0 modulo 256.

    With ``wwn`` (a 64-bit NAA 5 name, as ``disk_wwn`` makes) words 108-111
    hold it, most significant word first, and bit 8 of words 84 and 87 says
    so (ATA8-ACS; libata's ``ata_id_has_wwn`` tests word 87).  Without it
    those words stay zero, as before.

    @raise ValueError: if ``sectors`` is negative or more than a 48-bit LBA
        addresses, or ``wwn`` is not a 64-bit name with NAA 5.
    """
    if not 0 <= sectors <= _LBA48_MAX_SECTORS:
        raise ValueError(f"a disk of {sectors} sectors cannot be described by IDENTIFY")
    if wwn is not None and not (0 <= wwn < 1 << 64 and wwn >> 60 == _NAA_IEEE_REGISTERED):
        raise ValueError(f"world-wide name {wwn!r} is not a 64-bit NAA 5 name")
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
    if wwn is not None:
        words[84] |= _WWN_SUPPORTED
        words[87] |= _WWN_SUPPORTED
        for i in range(4):
            words[_WWN_WORD + i] = (wwn >> (48 - 16 * i)) & 0xFFFF

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
    ``identify()`` returns the same ``bytes``.  ``for_disk`` builds the one a
    target uses by default.
    """

    sectors: int
    serial: str = ""
    model: str = "aoe-twisted"
    firmware: str = __version__
    wwn: int | None = None
    _page: bytes = field(
        init=False,
        repr=False,
        eq=False,
        default=Factory(
            lambda self: build_identify(
                self.sectors,
                serial=self.serial,
                model=self.model,
                firmware=self.firmware,
                wwn=self.wwn,
            ),
            takes_self=True,
        ),
    )

    def identify(self) -> bytes:
        """Return the 512-byte page."""
        return self._page

    @classmethod
    def for_disk(
        cls, sectors: int, identity: bytes | None, *, serial: str | None, fallback_serial: str
    ) -> DefaultIdentifier:
        """
        Return the identifier a target uses by default for a disk of ``sectors`` sectors.

        With an ``identity`` (``IDiskIdentity.disk_identity``) the serial is
        ``disk_serial(identity)`` and the world-wide name ``disk_wwn(identity)``;
        without one the serial is ``fallback_serial`` (a target's
        ``shelf.slot``) and there is no world-wide name, as for every disk
        before identities.  A ``serial`` given explicitly wins over both.
        """
        if identity is None:
            derived, wwn = fallback_serial, None
        else:
            derived, wwn = disk_serial(identity), disk_wwn(identity)
        return cls(sectors, serial=derived if serial is None else serial, wwn=wwn)


def page_identity(page: bytes) -> tuple[str, int | None]:
    """
    Return what an IDENTIFY page says the disk is: its serial and its world-wide name.

    The serial with its padding removed; the name only if word 87 says it is
    there (bits 15:14 are 01 and bit 8 is set, libata's ``ata_id_has_wwn``),
    else ``None``.

    @raise ValueError: if ``page`` is not 512 bytes.
    """
    if len(page) != IDENTIFY_SIZE:
        raise ValueError(f"an IDENTIFY page is {IDENTIFY_SIZE} bytes, not {len(page)}")
    words = _WORDS.unpack(page)
    start, length = _SERIAL
    field = page[2 * start : 2 * start + length]
    raw = bytearray(length)
    raw[0::2] = field[1::2]
    raw[1::2] = field[0::2]
    text = raw.decode("ascii", "replace").strip(" \x00")
    if words[87] & (0xC000 | _WWN_SUPPORTED) != _VALID | _WWN_SUPPORTED:
        return text, None
    wwn = 0
    for i in range(4):
        wwn = wwn << 16 | words[_WWN_WORD + i]
    return text, wwn


def same_disk(page: bytes, other: bytes) -> bool:
    """
    Return whether two IDENTIFY pages describe one disk (two paths to it).

    Only when both carry a world-wide name and the names and serials are
    equal: a page without a name (a backend without ``IDiskIdentity``, a
    memory disk, vblade) is never the same disk as another, so a duplicate
    address is refused rather than taken for a second path.

    @raise ValueError: if either page is not 512 bytes.
    """
    ours, theirs = page_identity(page), page_identity(other)
    return ours[1] is not None and ours == theirs
