# -*- test-case-name: tests.test_wire -*-
"""AoEr11 constants and enumerations, named as in the seed API."""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "BROADCAST_MAJOR",
    "BROADCAST_MINOR",
    "ETHERTYPE",
    "MAX_CONFIG_STRING",
    "SECTOR_SIZE",
    "VERSION",
    "ATACmdStatus",
    "ATAError",
    "ATAFlag",
    "Command",
    "ConfigCommand",
    "DirectiveCommand",
    "Error",
    "MACMaskCommand",
    "MACMaskError",
    "ReserveReleaseCommand",
]

#: The AoE protocol version this package speaks.
VERSION = 1
#: The registered EtherType of ATA over Ethernet.
ETHERTYPE = 0x88A2
#: Wildcard shelf (major) address: every shelf.
BROADCAST_MAJOR = 0xFFFF
#: Wildcard slot (minor) address: every slot.
BROADCAST_MINOR = 0xFF
#: AoE sectors are always 512 bytes (AoEr11 section 3).
SECTOR_SIZE = 512
#: The longest config string AoEr11 section 3.2 allows.
MAX_CONFIG_STRING = 1024


class Command(IntEnum):
    """The AoE command in a header (AoEr11 section 2)."""

    ISSUE_ATA_COMMAND = 0
    QUERY_CONFIG_INFORMATION = 1
    MAC_MASK_LIST = 2
    RESERVE_RELEASE = 3


class Error(IntEnum):
    """The AoE error codes a response can carry with the E flag (AoEr11 section 2.4)."""

    UNRECOGNIZED_COMMAND_CODE = 1
    BAD_ARGUMENT_PARAMETER = 2
    DEVICE_UNAVAILABLE = 3
    CONFIG_STRING_PRESENT = 4
    UNSUPPORTED_VERSION = 5
    TARGET_IS_RESERVED = 6


class ConfigCommand(IntEnum):
    """The sub-command of a Query Config Information request (AoEr11 section 3.2)."""

    READ = 0
    TEST = 1
    TEST_PREFIX = 2
    SET = 3
    FORCE_SET = 4


class MACMaskCommand(IntEnum):
    """The sub-command of a MAC Mask List request (AoEr11 section 3.3)."""

    READ = 0
    EDIT = 1


class MACMaskError(IntEnum):
    """Why a MAC Mask List edit stopped (AoEr11 section 3.3); 0 means no error."""

    UNSPECIFIED = 1
    BAD_COMMAND = 2
    LIST_FULL = 3


class DirectiveCommand(IntEnum):
    """What one directive of a MAC Mask List edit does."""

    NONE = 0
    ADD = 1
    DELETE = 2


class ReserveReleaseCommand(IntEnum):
    """The sub-command of a Reserve/Release request (AoEr11 section 3.4)."""

    READ = 0
    SET = 1
    FORCE_SET = 2


class ATACmdStatus(IntEnum):
    """ATA commands a target serves, and the status bits it answers with."""

    ERR_STATUS = 0x01
    READY_STATUS = 0x40
    READ_28BIT = 0x20
    READ_48BIT = 0x24
    WRITE_28BIT = 0x30
    WRITE_48BIT = 0x34
    CHECK_POWER = 0xE5
    FLUSH = 0xE7
    FLUSH_EXT = 0xEA
    IDENTIFY = 0xEC


class ATAError(IntEnum):
    """Bits of the ATA error register carried in ``ATAArg.err_feature`` of a reply."""

    ABRT = 0x04
    IDNF = 0x10
    UNC = 0x40


class ATAFlag(IntEnum):
    """Bits of the ATA argument's AFlags byte (AoEr11 section 3.1)."""

    WRITE = 0x01
    ASYNCHRONOUS = 0x02
    DEVICE_HEAD = 0x10
    LBA48_EXTENDED = 0x40
