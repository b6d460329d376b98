# -*- test-case-name: tests.test_wire -*-
"""The AoE header (AoEr11 section 2), which picks its argument's codec from the command."""

from __future__ import annotations

import struct
from typing import TypeAlias

from attrs import frozen

from aoe_twisted.core.wire.ata import ATAArg
from aoe_twisted.core.wire.config import ConfigArg
from aoe_twisted.core.wire.constants import VERSION, Command, Error
from aoe_twisted.core.wire.errors import FrameTooShort, ProtocolError, WireError
from aoe_twisted.core.wire.macmask import MACMaskArg
from aoe_twisted.core.wire.reserve import ReserveReleaseArg

__all__ = ["HEADER_SIZE", "Arg", "Header", "RawArg"]

#  0           1      2..3   4      5        6..9  10..
# +-----+-----+------+------+------+--------+-----+-----
# | Ver |Flags| Error| Major| Minor| Command| Tag | Arg
# +-----+-----+------+------+------+--------+-----+-----
# Ver is the high nibble of byte 0; flags R=0x08 (response), E=0x04 (error).
_HEADER = struct.Struct("!BBHBB4s")
HEADER_SIZE = _HEADER.size
_FLAG_RESPONSE = 0x08
_FLAG_ERROR = 0x04


@frozen
class RawArg:
    """An argument kept as bytes: of a message that failed to decode, or echoed in an error."""

    data: bytes = b""

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> RawArg:
        """Keep ``data`` as it is."""
        return cls(bytes(data))

    def to_bytes(self) -> bytes:
        """Return the bytes unchanged."""
        return self.data


Arg: TypeAlias = ATAArg | ConfigArg | MACMaskArg | ReserveReleaseArg | RawArg

_ARG_CODECS: dict[int, type[ATAArg | ConfigArg | MACMaskArg | ReserveReleaseArg]] = {
    Command.ISSUE_ATA_COMMAND: ATAArg,
    Command.QUERY_CONFIG_INFORMATION: ConfigArg,
    Command.MAC_MASK_LIST: MACMaskArg,
    Command.RESERVE_RELEASE: ReserveReleaseArg,
}
#: Each known command's enum member, looked up instead of calling ``Command`` per message.
_COMMANDS = {int(command): command for command in Command}


@frozen
class Header:
    """An AoE message: the header and the argument its command calls for."""

    version: int = VERSION
    flag_response: bool = False
    flag_error: bool = False
    error: int = 0
    major: int = 0
    minor: int = 0
    command: int = Command.ISSUE_ATA_COMMAND
    tag: bytes = bytes(4)
    arg: Arg | None = None

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Header:
        """
        Decode a message, ignoring padding after it.

        Raise ``FrameTooShort`` if bytes are missing, ``ProtocolError`` (carrying
        what was decoded) for a wrong version, an unknown command or a bad
        argument.  An error response (R and E set) whose argument does not
        decode keeps it raw, so an initiator can still read the error code.
        """
        if len(data) < HEADER_SIZE:
            raise FrameTooShort(f"AoE header of {len(data)} bytes, needs {HEADER_SIZE}")
        verflags, error, major, minor, command, tag = _HEADER.unpack_from(data)
        version = verflags >> 4
        flag_response = bool(verflags & _FLAG_RESPONSE)
        error_response = flag_response and bool(verflags & _FLAG_ERROR)
        body = data[HEADER_SIZE:]
        if version != VERSION:
            raise ProtocolError(
                Error.UNSUPPORTED_VERSION,
                f"AoE version {version}",
                cls._partial(verflags, error, major, minor, command, tag, body),
            )
        codec = _ARG_CODECS.get(command)
        if codec is None:
            raise ProtocolError(
                Error.UNRECOGNIZED_COMMAND_CODE,
                f"AoE command {command}",
                cls._partial(verflags, error, major, minor, command, tag, body),
            )
        try:
            arg: Arg = codec.from_bytes(body)
        except ProtocolError as e:
            if error_response:
                arg = RawArg(bytes(body))
            else:
                e.header = cls._partial(verflags, error, major, minor, command, tag, body)
                raise
        except WireError:
            if not error_response:
                raise
            arg = RawArg(bytes(body))
        return cls(
            version,
            flag_response,
            bool(verflags & _FLAG_ERROR),
            error,
            major,
            minor,
            _COMMANDS[command],
            tag,
            arg,
        )

    @classmethod
    def _partial(
        cls,
        verflags: int,
        error: int,
        major: int,
        minor: int,
        command: int,
        tag: bytes,
        body: bytes | bytearray | memoryview,
    ) -> Header:
        """Build the header of a message whose argument could not be decoded."""
        return cls(
            verflags >> 4,
            bool(verflags & _FLAG_RESPONSE),
            bool(verflags & _FLAG_ERROR),
            error,
            major,
            minor,
            command,
            tag,
            RawArg(bytes(body)),
        )

    def to_bytes(self) -> bytes:
        """Encode the message; the version must be 1 and an argument present."""
        if self.version != VERSION:
            raise ProtocolError(Error.UNSUPPORTED_VERSION, f"AoE version {self.version}")
        if self.arg is None:
            raise ProtocolError(Error.BAD_ARGUMENT_PARAMETER, "a message needs an argument")
        if len(self.tag) != 4:
            raise ProtocolError(Error.BAD_ARGUMENT_PARAMETER, "a tag is 4 bytes")
        verflags = (
            self.version << 4
            | (_FLAG_RESPONSE if self.flag_response else 0)
            | (_FLAG_ERROR if self.flag_error else 0)
        )
        try:
            head = _HEADER.pack(
                verflags, self.error, self.major, self.minor, self.command, self.tag
            )
        except struct.error as e:
            raise ProtocolError(Error.BAD_ARGUMENT_PARAMETER, f"AoE header: {e}") from None
        return head + self.arg.to_bytes()
