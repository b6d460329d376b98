# -*- test-case-name: tests.test_identify -*-
"""
Tests for ``aoe_twisted.core.identify``: the default IDENTIFY DEVICE page.

The page matters because an AoE initiator learns the disk's size from it and
nothing else, so the tests read it back the way the Linux initiator does
(``linux_capacity``) and compare it with vblade's page in a real capture.
"""

from __future__ import annotations

import struct
from pathlib import Path

import attrs
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from aoe_twisted import __version__
from aoe_twisted.core.identify import (
    IDENTIFY_SIZE,
    LBA28_MAX_SECTORS,
    DefaultIdentifier,
    build_identify,
)
from aoe_twisted.core.wire import ATAArg, EthernetFrame, Header
from aoe_twisted.interfaces import IIdentifier
from tests.pcap import read_pcap

__all__ = ["ata_text", "linux_capacity", "vblade_identify_page", "words"]

_DATA = Path(__file__).parent / "data"

#: Disk sizes in sectors around the limits of words 60-61 and the CHS geometry.
SIZES = {
    "one sector": 1,
    "smaller than one cylinder": 1007,
    "100 cylinders": 100 * 16 * 63,
    "512 MiB": 0x100000,
    "largest CHS": 16383 * 16 * 63,
    "beyond CHS": 16383 * 16 * 63 + 1,
    "2**28 - 1, the largest LBA28 capacity": 2**28 - 1,
    "2**28": 2**28,
    "2**28 + 1": 2**28 + 1,
    "2 TiB": 2**32,
    "4 PiB": 2**43 + 12345,
    "2**48, the most a 48-bit LBA addresses": 2**48,
}


def words(page: bytes) -> tuple[int, ...]:
    """Return the 256 little-endian words of an IDENTIFY page."""
    return struct.unpack("<256H", page)


def ata_text(page: bytes, first_word: int, length: int) -> str:
    """Decode an ATA string field (pairs swapped) back to text, trailing spaces removed."""
    raw = page[2 * first_word : 2 * first_word + length]
    unswapped = bytearray(length)
    unswapped[0::2] = raw[1::2]
    unswapped[1::2] = raw[0::2]
    return unswapped.decode("ascii").rstrip(" ")


def linux_capacity(page: bytes) -> int:
    """
    Return the disk size in sectors the Linux initiator takes from ``page``.

    As ``ataid_complete`` in ``drivers/block/aoe/aoecmd.c``: words 100-103 if
    word 83 or 86 has bit 10 (LBA48) set, else words 60-61.
    """
    w = words(page)
    if (w[83] | w[86]) & 0x0400:
        return w[100] | w[101] << 16 | w[102] << 32 | w[103] << 48
    return w[60] | w[61] << 16


def vblade_identify_page() -> bytes:
    """Return vblade 25's IDENTIFY page for its 0x100000-sector disk, from the capture."""
    for frame in read_pcap(_DATA / "linux-vblade-mtu1500.pcap").frames:
        header = Header.from_bytes(EthernetFrame.from_bytes(frame).payload)
        arg = header.arg
        if header.flag_response and isinstance(arg, ATAArg) and len(arg.data) == 512:
            return arg.data
    raise AssertionError("the capture holds no IDENTIFY reply")


