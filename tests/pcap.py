"""
A tiny reader and writer for classic libpcap files, using only the standard library.

The golden-frame tests replay real captures stored under ``tests/data/``, and
later tests (target, dispatch, end-to-end) may want to record what our target
sends.  Only the classic format is handled (not pcapng): that is what the
captures are and what ``tcpdump -w`` writes by default.  Both byte orders and
both the microsecond and the nanosecond magic are read; files are written
little-endian with microsecond timestamps.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

from attrs import frozen

__all__ = [
    "LINKTYPE_ETHERNET",
    "PcapError",
    "PcapFile",
    "PcapRecord",
    "iter_records",
    "read_pcap",
    "write_pcap",
]

#: ``network`` value of Ethernet captures (LINKTYPE_ETHERNET, i.e. DLT_EN10MB).
LINKTYPE_ETHERNET = 1

_MAGIC_MICRO = 0xA1B2C3D4
_MAGIC_NANO = 0xA1B23C4D
# magic, version major, version minor, thiszone, sigfigs, snaplen, network
_GLOBAL_FIELDS = "IHHiIII"
# ts_sec, ts_frac (usec or nsec), incl_len, orig_len
_RECORD_FIELDS = "IIII"
_GLOBAL_SIZE = struct.calcsize("<" + _GLOBAL_FIELDS)
_RECORD_SIZE = struct.calcsize("<" + _RECORD_FIELDS)


class PcapError(ValueError):
    """The bytes are not a classic pcap file, or a record runs past its end."""


@frozen
class PcapRecord:
    """One captured packet: when, the bytes captured, and how long it was on the wire."""

    timestamp: float
    data: bytes
    orig_len: int

    @property
    def truncated(self) -> bool:
        """Whether the capture kept fewer bytes than the packet had (snaplen cut it)."""
        return len(self.data) < self.orig_len


@frozen
class PcapFile:
    """A whole capture: its link type, snap length and records, in file order."""

    linktype: int
    snaplen: int
    records: tuple[PcapRecord, ...]

    @property
    def frames(self) -> list[bytes]:
        """The captured bytes of every record, in order."""
        return [record.data for record in self.records]


def _global_header(data: bytes) -> tuple[str, int, int, int]:
    """Return the byte-order prefix, timestamp divisor, snaplen and link type of a capture."""
    if len(data) < _GLOBAL_SIZE:
        raise PcapError(f"pcap global header needs {_GLOBAL_SIZE} bytes, got {len(data)}")
    for order in ("<", ">"):
        (magic,) = struct.unpack_from(order + "I", data)
        if magic in (_MAGIC_MICRO, _MAGIC_NANO):
            break
    else:
        raise PcapError(f"not a classic pcap file (magic {data[:4].hex()})")
    _, _, _, _, _, snaplen, linktype = struct.unpack_from(order + _GLOBAL_FIELDS, data)
    divisor = 1_000_000 if magic == _MAGIC_MICRO else 1_000_000_000
    return order, divisor, snaplen, linktype


def iter_records(data: bytes) -> Iterator[PcapRecord]:
    """Yield the records of the capture held in ``data``; raise ``PcapError`` if it is cut short."""
    order, divisor, _, _ = _global_header(data)
    record = struct.Struct(order + _RECORD_FIELDS)
    offset = _GLOBAL_SIZE
    while offset < len(data):
        if len(data) - offset < _RECORD_SIZE:
            raise PcapError(f"record header cut short at offset {offset}")
        seconds, fraction, incl_len, orig_len = record.unpack_from(data, offset)
        offset += _RECORD_SIZE
        if len(data) - offset < incl_len:
            raise PcapError(f"record of {incl_len} bytes cut short at offset {offset}")
        yield PcapRecord(seconds + fraction / divisor, data[offset : offset + incl_len], orig_len)
        offset += incl_len


def read_pcap(path: str | Path) -> PcapFile:
    """Read the classic pcap file at ``path``."""
    data = Path(path).read_bytes()
    _, _, snaplen, linktype = _global_header(data)
    return PcapFile(linktype, snaplen, tuple(iter_records(data)))


def write_pcap(
    path: str | Path,
    frames: Iterable[bytes | PcapRecord],
    linktype: int = LINKTYPE_ETHERNET,
    snaplen: int = 262144,
) -> None:
    """
    Write ``frames`` as a little-endian, microsecond classic pcap file.

    Plain ``bytes`` get timestamp 0 and their own length as the wire length;
    ``PcapRecord``s keep theirs.
    """
    out = [struct.pack("<" + _GLOBAL_FIELDS, _MAGIC_MICRO, 2, 4, 0, 0, snaplen, linktype)]
    for frame in frames:
        record = frame if isinstance(frame, PcapRecord) else PcapRecord(0.0, frame, len(frame))
        seconds = int(record.timestamp)
        micros = round((record.timestamp - seconds) * 1_000_000)
        if micros == 1_000_000:
            seconds, micros = seconds + 1, 0
        out.append(
            struct.pack("<" + _RECORD_FIELDS, seconds, micros, len(record.data), record.orig_len)
        )
        out.append(record.data)
    Path(path).write_bytes(b"".join(out))
