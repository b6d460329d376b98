# -*- test-case-name: tests.test_wire -*-
"""The argument of Command 0, Issue ATA Command (AoEr11 section 3.1)."""

from __future__ import annotations

import struct

from attrs import frozen

from aoe_twisted.core.wire.constants import ATAFlag, Error
from aoe_twisted.core.wire.errors import FrameTooShort, ProtocolError

__all__ = ["ATA_ARG_SIZE", "ATAArg"]

#  0        1            2             3           4..9          10..11
# +--------+------------+-------------+-----------+-------------+----------+------
# | AFlags | Err/Feature| Sector Count| Cmd/Status| LBA0..LBA5  | reserved | data
# +--------+------------+-------------+-----------+-------------+----------+------
# AFlags: 0x40 E (LBA48 extended), 0x10 D (device/head), 0x02 A (async), 0x01 W (write)
# LBA is little-endian: LBA0 is the least significant byte.
_ATA = struct.Struct("<BBBB6sH")
ATA_ARG_SIZE = _ATA.size
_LBA_MAX = (1 << 48) - 1
# The AFlags bits as plain ints: ``int & IntFlag`` and ``IntFlag | IntFlag``
# run Python-level operators, and these run for every ATA message.
_E = int(ATAFlag.LBA48_EXTENDED)
_DEVICE_HEAD = int(ATAFlag.DEVICE_HEAD)
_ASYNC = int(ATAFlag.ASYNCHRONOUS)
_W = int(ATAFlag.WRITE)


@frozen
class ATAArg:
    """An ATA command (request) or its status (response), with the sectors it carries."""

    flag_lba48_extended: bool = False
    flag_ata_device_head_register: bool = False
    flag_asynchronous: bool = False
    flag_write: bool = False
    err_feature: int = 0
    sector_count: int = 0
    cmd_status: int = 0
    lba: int = 0
    data: bytes = b""

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> ATAArg:
        """Decode an ATA argument; ``data`` is every byte after the 12-byte argument."""
        if len(data) < ATA_ARG_SIZE:
            raise FrameTooShort(f"ATA argument of {len(data)} bytes, needs {ATA_ARG_SIZE}")
        aflags, err, count, cmd, lba, reserved = _ATA.unpack_from(data)
        if reserved:
            raise ProtocolError(Error.BAD_ARGUMENT_PARAMETER, "ATA reserved bytes are not zero")
        return cls(
            bool(aflags & _E),
            bool(aflags & _DEVICE_HEAD),
            bool(aflags & _ASYNC),
            bool(aflags & _W),
            err,
            count,
            cmd,
            int.from_bytes(lba, "little"),
            bytes(data[ATA_ARG_SIZE:]),
        )

    @property
    def aflags(self) -> int:
        """The AFlags byte these flags encode to."""
        return (
            (_E if self.flag_lba48_extended else 0)
            | (_DEVICE_HEAD if self.flag_ata_device_head_register else 0)
            | (_ASYNC if self.flag_asynchronous else 0)
            | (_W if self.flag_write else 0)
        )

    def to_bytes(self) -> bytes:
        """Encode the argument followed by its data."""
        if not 0 <= self.lba <= _LBA_MAX:
            raise ProtocolError(Error.BAD_ARGUMENT_PARAMETER, "LBA does not fit in 48 bits")
        try:
            head = _ATA.pack(
                self.aflags,
                self.err_feature,
                self.sector_count,
                self.cmd_status,
                self.lba.to_bytes(6, "little"),
                0,
            )
        except struct.error as e:
            raise ProtocolError(Error.BAD_ARGUMENT_PARAMETER, f"ATA argument: {e}") from None
        return head + self.data
