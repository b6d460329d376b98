# -*- test-case-name: tests.test_wire -*-
"""
The AoEr11 wire codec: bytes to messages and back, with no I/O.

Every message class is a frozen attrs class with ``to_bytes()`` and a
classmethod ``from_bytes(data)``.  Decoding raises only ``WireError``:
``FrameTooShort`` (drop the frame) or ``ProtocolError`` (answer with its
``code``).
"""

from aoe_twisted.core.wire.ata import ATA_ARG_SIZE, ATAArg
from aoe_twisted.core.wire.config import CONFIG_ARG_SIZE, ConfigArg
from aoe_twisted.core.wire.constants import (
    BROADCAST_MAJOR,
    BROADCAST_MINOR,
    ETHERTYPE,
    MAX_CONFIG_STRING,
    SECTOR_SIZE,
    VERSION,
    ATACmdStatus,
    ATAError,
    ATAFlag,
    Command,
    ConfigCommand,
    DirectiveCommand,
    Error,
    MACMaskCommand,
    MACMaskError,
    ReserveReleaseCommand,
)
from aoe_twisted.core.wire.errors import FrameTooShort, ProtocolError, WireError
from aoe_twisted.core.wire.ethernet import (
    BROADCAST_MAC,
    ETHERNET_HEADER_SIZE,
    MIN_FRAME_SIZE,
    EthernetFrame,
    format_mac,
    join_frame,
    parse_mac,
    split_frame,
)
from aoe_twisted.core.wire.header import HEADER_SIZE, Arg, Header, RawArg
from aoe_twisted.core.wire.macmask import DIRECTIVE_SIZE, MACMASK_ARG_SIZE, Directive, MACMaskArg
from aoe_twisted.core.wire.reserve import RESERVE_ARG_SIZE, ReserveReleaseArg

__all__ = [
    "ATA_ARG_SIZE",
    "BROADCAST_MAC",
    "BROADCAST_MAJOR",
    "BROADCAST_MINOR",
    "CONFIG_ARG_SIZE",
    "DIRECTIVE_SIZE",
    "ETHERNET_HEADER_SIZE",
    "ETHERTYPE",
    "HEADER_SIZE",
    "MACMASK_ARG_SIZE",
    "MAX_CONFIG_STRING",
    "MIN_FRAME_SIZE",
    "RESERVE_ARG_SIZE",
    "SECTOR_SIZE",
    "VERSION",
    "ATAArg",
    "ATACmdStatus",
    "ATAError",
    "ATAFlag",
    "Arg",
    "Command",
    "ConfigArg",
    "ConfigCommand",
    "Directive",
    "DirectiveCommand",
    "Error",
    "EthernetFrame",
    "FrameTooShort",
    "Header",
    "MACMaskArg",
    "MACMaskCommand",
    "MACMaskError",
    "ProtocolError",
    "RawArg",
    "ReserveReleaseArg",
    "ReserveReleaseCommand",
    "WireError",
    "format_mac",
    "join_frame",
    "parse_mac",
    "split_frame",
]