class BuildIdentifyTests(SynchronousTestCase):
    """``build_identify`` builds the page an initiator reads the disk from."""

    def test_length(self) -> None:
        """The page is 512 bytes for every size."""
        for name, sectors in SIZES.items():
            with self.subTest(name):
                self.assertEqual(len(build_identify(sectors)), IDENTIFY_SIZE)

    def test_lba48_capacity(self) -> None:
        """Words 100-103 hold the whole size, a 64-bit little-endian number."""
        for name, sectors in SIZES.items():
            with self.subTest(name):
                w = words(build_identify(sectors))
                self.assertEqual(w[100] | w[101] << 16 | w[102] << 32 | w[103] << 48, sectors)

    def test_lba28_capacity(self) -> None:
        """Words 60-61 hold the size up to 0x0FFFFFFF sectors and 0x0FFFFFFF above it."""
        expected = {
            "one sector": 1,
            "512 MiB": 0x100000,
            "2**28 - 1, the largest LBA28 capacity": 0x0FFFFFFF,
            "2**28": 0x0FFFFFFF,
            "2**28 + 1": 0x0FFFFFFF,
            "2 TiB": 0x0FFFFFFF,
            "2**48, the most a 48-bit LBA addresses": 0x0FFFFFFF,
        }
        for name, capacity in expected.items():
            with self.subTest(name):
                w = words(build_identify(SIZES[name]))
                self.assertEqual(w[60] | w[61] << 16, capacity)
        self.assertEqual(LBA28_MAX_SECTORS, 0x0FFFFFFF)

    def test_linux_reads_the_size(self) -> None:
        """The Linux initiator's reading of the page gives the disk's size, for every size."""
        for name, sectors in SIZES.items():
            with self.subTest(name):
                self.assertEqual(linux_capacity(build_identify(sectors)), sectors)

    def test_lba48_advertised(self) -> None:
        """Word 83 (supported) and word 86 (enabled) have bit 10, LBA48, set."""
        w = words(build_identify(1000))
        self.assertTrue(w[83] & 0x0400)
        self.assertTrue(w[86] & 0x0400)

    def test_lba_advertised(self) -> None:
        """Word 49 says LBA is supported (bit 9) and claims nothing else (no DMA)."""
        self.assertEqual(words(build_identify(1000))[49], 0x0200)

    def test_flush_advertised(self) -> None:
        """Words 83 and 86 advertise FLUSH CACHE (bit 12) and FLUSH CACHE EXT (bit 13)."""
        w = words(build_identify(1000))
        for index in (83, 86):
            with self.subTest(word=index):
                self.assertEqual(w[index] & 0x3000, 0x3000)

    def test_validity_bits(self) -> None:
        """Words 50, 83, 84, 87 and 106 are marked valid: bit 14 set, bit 15 clear."""
        w = words(build_identify(1000))
        for index in (50, 83, 84, 87, 106):
            with self.subTest(word=index):
                self.assertEqual(w[index] & 0xC000, 0x4000)

    def test_fixed_words(self) -> None:
        """The words that do not depend on the disk have their documented values."""
        expected = {
            0: 0x0040,  # ATA device, not removable
            47: 0x8000,  # READ/WRITE MULTIPLE not supported
            50: 0x4000,
            53: 0x0001,  # words 54-58 valid
            80: 0x01C0,  # ATA/ATAPI-6, -7, ATA8-ACS
            82: 0x4000,
            83: 0x7400,
            84: 0x4000,
            85: 0x4000,
            86: 0x3400,
            87: 0x4000,
            106: 0x4000,  # one 512-byte logical sector per physical sector
        }
        w = words(build_identify(1000))
        for index, value in expected.items():
            with self.subTest(word=index):
                self.assertEqual(w[index], value)

    def test_chs_geometry(self) -> None:
        """
        Words 1/3/6 and 54-56 give 16 heads, 63 sectors a track and the cylinders
        that fit (at most 16383); words 57-58 their capacity.
        """
        expected = {
            "one sector": 0,
            "smaller than one cylinder": 0,
            "100 cylinders": 100,
            "largest CHS": 16383,
            "beyond CHS": 16383,
            "2 TiB": 16383,
        }
        for name, cylinders in expected.items():
            with self.subTest(name):
                w = words(build_identify(SIZES[name]))
                self.assertEqual((w[1], w[3], w[6]), (cylinders, 16, 63))
                self.assertEqual((w[54], w[55], w[56]), (cylinders, 16, 63))
                self.assertEqual(w[57] | w[58] << 16, cylinders * 16 * 63)

    def test_integrity_word(self) -> None:
        """Word 255 has the signature 0xA5 and a checksum: all 512 bytes sum to 0 mod 256."""
        for name, sectors in SIZES.items():
            with self.subTest(name):
                page = build_identify(sectors, serial=name[:20], model=name)
                self.assertEqual(page[510], 0xA5)
                self.assertEqual(sum(page) % 256, 0)

    @given(
        sectors=st.integers(0, 2**48),
        serial=st.text(max_size=30),
        model=st.text(max_size=50),
        firmware=st.text(max_size=10),
    )
    def test_checksum_any_page(self, sectors: int, serial: str, model: str, firmware: str) -> None:
        """Whatever the size and strings, the page is 512 bytes summing to 0 mod 256."""
        page = build_identify(sectors, serial=serial, model=model, firmware=firmware)
        self.assertEqual(len(page), IDENTIFY_SIZE)
        self.assertEqual(page[510], 0xA5)
        self.assertEqual(sum(page) % 256, 0)
        self.assertEqual(linux_capacity(page), sectors)

    def test_strings(self) -> None:
        """Serial (words 10-19), firmware (23-26) and model (27-46) decode back to the text."""
        page = build_identify(1000, serial="1.7:host", model="Some Disk", firmware="1.2.3")
        self.assertEqual(ata_text(page, 10, 20), "1.7:host")
        self.assertEqual(ata_text(page, 23, 8), "1.2.3")
        self.assertEqual(ata_text(page, 27, 40), "Some Disk")

    def test_strings_byte_swapped(self) -> None:
        """Each pair of characters is swapped: the first of a word goes in its high byte."""
        page = build_identify(1000, serial="ab", model="Coraid", firmware="V25")
        self.assertEqual(page[20:24], b"ba  ")
        self.assertEqual(page[46:50], b"2V 5")
        self.assertEqual(page[54:60], b"oCardi")

    def test_strings_padded_with_spaces(self) -> None:
        """Short strings fill their field with spaces, not zeros."""
        page = build_identify(1000, serial="", model="m", firmware="")
        self.assertEqual(page[20:40], b" " * 20)
        self.assertEqual(page[46:54], b" " * 8)
        self.assertEqual(page[54:94], b" m" + b" " * 38)

    def test_strings_cut(self) -> None:
        """Strings longer than their field are cut, and the words after them are untouched."""
        page = build_identify(1000, serial="s" * 30, model="m" * 50, firmware="f" * 10)
        self.assertEqual(ata_text(page, 10, 20), "s" * 20)
        self.assertEqual(ata_text(page, 23, 8), "f" * 8)
        self.assertEqual(ata_text(page, 27, 40), "m" * 40)
        self.assertEqual(words(page)[47], 0x8000)

    def test_strings_ascii_only(self) -> None:
        """Characters that are not printable ASCII become ``?``."""
        page = build_identify(1000, serial="h\u00f6st\tx")
        self.assertEqual(ata_text(page, 10, 20), "h?st?x")

    def test_defaults(self) -> None:
        """By default the model is ``aoe-twisted``, the firmware the package version, no serial."""
        page = build_identify(1000)
        self.assertEqual(ata_text(page, 27, 40), "aoe-twisted")
        self.assertEqual(ata_text(page, 23, 8), __version__)
        self.assertEqual(ata_text(page, 10, 20), "")

    def test_size_out_of_range(self) -> None:
        """A negative size, or one beyond what a 48-bit LBA addresses, is refused."""
        for sectors in (-1, 2**48 + 1, 2**64):
            with self.subTest(sectors=sectors):
                self.assertRaises(ValueError, build_identify, sectors)

    def test_matches_vblade(self) -> None:
        """
        Given vblade's size and strings, the page has vblade's strings and every
        word vblade sets, except where ours says more: words 83 and 86 add
        FLUSH CACHE EXT, and vblade's word 93 (a parallel ATA reset result) is left out.
        """
        theirs = vblade_identify_page()
        ours = build_identify(
            0x100000, serial="1.0:vm", model="Coraid EtherDrive vblade", firmware="V25"
        )
        self.assertEqual(ours[20:94], theirs[20:94])  # serial .. model, words 10-46
        w_ours, w_theirs = words(ours), words(theirs)
        for index in (47, 49, 50, 60, 61, 84, 87, 100, 101, 102, 103):
            with self.subTest(word=index):
                self.assertEqual(w_ours[index], w_theirs[index])
        for index in (83, 86):
            with self.subTest(word=index):
                self.assertEqual(w_ours[index] & w_theirs[index], w_theirs[index])
                self.assertEqual(w_ours[index] & ~w_theirs[index], 0x2000)
        self.assertEqual(linux_capacity(ours), linux_capacity(theirs))


