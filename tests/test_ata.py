# -*- test-case-name: tests.test_ata -*-
"""
Tests for ``aoe_twisted.core.ata.serve_ata``, the ATA engine.

Most tests run a request against a ``MemoryBackend`` whose sectors each hold a
distinct pattern, so a read of the wrong sector or a write to the wrong place
shows.  Fakes stand in where a test needs to count calls, fail, or have a disk
larger than memory.  Every refused request is also checked to leave the disk
exactly as it was.
"""

from __future__ import annotations

from pathlib import Path

from attrs import define, field
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.core.ata import serve_ata
from aoe_twisted.core.identify import DefaultIdentifier, build_identify
from aoe_twisted.core.wire import (
    SECTOR_SIZE,
    ATAArg,
    Command,
    ConfigArg,
    EthernetFrame,
    Header,
    RawArg,
)
from aoe_twisted.interfaces import IBlockBackend, IIdentifier
from tests.pcap import read_pcap
from tests.strategies import MAX_LBA
from tests.test_identify import linux_capacity

__all__ = ["FakeDisk", "SparseDisk"]

_DATA = Path(__file__).parent / "data"

DRDY = 0x40
ERR_DRDY = 0x41
ABRT = 0x04
IDNF = 0x10
UNC = 0x40

READ = 0x20
READ_EXT = 0x24
WRITE = 0x30
WRITE_EXT = 0x34
IDENTIFY = 0xEC
FLUSH = 0xE7
FLUSH_EXT = 0xEA
CHECK_POWER = 0xE5

#: Sectors on the disk most tests use.
SECTORS = 64
TAG = b"\x81\x02\x03\x04"


def sector(n: int) -> bytes:
    """Return 512 bytes that say which sector they belong to (and differ from all others)."""
    return (n.to_bytes(4, "big") * 128)[:SECTOR_SIZE]


def new_sector(n: int) -> bytes:
    """Return 512 bytes meant to be written over sector ``n``, unlike ``sector(n)``."""
    return bytes(b ^ 0xFF for b in sector(n))


def patterned_disk(sectors: int = SECTORS, read_only: bool = False) -> MemoryBackend:
    """Return a memory disk whose sector ``n`` holds ``sector(n)``."""
    disk = MemoryBackend(sectors * SECTOR_SIZE)
    for n in range(sectors):
        disk.write(n * SECTOR_SIZE, sector(n))
    disk.read_only = read_only
    return disk


def snapshot(disk: IBlockBackend) -> bytes:
    """Return every byte of ``disk``."""
    return disk.read(0, disk.size)


def ata(
    cmd: int,
    lba: int = 0,
    count: int = 1,
    *,
    ext: bool | None = None,
    write: bool | None = None,
    data: bytes = b"",
    feature: int = 0,
    device: bool = False,
    asynchronous: bool = False,
) -> Header:
    """
    Return an Issue ATA Command request as the Linux initiator would send it.

    The E flag defaults to set for the EXT commands and the W flag to set for
    the write commands; pass ``ext`` or ``write`` to send them wrongly.
    """
    return Header(
        major=1,
        minor=2,
        command=Command.ISSUE_ATA_COMMAND,
        tag=TAG,
        arg=ATAArg(
            flag_lba48_extended=cmd in (READ_EXT, WRITE_EXT) if ext is None else ext,
            flag_ata_device_head_register=device,
            flag_asynchronous=asynchronous,
            flag_write=cmd in (WRITE, WRITE_EXT) if write is None else write,
            err_feature=feature,
            sector_count=count,
            cmd_status=cmd,
            lba=lba,
            data=data,
        ),
    )


def reply_arg(reply: Header) -> ATAArg:
    """Return the ``ATAArg`` of a reply, failing if it is something else."""
    assert isinstance(reply.arg, ATAArg), reply
    return reply.arg


