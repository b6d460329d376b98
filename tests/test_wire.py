"""
Tests for ``aoe_twisted.core.wire``, the AoEr11 codec.

Three kinds of evidence:

- golden frames: every frame of two real captures (the Linux initiator talking
  to Coraid's vblade, ``tests/data/``) decodes and re-encodes to the same bytes,
  with field values checked against what the initiator and vblade are known to send;
- hand-built golden bytes for the messages the captures lack (MAC mask list,
  reserve/release, config set, 28-bit ATA, writes, AoE error responses);
- one test per error rule of the seed API (``shared/seed/aoe-go-package-api.txt``),
  plus the padding rules a real Ethernet imposes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from attrs import evolve
from twisted.trial.unittest import SynchronousTestCase

from aoe_twisted.core.wire import (
    BROADCAST_MAC,
    BROADCAST_MAJOR,
    BROADCAST_MINOR,
    ETHERTYPE,
    MIN_FRAME_SIZE,
    SECTOR_SIZE,
    ATAArg,
    ATACmdStatus,
    Command,
    ConfigArg,
    ConfigCommand,
    Directive,
    DirectiveCommand,
    Error,
    EthernetFrame,
    FrameTooShort,
    Header,
    MACMaskArg,
    MACMaskCommand,
    MACMaskError,
    ProtocolError,
    RawArg,
    ReserveReleaseArg,
    ReserveReleaseCommand,
    WireError,
    format_mac,
    parse_mac,
)
from tests.pcap import LINKTYPE_ETHERNET, read_pcap, write_pcap

DATA = Path(__file__).parent / "data"
#: The stored captures, by the MTU they were taken at.
CAPTURES = {
    1500: DATA / "linux-vblade-mtu1500.pcap",
    9000: DATA / "linux-vblade-mtu9000.pcap",
}
#: What vblade's config response advertises as sectors per command at each MTU.
VBLADE_SECTORS = {1500: 2, 9000: 17}
#: How many sectors the initiator's first READ SECTORS EXT asks for at each MTU.
FIRST_READ_SECTORS = {1500: 2, 9000: 8}

INITIATOR_MAC = parse_mac("52:54:00:ae:00:01")
#: vblade's MAC (the tap changed between the two runs).
TARGET_MACS = {1500: parse_mac("22:de:2c:46:f7:32"), 9000: parse_mac("96:c2:07:c5:bd:56")}
MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")


def _frames(mtu: int) -> list[bytes]:
    """The frames of the capture taken at ``mtu``, in order."""
    return read_pcap(CAPTURES[mtu]).frames


def _message(frame: bytes) -> Header:
    """Decode the AoE message an Ethernet frame carries."""
    return Header.from_bytes(EthernetFrame.from_bytes(frame).payload)


def _kind(header: Header) -> str:
    """Name the kind of a captured message, for tables and error messages."""
    direction = "response" if header.flag_response else "request"
    if header.command == Command.QUERY_CONFIG_INFORMATION:
        return f"config {direction}"
    if header.command == Command.ISSUE_ATA_COMMAND:
        return f"ata {direction}"
    return f"command {header.command} {direction}"


def _ata_requests(mtu: int) -> list[tuple[int, Header]]:
    """The ATA requests of a capture with their frame indexes."""
    found = []
    for index, frame in enumerate(_frames(mtu)):
        header = _message(frame)
        if header.command == Command.ISSUE_ATA_COMMAND and not header.flag_response:
            found.append((index, header))
    return found


def _response_to(mtu: int, request: Header) -> Header | None:
    """The captured response carrying the tag of ``request``, if the capture holds it."""
    for frame in _frames(mtu):
        header = _message(frame)
        if header.flag_response and header.tag == request.tag:
            return header
    return None


class GoldenCaptureTests(SynchronousTestCase):
    """Real frames from the Linux initiator and vblade decode, re-encode and mean what we expect."""

    def test_capturesAreEthernet(self) -> None:
        """Both stored captures are untruncated Ethernet captures of 40 frames."""
        for mtu, path in CAPTURES.items():
            capture = read_pcap(path)
            self.assertEqual(capture.linktype, LINKTYPE_ETHERNET, mtu)
            self.assertEqual(len(capture.records), 40, mtu)
            self.assertEqual([r for r in capture.records if r.truncated], [], mtu)

    def test_pcapReaderAndWriterAgree(self) -> None:
        """
        Writing the records ``tests.pcap`` read gives the stored file back byte for
        byte, so the reader the golden tests rely on misses nothing.
        """
        for path in CAPTURES.values():
            copy = Path(self.mktemp())
            write_pcap(copy, read_pcap(path).records)
            self.assertEqual(copy.read_bytes(), path.read_bytes(), path.name)

    def test_everyFrameRoundTrips(self) -> None:
        """
        Every captured frame decodes as Ethernet then as an AoE message, and
        encoding the message and the frame again gives exactly the captured bytes.
        """
        for mtu in CAPTURES:
            for index, frame in enumerate(_frames(mtu)):
                where = f"MTU {mtu} frame {index}"
                ethernet = EthernetFrame.from_bytes(frame)
                self.assertEqual(ethernet.ethertype, ETHERTYPE, where)
                header = Header.from_bytes(ethernet.payload)
                self.assertFalse(isinstance(header.arg, RawArg), where)
                self.assertEqual(header.to_bytes(), ethernet.payload, where)
                rebuilt = EthernetFrame(
                    ethernet.dst, ethernet.src, ethernet.ethertype, header.to_bytes()
                )
                self.assertEqual(rebuilt.to_bytes(), frame, where)

    def test_everyKindPresent(self) -> None:
        """Each capture holds config, IDENTIFY and READ EXT requests and their responses."""
        for mtu in CAPTURES:
            headers = [_message(frame) for frame in _frames(mtu)]
            self.assertEqual(
                {_kind(h) for h in headers},
                {"config request", "config response", "ata request", "ata response"},
            )
            commands = {h.arg.cmd_status for h in headers if _kind(h) == "ata request"}
            self.assertEqual(commands, {ATACmdStatus.IDENTIFY, ATACmdStatus.READ_48BIT})

    def test_configQuery(self) -> None:
        """The initiator's discovery is a broadcast config read with every field zero and tag 0."""
        for mtu in CAPTURES:
            frame = EthernetFrame.from_bytes(_frames(mtu)[0])
            self.assertEqual((frame.dst, frame.src), (BROADCAST_MAC, INITIATOR_MAC))
            self.assertEqual(
                Header.from_bytes(frame.payload),
                Header(
                    major=BROADCAST_MAJOR,
                    minor=BROADCAST_MINOR,
                    command=Command.QUERY_CONFIG_INFORMATION,
                    tag=bytes(4),
                    arg=ConfigArg(),
                ),
            )

    def test_configResponse(self) -> None:
        """
        vblade answers from its own shelf.slot 1.0 with buffer count 16, firmware
        0x4019, AoE version 1 and 2 sectors per command at MTU 1500, 17 at 9000.
        """
        for mtu, sectors in VBLADE_SECTORS.items():
            frame = EthernetFrame.from_bytes(_frames(mtu)[1])
            self.assertEqual((frame.dst, frame.src), (INITIATOR_MAC, TARGET_MACS[mtu]))
            header = Header.from_bytes(frame.payload)
            self.assertTrue(header.flag_response)
            self.assertFalse(header.flag_error)
            self.assertEqual((header.major, header.minor, header.tag), (1, 0, bytes(4)))
            self.assertEqual(header.command, Command.QUERY_CONFIG_INFORMATION)
            self.assertEqual(
                header.arg,
                ConfigArg(
                    buffer_count=16,
                    firmware_version=0x4019,
                    sector_count=sectors,
                    version=1,
                    command=ConfigCommand.READ,
                ),
            )

    def test_identifyRequest(self) -> None:
        """
        IDENTIFY DEVICE is command 0xEC for one sector, with no flags, no data and
        0xA0 (the legacy device register) in LBA byte 3.
        """
        for mtu in CAPTURES:
            header = _message(_frames(mtu)[2])
            arg = header.arg
            self.assertIsInstance(arg, ATAArg)
            self.assertEqual((arg.cmd_status, arg.sector_count), (0xEC, 1))
            self.assertEqual(arg.lba.to_bytes(6, "little")[3], 0xA0)
            self.assertEqual(arg.aflags, 0)
            self.assertEqual(arg.data, b"")

    def test_identifyResponse(self) -> None:
        """
        The IDENTIFY reply echoes the tag, has status DRDY (0x40) and carries one
        512-byte page whose model words (27-46) name vblade.
        """
        for mtu in CAPTURES:
            request = _message(_frames(mtu)[2])
            response = _message(_frames(mtu)[3])
            self.assertEqual(response.tag, request.tag)
            self.assertTrue(response.flag_response)
            self.assertEqual(response.arg.cmd_status, ATACmdStatus.READY_STATUS)
            self.assertEqual(len(response.arg.data), SECTOR_SIZE)
            model = response.arg.data[54:94]
            unswapped = b"".join(model[i : i + 2][::-1] for i in range(0, len(model), 2))
            self.assertIn(b"vblade", unswapped)

    def test_readExtRequest(self) -> None:
        """READ SECTORS EXT is command 0x24 with the E (LBA48) flag, no W flag and no data."""
        for mtu, sectors in FIRST_READ_SECTORS.items():
            header = _message(_frames(mtu)[4])
            arg = header.arg
            self.assertIsInstance(arg, ATAArg)
            self.assertTrue(arg.flag_lba48_extended)
            self.assertFalse(arg.flag_write)
            self.assertEqual((arg.cmd_status, arg.sector_count, arg.lba), (0x24, sectors, 0))
            self.assertEqual(arg.data, b"")

    def test_readExtResponses(self) -> None:
        """
        Every answered read gets DRDY and exactly its sector count of 512-byte
        sectors (the last few requests are answered after the stored 40 frames).
        """
        for mtu in CAPTURES:
            answered = 0
            for index, request in _ata_requests(mtu):
                response = _response_to(mtu, request)
                if request.arg.cmd_status != ATACmdStatus.READ_48BIT or response is None:
                    continue
                where = f"MTU {mtu} frame {index}"
                self.assertEqual(response.arg.cmd_status, ATACmdStatus.READY_STATUS, where)
                self.assertEqual(
                    len(response.arg.data), request.arg.sector_count * SECTOR_SIZE, where
                )
                answered += 1
            self.assertGreaterEqual(answered, 10, mtu)

    def test_fullSizedReadAtMTU9000(self) -> None:
        """At MTU 9000 the initiator reads 17 sectors (8704 bytes) per frame, as vblade offers."""
        requests = [h for _, h in _ata_requests(9000) if h.arg.sector_count == 17]
        self.assertNotEqual(requests, [])
        response = _response_to(9000, requests[0])
        assert response is not None
        self.assertEqual(len(response.arg.data), 8704)


