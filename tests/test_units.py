# -*- test-case-name: tests.test_units -*-
"""
Tests for ``aoe_twisted.units`` (the size and address grammars every command
line shares) and for the frame builders of ``aoe_twisted.testing.frames``.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from aoe_twisted.core.wire import (
    ETHERTYPE,
    SECTOR_SIZE,
    ATAArg,
    ATACmdStatus,
    Command,
    ConfigArg,
    ConfigCommand,
    Directive,
    DirectiveCommand,
    EthernetFrame,
    Header,
    MACMaskArg,
    MACMaskCommand,
    ProtocolError,
    ReserveReleaseArg,
    ReserveReleaseCommand,
)
from aoe_twisted.errors import BackendSpecError
from aoe_twisted.testing import (
    INITIATOR_MAC,
    OTHER_MAC,
    TARGET_MAC,
    ata_arg,
    ata_request,
    config_request,
    ethernet_frame,
    mask_request,
    reserve_request,
)
from aoe_twisted.units import parse_address, parse_byte_count, parse_size

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "s": 512}


class ByteCountTests(SynchronousTestCase):
    """``parse_byte_count``: the one size grammar of ``--backend memory:SIZE`` and the CLI."""

    def test_valid(self) -> None:
        """Decimal or 0x hex, then K/M/G/T (with iB or B, any case) or s for sectors."""
        table = [
            ("0", 0),
            ("512", 512),
            ("0512", 512),
            ("0x200", 512),
            ("0X200", 512),
            ("0x1b", 27),
            ("4K", 4096),
            ("4k", 4096),
            ("4KiB", 4096),
            ("4kb", 4096),
            ("4KB", 4096),
            ("64M", 64 << 20),
            ("64MiB", 64 << 20),
            ("64mb", 64 << 20),
            ("2G", 2 << 30),
            ("2GIB", 2 << 30),
            ("3tib", 3 << 40),
            ("0x10K", 16 << 10),
            ("8s", 4096),
            ("8S", 4096),
            ("0x10s", 16 * 512),
        ]
        for text, size in table:
            self.assertEqual((text, parse_byte_count(text)), (text, size))

    @given(
        st.integers(0, 1 << 40),
        st.sampled_from(sorted(_UNITS)),
        st.sampled_from(["", "b", "ib"]),
        st.booleans(),
        st.booleans(),
    )
    def test_any_number_and_unit(
        self, number: int, unit: str, suffix: str, hexadecimal: bool, upper: bool
    ) -> None:
        """Every number in either base, with every unit in every spelling, means number * unit."""
        text = (hex(number) if hexadecimal else str(number)) + unit
        if unit not in ("", "s"):
            text += suffix
        if upper:
            text = text.upper()
        self.assertEqual(parse_byte_count(text), number * _UNITS[unit])

    def test_invalid(self) -> None:
        """Anything else raises ``ValueError`` with one line quoting the text."""
        table = [
            "", "M", "K4", "64X", "64 M", " 64M", "64M ", "1.5M", "-512", "+512", "0x",
            "1_024", "512B", "64Mi", "64MBs", "8ss", "1e3", "\u0665\u0661\u0662",
        ]
        for text in table:
            error = self.assertRaises(ValueError, parse_byte_count, text)
            self.assertIn(f"not a size: {text!r}", str(error))
            self.assertNotIn("\n", str(error))


class ParseSizeTests(SynchronousTestCase):
    """``parse_size`` is ``parse_byte_count`` plus the disk-size check, failing as a spec."""

    def test_same_grammar(self) -> None:
        """Every spelling ``aoe-twisted read --length`` takes works in ``memory:SIZE``."""
        for text in ("64M", "64MB", "64MiB", "0x4000000", "131072s", "67108864"):
            self.assertEqual(parse_size(text), 64 << 20, text)

    def test_refused_as_spec_error(self) -> None:
        """A size outside the grammar, or not whole sectors, is a ``BackendSpecError``."""
        for text in ("64X", "0", "1000", "0x1ff"):
            error = self.assertRaises(BackendSpecError, parse_size, text)
            self.assertIn(repr(text), str(error))


class ParseAddressTests(SynchronousTestCase):
    """``parse_address``: the one target-address grammar of ``--target`` and the CLI."""

    def test_valid(self) -> None:
        """``SHELF.SLOT`` with or without ``e``, decimal (leading zeros too) or 0x hex."""
        table = [
            ("e1.0", (1, 0)),
            ("E1.0", (1, 0)),
            ("1.0", (1, 0)),
            ("e01.002", (1, 2)),
            ("0x10.0", (16, 0)),
            ("e0x10.0xa", (16, 10)),
            ("65534.254", (65534, 254)),
            ("e0.0", (0, 0)),
        ]
        for text, address in table:
            self.assertEqual((text, parse_address(text)), (text, address))

    def test_invalid(self) -> None:
        """Anything else, and the wildcard shelf and slot, raise a one-line ``ValueError``."""
        for text in ("", "e1", "1", "e1.0.0", "x1.0", "e-1.0", "e1.", ".1", "1 .2", " 1.2",
                     "0b1.0", "ee1.0", "1.2=memory:1M"):
            error = self.assertRaises(ValueError, parse_address, text)
            self.assertIn(f"not a target address: {text!r}", str(error))
        for text in ("e65535.0", "e1.255", "0xffff.0"):
            error = self.assertRaises(ValueError, parse_address, text)
            self.assertIn("the shelf must be 0..65534 and the slot 0..254", str(error))


def _decode(message: bytes) -> Header:
    return Header.from_bytes(message)


class FrameBuilderTests(SynchronousTestCase):
    """``aoe_twisted.testing.frames`` builds what its arguments say, through the codec."""

    def test_macs(self) -> None:
        """The test MACs are distinct, locally administered and unicast."""
        macs = {INITIATOR_MAC, TARGET_MAC, OTHER_MAC}
        self.assertEqual(len(macs), 3)
        for mac in macs:
            self.assertEqual((len(mac), mac[0] & 0x03), (6, 0x02))

    def test_ethernet_frame(self) -> None:
        """From the initiator to the target by default, unpadded unless asked."""
        frame = EthernetFrame.from_bytes(ethernet_frame(b"abc"))
        self.assertEqual(frame, EthernetFrame(TARGET_MAC, INITIATOR_MAC, ETHERTYPE, b"abc"))
        self.assertEqual(len(ethernet_frame(b"abc", OTHER_MAC, INITIATOR_MAC, 0x0800)), 17)
        self.assertEqual(len(ethernet_frame(b"abc", pad=True)), 60)

    def test_ata_as_linux_sends_it(self) -> None:
        """Each command gets Linux's flags and the sector count its data calls for."""
        data = bytes(range(256)) * 4
        self.assertEqual(
            [
                ata_arg(),
                ata_arg(ATACmdStatus.WRITE_48BIT, lba=7, data=data),
                ata_arg(ATACmdStatus.WRITE_28BIT, lba=1, data=data[:SECTOR_SIZE]),
                ata_arg(ATACmdStatus.FLUSH_EXT),
                ata_arg(ATACmdStatus.IDENTIFY),
            ],
            [
                ATAArg(True, False, False, False, 0, 1, ATACmdStatus.READ_48BIT, 0),
                ATAArg(True, False, False, True, 0, 2, ATACmdStatus.WRITE_48BIT, 7, data),
                ATAArg(False, False, False, True, 0, 1, ATACmdStatus.WRITE_28BIT, 1,
                       data[:SECTOR_SIZE]),
                ATAArg(True, False, False, False, 0, 0, ATACmdStatus.FLUSH_EXT, 0),
                ATAArg(False, False, False, False, 0, 1, ATACmdStatus.IDENTIFY, 0),
            ],
        )

    def test_ata_request(self) -> None:
        """The header and argument decode to what was asked."""
        message = ata_request(ATACmdStatus.READ_28BIT, lba=5, count=3, shelf=7, slot=9,
                              tag=0x01020304, asynchronous=True, device_head=True, feature=6,
                              extended=True)
        self.assertEqual(
            _decode(message),
            Header(major=7, minor=9, command=Command.ISSUE_ATA_COMMAND, tag=b"\x01\x02\x03\x04",
                   arg=ATAArg(True, True, True, False, 6, 3, ATACmdStatus.READ_28BIT, 5)),
        )

    def test_ata_raw_fields(self) -> None:
        """``verflags``, ``aflags``, ``reserved``, ``aoe_command`` and ``error`` go in as given."""
        plain = ata_request(tag=b"abcd")
        self.assertEqual(plain[:10], bytes([0x10, 0, 0, 1, 0, 0]) + b"abcd")
        self.assertEqual(plain[10:22], bytes([0x40, 0, 1, 0x24]) + bytes(8))
        odd = ata_request(tag=b"abcd", verflags=0x20, aflags=0xFF, reserved=0x0102,
                          aoe_command=9, error=3)
        self.assertEqual(odd[:10], bytes([0x20, 3, 0, 1, 0, 9]) + b"abcd")
        self.assertEqual(odd[10:22], bytes([0xFF, 0, 1, 0x24]) + bytes(6) + b"\x02\x01")
        self.assertRaises(ProtocolError, Header.from_bytes, odd)

    def test_config_request(self) -> None:
        """A broadcast config read by default; any sub-command and string on request."""
        self.assertEqual(
            _decode(config_request()),
            Header(major=0xFFFF, minor=0xFF, command=Command.QUERY_CONFIG_INFORMATION,
                   arg=ConfigArg()),
        )
        self.assertEqual(
            _decode(config_request(ConfigCommand.SET, b"hi", shelf=1, slot=2, tag=5)),
            Header(major=1, minor=2, command=Command.QUERY_CONFIG_INFORMATION,
                   tag=bytes([0, 0, 0, 5]), arg=ConfigArg(0, 0, 0, 0, ConfigCommand.SET, 2, b"hi")),
        )
        self.assertTrue(_decode(config_request(verflags=0x18)).flag_response)

    def test_mask_and_reserve_requests(self) -> None:
        """The MAC mask and reserve builders count what they are given."""
        directive = Directive(DirectiveCommand.ADD, OTHER_MAC)
        self.assertEqual(
            _decode(mask_request(MACMaskCommand.EDIT, [directive], shelf=3)).arg,
            MACMaskArg(MACMaskCommand.EDIT, 0, 1, (directive,)),
        )
        header = _decode(reserve_request(ReserveReleaseCommand.SET, [INITIATOR_MAC, OTHER_MAC]))
        self.assertEqual((header.major, header.minor, header.command), (1, 0, 3))
        self.assertEqual(
            header.arg,
            ReserveReleaseArg(ReserveReleaseCommand.SET, 2, (INITIATOR_MAC, OTHER_MAC)),
        )
