# -*- test-case-name: tests.test_wire -*-
"""Ethernet II framing, so the layers above never slice frames by hand."""

from __future__ import annotations

import struct

from attrs import frozen

from aoe_twisted.core.wire.errors import FrameTooShort, WireError

__all__ = [
    "BROADCAST_MAC",
    "ETHERNET_HEADER_SIZE",
    "MIN_FRAME_SIZE",
    "EthernetFrame",
    "format_mac",
    "join_frame",
    "parse_mac",
    "split_frame",
]

#: dst(6) src(6) ethertype(2)
_ETHERNET = struct.Struct("!6s6sH")
ETHERNET_HEADER_SIZE = _ETHERNET.size
#: The Ethernet minimum frame size without the FCS; shorter frames are padded.
MIN_FRAME_SIZE = 60
BROADCAST_MAC = b"\xff" * 6


def format_mac(mac: bytes) -> str:
    """Return ``mac`` as ``aa:bb:cc:dd:ee:ff``."""
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    """
    Parse a MAC address written with colons, dashes or no separators.

    Raise ``ValueError`` naming the text if it is not six hex bytes.
    """
    digits = text.replace(":", "").replace("-", "").replace(".", "")
    if len(digits) != 12:
        raise ValueError(f"not a MAC address: {text!r}")
    try:
        return bytes.fromhex(digits)
    except ValueError:
        raise ValueError(f"not a MAC address: {text!r}") from None


@frozen
class EthernetFrame:
    """An Ethernet II frame: destination, source, EtherType and payload (without FCS)."""

    dst: bytes
    src: bytes
    ethertype: int
    payload: bytes

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> EthernetFrame:
        """Decode a frame; any padding stays in ``payload`` for the message codec to ignore."""
        return cls(*split_frame(data))

    def to_bytes(self, pad: bool = False) -> bytes:
        """Encode the frame; with ``pad``, fill it with zeros to the 60-byte Ethernet minimum."""
        return join_frame(self.dst, self.src, self.ethertype, self.payload, pad)


def split_frame(data: bytes | bytearray | memoryview) -> tuple[bytes, bytes, int, bytes]:
    """
    Return a frame's ``(dst, src, ethertype, payload)``, as ``EthernetFrame`` holds them.

    The function behind ``EthernetFrame.from_bytes``, for the per-frame path
    that needs the fields but not an object.  ``payload`` is a copy (any
    padding included).

    @raise FrameTooShort: if ``data`` is shorter than the 14-byte header.
    """
    if len(data) < ETHERNET_HEADER_SIZE:
        raise FrameTooShort(f"Ethernet frame of {len(data)} bytes")
    dst, src, ethertype = _ETHERNET.unpack_from(data)
    return dst, src, ethertype, bytes(data[ETHERNET_HEADER_SIZE:])


def join_frame(
    dst: bytes, src: bytes, ethertype: int, payload: bytes, pad: bool = False
) -> bytes:
    """
    Return the frame of these fields; with ``pad``, zero-filled to the 60-byte minimum.

    The function behind ``EthernetFrame.to_bytes``.

    @raise WireError: if a MAC address is not 6 bytes or ``ethertype`` does not fit.
    """
    if len(dst) != 6 or len(src) != 6:
        raise WireError("a MAC address must be 6 bytes")
    try:
        frame = _ETHERNET.pack(dst, src, ethertype) + payload
    except struct.error as e:
        raise WireError(f"cannot encode Ethernet frame: {e}") from None
    if pad and len(frame) < MIN_FRAME_SIZE:
        frame += bytes(MIN_FRAME_SIZE - len(frame))
    return frame
