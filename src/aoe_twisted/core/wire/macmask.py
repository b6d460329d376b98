# -*- test-case-name: tests.test_wire -*-
"""The argument of Command 2, MAC Mask List, and its directives (AoEr11 section 3.3)."""

from __future__ import annotations

import struct

from attrs import field, frozen

from aoe_twisted.core.wire.constants import Error
from aoe_twisted.core.wire.errors import FrameTooShort, ProtocolError

__all__ = ["DIRECTIVE_SIZE", "MACMASK_ARG_SIZE", "Directive", "MACMaskArg"]

#  0         1      2       3          4..
# +---------+------+-------+----------+----------------------------------------+
# | reserved| MCmd | MError| Dir Count| Dir Count directives of 8 bytes each   |
# +---------+------+-------+----------+----------------------------------------+
# a directive: reserved(1) DCmd(1) MAC(6)
_MACMASK = struct.Struct("!BBBB")
MACMASK_ARG_SIZE = _MACMASK.size
_DIRECTIVE = struct.Struct("!BB6s")
DIRECTIVE_SIZE = _DIRECTIVE.size


@frozen
class Directive:
    """One entry of a MAC mask list edit: add, delete or nothing, for one MAC."""

    command: int = 0
    mac: bytes = bytes(6)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Directive:
        """Decode exactly one 8-byte directive."""
        if len(data) != DIRECTIVE_SIZE:
            raise FrameTooShort(f"directive of {len(data)} bytes, needs exactly 8")
        reserved, command, mac = _DIRECTIVE.unpack(data)
        if reserved:
            raise ProtocolError(Error.BAD_ARGUMENT_PARAMETER, "directive reserved byte not zero")
        return cls(command, mac)

    def to_bytes(self) -> bytes:
        """Encode the directive; the MAC must be 6 bytes."""
        if len(self.mac) != 6:
            raise ProtocolError(Error.BAD_ARGUMENT_PARAMETER, "directive MAC is not 6 bytes")
        try:
            return _DIRECTIVE.pack(0, self.command, self.mac)
        except struct.error as e:
            raise ProtocolError(Error.BAD_ARGUMENT_PARAMETER, f"directive: {e}") from None


@frozen
class MACMaskArg:
    """A mask list read or edit (request), or the list or the failed edit (response)."""

    command: int = 0
    error: int = 0
    dir_count: int = 0
    directives: tuple[Directive, ...] = field(default=(), converter=tuple)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> MACMaskArg:
        """Decode the argument and its ``dir_count`` directives; trailing bytes are ignored."""
        if len(data) < MACMASK_ARG_SIZE:
            raise FrameTooShort(f"MAC mask argument of {len(data)} bytes, needs 4")
        reserved, command, error, count = _MACMASK.unpack_from(data)
        if reserved:
            raise ProtocolError(Error.BAD_ARGUMENT_PARAMETER, "MAC mask reserved byte not zero")
        end = MACMASK_ARG_SIZE + count * DIRECTIVE_SIZE
        if len(data) < end:
            raise FrameTooShort(f"{count} directives need {end} bytes, {len(data)} present")
        directives = tuple(
            Directive.from_bytes(data[i : i + DIRECTIVE_SIZE])
            for i in range(MACMASK_ARG_SIZE, end, DIRECTIVE_SIZE)
        )
        return cls(command, error, count, directives)

    def to_bytes(self) -> bytes:
        """Encode the argument; ``dir_count`` must match the directives."""
        if self.dir_count != len(self.directives):
            raise ProtocolError(Error.BAD_ARGUMENT_PARAMETER, "dir_count disagrees with directives")
        try:
            head = _MACMASK.pack(0, self.command, self.error, self.dir_count)
        except struct.error as e:
            raise ProtocolError(Error.BAD_ARGUMENT_PARAMETER, f"MAC mask argument: {e}") from None
        return head + b"".join(d.to_bytes() for d in self.directives)
