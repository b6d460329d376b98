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
from aoe_twisted.backends.file import FileBackend
from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.core.identify import (
    IDENTIFY_SIZE,
    LBA28_MAX_SECTORS,
    WWN_OUI,
    DefaultIdentifier,
    build_identify,
    disk_serial,
    disk_wwn,
    page_identity,
    same_disk,
)
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import ATAArg, EthernetFrame, Header
from aoe_twisted.interfaces import IIdentifier
from tests.pcap import read_pcap

__all__ = ["ata_text", "linux_capacity", "page_wwn", "vblade_identify_page", "words"]

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


def page_wwn(page: bytes) -> int:
    """Return words 108-111 as one 64-bit number, word 108 the most significant (ATA8-ACS)."""
    w = words(page)
    return w[108] << 48 | w[109] << 32 | w[110] << 16 | w[111]


#: A world-wide name as ``disk_wwn`` makes them: NAA 5, our OUI, a 36-bit id.
WWN = 0x5_0288A2_123456789


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


class WorldWideNameTests(SynchronousTestCase):
    """``build_identify(wwn=...)`` puts a world-wide name in words 108-111 and says so."""

    def test_words(self) -> None:
        """Words 108-111 hold the name, most significant word first."""
        w = words(build_identify(1000, wwn=WWN))
        self.assertEqual(w[108:112], (0x5028, 0x8A21, 0x2345, 0x6789))

    def test_supported_bits(self) -> None:
        """Bit 8 of words 84 (supported) and 87 (its copy) is set; the words stay valid."""
        w = words(build_identify(1000, wwn=WWN))
        self.assertEqual(w[84], 0x4100)
        self.assertEqual(w[87], 0x4100)

    def test_libata_sees_it(self) -> None:
        """libata's ``ata_id_has_wwn`` test, ``(word 87 & 0xC100) == 0x4100``, holds."""
        self.assertEqual(words(build_identify(1000, wwn=WWN))[87] & 0xC100, 0x4100)

    def test_absent_by_default(self) -> None:
        """Without a name words 108-111 are zero and bit 8 of words 84 and 87 is clear."""
        w = words(build_identify(1000))
        self.assertEqual(w[108:112], (0, 0, 0, 0))
        self.assertEqual((w[84] & 0x0100, w[87] & 0x0100), (0, 0))

    def test_nothing_else_changes(self) -> None:
        """Only words 84, 87, 108-111 and the checksum differ from the page without a name."""
        plain = words(build_identify(1000, serial="s"))
        named = words(build_identify(1000, serial="s", wwn=WWN))
        changed = {i for i in range(256) if plain[i] != named[i]}
        self.assertEqual(changed - {255}, {84, 87, 108, 109, 110, 111})

    def test_checksum(self) -> None:
        """The page with a name still sums to 0 modulo 256, with the signature."""
        page = build_identify(2**33, serial=disk_serial(b"x"), wwn=disk_wwn(b"x"))
        self.assertEqual(page[510], 0xA5)
        self.assertEqual(sum(page) % 256, 0)

    @given(sectors=st.integers(0, 2**48), unique=st.integers(0, 2**36 - 1))
    def test_checksum_any_name(self, sectors: int, unique: int) -> None:
        """Whatever the size and name, the page sums to 0 and the size reads back."""
        wwn = 5 << 60 | WWN_OUI << 36 | unique
        page = build_identify(sectors, wwn=wwn)
        self.assertEqual(sum(page) % 256, 0)
        self.assertEqual(linux_capacity(page), sectors)
        self.assertEqual(page_wwn(page), wwn)

    def test_bad_name_refused(self) -> None:
        """A name that is not 64 bits with NAA 5 is refused."""
        for wwn in (-1, 0, 1 << 64, 0x6 << 60, 0x3 << 60 | 1):
            with self.subTest(wwn=hex(wwn)):
                self.assertRaises(ValueError, build_identify, 1000, wwn=wwn)

    def test_identifier_carries_it(self) -> None:
        """``DefaultIdentifier(wwn=...)`` serves the page with the name."""
        self.assertEqual(page_wwn(DefaultIdentifier(1000, wwn=WWN).identify()), WWN)


class DiskNameTests(SynchronousTestCase):
    """``disk_serial`` and ``disk_wwn`` name a disk from its identity."""

    def test_serial_fills_the_field(self) -> None:
        """The serial is 20 upper-case hex digits: words 10-19 exactly."""
        serial = disk_serial(b"file host=a fsid=1 ino=2")
        self.assertEqual(len(serial), 20)
        self.assertEqual(serial, serial.upper())
        int(serial, 16)
        self.assertEqual(ata_text(build_identify(1, serial=serial), 10, 20), serial)

    def test_stable(self) -> None:
        """The same identity gives the same serial and name (no salt, no process state)."""
        self.assertEqual(disk_serial(b"id"), disk_serial(b"id"))
        self.assertEqual(disk_wwn(b"id"), disk_wwn(b"id"))
        # Pinned: a change would rename every disk that every initiator has seen.
        self.assertEqual(disk_serial(b"x"), "0D005B84668EBFF4FFB8")
        self.assertEqual(disk_wwn(b"x"), 0x50288A20D005B846)

    def test_different_identities(self) -> None:
        """Different identities give different serials and names."""
        self.assertNotEqual(disk_serial(b"ino=1"), disk_serial(b"ino=2"))
        self.assertNotEqual(disk_wwn(b"ino=1"), disk_wwn(b"ino=2"))

    def test_wwn_format(self) -> None:
        """The name is NAA 5, then the OUI 02-88-A2 (locally administered), then 36 bits."""
        wwn = disk_wwn(b"anything")
        self.assertEqual(wwn >> 60, 5)
        self.assertEqual(wwn >> 36 & 0xFFFFFF, 0x0288A2)
        self.assertEqual(WWN_OUI >> 16 & 0x03, 0x02, "X (local) bit set, multicast bit clear")

    def test_serial_matches_wwn(self) -> None:
        """The serial's first nine hex digits are the name's last nine."""
        identity = b"block wwid:naa.600140512345"
        self.assertEqual(disk_serial(identity)[:9], f"{disk_wwn(identity) & (2**36 - 1):09X}")


