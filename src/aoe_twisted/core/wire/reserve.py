# -*- test-case-name: tests.test_wire -*-
"""The argument of Command 3, Reserve/Release (AoEr11 section 3.4)."""

from __future__ import annotations

import struct

from attrs import field, frozen

from aoe_twisted.core.wire.constants import Error
from aoe_twisted.core.wire.errors import FrameTooShort, ProtocolError

__all__ = ["RESERVE_ARG_SIZE", "ReserveReleaseArg"]

#  0     1       2..
# +-----+-------+--------------------------+
# | RCmd| NMACs | NMACs MAC addresses (6 B) |
# +-----+-------+--------------------------+
_RESERVE = struct.Struct("!BB")
RESERVE_ARG_SIZE = _RESERVE.size


@frozen
class ReserveReleaseArg:
    """A reserve list read or change (request), or the reserve list (response)."""

    command: int = 0
    nmacs: int = 0
    macs: tuple[bytes, ...] = field(default=(), converter=tuple)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> ReserveReleaseArg:
        """Decode the argument and its ``nmacs`` MACs; Ethernet padding after them is ignored."""
        if len(data) < RESERVE_ARG_SIZE:
            raise FrameTooShort(f"reserve argument of {len(data)} bytes, needs 2")
        command, nmacs = _RESERVE.unpack_from(data)
        end = RESERVE_ARG_SIZE + 6 * nmacs
        if len(data) < end:
            raise FrameTooShort(f"{nmacs} MACs need {end} bytes, {len(data)} present")
        macs = tuple(bytes(data[i : i + 6]) for i in range(RESERVE_ARG_SIZE, end, 6))
        return cls(command, nmacs, macs)

    def to_bytes(self) -> bytes:
        """Encode the argument; ``nmacs`` must match the list and every MAC be 6 bytes."""
        if self.nmacs != len(self.macs):
            raise ProtocolError(Error.BAD_ARGUMENT_PARAMETER, "nmacs disagrees with the MAC list")
        if any(len(mac) != 6 for mac in self.macs):
            raise ProtocolError(Error.BAD_ARGUMENT_PARAMETER, "a reserve MAC is not 6 bytes")
        try:
            head = _RESERVE.pack(self.command, self.nmacs)
        except struct.error as e:
            raise ProtocolError(Error.BAD_ARGUMENT_PARAMETER, f"reserve argument: {e}") from None
        return head + b"".join(self.macs)
