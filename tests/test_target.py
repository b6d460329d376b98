"""Tests for ``Target``: addressing, the MAC mask, config, reserve/release and AoE errors."""

from __future__ import annotations

from attrs import define, field
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

import aoe_twisted.core.target as target_module
from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.core.acl import MASK_LIST_LIMIT, MemoryACLStore
from aoe_twisted.core.operations import BackendIO, IOKind
from aoe_twisted.core.target import FIRMWARE_VERSION, Pending, StoreFailure, Target
from aoe_twisted.core.wire import (
    SECTOR_SIZE,
    ATAArg,
    ATACmdStatus,
    ATAError,
    Command,
    ConfigArg,
    ConfigCommand,
    Directive,
    DirectiveCommand,
    Error,
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
)
from aoe_twisted.interfaces import IACLStore, IBlockBackend, IIdentifier
from tests import strategies

SHELF = 7
SLOT = 3
SECTORS = 64
SIZE = SECTORS * SECTOR_SIZE
TAG = b"\x01\x02\x03\x04"
HOST = bytes.fromhex("020000000001")
OTHER = bytes.fromhex("020000000002")
THIRD = bytes.fromhex("020000000003")
DRDY = ATACmdStatus.READY_STATUS


def make_target(**kwargs: object) -> Target:
    """Return a target at ``SHELF``.``SLOT`` on a zeroed 32 KiB memory disk."""
    kwargs.setdefault("backend", MemoryBackend(SIZE))
    return Target(SHELF, SLOT, **kwargs)  # type: ignore[arg-type]


def request(
    command: int,
    arg: object,
    major: int = SHELF,
    minor: int = SLOT,
    tag: bytes = TAG,
    flag_response: bool = False,
) -> Header:
    """Return a request header for ``command`` carrying ``arg``."""
    return Header(
        flag_response=flag_response,
        major=major,
        minor=minor,
        command=command,
        tag=tag,
        arg=arg,  # type: ignore[arg-type]
    )


def config(ccmd: int, string: bytes = b"", **kwargs: object) -> Header:
    """Return a Query Config request."""
    arg = ConfigArg(command=ccmd, string_length=len(string), string=string)
    return request(Command.QUERY_CONFIG_INFORMATION, arg, **kwargs)  # type: ignore[arg-type]


def mask(mcmd: int, *directives: Directive) -> Header:
    """Return a MAC Mask List request."""
    arg = MACMaskArg(mcmd, 0, len(directives), directives)
    return request(Command.MAC_MASK_LIST, arg)


def edit(*pairs: tuple[int, bytes]) -> Header:
    """Return a MAC mask edit request with one directive per (DCmd, MAC) pair."""
    return mask(MACMaskCommand.EDIT, *(Directive(c, m) for c, m in pairs))


def listed(*macs: bytes) -> tuple[Directive, ...]:
    """Return the directives a mask list reply carries for ``macs``."""
    return tuple(Directive(DirectiveCommand.NONE, mac) for mac in macs)


def reserve(rcmd: int, *macs: bytes) -> Header:
    """Return a Reserve/Release request."""
    return request(Command.RESERVE_RELEASE, ReserveReleaseArg(rcmd, len(macs), macs))


def identify() -> Header:
    """Return an IDENTIFY DEVICE request, as Linux sends it."""
    return request(
        Command.ISSUE_ATA_COMMAND,
        ATAArg(sector_count=1, cmd_status=ATACmdStatus.IDENTIFY, lba=0xA0 << 24),
    )


def read(lba: int, count: int = 1) -> Header:
    """Return a READ SECTORS EXT request."""
    arg = ATAArg(
        flag_lba48_extended=True,
        sector_count=count,
        cmd_status=ATACmdStatus.READ_48BIT,
        lba=lba,
    )
    return request(Command.ISSUE_ATA_COMMAND, arg)


def write(lba: int, data: bytes) -> Header:
    """Return a WRITE SECTORS EXT request carrying ``data``."""
    arg = ATAArg(
        flag_lba48_extended=True,
        flag_write=True,
        sector_count=len(data) // SECTOR_SIZE,
        cmd_status=ATACmdStatus.WRITE_48BIT,
        lba=lba,
        data=data,
    )
    return request(Command.ISSUE_ATA_COMMAND, arg)


def decode_error(data: bytes) -> ProtocolError:
    """Return the ``ProtocolError`` decoding ``data`` raises."""
    try:
        Header.from_bytes(data)
    except ProtocolError as e:
        return e
    raise AssertionError(f"{data!r} decoded")


def with_byte(header: Header, index: int, value: int) -> bytes:
    """Return ``header`` encoded, with byte ``index`` replaced by ``value``."""
    data = bytearray(header.to_bytes())
    data[index] = value
    return bytes(data)


@implementer(IACLStore)
@define
class RecordingStore(MemoryACLStore):
    """A ``MemoryACLStore`` that records each ``set_*`` call, to see what a target stores."""

    calls: list[tuple[str, object]] = field(factory=list)

    def set_config_string(self, value: bytes) -> None:
        """Record, then store."""
        self.calls.append(("config", value))
        super().set_config_string(value)

    def set_mask_list(self, macs: tuple[bytes, ...]) -> None:
        """Record, then store."""
        self.calls.append(("mask", macs))
        super().set_mask_list(macs)

    def set_reserve_list(self, macs: tuple[bytes, ...]) -> None:
        """Record, then store."""
        self.calls.append(("reserve", macs))
        super().set_reserve_list(macs)


