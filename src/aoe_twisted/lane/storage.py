# -*- test-case-name: tests.test_lane -*-
"""Where a disk's bytes are, for the compiled data lane: ``LaneStorage``."""

from __future__ import annotations

import os
from typing import Any

from attrs import evolve, frozen

__all__ = ["MAPPED_WRITES_VARIABLE", "LaneStorage", "mapped_writes", "sliced"]

MAPPED_WRITES_VARIABLE = "AOE_TWISTED_MAPPED_WRITES"
"""The environment variable that, set to ``0``, has the lane write files and devices with pwrite."""


def mapped_writes() -> bool:
    """
    Whether the compiled lane writes file and block disks through a mapping of them.

    Yes unless ``AOE_TWISTED_MAPPED_WRITES=0``: then with ``pwrite``, as
    before.  Read when a disk is opened (``FDBackend.mappable``).
    """
    return os.environ.get(MAPPED_WRITES_VARIABLE, "").strip() != "0"


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

    ``mapped``, with a writable ``fd`` that is not ``direct``: the lane may
    write the disk through a shared mapping of the descriptor, which it
    makes itself (one copy from the ring into the page cache, no system
    call), instead of ``pwrite``; it still reads with ``pread``.  A copy that
    faults (``SIGBUS``: the file was truncated, no space left, an I/O error)
    is done again with ``pwrite``, which gives the errno.
    """

    fd: int = -1
    buffer: Any = None
    offset: int = 0
    direct: bool = False
    alignment: int = 512
    mapped: bool = False

    def __attrs_post_init__(self) -> None:
        if (self.fd < 0) == (self.buffer is None):
            raise ValueError("a LaneStorage has a descriptor or a buffer, and only one")
        if self.offset < 0:
            raise ValueError(f"a LaneStorage offset must not be negative, not {self.offset}")
        if self.mapped and (self.fd < 0 or self.direct):
            raise ValueError("only a descriptor that is not O_DIRECT is written through a mapping")


def sliced(storage: LaneStorage, offset: int) -> LaneStorage:
    """Return ``storage`` seen from its byte ``offset``: a slice's storage."""
    return evolve(storage, offset=storage.offset + offset)