# Hand-built messages.  Each byte string is written field by field, as in AoEr11:
# header = ver|flags, error, major (2), minor, command, tag (4); then the argument.
_TAG = "deadbeef"


def _hdr(flags: str, error: str, command: str, major: str = "0001", minor: str = "00") -> str:
    """The hex of a 10-byte header at ``major.minor`` with tag deadbeef."""
    return f"{flags} {error} {major} {minor} {command} {_TAG}"


def _h(command: Command, arg: Any, **fields: Any) -> Header:
    """A version 1 message to or from shelf 1 slot 0 with tag deadbeef."""
    return Header(
        major=fields.pop("major", 1),
        minor=fields.pop("minor", 0),
        command=command,
        tag=bytes.fromhex(_TAG),
        arg=arg,
        **fields,
    )


_SECTORS_2 = bytes(range(256)) * 4

#: name: (bytes, message), every message kind, checked in both directions.
GOLDEN: dict[str, tuple[bytes, Header]] = {
    "config read request, broadcast": (
        bytes.fromhex(_hdr("10", "00", "01", "ffff", "ff") + " 0000 0000 00 00 0000"),
        _h(Command.QUERY_CONFIG_INFORMATION, ConfigArg(), major=0xFFFF, minor=0xFF),
    ),
    "config set request with a string": (
        bytes.fromhex(_hdr("10", "00", "01") + " 0000 0000 00 03 0009") + b"hello aoe",
        _h(
            Command.QUERY_CONFIG_INFORMATION,
            ConfigArg(command=ConfigCommand.SET, string_length=9, string=b"hello aoe"),
        ),
    ),
    "config test-prefix response with the target's string": (
        bytes.fromhex(_hdr("18", "00", "01") + " 0010 4019 11 12 000c") + b"hello aoe!!!",
        _h(
            Command.QUERY_CONFIG_INFORMATION,
            ConfigArg(16, 0x4019, 17, 1, ConfigCommand.TEST_PREFIX, 12, b"hello aoe!!!"),
            flag_response=True,
        ),
    ),
    "MAC mask read request": (
        bytes.fromhex(_hdr("10", "00", "02") + " 00 00 00 00"),
        _h(Command.MAC_MASK_LIST, MACMaskArg(command=MACMaskCommand.READ)),
    ),
    "MAC mask edit request: add one MAC, delete another": (
        bytes.fromhex(
            _hdr("10", "00", "02") + " 00 01 00 02  00 01 020000000001  00 02 020000000002"
        ),
        _h(
            Command.MAC_MASK_LIST,
            MACMaskArg(
                MACMaskCommand.EDIT,
                0,
                2,
                [Directive(DirectiveCommand.ADD, MAC_A), Directive(DirectiveCommand.DELETE, MAC_B)],
            ),
        ),
    ),
    "MAC mask read response: two MACs listed": (
        bytes.fromhex(
            _hdr("18", "00", "02") + " 00 00 00 02  00 01 020000000001  00 01 020000000002"
        ),
        _h(
            Command.MAC_MASK_LIST,
            MACMaskArg(
                MACMaskCommand.READ,
                0,
                2,
                [Directive(DirectiveCommand.ADD, MAC_A), Directive(DirectiveCommand.ADD, MAC_B)],
            ),
            flag_response=True,
        ),
    ),
    "MAC mask edit response: bad directive command at index 0": (
        bytes.fromhex(_hdr("18", "00", "02") + " 00 01 02 00"),
        _h(
            Command.MAC_MASK_LIST,
            MACMaskArg(MACMaskCommand.EDIT, MACMaskError.BAD_COMMAND, 0, []),
            flag_response=True,
        ),
    ),
    "reserve read request": (
        bytes.fromhex(_hdr("10", "00", "03") + " 00 00"),
        _h(Command.RESERVE_RELEASE, ReserveReleaseArg(ReserveReleaseCommand.READ)),
    ),
    "reserve set request with two MACs": (
        bytes.fromhex(_hdr("10", "00", "03") + " 01 02 020000000001 020000000002"),
        _h(
            Command.RESERVE_RELEASE,
            ReserveReleaseArg(ReserveReleaseCommand.SET, 2, [MAC_A, MAC_B]),
        ),
    ),
    "reserve force-set response with one MAC": (
        bytes.fromhex(_hdr("18", "00", "03") + " 02 01 020000000001"),
        _h(
            Command.RESERVE_RELEASE,
            ReserveReleaseArg(ReserveReleaseCommand.FORCE_SET, 1, [MAC_A]),
            flag_response=True,
        ),
    ),
    "ATA READ SECTORS (28-bit) request, LBA 0x10 with 0xE0 in LBA byte 3": (
        bytes.fromhex(_hdr("10", "00", "00") + " 00 00 02 20 10 00 00 e0 00 00 0000"),
        _h(Command.ISSUE_ATA_COMMAND, ATAArg(sector_count=2, cmd_status=0x20, lba=0xE0000010)),
    ),
    "ATA READ SECTORS (28-bit) response with two sectors": (
        bytes.fromhex(_hdr("18", "00", "00") + " 00 00 00 40 10 00 00 e0 00 00 0000") + _SECTORS_2,
        _h(
            Command.ISSUE_ATA_COMMAND,
            ATAArg(cmd_status=0x40, lba=0xE0000010, data=_SECTORS_2),
            flag_response=True,
        ),
    ),
    "ATA WRITE SECTORS EXT request: flags E and W, two sectors": (
        bytes.fromhex(_hdr("10", "00", "00") + " 41 00 02 34 00 50 0f 00 00 00 0000") + _SECTORS_2,
        _h(
            Command.ISSUE_ATA_COMMAND,
            ATAArg(
                flag_lba48_extended=True,
                flag_write=True,
                sector_count=2,
                cmd_status=0x34,
                lba=1003520,
                data=_SECTORS_2,
            ),
        ),
    ),
    "ATA WRITE SECTORS EXT response: DRDY, no data": (
        bytes.fromhex(_hdr("18", "00", "00") + " 41 00 00 40 00 50 0f 00 00 00 0000"),
        _h(
            Command.ISSUE_ATA_COMMAND,
            ATAArg(flag_lba48_extended=True, flag_write=True, cmd_status=0x40, lba=1003520),
            flag_response=True,
        ),
    ),
    "ATA response: ERR|DRDY with IDNF, device/head and async flags": (
        bytes.fromhex(_hdr("18", "00", "00") + " 52 10 00 41 ff ff ff ff ff ff 0000"),
        _h(
            Command.ISSUE_ATA_COMMAND,
            ATAArg(
                flag_lba48_extended=True,
                flag_ata_device_head_register=True,
                flag_asynchronous=True,
                err_feature=0x10,
                cmd_status=0x41,
                lba=(1 << 48) - 1,
            ),
            flag_response=True,
        ),
    ),
    "AoE error response: target is reserved, to an ATA request": (
        bytes.fromhex(_hdr("1c", "06", "00") + " 40 00 02 24 00 00 00 00 00 00 0000"),
        _h(
            Command.ISSUE_ATA_COMMAND,
            ATAArg(flag_lba48_extended=True, sector_count=2, cmd_status=0x24),
            flag_response=True,
            flag_error=True,
            error=Error.TARGET_IS_RESERVED,
        ),
    ),
    "AoE error response: config string present, to a config set": (
        bytes.fromhex(_hdr("1c", "04", "01") + " 0010 4019 02 13 0003") + b"abc",
        _h(
            Command.QUERY_CONFIG_INFORMATION,
            ConfigArg(16, 0x4019, 2, 1, ConfigCommand.SET, 3, b"abc"),
            flag_response=True,
            flag_error=True,
            error=Error.CONFIG_STRING_PRESENT,
        ),
    ),
}