class _TargetTestCase(SynchronousTestCase):
    """Helpers to send one request and check the answer."""

    def answer(self, target: Target, req: Header, src: bytes = HOST) -> Header:
        """Assert that ``target`` answers ``req`` with exactly one reply and return it."""
        replies = target.handle(src, req)
        self.assertEqual(len(replies), 1, f"expected one reply, got {replies!r}")
        return replies[0]

    def assertSilent(self, target: Target, req: Header, src: bytes = HOST) -> None:
        """Assert that ``target`` does not answer ``req``."""
        self.assertEqual(target.handle(src, req), [])

    def assertAoEError(self, reply: Header, code: int) -> None:
        """Assert that ``reply`` is an AoE error response with ``code``."""
        self.assertEqual((reply.flag_response, reply.flag_error, reply.error), (True, True, code))

    def assertSuccess(self, reply: Header) -> None:
        """Assert that ``reply`` is a response without the AoE error flag."""
        self.assertEqual((reply.flag_response, reply.flag_error, reply.error), (True, False, 0))


class ConstructionTests(SynchronousTestCase):
    """``Target`` refuses addresses and settings the wire cannot carry."""

    def test_broadcast_shelf_refused(self) -> None:
        """Shelf 0xFFFF is the wildcard, not an address."""
        self.assertRaises(ValueError, Target, 0xFFFF, 0, MemoryBackend(SIZE))

    def test_broadcast_slot_refused(self) -> None:
        """Slot 0xFF is the wildcard, not an address."""
        self.assertRaises(ValueError, Target, 0, 0xFF, MemoryBackend(SIZE))

    def test_negative_refused(self) -> None:
        """Negative addresses are refused."""
        self.assertRaises(ValueError, Target, -1, 0, MemoryBackend(SIZE))
        self.assertRaises(ValueError, Target, 0, -1, MemoryBackend(SIZE))

    def test_highest_addresses(self) -> None:
        """Shelf 0xFFFE and slot 0xFE are real addresses."""
        target = Target(0xFFFE, 0xFE, MemoryBackend(SIZE))
        self.assertEqual((target.shelf, target.slot), (0xFFFE, 0xFE))

    def test_max_sectors_range(self) -> None:
        """The advertised sector count is one byte and not zero (zero would mean 2)."""
        self.assertRaises(ValueError, make_target, max_sectors=0)
        self.assertRaises(ValueError, make_target, max_sectors=256)

    def test_max_sectors_checked_on_set(self) -> None:
        """Setting ``max_sectors`` later is checked too."""
        target = make_target()
        with self.assertRaises(ValueError):
            target.max_sectors = 300

    def test_backend_must_provide_interface(self) -> None:
        """A backend that does not provide ``IBlockBackend`` is refused."""
        self.assertRaises(TypeError, Target, 1, 1, object())

    def test_defaults(self) -> None:
        """By default: 16 buffers, 2 sectors, our firmware version, the default mask limit."""
        target = make_target()
        self.assertEqual(
            (target.buffer_count, target.max_sectors, target.firmware_version, target.mask_limit),
            (16, 255, FIRMWARE_VERSION, MASK_LIST_LIMIT),
        )
        self.assertIsInstance(target.acl, MemoryACLStore)


def _ata_string(page: bytes, first_word: int, words: int) -> str:
    """Return the ATA string (two characters per word, high byte first) at ``first_word``."""
    raw = page[first_word * 2 : (first_word + words) * 2]
    return (
        b"".join(raw[i + 1 : i + 2] + raw[i : i + 1] for i in range(0, len(raw), 2))
        .decode("ascii")
        .strip()
    )


class IdentifierTests(SynchronousTestCase):
    """The target's IDENTIFY data."""

    def test_default_serial(self) -> None:
        """Without an identifier, the default one has serial "shelf.slot"."""
        page = make_target().identifier.identify()
        self.assertEqual(_ata_string(page, 10, 10), f"{SHELF}.{SLOT}")

    def test_default_capacity(self) -> None:
        """The default identifier gives the backend's size in sectors (LBA48 words 100-103)."""
        page = make_target().identifier.identify()
        self.assertEqual(int.from_bytes(page[200:208], "little"), SECTORS)

    def test_given_serial(self) -> None:
        """A serial given to the target is used instead of "shelf.slot"."""
        page = make_target(serial="disk-42").identifier.identify()
        self.assertEqual(_ata_string(page, 10, 10), "disk-42")

    def test_given_identifier_kept(self) -> None:
        """An identifier given to the target is used as it is."""

        @implementer(IIdentifier)
        class Page:
            def identify(self) -> bytes:
                return bytes(512)

        page = Page()
        self.assertIs(make_target(identifier=page).identifier, page)

    def test_identifier_must_provide_interface(self) -> None:
        """An identifier that does not provide ``IIdentifier`` is refused."""
        self.assertRaises(TypeError, make_target, identifier=object())


