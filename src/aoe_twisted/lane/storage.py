# -*- test-case-name: tests.test_lane -*-
"""Where a disk's bytes are, for the compiled data lane: ``LaneStorage``."""

from __future__ import annotations

import os
from typing import Any

from attrs import evolve, frozen

__all__ = ["LANE_IO_VARIABLE", "LaneStorage", "mapped_io", "sliced"]

LANE_IO_VARIABLE = "AOE_TWISTED_LANE_IO"
"""The environment variable that, set to ``pread``, keeps disks from being mapped for the lane."""


def mapped_io() -> bool:
    """
    Whether file and block disks are mapped into memory for the compiled lane.

    Yes unless ``AOE_TWISTED_LANE_IO=pread``: then the lane reads and writes
    them with ``pread``/``pwrite``, as before mapped I/O.
    """
    return os.environ.get(LANE_IO_VARIABLE, "").strip().lower() != "pread"


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

    ``mapping``, with ``fd`` (never ``direct``), is a writable shared
    mapping of that descriptor from its byte 0 (an ``mmap.mmap``): the lane
    then copies between the ring and the page cache through it, with no
    system call per request, instead of ``pread``/``pwrite``.  Each copy is
    guarded: where the file no longer has the bytes (it was truncated) or
    the kernel cannot give them (an I/O error, no space left), the request
    fails with ``EIO`` as a failed ``pread``/``pwrite`` would, and the
    process goes on.  The mapping must hold ``offset`` plus the disk's size.
    """

    fd: int = -1
    buffer: Any = None
    offset: int = 0
    direct: bool = False
    alignment: int = 512
    mapping: Any = None

    def __attrs_post_init__(self) -> None:
        if (self.fd < 0) == (self.buffer is None):
            raise ValueError("a LaneStorage has a descriptor or a buffer, and only one")
        if self.offset < 0:
            raise ValueError(f"a LaneStorage offset must not be negative, not {self.offset}")
        if self.mapping is not None and (self.fd < 0 or self.direct):
            raise ValueError("a LaneStorage mapping maps its descriptor, which is not O_DIRECT")


def sliced(storage: LaneStorage, offset: int) -> LaneStorage:
    """Return ``storage`` seen from its byte ``offset``: a slice's storage."""
    return evolve(storage, offset=storage.offset + offset)