def _golden(prefix: str) -> tuple[bytes, Header]:
    """The one golden message whose name starts with ``prefix``."""
    (found,) = [value for name, value in GOLDEN.items() if name.startswith(prefix)]
    return found


class HandBuiltGoldenTests(SynchronousTestCase):
    """Messages the captures lack, written byte by byte from AoEr11, in both directions."""

    def test_kinds(self) -> None:
        """The golden table covers every command, and requests and responses of each."""
        kinds = {(m.command, m.flag_response) for _, m in GOLDEN.values()}
        self.assertEqual(kinds, {(c, r) for c in Command for r in (False, True)})

    def test_decode(self) -> None:
        """Each hand-built byte string decodes to its message."""
        for what, (data, message) in GOLDEN.items():
            self.assertEqual(Header.from_bytes(data), message, what)

    def test_encode(self) -> None:
        """Each message encodes to its hand-built byte string."""
        for what, (data, message) in GOLDEN.items():
            self.assertEqual(message.to_bytes(), data, what)

    def test_decodeFromBuffers(self) -> None:
        """
        Decoding a ``bytearray`` or ``memoryview`` (as a receive buffer may be) gives
        the same message, whose byte fields are ``bytes`` copies, not views.
        """
        for what, (data, message) in GOLDEN.items():
            for buffer in (bytearray(data), memoryview(data)):
                decoded = Header.from_bytes(buffer)
                self.assertEqual(decoded, message, what)
                self.assertIs(type(decoded.tag), bytes, what)
                self.assertEqual(decoded.to_bytes(), data, what)

    def test_decodedCommandIsEnum(self) -> None:
        """A decoded message's command is a ``Command`` member, so logs show its name."""
        for what, (data, _) in GOLDEN.items():
            self.assertIsInstance(Header.from_bytes(data).command, Command, what)

    def test_writeCarriesSectorsOfData(self) -> None:
        """A WRITE SECTORS EXT request carries exactly sector_count * 512 bytes of data."""
        arg = Header.from_bytes(_golden("ATA WRITE SECTORS EXT request")[0]).arg
        self.assertIsInstance(arg, ATAArg)
        self.assertTrue(arg.flag_lba48_extended)
        self.assertTrue(arg.flag_write)
        self.assertEqual(arg.cmd_status, ATACmdStatus.WRITE_48BIT)
        self.assertEqual(len(arg.data), arg.sector_count * SECTOR_SIZE)