class AddressingTests(_TargetTestCase):
    """Which shelf.slot a target answers, and the address its replies carry."""

    def test_addresses_table(self) -> None:
        """The shelf and slot wildcards apply independently; other addresses are not ours."""
        target = make_target()
        table = [
            (SHELF, SLOT, True),
            (0xFFFF, 0xFF, True),
            (0xFFFF, SLOT, True),
            (SHELF, 0xFF, True),
            (SHELF + 1, SLOT, False),
            (SHELF, SLOT + 1, False),
            (0xFFFF, SLOT + 1, False),
            (SHELF + 1, 0xFF, False),
        ]
        for major, minor, expected in table:
            with self.subTest(major=major, minor=minor):
                self.assertEqual(target.addresses(major, minor), expected)

    def test_own_address_answered(self) -> None:
        """A request to our shelf.slot is answered."""
        self.answer(make_target(), config(ConfigCommand.READ))

    def test_full_broadcast_answered(self) -> None:
        """A request to 0xFFFF.0xFF is answered."""
        self.answer(make_target(), config(ConfigCommand.READ, major=0xFFFF, minor=0xFF))

    def test_shelf_broadcast_answered(self) -> None:
        """A request to 0xFFFF.slot is answered by that slot on every shelf."""
        self.answer(make_target(), config(ConfigCommand.READ, major=0xFFFF))

    def test_slot_broadcast_answered(self) -> None:
        """A request to shelf.0xFF is answered by every slot of that shelf."""
        self.answer(make_target(), config(ConfigCommand.READ, minor=0xFF))

    def test_other_shelf_ignored(self) -> None:
        """A request to another shelf is not answered, even with the slot wildcard."""
        self.assertSilent(make_target(), config(ConfigCommand.READ, major=SHELF + 1, minor=0xFF))

    def test_other_slot_ignored(self) -> None:
        """A request to another slot is not answered, even with the shelf wildcard."""
        self.assertSilent(make_target(), config(ConfigCommand.READ, major=0xFFFF, minor=SLOT + 1))

    def test_reply_carries_own_address(self) -> None:
        """A reply to a broadcast request carries our own shelf.slot, never the wildcards."""
        reply = self.answer(make_target(), config(ConfigCommand.READ, major=0xFFFF, minor=0xFF))
        self.assertEqual((reply.major, reply.minor), (SHELF, SLOT))

    def test_ata_reply_carries_own_address(self) -> None:
        """An ATA reply to a broadcast request carries our own shelf.slot too."""
        req = Header(
            major=0xFFFF,
            minor=0xFF,
            command=Command.ISSUE_ATA_COMMAND,
            tag=TAG,
            arg=identify().arg,
        )
        reply = self.answer(make_target(), req)
        self.assertEqual((reply.major, reply.minor), (SHELF, SLOT))

    def test_reply_echoes_tag_and_command(self) -> None:
        """A reply echoes the request's tag and command, with version 1 and the R flag."""
        reply = self.answer(make_target(), config(ConfigCommand.READ, tag=b"\xfe\xdc\xba\x98"))
        self.assertEqual(
            (reply.version, reply.flag_response, reply.tag, reply.command),
            (1, True, b"\xfe\xdc\xba\x98", Command.QUERY_CONFIG_INFORMATION),
        )

    def test_response_ignored(self) -> None:
        """A frame with the response flag set is never answered."""
        self.assertSilent(make_target(), config(ConfigCommand.READ, flag_response=True))

    def test_ata_response_ignored(self) -> None:
        """An ATA response (another target's reply) is never answered, nor served."""
        backend = MemoryBackend(SIZE)
        target = make_target(backend=backend)
        req = write(0, b"\x55" * SECTOR_SIZE)
        self.assertSilent(target, Header(**{**_fields(req), "flag_response": True}))
        self.assertEqual(backend.read(0, SECTOR_SIZE), bytes(SECTOR_SIZE))


def _fields(header: Header) -> dict[str, object]:
    """Return ``header``'s fields as keyword arguments."""
    return {
        name: getattr(header, name)
        for name in (
            "version",
            "flag_response",
            "flag_error",
            "error",
            "major",
            "minor",
            "command",
            "tag",
            "arg",
        )
    }


class ErrorTests(_TargetTestCase):
    """AoE errors for requests that do not decode (``Target.reject``) or make no sense."""

    def test_unknown_command(self) -> None:
        """An unknown command gets error 1, echoing the tag, command and argument."""
        data = with_byte(config(ConfigCommand.READ), 5, 9)
        [reply] = make_target().reject(HOST, decode_error(data))
        self.assertAoEError(reply, Error.UNRECOGNIZED_COMMAND_CODE)
        self.assertEqual((reply.tag, reply.command), (TAG, 9))
        self.assertEqual(reply.arg, RawArg(data[10:]))

    def test_bad_version(self) -> None:
        """A request of AoE version 2 gets error 5 in a version-1 reply."""
        data = with_byte(config(ConfigCommand.READ), 0, 0x20)
        [reply] = make_target().reject(HOST, decode_error(data))
        self.assertAoEError(reply, Error.UNSUPPORTED_VERSION)
        self.assertEqual((reply.version, reply.tag), (1, TAG))

    def test_bad_argument(self) -> None:
        """An argument the codec refuses (reserved ATA bytes set) gets error 2."""
        data = read(0).to_bytes()
        data = data[:20] + b"\x00\x01" + data[22:]
        [reply] = make_target().reject(HOST, decode_error(data))
        self.assertAoEError(reply, Error.BAD_ARGUMENT_PARAMETER)
        self.assertEqual(reply.command, Command.ISSUE_ATA_COMMAND)

    def test_reject_broadcast_own_address(self) -> None:
        """An error reply to a broadcast request carries our own shelf.slot."""
        data = with_byte(config(ConfigCommand.READ, major=0xFFFF, minor=0xFF), 5, 9)
        [reply] = make_target().reject(HOST, decode_error(data))
        self.assertEqual((reply.major, reply.minor), (SHELF, SLOT))

    def test_reject_response(self) -> None:
        """A malformed frame with the response flag set gets no error reply."""
        data = with_byte(config(ConfigCommand.READ, flag_response=True), 5, 9)
        self.assertEqual(make_target().reject(HOST, decode_error(data)), [])

    def test_reject_unaddressed(self) -> None:
        """A malformed frame for another target gets no error reply."""
        data = with_byte(config(ConfigCommand.READ, major=SHELF + 1), 5, 9)
        self.assertEqual(make_target().reject(HOST, decode_error(data)), [])

    def test_reject_masked(self) -> None:
        """A malformed frame from a host off a non-empty mask list gets no error reply."""
        target = make_target(acl=MemoryACLStore(mask_list=(OTHER,)))
        data = with_byte(config(ConfigCommand.READ), 5, 9)
        self.assertEqual(target.reject(HOST, decode_error(data)), [])

    def test_reject_without_header(self) -> None:
        """An error that carries no header cannot be answered."""
        error = ProtocolError(Error.BAD_ARGUMENT_PARAMETER, "no header")
        self.assertEqual(make_target().reject(HOST, error), [])

    def test_handle_unknown_command(self) -> None:
        """A decoded header with a command we do not serve gets error 1."""
        reply = self.answer(make_target(), request(0x42, RawArg(b"xyz")))
        self.assertAoEError(reply, Error.UNRECOGNIZED_COMMAND_CODE)
        self.assertEqual((reply.command, reply.arg), (0x42, RawArg(b"xyz")))

    def test_handle_raw_argument(self) -> None:
        """A request whose argument stayed raw (E flag set by the sender) gets error 2."""
        req = Header(
            flag_error=True,
            major=SHELF,
            minor=SLOT,
            command=Command.QUERY_CONFIG_INFORMATION,
            tag=TAG,
            arg=RawArg(b"\x00"),
        )
        reply = self.answer(make_target(), req)
        self.assertAoEError(reply, Error.BAD_ARGUMENT_PARAMETER)
        self.assertEqual(reply.arg, RawArg(b"\x00"))

    def test_error_flagged_request_not_raw(self) -> None:
        """An E-flagged request with a short argument is not kept raw: it is too short, dropped."""
        data = bytes([0x14, 0, 0, SHELF, SLOT, 1]) + TAG + b"\x00\x00"
        self.assertRaises(FrameTooShort, Header.from_bytes, data)


