# -*- test-case-name: tests.test_lane -*-
"""Where a disk's bytes are, for the compiled data lane: ``LaneStorage``."""

from __future__ import annotations

from typing import Any

from attrs import evolve, frozen

__all__ = ["LaneStorage", "sliced"]


@frozen
class LaneStorage:
    """
    A disk's bytes as the compiled lane reaches them (``ILaneBackend.lane_storage``).

    Either ``fd`` (an open descriptor, read with ``pread`` and written with
    ``pwrite``) or ``buffer`` (a writable object with the buffer protocol,
    such as a ``bytearray``; never a ``memoryview`` the backend releases on
    close, which a held export would stop), and the disk's byte 0 at
    ``offset`` in it.  ``direct`` says the descriptor is ``O_DIRECT``:
    the lane then moves whole ``alignment``-byte blocks through an aligned
    buffer of its own, as ``FDBackend`` does.
    """

    fd: int = -1
    buffer: Any = None
    offset: int = 0
    direct: bool = False
    alignment: int = 512

    def __attrs_post_init__(self) -> None:
        if (self.fd < 0) == (self.buffer is None):
            raise ValueError("a LaneStorage has a descriptor or a buffer, and only one")
        if self.offset < 0:
            raise ValueError(f"a LaneStorage offset must not be negative, not {self.offset}")


def sliced(storage: LaneStorage, offset: int) -> LaneStorage:
    """Return ``storage`` seen from its byte ``offset``: a slice's storage."""
    return evolve(storage, offset=storage.offset + offset)
