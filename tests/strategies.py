"""
Hypothesis strategies for every AoEr11 message, shared by the codec, target and dispatch tests.

Every strategy draws *valid* messages: fields within the range of their wire
encoding, the count fields (``string_length``, ``dir_count``, ``nmacs``)
agreeing with the lists they count.  ``to_bytes()`` therefore succeeds on all of
them and ``from_bytes`` gives the same message back.  Mutating those encodings
(``mutated_messages``) yields the near-misses that find decoder bugs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TypeVar

from hypothesis import strategies as st

from aoe_twisted.core.wire import (
    ATA_ARG_SIZE,
    CONFIG_ARG_SIZE,
    ETHERTYPE,
    MACMASK_ARG_SIZE,
    MAX_CONFIG_STRING,
    RESERVE_ARG_SIZE,
    SECTOR_SIZE,
    VERSION,
    ATAArg,
    Command,
    ConfigArg,
    Directive,
    EthernetFrame,
    Header,
    MACMaskArg,
    RawArg,
    ReserveReleaseArg,
)

__all__ = [
    "MAX_LBA",
    "aoe_frames",
    "ata_args",
    "ata_data",
    "ata_headers",
    "bytes_of_header",
    "config_args",
    "config_headers",
    "directives",
    "ethernet_frames",
    "headers",
    "mac_mask_args",
    "mac_mask_headers",
    "macs",
    "mutated_messages",
    "nibble",
    "non_ata_headers",
    "raw_error_headers",
    "reserve_release_args",
    "reserve_release_headers",
    "tags",
    "uint8",
    "uint16",
]

_T = TypeVar("_T")

#: The largest LBA a 6-byte ATA argument can carry.
MAX_LBA = (1 << 48) - 1

uint8 = st.integers(0, 0xFF)
uint16 = st.integers(0, 0xFFFF)
nibble = st.integers(0, 0xF)

#: A 6-byte MAC address.
macs = st.binary(min_size=6, max_size=6)
#: A 4-byte AoE tag.
tags = st.binary(min_size=4, max_size=4)


def _sized(make: Callable[..., st.SearchStrategy[_T]], largest: int) -> st.SearchStrategy[_T]:
    """
    Draw a length up to ``largest`` first, then a value of exactly that length.

    ``st.binary``/``st.lists`` alone rarely reach long values in a short run;
    drawing the length as an integer reaches both ends (0, 1, ``largest``) often.
    """
    return st.integers(0, largest).flatmap(lambda n: make(min_size=n, max_size=n))


#: The data of an ATA argument: any bytes, or whole 512-byte sectors as reads and writes carry.
ata_data = st.one_of(
    st.binary(max_size=64),
    st.integers(0, 17).flatmap(
        lambda sectors: st.binary(min_size=sectors * SECTOR_SIZE, max_size=sectors * SECTOR_SIZE)
    ),
)


@st.composite
def ata_args(draw: st.DrawFn, data: st.SearchStrategy[bytes] = ata_data) -> ATAArg:
    """An ATA argument with any flags, registers and 48-bit LBA."""
    return ATAArg(
        flag_lba48_extended=draw(st.booleans()),
        flag_ata_device_head_register=draw(st.booleans()),
        flag_asynchronous=draw(st.booleans()),
        flag_write=draw(st.booleans()),
        err_feature=draw(uint8),
        sector_count=draw(uint8),
        cmd_status=draw(uint8),
        lba=draw(st.integers(0, MAX_LBA)),
        data=draw(data),
    )


@st.composite
def config_args(draw: st.DrawFn, max_string: int = MAX_CONFIG_STRING) -> ConfigArg:
    """A config argument whose string (at most 1024 bytes) matches its ``string_length``."""
    string = draw(_sized(st.binary, max_string))
    return ConfigArg(
        buffer_count=draw(uint16),
        firmware_version=draw(uint16),
        sector_count=draw(uint8),
        version=draw(nibble),
        command=draw(nibble),
        string_length=len(string),
        string=string,
    )


@st.composite
def directives(draw: st.DrawFn) -> Directive:
    """One MAC mask directive with any command byte."""
    return Directive(command=draw(uint8), mac=draw(macs))


@st.composite
def mac_mask_args(draw: st.DrawFn, max_directives: int = 255) -> MACMaskArg:
    """A MAC mask argument with up to 255 directives and the matching ``dir_count``."""
    items = draw(_sized(partial(st.lists, directives()), max_directives))
    return MACMaskArg(
        command=draw(uint8), error=draw(uint8), dir_count=len(items), directives=items
    )


@st.composite
def reserve_release_args(draw: st.DrawFn, max_macs: int = 255) -> ReserveReleaseArg:
    """A reserve/release argument with up to 255 MACs and the matching ``nmacs``."""
    items = draw(_sized(partial(st.lists, macs), max_macs))
    return ReserveReleaseArg(command=draw(uint8), nmacs=len(items), macs=items)


def _headers(command: Command, args: st.SearchStrategy[object]) -> st.SearchStrategy[Header]:
    """Messages of ``command`` carrying an argument from ``args``, any address, flags and tag."""
    return st.builds(
        Header,
        version=st.just(VERSION),
        flag_response=st.booleans(),
        flag_error=st.booleans(),
        error=uint8,
        major=uint16,
        minor=uint8,
        command=st.just(command),
        tag=tags,
        arg=args,
    )


ata_headers = _headers(Command.ISSUE_ATA_COMMAND, ata_args())
config_headers = _headers(Command.QUERY_CONFIG_INFORMATION, config_args())
mac_mask_headers = _headers(Command.MAC_MASK_LIST, mac_mask_args())
reserve_release_headers = _headers(Command.RESERVE_RELEASE, reserve_release_args())

#: Messages whose argument ends where its own count fields say, so padding can follow it.
non_ata_headers = st.one_of(config_headers, mac_mask_headers, reserve_release_headers)

#: Messages of every command, each with the argument kind its command calls for.
headers = st.one_of(ata_headers, non_ata_headers)

#: The fewest bytes each command's argument needs; fewer cannot decode.
_MIN_ARG_SIZE = {
    Command.ISSUE_ATA_COMMAND: ATA_ARG_SIZE,
    Command.QUERY_CONFIG_INFORMATION: CONFIG_ARG_SIZE,
    Command.MAC_MASK_LIST: MACMASK_ARG_SIZE,
    Command.RESERVE_RELEASE: RESERVE_ARG_SIZE,
}


@st.composite
def raw_error_headers(draw: st.DrawFn) -> Header:
    """
    Error responses whose argument is too short to decode, so it stays a ``RawArg``.

    These are the only messages that decode with a ``RawArg``; they round-trip too.
    """
    command = draw(st.sampled_from(Command))
    raw = draw(st.binary(max_size=_MIN_ARG_SIZE[command] - 1))
    return Header(
        version=VERSION,
        flag_response=True,
        flag_error=True,
        error=draw(uint8),
        major=draw(uint16),
        minor=draw(uint8),
        command=command,
        tag=draw(tags),
        arg=RawArg(raw),
    )


def bytes_of_header(strategy: st.SearchStrategy[Header] = headers) -> st.SearchStrategy[bytes]:
    """The encodings of messages drawn from ``strategy``."""
    return strategy.map(Header.to_bytes)


def _positions(last: int) -> st.SearchStrategy[int]:
    """
    Offsets 0 to ``last``, half of them within the first 32 bytes.

    That is where the header, the argument and the count fields are; the rest of
    a long message is mostly ATA data, where a change can only change the data.
    """
    return st.one_of(st.integers(0, min(last, 31)), st.integers(0, last))


def _truncate(draw: st.DrawFn, data: bytes) -> bytes:
    """Cut ``data`` short by at least one byte."""
    return data[: draw(st.integers(0, max(0, len(data) - 1)))]


def _flip(draw: st.DrawFn, data: bytes) -> bytes:
    """Flip one bit of ``data`` (unchanged if it is empty)."""
    if not data:
        return data
    position = draw(_positions(len(data) - 1))
    bit = draw(st.integers(0, 7))
    return data[:position] + bytes([data[position] ^ (1 << bit)]) + data[position + 1 :]


def _overwrite(draw: st.DrawFn, data: bytes) -> bytes:
    """Write one to four arbitrary bytes over ``data`` somewhere (possibly past its end)."""
    position = draw(_positions(len(data)))
    junk = draw(st.binary(min_size=1, max_size=4))
    return data[:position] + junk + data[position + len(junk) :]


_MUTATIONS: tuple[Callable[[st.DrawFn, bytes], bytes], ...] = (_truncate, _flip, _overwrite)


@st.composite
def mutated_messages(draw: st.DrawFn, strategy: st.SearchStrategy[bytes] | None = None) -> bytes:
    """
    A valid encoding (by default of any message) cut short, bit-flipped or overwritten.

    One to three mutations are applied, so the result is usually near a valid
    message and reaches the argument decoders' checks, not just the header's.
    """
    data = draw(strategy if strategy is not None else bytes_of_header())
    for _ in range(draw(st.integers(1, 3))):
        data = draw(st.sampled_from(_MUTATIONS))(draw, data)
    return data


#: Any Ethernet II frame: any addresses, EtherType and payload.
ethernet_frames = st.builds(
    EthernetFrame, dst=macs, src=macs, ethertype=uint16, payload=st.binary(max_size=128)
)

#: Ethernet frames with EtherType 0x88A2 carrying an encoded AoE message.
aoe_frames = st.builds(
    EthernetFrame, dst=macs, src=macs, ethertype=st.just(ETHERTYPE), payload=bytes_of_header()
)