class ConfigTests(_TargetTestCase):
    """Query Config Information (command 1): read, test, prefix, set, force set."""

    def target(self, string: bytes = b"", **kwargs: object) -> Target:
        """Return a target whose config string is ``string``."""
        return make_target(acl=MemoryACLStore(config_string=string), **kwargs)

    def test_read(self) -> None:
        """A read is answered with the current string and the read sub-command."""
        reply = self.answer(self.target(b"hello"), config(ConfigCommand.READ))
        self.assertSuccess(reply)
        self.assertEqual(
            (reply.arg.command, reply.arg.string_length, reply.arg.string),
            (ConfigCommand.READ, 5, b"hello"),
        )

    def test_reply_fields(self) -> None:
        """A reply carries the buffer count, firmware version, sector count and AoE version 1."""
        target = self.target(buffer_count=40, max_sectors=17, firmware_version=0x1234)
        reply = self.answer(target, config(ConfigCommand.READ))
        self.assertEqual(
            (
                reply.arg.buffer_count,
                reply.arg.firmware_version,
                reply.arg.sector_count,
                reply.arg.version,
            ),
            (40, 0x1234, 17, 1),
        )

    def test_sector_count_follows_max_sectors(self) -> None:
        """A change of ``max_sectors`` (the server's MTU) shows in the next reply."""
        target = self.target()
        target.max_sectors = 9
        self.assertEqual(self.answer(target, config(ConfigCommand.READ)).arg.sector_count, 9)

    def test_read_ignores_request_string(self) -> None:
        """A read does not change the string, whatever the request carries."""
        target = self.target(b"mine")
        reply = self.answer(target, config(ConfigCommand.READ, b"theirs"))
        self.assertEqual((reply.arg.string, target.acl.config_string), (b"mine", b"mine"))

    def test_test_match(self) -> None:
        """A test with exactly our string is answered, with the test sub-command."""
        reply = self.answer(self.target(b"abc"), config(ConfigCommand.TEST, b"abc"))
        self.assertSuccess(reply)
        self.assertEqual((reply.arg.command, reply.arg.string), (ConfigCommand.TEST, b"abc"))

    def test_test_mismatch_silent(self) -> None:
        """A test with a different string gets no reply at all."""
        self.assertSilent(self.target(b"abc"), config(ConfigCommand.TEST, b"abd"))

    def test_test_prefix_not_exact(self) -> None:
        """A test with a mere prefix of our string gets no reply."""
        self.assertSilent(self.target(b"abc"), config(ConfigCommand.TEST, b"ab"))

    def test_prefix_match(self) -> None:
        """A prefix test with a prefix of our string is answered with the whole string."""
        reply = self.answer(self.target(b"abcdef"), config(ConfigCommand.TEST_PREFIX, b"abc"))
        self.assertSuccess(reply)
        self.assertEqual(reply.arg.string, b"abcdef")

    def test_prefix_empty(self) -> None:
        """An empty prefix matches any string."""
        self.answer(self.target(b"abc"), config(ConfigCommand.TEST_PREFIX, b""))

    def test_prefix_exact(self) -> None:
        """Our whole string is a prefix of itself."""
        self.answer(self.target(b"abc"), config(ConfigCommand.TEST_PREFIX, b"abc"))

    def test_prefix_mismatch_silent(self) -> None:
        """A prefix test with a string that does not start ours gets no reply."""
        self.assertSilent(self.target(b"abc"), config(ConfigCommand.TEST_PREFIX, b"b"))

    def test_prefix_longer_silent(self) -> None:
        """A prefix test with a string longer than ours gets no reply."""
        self.assertSilent(self.target(b"abc"), config(ConfigCommand.TEST_PREFIX, b"abcd"))

    def test_set_when_empty(self) -> None:
        """A set on a target with no string stores it and replies with it."""
        target = self.target()
        reply = self.answer(target, config(ConfigCommand.SET, b"new"))
        self.assertSuccess(reply)
        self.assertEqual((reply.arg.string, target.acl.config_string), (b"new", b"new"))

    def test_set_same(self) -> None:
        """A set with the string already stored succeeds."""
        target = self.target(b"same")
        reply = self.answer(target, config(ConfigCommand.SET, b"same"))
        self.assertSuccess(reply)
        self.assertEqual(target.acl.config_string, b"same")

    def test_set_same_not_rewritten(self) -> None:
        """A set that changes nothing does not write the store (a durable store would sync)."""
        store = RecordingStore(config_string=b"same")
        self.answer(make_target(acl=store), config(ConfigCommand.SET, b"same"))
        self.assertEqual(store.calls, [])

    def test_set_different(self) -> None:
        """A set over a different string gets error 4 with the current string; nothing changes."""
        target = self.target(b"mine")
        reply = self.answer(target, config(ConfigCommand.SET, b"theirs"))
        self.assertAoEError(reply, Error.CONFIG_STRING_PRESENT)
        self.assertEqual(
            (reply.arg.command, reply.arg.string, target.acl.config_string),
            (ConfigCommand.SET, b"mine", b"mine"),
        )

    def test_force_set(self) -> None:
        """A force set replaces any string and replies with the new one."""
        target = self.target(b"mine")
        reply = self.answer(target, config(ConfigCommand.FORCE_SET, b"theirs"))
        self.assertSuccess(reply)
        self.assertEqual((reply.arg.string, target.acl.config_string), (b"theirs", b"theirs"))

    def test_force_set_empty(self) -> None:
        """A force set with an empty string clears it."""
        target = self.target(b"mine")
        self.answer(target, config(ConfigCommand.FORCE_SET, b""))
        self.assertEqual(target.acl.config_string, b"")

    def test_bad_subcommand(self) -> None:
        """An unknown config sub-command gets error 2 and changes nothing."""
        target = self.target(b"mine")
        reply = self.answer(target, config(7, b"theirs"))
        self.assertAoEError(reply, Error.BAD_ARGUMENT_PARAMETER)
        self.assertEqual((reply.arg.command, target.acl.config_string), (7, b"mine"))

    def test_announcement(self) -> None:
        """The announcement is an unsolicited config read response, tag 0, own address."""
        target = self.target(b"hi", buffer_count=8, max_sectors=4)
        header = target.announcement()
        self.assertEqual(
            (header.flag_response, header.flag_error, header.major, header.minor),
            (True, False, SHELF, SLOT),
        )
        self.assertEqual((header.command, header.tag), (Command.QUERY_CONFIG_INFORMATION, bytes(4)))
        self.assertEqual(
            header.arg,
            ConfigArg(8, FIRMWARE_VERSION, 4, 1, ConfigCommand.READ, 2, b"hi"),
        )