class DefaultIdentifierTests(SynchronousTestCase):
    """``DefaultIdentifier`` serves ``build_identify``'s page through ``IIdentifier``."""

    def test_provides_interface(self) -> None:
        """It provides ``IIdentifier``."""
        self.assertTrue(verifyObject(IIdentifier, DefaultIdentifier(1000)))

    def test_page(self) -> None:
        """``identify()`` is ``build_identify`` of its size and strings."""
        identifier = DefaultIdentifier(2**30, serial="3.4:x", model="m", firmware="f")
        self.assertEqual(
            identifier.identify(), build_identify(2**30, serial="3.4:x", model="m", firmware="f")
        )

    def test_defaults(self) -> None:
        """Its defaults are ``build_identify``'s."""
        identifier = DefaultIdentifier(1000)
        self.assertEqual(
            (identifier.serial, identifier.model, identifier.firmware),
            ("", "aoe-twisted", __version__),
        )
        self.assertEqual(identifier.identify(), build_identify(1000))

    def test_cached(self) -> None:
        """The page is built once: every call returns the same object."""
        identifier = DefaultIdentifier(1000)
        self.assertIs(identifier.identify(), identifier.identify())

    def test_frozen(self) -> None:
        """It is immutable, so the cached page cannot go stale."""
        identifier = DefaultIdentifier(1000)
        self.assertRaises(attrs.exceptions.FrozenInstanceError, setattr, identifier, "sectors", 1)

    def test_equality(self) -> None:
        """Identifiers with the same fields are equal, whatever their cached page."""
        self.assertEqual(DefaultIdentifier(1000, serial="a"), DefaultIdentifier(1000, serial="a"))
        self.assertNotEqual(DefaultIdentifier(1000), DefaultIdentifier(1001))

    def test_size_out_of_range(self) -> None:
        """A size ``build_identify`` refuses is refused when the identifier is made."""
        self.assertRaises(ValueError, DefaultIdentifier, -1)