# A valid request of each command, used as the base of the error cases below.
_CONFIG_READ = bytes.fromhex(_hdr("10", "00", "01") + " 0000 0000 00 00 0000")
_ATA_READ = bytes.fromhex(_hdr("10", "00", "00") + " 40 00 02 24 00 00 00 00 00 00 0000")
_MASK_READ = _golden("MAC mask read request")[0]
_MASK_EDIT = _golden("MAC mask edit request")[0]
_RESERVE_READ = _golden("reserve read request")[0]
_RESERVE_SET = _golden("reserve set request")[0]


def _with(data: bytes, offset: int, value: bytes) -> bytes:
    """``data`` with ``value`` written over it at ``offset``."""
    return data[:offset] + value + data[offset + len(value) :]


class SeedRuleTests(SynchronousTestCase):
    """Every error rule of the seed API, one test each."""

    def assertProtocolError(
        self, code: Error, f: Callable[..., object], *args: object
    ) -> ProtocolError:
        """Assert ``f(*args)`` raises ``ProtocolError`` with ``code``, and return the error."""
        error = self.assertRaises(ProtocolError, f, *args)
        self.assertEqual(error.code, code)
        return error

    def assertEchoesHeader(self, error: ProtocolError, data: bytes) -> None:
        """Assert the error carries the header of ``data``: tag, address and command, raw arg."""
        self.assertIsNotNone(error.header)
        self.assertEqual(error.header.tag, data[6:10])
        self.assertEqual(error.header.major, int.from_bytes(data[2:4], "big"))
        self.assertEqual(error.header.minor, data[4])
        self.assertEqual(error.header.command, data[5])
        self.assertEqual(error.header.arg, RawArg(data[10:]))

    def test_headerTooShort(self) -> None:
        """Fewer than 10 bytes cannot hold a header: ``FrameTooShort``."""
        for length in range(10):
            self.assertRaises(FrameTooShort, Header.from_bytes, _CONFIG_READ[:length])

    def test_ataArgumentTooShort(self) -> None:
        """An ATA argument of fewer than 12 bytes is ``FrameTooShort``."""
        for length in range(10, 22):
            self.assertRaises(FrameTooShort, Header.from_bytes, _ATA_READ[:length])
        for length in range(12):
            self.assertRaises(FrameTooShort, ATAArg.from_bytes, bytes(length))

    def test_configArgumentTooShort(self) -> None:
        """A config argument of fewer than 8 bytes is ``FrameTooShort``."""
        for length in range(10, 18):
            self.assertRaises(FrameTooShort, Header.from_bytes, _CONFIG_READ[:length])
        for length in range(8):
            self.assertRaises(FrameTooShort, ConfigArg.from_bytes, bytes(length))

    def test_macMaskArgumentTooShort(self) -> None:
        """A MAC mask argument of fewer than 4 bytes is ``FrameTooShort``."""
        data = _MASK_READ
        for length in range(10, 14):
            self.assertRaises(FrameTooShort, Header.from_bytes, data[:length])

    def test_macMaskDirectivesMissing(self) -> None:
        """A MAC mask argument with fewer directive bytes than ``dir_count`` needs is short."""
        data = _MASK_EDIT
        for length in range(14, len(data)):
            self.assertRaises(FrameTooShort, Header.from_bytes, data[:length])

    def test_reserveArgumentTooShort(self) -> None:
        """A reserve/release argument of fewer than 2 bytes is ``FrameTooShort``."""
        data = _RESERVE_READ
        for length in range(10, 12):
            self.assertRaises(FrameTooShort, Header.from_bytes, data[:length])

    def test_reserveListShorterThanNMACs(self) -> None:
        """A reserve list shorter than ``nmacs`` MACs is ``FrameTooShort``."""
        data = _RESERVE_SET
        for length in range(12, len(data)):
            self.assertRaises(FrameTooShort, Header.from_bytes, data[:length])
        self.assertRaises(FrameTooShort, ReserveReleaseArg.from_bytes, b"\x01\x01" + MAC_A[:5])

    def test_unsupportedVersion(self) -> None:
        """
        A version other than 1 is ``UNSUPPORTED_VERSION``, and the error carries the
        header so the reply can echo tag, address and command.
        """
        for version in (0, 2, 15):
            data = _with(_CONFIG_READ, 0, bytes([version << 4]))
            error = self.assertProtocolError(Error.UNSUPPORTED_VERSION, Header.from_bytes, data)
            self.assertEchoesHeader(error, data)
            self.assertEqual(error.header.version, version)

    def test_unrecognizedCommand(self) -> None:
        """An unknown command is ``UNRECOGNIZED_COMMAND_CODE``, carrying the header."""
        for command in (4, 0x0F, 0xF0, 0xFF):
            data = _with(_CONFIG_READ, 5, bytes([command]))
            error = self.assertProtocolError(
                Error.UNRECOGNIZED_COMMAND_CODE, Header.from_bytes, data
            )
            self.assertEchoesHeader(error, data)

    def test_ataReservedBytes(self) -> None:
        """Non-zero ATA reserved bytes (argument bytes 10-11) are ``BAD_ARGUMENT_PARAMETER``."""
        for reserved in (b"\x01\x00", b"\x00\x01", b"\xff\xff"):
            data = _with(_ATA_READ, 20, reserved)
            error = self.assertProtocolError(Error.BAD_ARGUMENT_PARAMETER, Header.from_bytes, data)
            self.assertEchoesHeader(error, data)
            self.assertProtocolError(Error.BAD_ARGUMENT_PARAMETER, ATAArg.from_bytes, data[10:])

    def test_configStringOver1024Decode(self) -> None:
        """A config string length over 1024 is ``BAD_ARGUMENT_PARAMETER``, even if all present."""
        for length in (1025, 0xFFFF):
            data = _with(_CONFIG_READ, 16, length.to_bytes(2, "big")) + bytes(length)
            error = self.assertProtocolError(Error.BAD_ARGUMENT_PARAMETER, Header.from_bytes, data)
            self.assertEchoesHeader(error, data)

    def test_configString1024Decodes(self) -> None:
        """A config string of exactly 1024 bytes is allowed."""
        data = _with(_CONFIG_READ, 16, (1024).to_bytes(2, "big")) + b"x" * 1024
        self.assertEqual(Header.from_bytes(data).arg.string, b"x" * 1024)

    def test_configStringOver1024Encode(self) -> None:
        """Encoding a config string over 1024 bytes is ``BAD_ARGUMENT_PARAMETER``."""
        arg = ConfigArg(string_length=1025, string=bytes(1025))
        self.assertProtocolError(Error.BAD_ARGUMENT_PARAMETER, arg.to_bytes)

    def test_configStringLongerThanRemaining(self) -> None:
        """A config string length beyond the bytes present is ``FrameTooShort``."""
        for present in range(5):
            data = _with(_CONFIG_READ, 16, b"\x00\x05") + b"x" * present
            self.assertRaises(FrameTooShort, Header.from_bytes, data)

    def test_configCommandOver4Bits(self) -> None:
        """Encoding a config command over 0xF is ``BAD_ARGUMENT_PARAMETER``."""
        for command in (0x10, 0xFF):
            arg = ConfigArg(command=command)
            self.assertProtocolError(Error.BAD_ARGUMENT_PARAMETER, arg.to_bytes)

    def test_configVersionOver4Bits(self) -> None:
        """Encoding a config AoE version over 0xF is ``BAD_ARGUMENT_PARAMETER``."""
        arg = ConfigArg(version=0x10)
        self.assertProtocolError(Error.BAD_ARGUMENT_PARAMETER, arg.to_bytes)

    def test_configStringLengthDisagrees(self) -> None:
        """Encoding a ``string_length`` unequal to ``len(string)`` is ``BAD_ARGUMENT_PARAMETER``."""
        for length in (0, 2, 4):
            arg = ConfigArg(string_length=length, string=b"abc")
            self.assertProtocolError(Error.BAD_ARGUMENT_PARAMETER, arg.to_bytes)

    def test_macMaskReservedByte(self) -> None:
        """A non-zero MAC mask reserved byte (argument byte 0) is ``BAD_ARGUMENT_PARAMETER``."""
        data = _with(_MASK_READ, 10, b"\x01")
        error = self.assertProtocolError(Error.BAD_ARGUMENT_PARAMETER, Header.from_bytes, data)
        self.assertEchoesHeader(error, data)

    def test_directiveNotEightBytes(self) -> None:
        """A directive decoded from anything but exactly 8 bytes is ``FrameTooShort``."""
        for length in (0, 7, 9, 16):
            self.assertRaises(FrameTooShort, Directive.from_bytes, bytes(length))

    def test_directiveReservedByte(self) -> None:
        """A non-zero directive reserved byte is ``BAD_ARGUMENT_PARAMETER``, alone or in a list."""
        self.assertProtocolError(
            Error.BAD_ARGUMENT_PARAMETER, Directive.from_bytes, b"\x01\x01" + MAC_A
        )
        data = _with(_MASK_EDIT, 22, b"\x80")
        error = self.assertProtocolError(Error.BAD_ARGUMENT_PARAMETER, Header.from_bytes, data)
        self.assertEchoesHeader(error, data)

    def test_dirCountDisagrees(self) -> None:
        """Encoding a ``dir_count`` unequal to ``len(directives)`` is ``BAD_ARGUMENT_PARAMETER``."""
        for count in (0, 2):
            arg = MACMaskArg(dir_count=count, directives=[Directive(DirectiveCommand.ADD, MAC_A)])
            self.assertProtocolError(Error.BAD_ARGUMENT_PARAMETER, arg.to_bytes)

    def test_directiveMACNot6Bytes(self) -> None:
        """Encoding a directive whose MAC is not 6 bytes is ``BAD_ARGUMENT_PARAMETER``."""
        for mac in (b"", MAC_A[:5], MAC_A + b"\x00"):
            directive = Directive(DirectiveCommand.ADD, mac)
            self.assertProtocolError(Error.BAD_ARGUMENT_PARAMETER, directive.to_bytes)
            arg = MACMaskArg(dir_count=1, directives=[directive])
            self.assertProtocolError(Error.BAD_ARGUMENT_PARAMETER, arg.to_bytes)

    def test_reserveMACNot6Bytes(self) -> None:
        """Encoding a reserve list with a MAC that is not 6 bytes is ``BAD_ARGUMENT_PARAMETER``."""
        for mac in (b"", MAC_A[:5], MAC_A + b"\x00"):
            arg = ReserveReleaseArg(nmacs=2, macs=[MAC_B, mac])
            self.assertProtocolError(Error.BAD_ARGUMENT_PARAMETER, arg.to_bytes)

    def test_nmacsDisagrees(self) -> None:
        """Encoding an ``nmacs`` that is not the number of MACs is ``BAD_ARGUMENT_PARAMETER``."""
        for count in (0, 2):
            arg = ReserveReleaseArg(nmacs=count, macs=[MAC_A])
            self.assertProtocolError(Error.BAD_ARGUMENT_PARAMETER, arg.to_bytes)

    def test_headerEncodeVersion(self) -> None:
        """Encoding a message whose version is not 1 is ``UNSUPPORTED_VERSION``."""
        for version in (0, 2, 15):
            header = Header(version=version, arg=ATAArg())
            self.assertProtocolError(Error.UNSUPPORTED_VERSION, header.to_bytes)

    def test_headerEncodeNoArgument(self) -> None:
        """Encoding a message without an argument is ``BAD_ARGUMENT_PARAMETER``."""
        self.assertProtocolError(Error.BAD_ARGUMENT_PARAMETER, Header(arg=None).to_bytes)

    def test_errorsAreWireErrors(self) -> None:
        """``FrameTooShort`` and ``ProtocolError`` both derive from ``WireError``."""
        self.assertTrue(issubclass(FrameTooShort, WireError))
        self.assertTrue(issubclass(ProtocolError, WireError))
        self.assertFalse(issubclass(FrameTooShort, ProtocolError))

    def test_outOfRangeFieldsOnEncode(self) -> None:
        """
        A field too big for its wire encoding raises ``WireError`` (not
        ``struct.error`` or ``OverflowError``) when encoded.
        """
        cases: list[tuple[str, Callable[[], bytes]]] = [
            ("major", Header(major=0x10000, arg=ATAArg()).to_bytes),
            ("minor", Header(minor=0x100, arg=ATAArg()).to_bytes),
            ("error", Header(error=-1, arg=ATAArg()).to_bytes),
            ("command", Header(command=0x100, arg=RawArg()).to_bytes),
            ("tag", Header(tag=b"abc", arg=ATAArg()).to_bytes),
            ("lba", ATAArg(lba=1 << 48).to_bytes),
            ("negative lba", ATAArg(lba=-1).to_bytes),
            ("sector count", ATAArg(sector_count=0x100).to_bytes),
            ("buffer count", ConfigArg(buffer_count=0x10000).to_bytes),
            ("directive command", Directive(0x100, MAC_A).to_bytes),
            ("256 directives", MACMaskArg(dir_count=256, directives=[Directive()] * 256).to_bytes),
            ("256 MACs", ReserveReleaseArg(nmacs=256, macs=[MAC_A] * 256).to_bytes),
            ("ethertype", EthernetFrame(MAC_A, MAC_B, 0x10000, b"").to_bytes),
        ]
        for what, encode in cases:
            try:
                encode()
            except WireError:
                continue
            except Exception as e:
                self.fail(f"{what}: raised {e!r}, not a WireError")
            self.fail(f"{what}: encoded without an error")