class MaskTests(_TargetTestCase):
    """The MAC mask list (command 2): who may talk to the target, and editing it."""

    def target(self, *macs: bytes, **kwargs: object) -> Target:
        """Return a target whose mask list is ``macs``."""
        return make_target(acl=MemoryACLStore(mask_list=macs), **kwargs)

    def test_empty_allows_all(self) -> None:
        """With an empty mask list every host is answered."""
        target = self.target()
        for src in (HOST, OTHER):
            self.answer(target, config(ConfigCommand.READ), src)

    def test_member_answered(self) -> None:
        """A host on the mask list is answered."""
        self.answer(self.target(OTHER, HOST), config(ConfigCommand.READ), HOST)

    def test_non_member_dropped_every_command(self) -> None:
        """A host off a non-empty mask list gets nothing, for every command."""
        target = self.target(OTHER)
        for req in (
            identify(),
            read(0),
            config(ConfigCommand.READ),
            mask(MACMaskCommand.READ),
            edit((DirectiveCommand.ADD, HOST)),
            reserve(ReserveReleaseCommand.READ),
            request(0x42, RawArg()),
        ):
            with self.subTest(command=req.command):
                self.assertSilent(target, req, HOST)
        self.assertEqual(target.acl.mask_list, (OTHER,))

    def test_non_member_write_not_served(self) -> None:
        """A write from a host off the mask list does not reach the disk."""
        backend = MemoryBackend(SIZE)
        target = self.target(OTHER, backend=backend)
        self.assertSilent(target, write(0, b"\x77" * SECTOR_SIZE), HOST)
        self.assertEqual(backend.read(0, SECTOR_SIZE), bytes(SECTOR_SIZE))

    def test_read(self) -> None:
        """A read returns the list as NONE directives with their count."""
        reply = self.answer(self.target(HOST, OTHER), mask(MACMaskCommand.READ))
        self.assertSuccess(reply)
        self.assertEqual(reply.arg, MACMaskArg(MACMaskCommand.READ, 0, 2, listed(HOST, OTHER)))

    def test_read_empty(self) -> None:
        """A read of an empty list returns no directives."""
        reply = self.answer(self.target(), mask(MACMaskCommand.READ))
        self.assertEqual(reply.arg, MACMaskArg(MACMaskCommand.READ, 0, 0, ()))

    def test_edit_add(self) -> None:
        """An add puts the MAC on the list and the reply lists the whole new list."""
        target = self.target()
        req = edit((DirectiveCommand.ADD, HOST), (DirectiveCommand.ADD, OTHER))
        reply = self.answer(target, req)
        self.assertSuccess(reply)
        self.assertEqual(reply.arg, MACMaskArg(MACMaskCommand.EDIT, 0, 2, listed(HOST, OTHER)))
        self.assertEqual(target.acl.mask_list, (HOST, OTHER))

    def test_edit_add_locks_out_others(self) -> None:
        """Once a host adds itself, other hosts are no longer answered."""
        target = self.target()
        self.answer(target, edit((DirectiveCommand.ADD, HOST)), HOST)
        self.assertSilent(target, config(ConfigCommand.READ), OTHER)

    def test_edit_duplicate(self) -> None:
        """Adding a listed MAC succeeds and lists it once."""
        target = self.target(HOST)
        reply = self.answer(target, edit((DirectiveCommand.ADD, HOST)))
        self.assertSuccess(reply)
        self.assertEqual((reply.arg.error, target.acl.mask_list), (0, (HOST,)))

    def test_edit_delete(self) -> None:
        """A delete takes the MAC off the list."""
        target = self.target(HOST, OTHER)
        reply = self.answer(target, edit((DirectiveCommand.DELETE, OTHER)))
        self.assertEqual(reply.arg, MACMaskArg(MACMaskCommand.EDIT, 0, 1, listed(HOST)))
        self.assertEqual(target.acl.mask_list, (HOST,))

    def test_edit_delete_absent(self) -> None:
        """Deleting a MAC not on the list succeeds."""
        target = self.target(HOST)
        reply = self.answer(target, edit((DirectiveCommand.DELETE, THIRD)))
        self.assertEqual(reply.arg, MACMaskArg(MACMaskCommand.EDIT, 0, 1, listed(HOST)))

    def test_edit_bad_directive(self) -> None:
        """
        A bad DCmd stops the edit: MError 2, DirCount its index, no AoE error flag.

        The reply echoes the directives before the failing one, so DirCount
        agrees with what the reply carries.
        """
        target = self.target()
        reply = self.answer(
            target, edit((DirectiveCommand.ADD, HOST), (9, OTHER), (DirectiveCommand.ADD, THIRD))
        )
        self.assertSuccess(reply)
        self.assertEqual(
            reply.arg,
            MACMaskArg(
                MACMaskCommand.EDIT,
                MACMaskError.BAD_COMMAND,
                1,
                (Directive(DirectiveCommand.ADD, HOST),),
            ),
        )

    def test_edit_partial_application(self) -> None:
        """Directives before a failing one stay applied; the rest are not."""
        target = self.target()
        self.answer(
            target, edit((DirectiveCommand.ADD, HOST), (9, OTHER), (DirectiveCommand.ADD, THIRD))
        )
        self.assertEqual(target.acl.mask_list, (HOST,))

    def test_edit_list_full(self) -> None:
        """An add to a full list stops with MError 3 at its index."""
        target = self.target(HOST, mask_limit=2)
        reply = self.answer(
            target,
            edit(
                (DirectiveCommand.ADD, OTHER),
                (DirectiveCommand.NONE, HOST),
                (DirectiveCommand.ADD, THIRD),
            ),
        )
        self.assertSuccess(reply)
        self.assertEqual((reply.arg.error, reply.arg.dir_count), (MACMaskError.LIST_FULL, 2))
        self.assertEqual(len(reply.arg.directives), 2)
        self.assertEqual(target.acl.mask_list, (HOST, OTHER))

    def test_edit_unchanged_not_stored(self) -> None:
        """An edit that changes nothing does not write the store."""
        store = RecordingStore(mask_list=(HOST,))
        self.answer(make_target(acl=store), edit((DirectiveCommand.ADD, HOST)))
        self.assertEqual(store.calls, [])

    def test_edit_failure_stores_applied_part(self) -> None:
        """A failed edit that applied some directives stores the changed list."""
        store = RecordingStore()
        self.answer(make_target(acl=store), edit((DirectiveCommand.ADD, HOST), (9, OTHER)))
        self.assertEqual(store.calls, [("mask", (HOST,))])

    def test_bad_mcmd(self) -> None:
        """An unknown MCmd gets error 2 and changes nothing."""
        target = self.target(HOST)
        req = mask(5, Directive(DirectiveCommand.DELETE, HOST))
        reply = self.answer(target, req)
        self.assertAoEError(reply, Error.BAD_ARGUMENT_PARAMETER)
        self.assertEqual((reply.arg.command, target.acl.mask_list), (5, (HOST,)))