class ForDiskTests(SynchronousTestCase):
    """``DefaultIdentifier.for_disk``: the page a target serves by default."""

    def test_identity(self) -> None:
        """With an identity: its serial and world-wide name."""
        identifier = DefaultIdentifier.for_disk(1000, b"id", serial=None, fallback_serial="1.2")
        self.assertEqual((identifier.serial, identifier.wwn), (disk_serial(b"id"), disk_wwn(b"id")))

    def test_no_identity(self) -> None:
        """Without one: the fallback serial and no name, today's page."""
        identifier = DefaultIdentifier.for_disk(1000, None, serial=None, fallback_serial="1.2")
        self.assertEqual(identifier.identify(), build_identify(1000, serial="1.2"))

    def test_serial_given(self) -> None:
        """A serial given explicitly wins; the name stays the identity's."""
        identifier = DefaultIdentifier.for_disk(1000, b"id", serial="mine", fallback_serial="1.2")
        self.assertEqual((identifier.serial, identifier.wwn), ("mine", disk_wwn(b"id")))


class PageIdentityTests(SynchronousTestCase):
    """``page_identity`` and ``same_disk`` read back what a page says the disk is."""

    def test_reads_back(self) -> None:
        """The serial (unpadded) and the world-wide name come back."""
        page = build_identify(1000, serial="ABC123", wwn=WWN)
        self.assertEqual(page_identity(page), ("ABC123", WWN))

    def test_no_name(self) -> None:
        """Without bit 8 of word 87 there is no name, whatever words 108-111 hold."""
        page = bytearray(build_identify(1000, serial="1.0", wwn=WWN))
        page[174:176] = (0x4000).to_bytes(2, "little")  # word 87: valid, WWN bit clear
        self.assertEqual(page_identity(bytes(page)), ("1.0", None))

    def test_vblade(self) -> None:
        """vblade's page has its serial and no name."""
        self.assertEqual(page_identity(vblade_identify_page()), ("1.0:vm", None))

    def test_wrong_length(self) -> None:
        """A page that is not 512 bytes is refused."""
        self.assertRaises(ValueError, page_identity, bytes(510))

    def test_same_disk(self) -> None:
        """Two pages with the same serial and name are one disk, whatever their sizes."""
        name = disk_wwn(b"d")
        self.assertTrue(
            same_disk(
                build_identify(1000, serial="S", wwn=name),
                build_identify(2000, serial="S", wwn=name),
            )
        )

    def test_different_disks(self) -> None:
        """Another name, or another serial with the same name, is another disk."""
        page = build_identify(1000, serial=disk_serial(b"a"), wwn=disk_wwn(b"a"))
        self.assertFalse(
            same_disk(page, build_identify(1000, serial=disk_serial(b"b"), wwn=disk_wwn(b"b")))
        )
        self.assertFalse(same_disk(page, build_identify(1000, serial="x", wwn=disk_wwn(b"a"))))

    def test_nameless_never_same(self) -> None:
        """Pages without a name are never one disk, even identical ones: refuse, not share."""
        page = build_identify(1000, serial="1.0")
        self.assertFalse(same_disk(page, page))


class TargetIdentityTests(SynchronousTestCase):
    """A target's default IDENTIFY page names its disk when the backend can."""

    def open_file(self, path: str) -> FileBackend:
        """Open ``path`` (made if missing, 64 KiB) as a file disk closed at cleanup."""
        if not Path(path).exists():
            Path(path).write_bytes(bytes(65536))
        backend = FileBackend.open(path)
        self.addCleanup(backend.close)
        return backend

    def test_file_named(self) -> None:
        """A file disk's page carries the serial and name of its identity."""
        backend = self.open_file(self.mktemp())
        identity = backend.disk_identity()
        assert identity is not None
        page = Target(1, 0, backend).identifier.identify()
        self.assertEqual(page_identity(page), (disk_serial(identity), disk_wwn(identity)))
        self.assertEqual(linux_capacity(page), 128)

    def test_two_servers_one_file(self) -> None:
        """Two targets (two servers) on one file present one disk, whatever their address."""
        path = self.mktemp()
        first = Target(1, 0, self.open_file(path)).identifier.identify()
        second = Target(7, 3, self.open_file(path)).identifier.identify()
        self.assertTrue(same_disk(first, second))

    def test_two_files_differ(self) -> None:
        """Targets on two files at one address are two disks: a duplicate, not a path."""
        first = Target(1, 0, self.open_file(self.mktemp())).identifier.identify()
        second = Target(1, 0, self.open_file(self.mktemp())).identifier.identify()
        self.assertFalse(same_disk(first, second))

    def test_memory_unnamed(self) -> None:
        """A memory disk has no identity: serial ``shelf.slot`` and no name, as before."""
        page = Target(1, 0, MemoryBackend(65536)).identifier.identify()
        self.assertEqual(page, build_identify(128, serial="1.0"))

    def test_given_serial(self) -> None:
        """A serial given to the target replaces the derived one; the name stays."""
        backend = self.open_file(self.mktemp())
        identity = backend.disk_identity()
        assert identity is not None
        page = Target(1, 0, backend, serial="disk-42").identifier.identify()
        self.assertEqual(page_identity(page), ("disk-42", disk_wwn(identity)))