def _pad(data: bytes, to: int = MIN_FRAME_SIZE - 14) -> bytes:
    """``data`` zero-padded as a NIC pads a frame to 60 bytes (46 bytes of AoE payload)."""
    return data + bytes(max(0, to - len(data)))


class PaddingTests(SynchronousTestCase):
    """Bytes after a message, as Ethernet's 60-byte minimum adds, do not change it."""

    def test_paddedConfigQuery(self) -> None:
        """The captured config query padded to 60 bytes decodes as the unpadded one."""
        frame = _frames(1500)[0]
        self.assertEqual(len(frame), 32)
        padded = EthernetFrame.from_bytes(frame + bytes(MIN_FRAME_SIZE - len(frame)))
        self.assertEqual(Header.from_bytes(padded.payload), _message(frame))

    def test_paddedReserveRequest(self) -> None:
        """
        Padded reserve/release requests decode as unpadded ones (mdlayher/aoe
        requires the exact length there, so a real padded frame fails; not copied).
        """
        for what, (data, message) in GOLDEN.items():
            if message.command == Command.RESERVE_RELEASE:
                self.assertEqual(Header.from_bytes(_pad(data)), message, what)
                self.assertEqual(Header.from_bytes(data + b"\xff" * 7), message, what)

    def test_paddedMACMaskRequest(self) -> None:
        """Padded MAC mask requests decode as unpadded ones."""
        for what, (data, message) in GOLDEN.items():
            if message.command == Command.MAC_MASK_LIST:
                self.assertEqual(Header.from_bytes(_pad(data)), message, what)

    def test_paddedConfigWithString(self) -> None:
        """Bytes after a config string are padding, not part of the string."""
        data, message = _golden("config set request")
        self.assertEqual(Header.from_bytes(_pad(data)), message)

    def test_ataDataIsEverythingAfterArgument(self) -> None:
        """
        ``ATAArg.data`` is every byte after the 12-byte argument, padding included:
        only the target knows from the command how much of it is sectors.
        """
        frame = _frames(1500)[4]
        self.assertEqual(len(frame), 36)
        padded = EthernetFrame.from_bytes(frame + b"\xaa" * 24)
        arg = Header.from_bytes(padded.payload).arg
        self.assertEqual(arg.data, b"\xaa" * 24)
        self.assertEqual(arg, evolve(_message(frame).arg, data=b"\xaa" * 24))