class ReserveTests(_TargetTestCase):
    """Reserve/Release (command 3) and the reservation's effect on ATA commands."""

    def target(self, *macs: bytes, **kwargs: object) -> Target:
        """Return a target whose reserve list is ``macs``."""
        return make_target(acl=MemoryACLStore(reserve_list=macs), **kwargs)

    def test_read(self) -> None:
        """A read returns the reserve list."""
        reply = self.answer(self.target(HOST, OTHER), reserve(ReserveReleaseCommand.READ))
        self.assertSuccess(reply)
        self.assertEqual(reply.arg, ReserveReleaseArg(ReserveReleaseCommand.READ, 2, (HOST, OTHER)))

    def test_read_ignores_macs(self) -> None:
        """A read with MACs does not change the list."""
        target = self.target(HOST)
        self.answer(target, reserve(ReserveReleaseCommand.READ, OTHER), OTHER)
        self.assertEqual(target.acl.reserve_list, (HOST,))

    def test_set_when_empty(self) -> None:
        """Any host may set the list of an unreserved target; the reply lists it."""
        target = self.target()
        reply = self.answer(target, reserve(ReserveReleaseCommand.SET, HOST, OTHER), THIRD)
        self.assertSuccess(reply)
        self.assertEqual(reply.arg, ReserveReleaseArg(ReserveReleaseCommand.SET, 2, (HOST, OTHER)))
        self.assertEqual(target.acl.reserve_list, (HOST, OTHER))

    def test_set_by_member(self) -> None:
        """A host on the list may replace it."""
        target = self.target(HOST, OTHER)
        self.answer(target, reserve(ReserveReleaseCommand.SET, OTHER), OTHER)
        self.assertEqual(target.acl.reserve_list, (OTHER,))

    def test_set_by_non_member(self) -> None:
        """A host off the list gets error 6 with the current list, which stays."""
        target = self.target(HOST)
        reply = self.answer(target, reserve(ReserveReleaseCommand.SET, OTHER), OTHER)
        self.assertAoEError(reply, Error.TARGET_IS_RESERVED)
        self.assertEqual(reply.arg, ReserveReleaseArg(ReserveReleaseCommand.SET, 1, (HOST,)))
        self.assertEqual(target.acl.reserve_list, (HOST,))

    def test_force_set(self) -> None:
        """A force set by a host off the list replaces it anyway."""
        target = self.target(HOST)
        reply = self.answer(target, reserve(ReserveReleaseCommand.FORCE_SET, OTHER), OTHER)
        self.assertSuccess(reply)
        self.assertEqual(target.acl.reserve_list, (OTHER,))

    def test_release(self) -> None:
        """A member's set with no MACs releases the target."""
        target = self.target(HOST)
        reply = self.answer(target, reserve(ReserveReleaseCommand.SET), HOST)
        self.assertEqual(reply.arg, ReserveReleaseArg(ReserveReleaseCommand.SET, 0, ()))
        self.assertEqual(target.acl.reserve_list, ())

    def test_bad_rcmd(self) -> None:
        """An unknown RCmd gets error 2 and changes nothing."""
        target = self.target(HOST)
        reply = self.answer(target, reserve(3, OTHER), HOST)
        self.assertAoEError(reply, Error.BAD_ARGUMENT_PARAMETER)
        self.assertEqual(target.acl.reserve_list, (HOST,))

    def test_set_unchanged_not_stored(self) -> None:
        """A set that changes nothing does not write the store."""
        store = RecordingStore(reserve_list=(HOST,))
        self.answer(make_target(acl=store), reserve(ReserveReleaseCommand.SET, HOST), HOST)
        self.assertEqual(store.calls, [])

    def test_ata_read_by_non_member(self) -> None:
        """A read from a host off the reserve list gets error 6 and no data."""
        reply = self.answer(self.target(HOST), read(0), OTHER)
        self.assertAoEError(reply, Error.TARGET_IS_RESERVED)
        self.assertEqual(reply.arg.data, b"")

    def test_ata_write_by_non_member(self) -> None:
        """A write from a host off the reserve list gets error 6 and leaves the disk alone."""
        backend = MemoryBackend(SIZE)
        target = self.target(HOST, backend=backend)
        reply = self.answer(target, write(1, b"\x99" * SECTOR_SIZE), OTHER)
        self.assertAoEError(reply, Error.TARGET_IS_RESERVED)
        self.assertEqual(backend.read(SECTOR_SIZE, SECTOR_SIZE), bytes(SECTOR_SIZE))

    def test_identify_by_non_member(self) -> None:
        """IDENTIFY is served to any host, so an initiator can still learn the size."""
        reply = self.answer(self.target(HOST), identify(), OTHER)
        self.assertSuccess(reply)
        self.assertEqual(len(reply.arg.data), 512)

    def test_member_can_write(self) -> None:
        """A host on the reserve list writes to the disk."""
        backend = MemoryBackend(SIZE)
        target = self.target(HOST, backend=backend)
        reply = self.answer(target, write(2, b"\x42" * SECTOR_SIZE), HOST)
        self.assertSuccess(reply)
        self.assertEqual(backend.read(2 * SECTOR_SIZE, SECTOR_SIZE), b"\x42" * SECTOR_SIZE)

    def test_unreserved_read(self) -> None:
        """Without a reservation any host reads."""
        backend = MemoryBackend(SIZE)
        backend.write(0, b"\x11" * SECTOR_SIZE)
        reply = self.answer(make_target(backend=backend), read(0), OTHER)
        self.assertSuccess(reply)
        self.assertEqual(reply.arg.data, b"\x11" * SECTOR_SIZE)


