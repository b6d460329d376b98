# -*- test-case-name: tests.test_units -*-
"""
AoE request frames built from a few arguments, and the MAC addresses tests use.

The ``*_request`` builders return one AoE message (header and argument) as
bytes, encoded by the real codec (``aoe_twisted.core.wire``);
``ethernet_frame`` puts a message on the wire::

    frame = ethernet_frame(ata_request(ATACmdStatus.READ_48BIT, lba=8, count=2))

Every builder takes the header keywords of ``HeaderFields`` (address, tag,
...).  The version-and-flags byte (``verflags``) and the ATA ``aflags`` and
``reserved`` are written over the encoded bytes: they are the fields the
codec refuses to encode wrong, and a test of a malformed frame needs them
wrong.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypedDict, Unpack

from aoe_twisted.core.wire import (
    BROADCAST_MAJOR,
    BROADCAST_MINOR,
    ETHERTYPE,
    HEADER_SIZE,
    SECTOR_SIZE,
    ATAArg,
    ATACmdStatus,
    Command,
    ConfigArg,
    ConfigCommand,
    Directive,
    EthernetFrame,
    Header,
    MACMaskArg,
    MACMaskCommand,
    ReserveReleaseArg,
    ReserveReleaseCommand,
)
from aoe_twisted.core.wire.header import Arg

__all__ = [
    "INITIATOR_MAC",
    "OTHER_MAC",
    "TARGET_MAC",
    "ATAFields",
    "ATARequestFields",
    "HeaderFields",
    "ata_arg",
    "ata_request",
    "config_request",
    "ethernet_frame",
    "mask_request",
    "reserve_request",
]

#: The host that sends requests (locally administered unicast, as are the others).
INITIATOR_MAC = bytes.fromhex("020000000001")
#: The interface the target serves on: where requests go, replies come from.
TARGET_MAC = bytes.fromhex("02aa00000001")
#: A second host: not on a mask list, not the reservation holder, a forged source.
OTHER_MAC = bytes.fromhex("020000000002")

_EXTENDED = frozenset({ATACmdStatus.READ_48BIT, ATACmdStatus.WRITE_48BIT, ATACmdStatus.FLUSH_EXT})
_WRITES = frozenset({ATACmdStatus.WRITE_28BIT, ATACmdStatus.WRITE_48BIT})
_NO_SECTORS = frozenset({ATACmdStatus.FLUSH, ATACmdStatus.FLUSH_EXT, ATACmdStatus.CHECK_POWER})
#: Offsets in a message of the ATA argument's AFlags byte and its two reserved bytes.
_AFLAGS = HEADER_SIZE
_ATA_RESERVED = HEADER_SIZE + 10


def ethernet_frame(
    payload: bytes,
    src: bytes = INITIATOR_MAC,
    dst: bytes = TARGET_MAC,
    ethertype: int = ETHERTYPE,
    pad: bool = False,
) -> bytes:
    """
    Return ``payload`` in an Ethernet frame from ``src`` to ``dst``.

    Unpadded, as the Linux initiator sends on virtio, unless ``pad`` (then
    zeros fill it to the 60-byte Ethernet minimum).
    """
    return EthernetFrame(dst, src, ethertype, payload).to_bytes(pad=pad)


class ATAFields(TypedDict, total=False):
    """
    The ATA argument's fields, as ``ata_arg`` and ``ata_request`` take them.

    ``lba`` (0 by default) and ``data`` (none); ``count``, the sector count:
    by default the whole sectors in ``data`` for a write, none for FLUSH
    CACHE (EXT) and CHECK POWER MODE, else 1; ``extended``, the E (LBA48)
    flag: by default set for the 48-bit commands (READ/WRITE SECTORS EXT,
    FLUSH CACHE EXT); ``write``, the W flag: by default set for WRITE
    SECTORS (EXT); ``asynchronous`` and ``device_head``, the A and D flags
    (clear); ``feature``, the error/feature byte (0).
    """

    lba: int
    count: int
    data: bytes
    extended: bool
    write: bool
    asynchronous: bool
    device_head: bool
    feature: int


class HeaderFields(TypedDict, total=False):
    """
    The header keywords every ``*_request`` builder takes.

    ``shelf`` and ``slot``: the address (e1.0 by default, every shelf and
    slot for ``config_request``); ``tag``: an int or 4 bytes (0); ``error``:
    the header's error byte (0); ``aoe_command``: the command byte (the
    builder's own); ``verflags``: the version-and-flags byte as it is,
    written over the encoded one (e.g. ``0x18`` for a response, ``0x20`` for
    version 2).
    """

    shelf: int
    slot: int
    tag: int | bytes
    error: int
    aoe_command: int
    verflags: int


class ATARequestFields(ATAFields, HeaderFields, total=False):
    """
    What ``ata_request`` takes besides the command: ``ATAFields``, ``HeaderFields``, and:

    ``aflags``: the AFlags byte as it is, overriding ``extended``, ``write``,
    ``asynchronous`` and ``device_head``; ``reserved``: the argument's
    reserved 16 bits (zero in a valid request).
    """

    aflags: int
    reserved: int


def ata_arg(cmd: int = ATACmdStatus.READ_48BIT, **fields: Unpack[ATAFields]) -> ATAArg:
    """Return the ATA argument of command ``cmd`` (any byte): as Linux sends it, unless told."""
    data = fields.get("data", b"")
    count = fields.get("count")
    if count is None and cmd in _WRITES:
        count = len(data) // SECTOR_SIZE
    elif count is None:
        count = 0 if cmd in _NO_SECTORS else 1
    return ATAArg(
        flag_lba48_extended=fields.get("extended", cmd in _EXTENDED),
        flag_ata_device_head_register=fields.get("device_head", False),
        flag_asynchronous=fields.get("asynchronous", False),
        flag_write=fields.get("write", cmd in _WRITES),
        err_feature=fields.get("feature", 0),
        sector_count=count,
        cmd_status=cmd,
        lba=fields.get("lba", 0),
        data=data,
    )


def ata_request(cmd: int = ATACmdStatus.READ_48BIT, **fields: Unpack[ATARequestFields]) -> bytes:
    """Return an Issue ATA Command message: ``ata_arg``'s argument with a header."""
    aflags = fields.pop("aflags", None)
    reserved = fields.pop("reserved", 0)
    header = {name: fields.pop(name) for name in _HEADER_FIELDS if name in fields}
    arg = ata_arg(cmd, **fields)  # type: ignore[misc]
    message = bytearray(_message(Command.ISSUE_ATA_COMMAND, arg, header))  # type: ignore[arg-type]
    if aflags is not None:
        message[_AFLAGS] = aflags
    message[_ATA_RESERVED : _ATA_RESERVED + 2] = reserved.to_bytes(2, "little")
    return bytes(message)