#: (what, valid request, offset, bytes that make its argument invalid there)
_BAD_ARGUMENTS = [
    ("ATA reserved bytes", _ATA_READ, 20, b"\x01\x00"),
    ("config string over 1024", _CONFIG_READ, 16, b"\x04\x01"),
    ("MAC mask reserved byte", _MASK_READ, 10, b"\x01"),
    ("directive reserved byte", _MASK_EDIT, 14, b"\x01"),
]


class ErrorResponseTests(SynchronousTestCase):
    """
    An error response (R and E flags) whose argument does not decode is kept with
    a ``RawArg``, not rejected: its tag and error code are what matter.
    Other messages get no such leniency.
    """

    def test_errorResponseBadArgumentKeptRaw(self) -> None:
        """An error response (R and E flags) with a malformed argument keeps it as ``RawArg``."""
        for what, base, offset, value in _BAD_ARGUMENTS:
            data = _with(_with(base, 0, b"\x1c\x02"), offset, value)
            message = Header.from_bytes(data)
            self.assertEqual(message.arg, RawArg(data[10:]), what)
            self.assertTrue(message.flag_response and message.flag_error, what)
            self.assertEqual(message.error, Error.BAD_ARGUMENT_PARAMETER, what)

    def test_errorResponseShortArgumentKeptRaw(self) -> None:
        """An error response with a truncated argument keeps it as ``RawArg``, for every command."""
        for command in Command:
            data = bytes.fromhex(_hdr("1c", "01", f"{command:02x}")) + b"\x00"
            message = Header.from_bytes(data)
            self.assertEqual(message.arg, RawArg(b"\x00"), command.name)
            self.assertEqual(message.command, command)

    def test_rawArgumentReencodes(self) -> None:
        """A message decoded with a ``RawArg`` encodes back to the same bytes."""
        data = _with(_with(_ATA_READ, 0, b"\x1c\x02"), 20, b"\x00\x07")
        self.assertEqual(Header.from_bytes(data).to_bytes(), data)

    def test_otherBadArgumentRaises(self) -> None:
        """
        Without both R and E, a malformed argument raises ``ProtocolError``: a
        request, a request with only E, and a plain (successful) response alike.
        """
        for what, base, offset, value in _BAD_ARGUMENTS:
            for verflags in (b"\x10", b"\x14", b"\x18"):
                data = _with(_with(base, 0, verflags), offset, value)
                error = self.assertRaises(ProtocolError, Header.from_bytes, data)
                self.assertEqual(error.code, Error.BAD_ARGUMENT_PARAMETER, what)

    def test_responseFlagDoesNotExcuseVersion(self) -> None:
        """A response with a wrong version still raises ``UNSUPPORTED_VERSION``."""
        data = _with(_ATA_READ, 0, b"\x2c")
        error = self.assertRaises(ProtocolError, Header.from_bytes, data)
        self.assertEqual(error.code, Error.UNSUPPORTED_VERSION)
        self.assertTrue(error.header.flag_response)
        self.assertTrue(error.header.flag_error)