class ATAHandOffTests(_TargetTestCase):
    """What the target passes to the ATA engine."""

    def test_plan_ata_arguments(self) -> None:
        """``plan_ata`` gets the request's argument, backend, identifier and our limit."""
        calls = []
        planned = ATAArg(cmd_status=0x40)

        def fake(
            request: ATAArg,
            backend: IBlockBackend,
            identifier: IIdentifier | None = None,
            max_sectors: int = 255,
        ) -> ATAArg:
            calls.append((request, backend, identifier, max_sectors))
            return planned

        self.patch(target_module, "plan_ata", fake)
        target = make_target(max_sectors=17)
        req = read(0)
        reply = self.answer(target, req)
        self.assertEqual(calls, [(req.arg, target.backend, target.identifier, 17)])
        self.assertIs(reply.arg, planned)
        self.assertEqual((reply.major, reply.minor, reply.tag), (SHELF, SLOT, TAG))

    def test_read_is_pending(self) -> None:
        """``decide`` answers a read with the disk operation it needs, and does not read."""
        reads: list[tuple[int, int]] = []

        class Watched(MemoryBackend):
            def read(self, offset: int, length: int) -> bytes:
                reads.append((offset, length))
                return super().read(offset, length)

        target = make_target(backend=Watched(4 * SECTOR_SIZE))
        [answer] = target.decide(OTHER, read(1))
        self.assertIsInstance(answer, Pending)
        self.assertEqual(answer.io, BackendIO(IOKind.READ, SECTOR_SIZE, SECTOR_SIZE))
        self.assertFalse(answer.writes)
        self.assertEqual(reads, [])

    def test_pending_completes_later(self) -> None:
        """A pending read's reply, built when the result comes, carries the data and our address."""
        target = make_target()
        [answer] = target.decide(OTHER, read(0))
        data = b"\x5a" * SECTOR_SIZE
        reply = answer.reply(data)
        self.assertSuccess(reply)
        self.assertEqual(reply.arg.data, data)
        self.assertEqual((reply.major, reply.minor, reply.tag), (SHELF, SLOT, TAG))
        failed = answer.reply(None, OSError(5, "EIO"))
        self.assertEqual(failed.arg.err_feature, ATAError.UNC)


