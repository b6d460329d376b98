# -*- test-case-name: tests.test_wire -*-
"""The argument of Command 1, Query Config Information (AoEr11 section 3.2)."""

from __future__ import annotations

import struct

from attrs import frozen

from aoe_twisted.core.wire.constants import MAX_CONFIG_STRING, Error
from aoe_twisted.core.wire.errors import FrameTooShort, ProtocolError

__all__ = ["CONFIG_ARG_SIZE", "ConfigArg"]

#  0..1          2..3              4             5              6..7           8..
# +-------------+-----------------+-------------+--------------+--------------+--------
# | Buffer Count| Firmware Version| Sector Count| AoE Ver| CCmd| String Length| String
# +-------------+-----------------+-------------+--------------+--------------+--------
# big-endian; AoE Ver is the high nibble of byte 5, CCmd the low nibble.
_CONFIG = struct.Struct("!HHBBH")
CONFIG_ARG_SIZE = _CONFIG.size


@frozen
class ConfigArg:
    """A config query (request) or a target's configuration (response)."""

    buffer_count: int = 0
    firmware_version: int = 0
    sector_count: int = 0
    version: int = 0
    command: int = 0
    string_length: int = 0
    string: bytes = b""

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> ConfigArg:
        """Decode a config argument; bytes after the config string are padding and ignored."""
        if len(data) < CONFIG_ARG_SIZE:
            raise FrameTooShort(f"config argument of {len(data)} bytes, needs {CONFIG_ARG_SIZE}")
        bufcnt, firmware, sectors, vercmd, length = _CONFIG.unpack_from(data)
        if length > MAX_CONFIG_STRING:
            raise ProtocolError(
                Error.BAD_ARGUMENT_PARAMETER, f"config string of {length} bytes, over 1024"
            )
        end = CONFIG_ARG_SIZE + length
        if len(data) < end:
            raise FrameTooShort(f"config string of {length} bytes, {len(data) - 8} present")
        return cls(
            bufcnt, firmware, sectors, vercmd >> 4, vercmd & 0xF, length,
            bytes(data[CONFIG_ARG_SIZE:end]),
        )

    def to_bytes(self) -> bytes:
        """Encode the argument; the length and 4-bit fields are checked, not trusted."""
        if not 0 <= self.command <= 0xF or not 0 <= self.version <= 0xF:
            raise ProtocolError(Error.BAD_ARGUMENT_PARAMETER, "config version/command over 4 bits")
        if self.string_length != len(self.string):
            raise ProtocolError(
                Error.BAD_ARGUMENT_PARAMETER, "string_length disagrees with the config string"
            )
        if self.string_length > MAX_CONFIG_STRING:
            raise ProtocolError(Error.BAD_ARGUMENT_PARAMETER, "config string over 1024 bytes")
        try:
            head = _CONFIG.pack(
                self.buffer_count,
                self.firmware_version,
                self.sector_count,
                self.version << 4 | self.command,
                self.string_length,
            )
        except struct.error as e:
            raise ProtocolError(Error.BAD_ARGUMENT_PARAMETER, f"config argument: {e}") from None
        return head + self.string