class EthernetTests(SynchronousTestCase):
    """Ethernet II framing and MAC address text."""

    def test_shortFrame(self) -> None:
        """A frame of fewer than 14 bytes cannot hold an Ethernet header: ``FrameTooShort``."""
        for length in range(14):
            self.assertRaises(FrameTooShort, EthernetFrame.from_bytes, bytes(length))

    def test_headerOnly(self) -> None:
        """A 14-byte frame decodes with an empty payload."""
        frame = EthernetFrame.from_bytes(BROADCAST_MAC + MAC_A + b"\x88\xa2")
        self.assertEqual(frame, EthernetFrame(BROADCAST_MAC, MAC_A, ETHERTYPE, b""))

    def test_padToMinimum(self) -> None:
        """``to_bytes(pad=True)`` zero-fills a short frame to 60 bytes; ``to_bytes()`` does not."""
        frame = EthernetFrame(MAC_A, MAC_B, ETHERTYPE, _CONFIG_READ)
        self.assertEqual(len(frame.to_bytes()), 14 + len(_CONFIG_READ))
        padded = frame.to_bytes(pad=True)
        self.assertEqual(len(padded), MIN_FRAME_SIZE)
        self.assertEqual(padded, frame.to_bytes() + bytes(MIN_FRAME_SIZE - len(frame.to_bytes())))

    def test_padLeavesLongFrames(self) -> None:
        """``to_bytes(pad=True)`` leaves a frame of 60 bytes or more unchanged."""
        for length in (46, 47, 1500):
            frame = EthernetFrame(MAC_A, MAC_B, ETHERTYPE, b"\x01" * length)
            self.assertEqual(frame.to_bytes(pad=True), frame.to_bytes())

    def test_payloadKeepsPadding(self) -> None:
        """Decoding leaves padding in the payload for the message codec to ignore."""
        data = EthernetFrame(MAC_A, MAC_B, ETHERTYPE, _CONFIG_READ).to_bytes(pad=True)
        self.assertEqual(EthernetFrame.from_bytes(data).payload, _pad(_CONFIG_READ))

    def test_encodeBadMAC(self) -> None:
        """Encoding a frame whose addresses are not 6 bytes raises ``WireError``."""
        for dst, src in ((MAC_A[:5], MAC_B), (MAC_A, MAC_B + b"\x00")):
            self.assertRaises(WireError, EthernetFrame(dst, src, ETHERTYPE, b"").to_bytes)

    def test_parseMac(self) -> None:
        """``parse_mac`` accepts colons, dashes, Cisco dots or bare hex, in either case."""
        for text in (
            "52:54:00:ae:00:01",
            "52-54-00-AE-00-01",
            "525400ae0001",
            "5254.00ae.0001",
        ):
            self.assertEqual(parse_mac(text), INITIATOR_MAC, text)

    def test_parseMacRejects(self) -> None:
        """``parse_mac`` raises ``ValueError`` naming text that is not six hex bytes."""
        for text in ("", "52:54:00:ae:00", "52:54:00:ae:00:01:02", "zz:54:00:ae:00:01"):
            error = self.assertRaises(ValueError, parse_mac, text)
            self.assertIn(repr(text), str(error))

    def test_formatMac(self) -> None:
        """``format_mac`` writes lower-case hex pairs joined by colons; ``parse_mac`` reads them."""
        self.assertEqual(format_mac(TARGET_MACS[1500]), "22:de:2c:46:f7:32")
        self.assertEqual(format_mac(BROADCAST_MAC), "ff:ff:ff:ff:ff:ff")
        self.assertEqual(parse_mac(format_mac(MAC_B)), MAC_B)