class StoreFailureTests(_TargetTestCase):
    """An ACL store that cannot keep a change: an AoE error, the state unchanged."""

    def failing_store(self) -> MemoryACLStore:
        """A store whose config string cannot be changed: the disk is full."""

        class FullStore(MemoryACLStore):
            def set_config_string(self, value: bytes) -> None:
                raise OSError(28, "No space left on device")

        return FullStore(config_string=b"old")

    def test_config_set_failure(self) -> None:
        """A config string that cannot be stored is answered DEVICE_UNAVAILABLE, not confirmed."""
        target = make_target(acl=self.failing_store())
        request = Header(
            command=Command.QUERY_CONFIG_INFORMATION,
            major=SHELF,
            minor=SLOT,
            tag=TAG,
            arg=ConfigArg(command=ConfigCommand.FORCE_SET, string_length=3, string=b"new"),
        )
        [answer] = target.decide(OTHER, request)
        self.assertIsInstance(answer, StoreFailure)
        self.assertEqual(answer.error.errno, 28)
        self.assertTrue(answer.reply.flag_error)
        self.assertEqual(answer.reply.error, Error.DEVICE_UNAVAILABLE)
        self.assertEqual(target.acl.config_string, b"old")
        [reply] = target.handle(OTHER, request)
        self.assertEqual(reply, answer.reply)


@implementer(IBlockBackend)
@define
class CheckingBackend:
    """A memory disk that records any access outside it instead of trusting the caller."""

    size: int
    read_only: bool = False
    strays: list[tuple[str, int, int]] = field(factory=list)
    _disk: MemoryBackend = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._disk = MemoryBackend(self.size)

    def _check(self, op: str, offset: int, length: int) -> bool:
        if offset < 0 or length < 0 or offset + length > self.size:
            self.strays.append((op, offset, length))
            return False
        return True

    def read(self, offset: int, length: int) -> bytes:
        if not self._check("read", offset, length):
            return bytes(max(length, 0))
        return self._disk.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        if self._check("write", offset, len(data)):
            self._disk.write(offset, data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


_lists = st.sampled_from([(), (HOST,), (OTHER,), (OTHER, HOST)])


class PropertyTests(_TargetTestCase):
    """Properties over arbitrary decoded requests."""

    @settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
    @given(
        header=strategies.headers,
        address=st.sampled_from([(SHELF, SLOT), (0xFFFF, 0xFF), (0xFFFF, SLOT), (SHELF, 0xFF)]),
        src=st.sampled_from([HOST, OTHER]),
        mask_list=_lists,
        reserve_list=_lists,
        config_string=st.sampled_from([b"", b"abc"]),
    )
    def test_handle_never_raises(
        self,
        header: Header,
        address: tuple[int, int],
        src: bytes,
        mask_list: tuple[bytes, ...],
        reserve_list: tuple[bytes, ...],
        config_string: bytes,
    ) -> None:
        """
        ``handle`` answers any decoded request without raising or touching bytes off the disk.

        Every reply is an encodable response from our address echoing the tag
        and command.
        """
        backend = CheckingBackend(SIZE)
        acl = MemoryACLStore(config_string, mask_list, reserve_list)
        target = Target(SHELF, SLOT, backend, acl)
        req = Header(**{**_fields(header), "major": address[0], "minor": address[1]})
        replies = target.handle(src, req)
        self.assertEqual(backend.strays, [])
        self.assertLessEqual(len(replies), 1)
        for reply in replies:
            self.assertEqual(
                (reply.flag_response, reply.major, reply.minor, reply.tag, reply.command),
                (True, SHELF, SLOT, req.tag, req.command),
            )
            reply.to_bytes()
        if req.flag_response or (mask_list and src not in mask_list):
            self.assertEqual(replies, [])

    @settings(max_examples=300)
    @given(strategies.mutated_messages())
    def test_decoded_or_rejected_never_raises(self, data: bytes) -> None:
        """Whatever a near-valid message decodes to, the target answers it without raising."""
        target = Target(SHELF, SLOT, CheckingBackend(SIZE))
        if len(data) >= 5:
            data = data[:2] + bytes([0, SHELF, SLOT]) + data[5:]
        try:
            header = Header.from_bytes(data)
        except ProtocolError as e:
            replies = target.reject(HOST, e)
        except WireError:
            return
        else:
            replies = target.handle(HOST, header)
        for reply in replies:
            reply.to_bytes()
        self.assertEqual(target.backend.strays, [])
