# -*- test-case-name: tests.test_slice -*-
"""
Part of a disk served as a disk of its own: a target's ``offset`` and ``length``.

As ``vblade -o OFFSET -l LENGTH`` does, ``slice_backend(backend, offset,
length)`` serves ``length`` bytes of ``backend`` from byte ``offset``
(``length`` 0: to the end of the disk).  The slice is a disk in every way
the target can see: ``size`` is the slice's, so IDENTIFY reports its sector
count; every range is checked against the slice, so no request can touch a
byte outside it; and its identity (``IDiskIdentity``) is
``slice_identity(disk, offset, length)``, so two slices of one file are two
disks (different serials and world-wide names, never taken for two paths to
one disk) while the same slice served twice is one.

A ``SliceBackend`` has the abilities of the disk it slices, no more:
zero-copy reads and writes, ``sync_data``, an identity, a descriptor that
``--workers`` hands to its workers (``handoff`` carries the inner backend's
class and handoff, and ``adopt`` rebuilds both), or ``share`` for a memory
disk.  It declares them on itself when it is made (``alsoProvides``), so the
target's once-only ``providedBy`` checks see exactly what the inner backend
has.
"""

from __future__ import annotations

from typing import Any

from twisted.python.reflect import fullyQualifiedName, namedAny
from zope.interface import alsoProvides, implementer
from zope.interface.interface import InterfaceClass

from aoe_twisted.backends._range import check_range
from aoe_twisted.backends.identity import slice_identity
from aoe_twisted.errors import BackendSpecError
from aoe_twisted.interfaces import (
    IBlockBackend,
    IDataSyncBackend,
    IDescriptorBackend,
    IDiskIdentity,
    ILaneBackend,
    IProcessShareableBackend,
    IZeroCopyBackend,
)
from aoe_twisted.lane.storage import LaneStorage, sliced
from aoe_twisted.units import SECTOR_SIZE

__all__ = ["SliceBackend", "slice_backend"]

#: The optional abilities a slice has exactly when the disk it slices has them.
_FORWARDED: tuple[InterfaceClass, ...] = (
    IZeroCopyBackend,
    ILaneBackend,
    IDataSyncBackend,
    IDiskIdentity,
    IDescriptorBackend,
    IProcessShareableBackend,
)


def slice_backend(backend: IBlockBackend, offset: int, length: int) -> IBlockBackend:
    """
    Return ``length`` bytes of ``backend`` from byte ``offset`` as a disk of their own.

    ``length`` 0 means to the end of the disk.  The whole disk (``offset`` 0
    and ``length`` 0 or ``backend.size``) is ``backend`` itself; a slice of a
    ``SliceBackend`` is a slice of the disk under it, with the identity a
    slice of those same bytes made directly has.  The slice owns
    ``backend``: closing it closes ``backend``.

    @raise BackendSpecError: with a one-line message if ``offset`` or
        ``length`` is negative or not a whole number of 512-byte sectors,
        or the slice is empty or runs past the end of the disk.
    """
    size = _slice_length(backend.size, offset, length)
    if offset == 0 and size == backend.size:
        return backend
    if isinstance(backend, SliceBackend):
        return SliceBackend(backend.inner, backend.offset + offset, size)
    return SliceBackend(backend, offset, size)


def _slice_length(disk_size: int, offset: int, length: int) -> int:
    """
    Return the length in bytes of the slice ``offset``, ``length`` of a disk of ``disk_size`` bytes.

    ``length`` itself, or for ``length`` 0 the rest of the disk from ``offset``.

    @raise BackendSpecError: as ``slice_backend``.
    """
    for name, value in (("offset", offset), ("length", length)):
        if value < 0:
            raise BackendSpecError(f"{name} {value} is negative")
        if value % SECTOR_SIZE:
            raise BackendSpecError(
                f"{name} {value} is not a whole number of {SECTOR_SIZE}-byte sectors"
            )
    if length:
        if offset + length > disk_size:
            raise BackendSpecError(
                f"offset {offset} + length {length} is past the end of the disk ({disk_size} bytes)"
            )
        return length
    if offset > disk_size:
        raise BackendSpecError(f"offset {offset} is past the end of the disk ({disk_size} bytes)")
    if offset == disk_size:
        raise BackendSpecError(
            f"offset {offset} is the end of the disk ({disk_size} bytes): the slice is empty"
        )
    return disk_size - offset


