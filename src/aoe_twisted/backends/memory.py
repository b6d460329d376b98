# -*- test-case-name: tests.test_backends -*-
"""``memory:SIZE``: a disk held in a ``bytearray``, lost when the target stops."""

from __future__ import annotations

import errno
import os

from attrs import define, field
from zope.interface import implementer

from aoe_twisted.backends._range import check_range
from aoe_twisted.backends.shared_memory import SharedMemoryBackend
from aoe_twisted.errors import BackendSpecError
from aoe_twisted.interfaces import (
    IDataSyncBackend,
    ILaneBackend,
    IProcessShareableBackend,
    IZeroCopyBackend,
)
from aoe_twisted.lane.storage import LaneStorage
from aoe_twisted.units import check_disk_size

__all__ = ["MemoryBackend"]


@implementer(IZeroCopyBackend, ILaneBackend, IDataSyncBackend, IProcessShareableBackend)
@define
class MemoryBackend:
    """
    A disk of ``size`` bytes in memory, all zeros at first.

    Reads copy once (into the returned ``bytes``); writes copy straight into
    the buffer through a ``memoryview``.  ``share`` moves the disk into a
    ``SharedMemoryBackend``, which ``--workers`` serves from every process.
    """

    size: int = field()
    read_only: bool = False
    _view: memoryview = field(init=False, repr=False)

    @size.validator
    def _check_size(self, attribute: object, size: int) -> None:
        check_disk_size(size, "memory disk")

    def __attrs_post_init__(self) -> None:
        try:
            buffer = bytearray(self.size)
        except MemoryError:
            raise BackendSpecError(f"memory disk: cannot allocate {self.size} bytes") from None
        self._view = memoryview(buffer)

    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` bytes from byte ``offset``."""
        check_range(offset, length, self.size)
        return self._view[offset : offset + length].tobytes()

    def read_into(self, offset: int, view: memoryview) -> int:
        """
        Copy ``len(view)`` bytes from byte ``offset`` into ``view``; return how many.

        The zero-copy read of the fast path (into a TX ring slot).
        ``IZeroCopyBackend`` also promises that ``write`` takes any
        bytes-like object and keeps no reference to it: it copies.
        """
        length = len(view)
        check_range(offset, length, self.size)
        view[:length] = self._view[offset : offset + length]
        return length

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """
        Copy ``data`` to byte ``offset``; no reference to it is kept.

        @raise OSError: ``EROFS`` if the disk is read-only.
        """
        if self.read_only:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), "memory disk")
        check_range(offset, len(data), self.size)
        self._view[offset : offset + len(data)] = data

    def lane_storage(self) -> LaneStorage:
        """``ILaneBackend``: the ``bytearray`` itself (not the view ``close`` releases)."""
        return LaneStorage(buffer=self._view.obj)

    def flush(self) -> None:
        """Do nothing: memory is as durable as this disk gets."""

    def sync_data(self) -> None:
        """Do nothing, as ``flush``: ``--sync`` costs a memory disk nothing."""

    def share(self) -> SharedMemoryBackend:
        """
        Move this disk into shared memory: return a ``SharedMemoryBackend``
        with its size, contents and read-only flag, and close this one.

        Other processes reach the new disk through its descriptor
        (``IDescriptorBackend``).  If it cannot be made this disk stays open
        and the error (``BackendSpecError``) propagates.
        """
        shared = SharedMemoryBackend.create(self.size, self.read_only, contents=self._view)
        self.close()
        return shared

    def close(self) -> None:
        """Release the buffer; reads and writes fail afterwards."""
        self._view.release()