@implementer(IBlockBackend)
@define
class FakeDisk:
    """
    A memory disk that records every call, and can fail or lie about what it did.

    ``fail`` makes ``read``, ``write`` and ``flush`` raise ``OSError``;
    ``short`` makes ``read`` return one byte too few.  Unlike ``MemoryBackend``
    its ``write`` works even when ``read_only`` is set, so a test sees whether
    the engine called it.
    """

    sectors: int = SECTORS
    read_only: bool = False
    fail: bool = False
    short: bool = False
    calls: list[tuple[str, int, int]] = field(factory=list)
    buffer: bytearray = field(init=False)

    def __attrs_post_init__(self) -> None:
        """Fill the disk with ``sector(n)`` patterns."""
        self.buffer = bytearray(b"".join(sector(n) for n in range(self.sectors)))

    @property
    def size(self) -> int:
        """The disk's size in bytes."""
        return self.sectors * SECTOR_SIZE

    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` bytes at ``offset``, or fail."""
        self.calls.append(("read", offset, length))
        if self.fail:
            raise OSError(5, "injected read error")
        return bytes(self.buffer[offset : offset + length - self.short])

    def write(self, offset: int, data: bytes) -> None:
        """Store ``data`` at ``offset``, or fail."""
        self.calls.append(("write", offset, len(data)))
        if self.fail:
            raise OSError(5, "injected write error")
        self.buffer[offset : offset + len(data)] = data

    def flush(self) -> None:
        """Count the flush, or fail."""
        self.calls.append(("flush", 0, 0))
        if self.fail:
            raise OSError(5, "injected flush error")

    def close(self) -> None:
        """Nothing to release."""


@implementer(IBlockBackend)
@define
class SparseDisk:
    """A disk of any size that allocates nothing: it reads zeros and records writes."""

    sectors: int
    read_only: bool = False
    calls: list[tuple[str, int, int]] = field(factory=list)

    @property
    def size(self) -> int:
        """The disk's size in bytes."""
        return self.sectors * SECTOR_SIZE

    def read(self, offset: int, length: int) -> bytes:
        """Return zeros, recording where they were read."""
        assert offset >= 0 and offset + length <= self.size, (offset, length)
        self.calls.append(("read", offset, length))
        return bytes(length)

    def write(self, offset: int, data: bytes) -> None:
        """Record where ``data`` was written."""
        assert offset >= 0 and offset + len(data) <= self.size, (offset, len(data))
        self.calls.append(("write", offset, len(data)))

    def flush(self) -> None:
        """Record the flush."""
        self.calls.append(("flush", 0, 0))

    def close(self) -> None:
        """Nothing to release."""


@implementer(IIdentifier)
@define
class FakeIdentifier:
    """An identifier that returns ``page`` or raises ``OSError``."""

    page: bytes = bytes(range(256)) * 2
    fail: bool = False

    def identify(self) -> bytes:
        """Return the page, or fail as an ``HDIO_GET_IDENTITY`` ioctl may."""
        if self.fail:
            raise OSError(25, "injected ioctl error")
        return self.page


class FakesTests(SynchronousTestCase):
    """The fakes the engine is tested with keep the interfaces they stand in for."""

    def test_interfaces(self) -> None:
        """The fake disks provide ``IBlockBackend``, the fake identifier ``IIdentifier``."""
        self.assertTrue(verifyObject(IBlockBackend, FakeDisk()))
        self.assertTrue(verifyObject(IBlockBackend, SparseDisk(2**40)))
        self.assertTrue(verifyObject(IIdentifier, FakeIdentifier()))


class ReplyTests(SynchronousTestCase):
    """The AoE envelope of every reply."""

    REQUESTS: dict[str, Header] = {
        "read": ata(READ_EXT, 3, 2),
        "write": ata(WRITE_EXT, 3, 1, data=new_sector(3)),
        "identify": ata(IDENTIFY, 0xA0000000),
        "flush": ata(FLUSH),
        "check power": ata(CHECK_POWER),
        "unknown": ata(0xC8),
        "out of range": ata(READ_EXT, SECTORS),
    }

    def test_header(self) -> None:
        """A reply is version 1, a response without AoE error, with the request's command, tag."""
        for name, request in self.REQUESTS.items():
            with self.subTest(name):
                reply = serve_ata(request, patterned_disk())
                self.assertEqual(
                    (reply.version, reply.flag_response, reply.flag_error, reply.error),
                    (1, True, False, 0),
                )
                self.assertEqual((reply.command, reply.tag), (Command.ISSUE_ATA_COMMAND, TAG))

    def test_address_echoed(self) -> None:
        """Without ``major`` and ``minor`` the reply carries the request's address."""
        reply = serve_ata(ata(CHECK_POWER), patterned_disk())
        self.assertEqual((reply.major, reply.minor), (1, 2))

    def test_address_given(self) -> None:
        """With ``major`` and ``minor`` the reply carries them, as a broadcast request needs."""
        request = Header(major=0xFFFF, minor=0xFF, tag=TAG, arg=ATAArg(cmd_status=CHECK_POWER))
        reply = serve_ata(request, patterned_disk(), major=7, minor=3)
        self.assertEqual((reply.major, reply.minor), (7, 3))

    def test_aflags_echoed(self) -> None:
        """The reply's AFlags are the request's, on success and on failure."""
        for name, request in self.REQUESTS.items():
            for device, asynchronous in ((False, False), (True, True)):
                with self.subTest(name, device=device, asynchronous=asynchronous):
                    arg = reply_arg(request)
                    flagged = Header(
                        major=1,
                        minor=2,
                        tag=TAG,
                        arg=ATAArg(
                            arg.flag_lba48_extended,
                            device,
                            asynchronous,
                            arg.flag_write,
                            arg.err_feature,
                            arg.sector_count,
                            arg.cmd_status,
                            arg.lba,
                            arg.data,
                        ),
                    )
                    self.assertEqual(
                        reply_arg(serve_ata(flagged, patterned_disk())).aflags,
                        reply_arg(flagged).aflags,
                    )

    def test_encodes(self) -> None:
        """Every reply encodes to bytes."""
        for name, request in self.REQUESTS.items():
            with self.subTest(name):
                self.assertIsInstance(serve_ata(request, patterned_disk()).to_bytes(), bytes)

    def test_not_ata(self) -> None:
        """A request that is not an ATA command with an ``ATAArg`` is a programming error."""
        requests = {
            "config command": Header(command=Command.QUERY_CONFIG_INFORMATION, arg=ConfigArg()),
            "ATA command, config argument": Header(arg=ConfigArg()),
            "ATA command, raw argument": Header(arg=RawArg(bytes(12))),
            "ATA command, no argument": Header(arg=None),
            "ATA argument, config command": Header(
                command=Command.QUERY_CONFIG_INFORMATION, arg=ATAArg(cmd_status=CHECK_POWER)
            ),
        }
        for name, request in requests.items():
            with self.subTest(name):
                self.assertRaises(ValueError, serve_ata, request, patterned_disk())


class ReadTests(SynchronousTestCase):
    """READ SECTORS (0x20) and READ SECTORS EXT (0x24)."""

    def test_reads(self) -> None:
        """A read answers DRDY with exactly the sectors asked for."""
        cases = {
            "first sector": (0, 1),
            "last sector": (SECTORS - 1, 1),
            "two in the middle": (10, 2),
            "the last max_sectors": (SECTORS - 17, 17),
        }
        for cmd in (READ, READ_EXT):
            for name, (lba, count) in cases.items():
                with self.subTest(name, cmd=hex(cmd)):
                    arg = reply_arg(
                        serve_ata(ata(cmd, lba, count), patterned_disk(), max_sectors=17)
                    )
                    self.assertEqual((arg.cmd_status, arg.err_feature), (DRDY, 0))
                    self.assertEqual(arg.data, b"".join(sector(n) for n in range(lba, lba + count)))

    def test_registers(self) -> None:
        """A read reply's sector count is 0 (none left) and its LBA the request's, as vblade's."""
        arg = reply_arg(serve_ata(ata(READ_EXT, 5, 2), patterned_disk()))
        self.assertEqual((arg.sector_count, arg.lba), (0, 5))

    def test_lba28_masked(self) -> None:
        """READ SECTORS uses 28 bits of LBA: the initiator puts 0xE0 (LBA mode) in byte 3."""
        arg = reply_arg(serve_ata(ata(READ, 0xE0000000 | 5, 1), patterned_disk()))
        self.assertEqual((arg.cmd_status, arg.data), (DRDY, sector(5)))

    def test_lba28_masked_even_with_e_flag(self) -> None:
        """READ SECTORS addresses 28 bits even if the E flag is set."""
        arg = reply_arg(serve_ata(ata(READ, 0x1_0000_0005, 1, ext=True), patterned_disk()))
        self.assertEqual((arg.cmd_status, arg.data), (DRDY, sector(5)))

    def test_ext_without_e_flag_masked(self) -> None:
        """READ SECTORS EXT without the E flag has 28-bit registers: the LBA is masked."""
        arg = reply_arg(serve_ata(ata(READ_EXT, 0xE0000000 | 6, 1, ext=False), patterned_disk()))
        self.assertEqual((arg.cmd_status, arg.data), (DRDY, sector(6)))

    def test_lba48_not_masked(self) -> None:
        """READ SECTORS EXT with the E flag uses all 48 bits: 0xE0 in byte 3 is out of range."""
        arg = reply_arg(serve_ata(ata(READ_EXT, 0xE0000000 | 5, 1), patterned_disk()))
        self.assertEqual((arg.cmd_status, arg.err_feature), (ERR_DRDY, IDNF))

    def test_lba48_large_disk(self) -> None:
        """On a disk over 2**28 sectors, LBA48 reads reach the last sector and no further."""
        sectors = 2**28 + 1000
        disk = SparseDisk(sectors)
        arg = reply_arg(serve_ata(ata(READ_EXT, sectors - 2, 2), disk))
        self.assertEqual((arg.cmd_status, arg.data), (DRDY, bytes(1024)))
        self.assertEqual(disk.calls, [("read", (sectors - 2) * SECTOR_SIZE, 1024)])
        arg = reply_arg(serve_ata(ata(READ_EXT, sectors - 1, 2), disk))
        self.assertEqual((arg.cmd_status, arg.err_feature), (ERR_DRDY, IDNF))
        self.assertEqual(len(disk.calls), 1)

    def test_lba28_large_disk(self) -> None:
        """On a disk over 2**28 sectors, READ SECTORS reaches only the first 2**28."""
        disk = SparseDisk(2**28 + 1000)
        arg = reply_arg(serve_ata(ata(READ, 0xEFFFFFFF, 1), disk))
        self.assertEqual(arg.cmd_status, DRDY)
        self.assertEqual(disk.calls, [("read", (2**28 - 1) * SECTOR_SIZE, 512)])

    def test_read_error(self) -> None:
        """A backend read that raises ``OSError`` answers ERR|DRDY with UNC and no data."""
        arg = reply_arg(serve_ata(ata(READ_EXT, 0, 1), FakeDisk(fail=True)))
        self.assertEqual((arg.cmd_status, arg.err_feature, arg.data), (ERR_DRDY, UNC, b""))

    def test_short_read(self) -> None:
        """A backend read that returns too few bytes answers UNC, never a short reply."""
        arg = reply_arg(serve_ata(ata(READ_EXT, 0, 1), FakeDisk(short=True)))
        self.assertEqual((arg.cmd_status, arg.err_feature, arg.data), (ERR_DRDY, UNC, b""))


class WriteTests(SynchronousTestCase):
    """WRITE SECTORS (0x30) and WRITE SECTORS EXT (0x34)."""

    def test_writes(self) -> None:
        """A write answers DRDY without data and changes exactly its sectors."""
        cases = {
            "first sector": (0, 1),
            "last sector": (SECTORS - 1, 1),
            "two in the middle": (10, 2),
            "the last max_sectors": (SECTORS - 17, 17),
        }
        for cmd in (WRITE, WRITE_EXT):
            for name, (lba, count) in cases.items():
                with self.subTest(name, cmd=hex(cmd)):
                    disk = patterned_disk()
                    expected = bytearray(snapshot(disk))
                    data = b"".join(new_sector(n) for n in range(lba, lba + count))
                    expected[lba * SECTOR_SIZE : (lba + count) * SECTOR_SIZE] = data
                    arg = reply_arg(
                        serve_ata(ata(cmd, lba, count, data=data), disk, max_sectors=17)
                    )
                    self.assertEqual((arg.cmd_status, arg.err_feature, arg.data), (DRDY, 0, b""))
                    self.assertEqual(snapshot(disk), bytes(expected))

    def test_registers(self) -> None:
        """A write reply's sector count is 0 (none left) and its LBA the request's."""
        arg = reply_arg(serve_ata(ata(WRITE_EXT, 5, 1, data=new_sector(5)), patterned_disk()))
        self.assertEqual((arg.sector_count, arg.lba), (0, 5))

    def test_lba28_masked(self) -> None:
        """WRITE SECTORS uses 28 bits of LBA, ignoring the 0xE0 in byte 3."""
        disk = patterned_disk()
        serve_ata(ata(WRITE, 0xE0000000 | 5, 1, data=new_sector(5)), disk)
        self.assertEqual(disk.read(5 * SECTOR_SIZE, SECTOR_SIZE), new_sector(5))

    def test_lba48_large_disk(self) -> None:
        """On a disk over 2**28 sectors, an LBA48 write reaches the last sector."""
        sectors = 2**28 + 1000
        disk = SparseDisk(sectors)
        arg = reply_arg(serve_ata(ata(WRITE_EXT, sectors - 1, 1, data=bytes(512)), disk))
        self.assertEqual(arg.cmd_status, DRDY)
        self.assertEqual(disk.calls, [("write", (sectors - 1) * SECTOR_SIZE, 512)])

    def test_padding_ignored(self) -> None:
        """Data beyond the sectors (Ethernet padding) is not written."""
        disk = patterned_disk()
        serve_ata(ata(WRITE_EXT, 4, 1, data=new_sector(4) + b"\xee" * 46), disk)
        self.assertEqual(disk.read(4 * SECTOR_SIZE, 2 * SECTOR_SIZE), new_sector(4) + sector(5))

    def test_data_passed_uncopied(self) -> None:
        """Data of exactly the sectors' length goes to the backend as it is, without a copy."""
        written: list[bytes] = []
        disk = patterned_disk()
        data = new_sector(4)

        class Recording:
            size = disk.size
            read_only = False

            def write(self, offset: int, chunk: bytes) -> None:
                written.append(chunk)

        serve_ata(ata(WRITE_EXT, 4, 1, data=data), Recording())  # type: ignore[arg-type]
        self.assertIs(written[0], data)

    def test_write_error(self) -> None:
        """A backend write that raises ``OSError`` answers ERR|DRDY with ABRT."""
        arg = reply_arg(serve_ata(ata(WRITE_EXT, 0, 1, data=bytes(512)), FakeDisk(fail=True)))
        self.assertEqual((arg.cmd_status, arg.err_feature), (ERR_DRDY, ABRT))

    def test_read_only_not_written(self) -> None:
        """A write to a read-only backend never calls its ``write``."""
        disk = FakeDisk(read_only=True)
        arg = reply_arg(serve_ata(ata(WRITE_EXT, 0, 1, data=bytes(512)), disk))
        self.assertEqual((arg.cmd_status, arg.err_feature), (ERR_DRDY, ABRT))
        self.assertEqual(disk.calls, [])


#: Requests the engine refuses: name -> (request, max_sectors, the error register).
FAILURES: dict[str, tuple[Header, int, int]] = {
    "read with W flag": (ata(READ_EXT, 0, 1, write=True, data=bytes(512)), 2, ABRT),
    "read28 with W flag": (ata(READ, 0, 1, write=True, data=bytes(512)), 2, ABRT),
    "write without W flag": (ata(WRITE_EXT, 0, 1, write=False, data=new_sector(0)), 2, ABRT),
    "write28 without W flag": (ata(WRITE, 0, 1, write=False, data=new_sector(0)), 2, ABRT),
    "read of 0 sectors (256)": (ata(READ, 0, 0), 255, ABRT),
    "read ext of 0 sectors (65536)": (ata(READ_EXT, 0, 0), 255, ABRT),
    "write of 0 sectors": (ata(WRITE_EXT, 0, 0, data=new_sector(0)), 255, ABRT),
    "read above max_sectors": (ata(READ_EXT, 0, 3), 2, ABRT),
    "write above max_sectors": (
        ata(WRITE_EXT, 0, 3, data=new_sector(0) * 3),
        2,
        ABRT,
    ),
    "write data one byte short": (ata(WRITE_EXT, 0, 2, data=(new_sector(0) * 2)[:-1]), 2, ABRT),
    "write without data": (ata(WRITE_EXT, 0, 1), 2, ABRT),
    "read past the end": (ata(READ_EXT, SECTORS - 1, 2), 2, IDNF),
    "read at the end": (ata(READ_EXT, SECTORS, 1), 2, IDNF),
    "read at the largest LBA": (ata(READ_EXT, MAX_LBA, 1), 2, IDNF),
    "read28 past the end": (ata(READ, 0xE0000000 | SECTORS, 1), 2, IDNF),
    "write past the end": (ata(WRITE_EXT, SECTORS - 1, 2, data=new_sector(0) * 2), 2, IDNF),
    "write at the end": (ata(WRITE_EXT, SECTORS, 1, data=new_sector(0)), 2, IDNF),
    "write28 past the end": (ata(WRITE, 0xE0000000 | SECTORS, 1, data=new_sector(0)), 2, IDNF),
    "unknown command": (ata(0xC8, 0, 1), 2, ABRT),
    "unknown command with W flag and data": (ata(0xCA, 0, 1, write=True, data=bytes(512)), 2, ABRT),
}


class FailureTests(SynchronousTestCase):
    """Every refused request answers ATA ERR|DRDY and leaves the disk as it was."""

    def test_status(self) -> None:
        """The reply has status ERR|DRDY, the error register says why, and no data."""
        for name, (request, max_sectors, error) in FAILURES.items():
            with self.subTest(name):
                arg = reply_arg(serve_ata(request, patterned_disk(), max_sectors=max_sectors))
                self.assertEqual(
                    (arg.cmd_status, arg.err_feature, arg.data), (ERR_DRDY, error, b"")
                )

    def test_registers_kept(self) -> None:
        """A refused request's sector count and LBA come back as they were sent."""
        for name, (request, max_sectors, _) in FAILURES.items():
            with self.subTest(name):
                arg = reply_arg(serve_ata(request, patterned_disk(), max_sectors=max_sectors))
                sent = reply_arg(request)
                self.assertEqual((arg.sector_count, arg.lba), (sent.sector_count, sent.lba))

    def test_disk_unchanged(self) -> None:
        """No byte of the disk changes."""
        for name, (request, max_sectors, _) in FAILURES.items():
            with self.subTest(name):
                disk = patterned_disk()
                before = snapshot(disk)
                serve_ata(request, disk, max_sectors=max_sectors)
                self.assertEqual(snapshot(disk), before)

    def test_backend_untouched(self) -> None:
        """The backend is not even called: every check comes first."""
        for name, (request, max_sectors, _) in FAILURES.items():
            with self.subTest(name):
                disk = FakeDisk()
                serve_ata(request, disk, max_sectors=max_sectors)
                self.assertEqual(disk.calls, [])

    def test_read_only_unchanged(self) -> None:
        """A write to a read-only disk answers ABRT and changes nothing."""
        disk = patterned_disk(read_only=True)
        before = snapshot(disk)
        arg = reply_arg(serve_ata(ata(WRITE_EXT, 0, 1, data=new_sector(0)), disk))
        self.assertEqual((arg.cmd_status, arg.err_feature), (ERR_DRDY, ABRT))
        self.assertEqual(snapshot(disk), before)


class UnknownCommandTests(SynchronousTestCase):
    """ATA commands the engine does not implement."""

    OPCODES = {
        "NOP": 0x00,
        "DATA SET MANAGEMENT (TRIM)": 0x06,
        "READ DMA EXT": 0x25,
        "WRITE DMA EXT": 0x35,
        "DRDY, the status (coreos/torus#384)": 0x40,
        "SMART": 0xB0,
        "READ MULTIPLE": 0xC4,
        "WRITE MULTIPLE": 0xC5,
        "READ DMA": 0xC8,
        "WRITE DMA": 0xCA,
        "IDENTIFY PACKET DEVICE": 0xA1,
        "SET FEATURES": 0xEF,
        "READ NATIVE MAX ADDRESS": 0xF8,
        "0xFF": 0xFF,
    }

    def test_aborted(self) -> None:
        """Each is answered ERR|DRDY with ABRT, and the backend is not called."""
        for name, opcode in self.OPCODES.items():
            with self.subTest(name):
                disk = FakeDisk()
                arg = reply_arg(serve_ata(ata(opcode), disk))
                self.assertEqual((arg.cmd_status, arg.err_feature), (ERR_DRDY, ABRT))
                self.assertEqual(disk.calls, [])


class IdentifyTests(SynchronousTestCase):
    """IDENTIFY DEVICE (0xEC)."""

    def test_default_page(self) -> None:
        """Without an identifier the reply is the default page for the disk's size."""
        arg = reply_arg(serve_ata(ata(IDENTIFY, 0xA0000000), patterned_disk()))
        self.assertEqual((arg.cmd_status, arg.err_feature), (DRDY, 0))
        self.assertEqual(arg.data, build_identify(SECTORS))

    def test_default_page_follows_size(self) -> None:
        """The default page is built for each disk's own size."""
        for sectors in (1, SECTORS, 2**28 - 1, 2**28 + 1, 2**40):
            with self.subTest(sectors=sectors):
                arg = reply_arg(serve_ata(ata(IDENTIFY), SparseDisk(sectors)))
                self.assertEqual(linux_capacity(arg.data), sectors)

    def test_registers(self) -> None:
        """The reply's sector count is 0 and its LBA the request's, as vblade answers."""
        arg = reply_arg(serve_ata(ata(IDENTIFY, 0xA0000000), patterned_disk()))
        self.assertEqual((arg.sector_count, arg.lba), (0, 0xA0000000))

    def test_identifier_used(self) -> None:
        """An identifier passed in answers instead of the default page."""
        identifier = FakeIdentifier()
        arg = reply_arg(serve_ata(ata(IDENTIFY), patterned_disk(), identifier))
        self.assertEqual((arg.cmd_status, arg.data), (DRDY, identifier.page))

    def test_default_identifier_used(self) -> None:
        """A ``DefaultIdentifier`` passed in answers with its own serial."""
        identifier = DefaultIdentifier(SECTORS, serial="1.2:host")
        arg = reply_arg(serve_ata(ata(IDENTIFY), patterned_disk(), identifier))
        self.assertEqual(arg.data, identifier.identify())

    def test_identifier_fails(self) -> None:
        """An identifier that raises ``OSError`` answers ERR|DRDY with ABRT."""
        arg = reply_arg(serve_ata(ata(IDENTIFY), patterned_disk(), FakeIdentifier(fail=True)))
        self.assertEqual((arg.cmd_status, arg.err_feature, arg.data), (ERR_DRDY, ABRT, b""))

    def test_identifier_wrong_length(self) -> None:
        """A page that is not 512 bytes is not sent (Linux drops it as a runt): ABRT."""
        for length in (0, 511, 513):
            with self.subTest(length=length):
                identifier = FakeIdentifier(page=bytes(length))
                arg = reply_arg(serve_ata(ata(IDENTIFY), patterned_disk(), identifier))
                self.assertEqual((arg.cmd_status, arg.err_feature), (ERR_DRDY, ABRT))


class FlushTests(SynchronousTestCase):
    """FLUSH CACHE (0xE7) and FLUSH CACHE EXT (0xEA)."""

    def test_flush_called_once(self) -> None:
        """Each calls the backend's ``flush`` once and answers DRDY."""
        for cmd in (FLUSH, FLUSH_EXT):
            with self.subTest(cmd=hex(cmd)):
                disk = FakeDisk()
                arg = reply_arg(serve_ata(ata(cmd, count=0), disk))
                self.assertEqual((arg.cmd_status, arg.err_feature, arg.data), (DRDY, 0, b""))
                self.assertEqual(disk.calls, [("flush", 0, 0)])

    def test_flush_fails(self) -> None:
        """A ``flush`` that raises ``OSError`` answers ERR|DRDY with ABRT."""
        for cmd in (FLUSH, FLUSH_EXT):
            with self.subTest(cmd=hex(cmd)):
                arg = reply_arg(serve_ata(ata(cmd, count=0), FakeDisk(fail=True)))
                self.assertEqual((arg.cmd_status, arg.err_feature), (ERR_DRDY, ABRT))

    def test_others_do_not_flush(self) -> None:
        """Reads, writes and IDENTIFY do not flush."""
        disk = FakeDisk()
        serve_ata(ata(READ_EXT, 0, 1), disk)
        serve_ata(ata(WRITE_EXT, 0, 1, data=bytes(512)), disk)
        serve_ata(ata(IDENTIFY), disk)
        self.assertNotIn("flush", [call[0] for call in disk.calls])


class CheckPowerTests(SynchronousTestCase):
    """CHECK POWER MODE (0xE5)."""

    def test_active(self) -> None:
        """The answer is DRDY with 0xFF, active or idle, in the sector count, and no data."""
        disk = FakeDisk()
        arg = reply_arg(serve_ata(ata(CHECK_POWER, count=0), disk))
        self.assertEqual(
            (arg.cmd_status, arg.err_feature, arg.sector_count, arg.data), (DRDY, 0, 0xFF, b"")
        )
        self.assertEqual(disk.calls, [])


class CaptureTests(SynchronousTestCase):
    """The engine answers the real Linux initiator's requests as vblade 25 did."""

    def replay(self, name: str) -> None:
        """
        Feed every ATA request of capture ``name`` to the engine and compare its
        reply to vblade's: registers, flags, data length, and the size the
        initiator reads from IDENTIFY.
        """
        headers = [
            Header.from_bytes(EthernetFrame.from_bytes(frame).payload)
            for frame in read_pcap(_DATA / name).frames
        ]
        max_sectors = next(
            h.arg.sector_count for h in headers if h.flag_response and isinstance(h.arg, ConfigArg)
        )
        replies = {h.tag: h for h in headers if h.flag_response and isinstance(h.arg, ATAArg)}
        requests = [h for h in headers if not h.flag_response and isinstance(h.arg, ATAArg)]
        disk = SparseDisk(0x100000)
        answered = 0
        for request in requests:
            theirs = replies.get(request.tag)
            if theirs is None:
                continue  # the capture ends before vblade's reply
            ours = serve_ata(request, disk, max_sectors=max_sectors, major=1, minor=0)
            a, b = reply_arg(ours), reply_arg(theirs)
            self.assertEqual(
                (ours.major, ours.minor, ours.tag, ours.flag_error),
                (theirs.major, theirs.minor, theirs.tag, theirs.flag_error),
            )
            self.assertEqual(
                (a.aflags, a.err_feature, a.sector_count, a.cmd_status, a.lba, len(a.data)),
                (b.aflags, b.err_feature, b.sector_count, b.cmd_status, b.lba, len(b.data)),
            )
            if b.cmd_status == DRDY and reply_arg(request).cmd_status == IDENTIFY:
                self.assertEqual(linux_capacity(a.data), linux_capacity(b.data))
            answered += 1
        self.assertGreater(answered, 10)

    def test_mtu1500(self) -> None:
        """At MTU 1500: IDENTIFY and two-sector READ EXT."""
        self.replay("linux-vblade-mtu1500.pcap")

    def test_mtu9000(self) -> None:
        """At MTU 9000: IDENTIFY and READ EXT of up to 17 sectors."""
        self.replay("linux-vblade-mtu9000.pcap")


#: Opcodes worth drawing often: the implemented ones and a few others.
_OPCODES = st.one_of(
    st.sampled_from([READ, READ_EXT, WRITE, WRITE_EXT, IDENTIFY, FLUSH, FLUSH_EXT, CHECK_POWER]),
    st.integers(0, 0xFF),
)
#: LBAs worth drawing often: on a small disk, around its end, with 0xE0 in byte 3, anything.
_LBAS = st.one_of(
    st.integers(0, SECTORS + 2),
    st.integers(0, SECTORS + 2).map(lambda lba: 0xE0000000 | lba),
    st.integers(0, MAX_LBA),
)


@st.composite
def _requests(draw: st.DrawFn) -> Header:
    """An Issue ATA Command request with any registers, biased towards ones that succeed."""
    count = draw(st.one_of(st.integers(0, 4), st.integers(0, 0xFF)))
    data = draw(
        st.one_of(
            st.binary(max_size=64),
            st.integers(0, 5).flatmap(
                lambda n: st.binary(min_size=n * SECTOR_SIZE, max_size=n * SECTOR_SIZE + 46)
            ),
        )
    )
    return Header(
        major=draw(st.integers(0, 0xFFFF)),
        minor=draw(st.integers(0, 0xFF)),
        tag=draw(st.binary(min_size=4, max_size=4)),
        arg=ATAArg(
            flag_lba48_extended=draw(st.booleans()),
            flag_ata_device_head_register=draw(st.booleans()),
            flag_asynchronous=draw(st.booleans()),
            flag_write=draw(st.booleans()),
            err_feature=draw(st.integers(0, 0xFF)),
            sector_count=count,
            cmd_status=draw(_OPCODES),
            lba=draw(_LBAS),
            data=data,
        ),
    )


class PropertyTests(SynchronousTestCase):
    """Whatever an initiator sends, the engine answers and keeps the disk intact."""

    @settings(max_examples=400, deadline=None)
    @given(request=_requests(), max_sectors=st.integers(1, 255), read_only=st.booleans())
    def test_any_request(self, request: Header, max_sectors: int, read_only: bool) -> None:
        """
        Any ATA request gets an encodable reply; only a successful write changes
        the disk, and then only its own sectors, to its data.
        """
        disk = patterned_disk(read_only=read_only)
        before = snapshot(disk)
        reply = serve_ata(request, disk, max_sectors=max_sectors)
        reply.to_bytes()
        sent, arg = reply_arg(request), reply_arg(reply)
        self.assertIn(arg.cmd_status, (DRDY, ERR_DRDY))
        after = snapshot(disk)
        if arg.cmd_status == DRDY and sent.cmd_status in (WRITE, WRITE_EXT):
            wide = sent.cmd_status == WRITE_EXT and sent.flag_lba48_extended
            lba = sent.lba & ((1 << 48) - 1 if wide else (1 << 28) - 1)
            start, end = lba * SECTOR_SIZE, (lba + sent.sector_count) * SECTOR_SIZE
            self.assertEqual(after[:start], before[:start])
            self.assertEqual(after[start:end], sent.data[: end - start])
            self.assertEqual(after[end:], before[end:])
        else:
            self.assertEqual(after, before)
        if arg.cmd_status == DRDY and sent.cmd_status in (READ, READ_EXT):
            self.assertEqual(len(arg.data), sent.sector_count * SECTOR_SIZE)
        elif sent.cmd_status != IDENTIFY or arg.cmd_status != DRDY:
            self.assertEqual(arg.data, b"")