@implementer(IBlockBackend)
class SliceBackend:
    """
    The ``size`` bytes of the disk ``inner`` from its byte ``offset``.

    Build it with ``slice_backend`` (which checks the slice and returns the
    whole disk as it is), or ``SliceBackend(inner, offset, length)``
    (``length`` 0: to the end), which checks it too.  Byte 0 of the slice is
    byte ``offset`` of ``inner``; a range that leaves the slice raises
    ``ValueError`` before ``inner`` is called, as every backend does.
    ``read_only`` is ``inner``'s, taken when the slice is made.

    The optional interfaces ``inner`` provides (``_FORWARDED``) are declared
    on this instance and forwarded to ``inner``; ``disk_identity`` is
    ``slice_identity`` of ``inner``'s, computed once.  The per-frame calls
    (``read``, ``read_into``, ``write``) cost one comparison, one addition
    and the inner call, bound when the slice is made.
    """

    def __init__(self, inner: IBlockBackend, offset: int, length: int = 0) -> None:
        """
        Slice ``inner``; see the class docstring.

        @raise TypeError: if ``inner`` does not provide ``IBlockBackend``.
        @raise BackendSpecError: as ``slice_backend``.
        """
        if not IBlockBackend.providedBy(inner):
            raise TypeError(f"a slice needs an IBlockBackend, not {inner!r}")
        self.size = _slice_length(inner.size, offset, length)
        self.inner = inner
        self.offset = offset
        self.read_only = inner.read_only
        self._read = inner.read
        self._write = inner.write
        provided = [interface for interface in _FORWARDED if interface.providedBy(inner)]
        if IZeroCopyBackend in provided:
            self._read_into = inner.read_into  # type: ignore[attr-defined]
        self._identity: bytes | None = None
        if IDiskIdentity in provided:
            identity = inner.disk_identity()  # type: ignore[attr-defined]
            if identity is not None:
                self._identity = slice_identity(identity, offset, self.size)
        alsoProvides(self, *provided)

    def __repr__(self) -> str:
        return f"SliceBackend({self.inner!r}, offset={self.offset}, length={self.size})"

    # -- IBlockBackend ---------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` bytes from byte ``offset`` of the slice."""
        if offset < 0 or length < 0 or offset + length > self.size:
            check_range(offset, length, self.size)  # raises the ValueError every backend does
        return self._read(self.offset + offset, length)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """
        Write ``data`` at byte ``offset`` of the slice.

        As ``inner.write``: with ``IZeroCopyBackend`` any bytes-like
        ``data``, of which no reference is kept (nor is one here).
        """
        if offset < 0 or offset + len(data) > self.size:
            check_range(offset, len(data), self.size)
        self._write(self.offset + offset, data)

    def flush(self) -> None:
        """Flush the whole inner disk: every completed write to the slice is durable."""
        self.inner.flush()

    def close(self) -> None:
        """Close the inner disk: the slice owns it."""
        self.inner.close()

    # -- forwarded when inner provides them --------------------------------

    def read_into(self, offset: int, view: memoryview) -> int:
        """``IZeroCopyBackend``: read ``len(view)`` bytes from byte ``offset`` into ``view``."""
        if offset < 0 or offset + len(view) > self.size:
            check_range(offset, len(view), self.size)
        return self._read_into(self.offset + offset, view)

    def lane_storage(self) -> LaneStorage:
        """``ILaneBackend``: the inner disk's storage, from the slice's first byte."""
        return sliced(self.inner.lane_storage(), self.offset)  # type: ignore[attr-defined]

    def sync_data(self) -> None:
        """``IDataSyncBackend``: the inner disk's ``sync_data``."""
        self.inner.sync_data()  # type: ignore[attr-defined]

    def disk_identity(self) -> bytes | None:
        """
        ``IDiskIdentity``: the inner disk's identity sliced (``slice_identity``), or ``None``.

        Two slices of one disk are two disks; the same slice is the same
        disk in every process that serves it.
        """
        return self._identity

    def fileno(self) -> int:
        """``IDescriptorBackend``: the inner disk's descriptor."""
        return self.inner.fileno()  # type: ignore[attr-defined, no-any-return]

    def handoff(self) -> dict[str, Any]:
        """
        ``IDescriptorBackend``: the inner disk's class and handoff, and the slice.

        ``{"class": ..., "handoff": ..., "offset": ..., "length": ...}``,
        JSON-serialisable if the inner handoff is; ``adopt`` takes it back.
        """
        inner = self.inner
        return {
            "class": fullyQualifiedName(type(inner)),
            "handoff": inner.handoff(),  # type: ignore[attr-defined]
            "offset": self.offset,
            "length": self.size,
        }

    @classmethod
    def adopt(cls, fd: int, handoff: dict[str, Any]) -> SliceBackend:
        """
        ``IDescriptorBackend``: rebuild, on ``fd``, the slice whose ``handoff()`` this is.

        The inner disk is its class's ``adopt(fd, ...)``; the slice owns it.

        @raise TypeError: if the class named does not implement ``IDescriptorBackend``.
        """
        inner_class = namedAny(handoff["class"])
        if not IDescriptorBackend.implementedBy(inner_class):
            raise TypeError(f"{handoff['class']} does not implement IDescriptorBackend")
        inner = inner_class.adopt(fd, handoff["handoff"])
        try:
            return cls(inner, handoff["offset"], handoff["length"])
        except BaseException:
            inner.close()
            raise

    def share(self) -> SliceBackend:
        """
        ``IProcessShareableBackend``: the same slice of the inner disk's ``share()``.

        The inner disk moves (and is closed by its ``share``); if it cannot,
        its error propagates and this slice stays as it was.
        """
        return type(self)(
            self.inner.share(),  # type: ignore[attr-defined]
            self.offset,
            self.size,
        )