def config_request(
    command: int = ConfigCommand.READ,
    string: bytes = b"",
    *,
    buffer_count: int = 0,
    firmware_version: int = 0,
    sector_count: int = 0,
    version: int = 0,
    **header: Unpack[HeaderFields],
) -> bytes:
    """
    Return a Query Config Information message with sub-command ``command`` and ``string``.

    By default a config read to every shelf and slot, as ``aoe-discover`` sends it.
    """
    arg = ConfigArg(
        buffer_count, firmware_version, sector_count, version, command, len(string), string
    )
    return _message(
        Command.QUERY_CONFIG_INFORMATION, arg, header, BROADCAST_MAJOR, BROADCAST_MINOR
    )


def mask_request(
    command: int = MACMaskCommand.READ,
    directives: Iterable[Directive] = (),
    **header: Unpack[HeaderFields],
) -> bytes:
    """Return a MAC Mask List read (``command`` 0) or edit (1) of ``directives``."""
    directives = tuple(directives)
    return _message(
        Command.MAC_MASK_LIST, MACMaskArg(command, 0, len(directives), directives), header
    )


def reserve_request(
    command: int = ReserveReleaseCommand.READ,
    macs: Iterable[bytes] = (),
    **header: Unpack[HeaderFields],
) -> bytes:
    """Return a Reserve/Release read (``command`` 0), set (1) or force set (2) of ``macs``."""
    macs = tuple(macs)
    return _message(Command.RESERVE_RELEASE, ReserveReleaseArg(command, len(macs), macs), header)


_HEADER_FIELDS = tuple(HeaderFields.__annotations__)


def _message(
    command: int, arg: Arg, header: HeaderFields, shelf: int = 1, slot: int = 0
) -> bytes:
    """Encode ``arg`` under a request header with ``header``'s fields (else these defaults)."""
    tag = header.get("tag", 0)
    if isinstance(tag, int):
        tag = tag.to_bytes(4, "big")
    message = Header(
        major=header.get("shelf", shelf),
        minor=header.get("slot", slot),
        command=header.get("aoe_command", command),
        tag=tag,
        error=header.get("error", 0),
        arg=arg,
    ).to_bytes()
    if "verflags" in header:
        message = bytes([header["verflags"]]) + message[1:]
    return message
