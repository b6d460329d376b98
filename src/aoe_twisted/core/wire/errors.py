# -*- test-case-name: tests.test_wire -*-
"""The codec's errors: a frame too short to decode, or one the protocol answers with an error."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aoe_twisted.core.wire.constants import Error

if TYPE_CHECKING:
    from aoe_twisted.core.wire.header import Header

__all__ = ["FrameTooShort", "ProtocolError", "WireError"]


class WireError(ValueError):
    """Bytes that are not a valid AoE message, or a message that cannot be encoded."""


class FrameTooShort(WireError):
    """Fewer bytes than the message needs (the seed's ``io.ErrUnexpectedEOF``); dropped."""


class ProtocolError(WireError):
    """
    A rule the protocol answers with an AoE ``Error``.

    ``code`` is that error.  When decoding got far enough to read the header,
    ``header`` is what was decoded, its argument kept raw (``RawArg``), so a
    target can address an error reply (tag, shelf, slot, command) from it.
    """

    def __init__(self, code: Error, message: str, header: Header | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.header = header

    def __repr__(self) -> str:
        return f"ProtocolError({self.code.name}, {self.args[0]!r})"
