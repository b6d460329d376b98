# -*- test-case-name: tests.test_workers -*-
"""
A memory disk that several processes serve: ``memory:SIZE`` under ``--workers``.

A ``MemoryBackend`` lives in one process's heap, so with ``--workers N``
each worker would serve a disk of its own.  ``SharedMemoryBackend`` keeps
the disk in a ``memfd`` instead: an anonymous file in RAM, read and written
like any ``FDBackend`` and passed to the workers by descriptor, so they all
serve the same bytes.  ``MemoryBackend.share`` makes one holding what the
memory disk held; like a memory disk, it is lost when the last process
closes it.
"""

from __future__ import annotations

import os
from typing import ClassVar, Self

from attrs import define

from aoe_twisted.backends._fd import FDBackend
from aoe_twisted.errors import BackendSpecError
from aoe_twisted.units import check_disk_size

__all__ = ["SharedMemoryBackend"]

#: How much of the contents ``create`` compares with zeros, and writes if it is not, at a time.
_COPY_CHUNK = 1 << 20


@define
class SharedMemoryBackend(FDBackend):
    """A disk of ``size`` bytes in a ``memfd``; ``flush`` costs nothing."""

    kind: ClassVar[str] = "memory disk"

    @classmethod
    def create(
        cls,
        size: int,
        read_only: bool = False,
        contents: bytes | bytearray | memoryview | None = None,
    ) -> Self:
        """
        Make a shared memory disk of ``size`` bytes: zeros, or a copy of ``contents``.

        ``contents`` (``size`` bytes) is copied in before the disk is
        returned, even if ``read_only``.  Runs of zeros are skipped, so the
        ``memfd`` holds pages only where the contents are not zero, as a
        fresh one would.

        @raise BackendSpecError: if the size is not a whole, non-zero number
            of sectors or the memory cannot be had.
        @raise ValueError: if ``contents`` is not ``size`` bytes long.
        """
        check_disk_size(size, "memory disk")
        if contents is not None:
            contents = memoryview(contents).cast("B")
            if len(contents) != size:
                raise ValueError(f"contents of {len(contents)} bytes for a disk of {size} bytes")
        try:
            fd = os.memfd_create("aoe-twisted-disk", os.MFD_CLOEXEC)
        except OSError as e:
            raise BackendSpecError(f"memory disk: cannot create: {e.strerror or e}") from None
        try:
            os.ftruncate(fd, size)
        except OSError as e:
            os.close(fd)
            raise BackendSpecError(
                f"memory disk: cannot allocate {size} bytes: {e.strerror or e}"
            ) from None
        disk = cls(path="memfd:aoe-twisted-disk", size=size, read_only=False, fd=fd)
        if contents is not None:
            try:
                disk._copy_in(contents)
            except OSError as e:
                disk.close()
                raise BackendSpecError(
                    f"memory disk: cannot fill {size} bytes: {e.strerror or e}"
                ) from None
            except BaseException:
                disk.close()
                raise
        disk.read_only = read_only
        return disk

    def _copy_in(self, contents: memoryview) -> None:
        """Write the chunks of ``contents`` that are not all zeros at their offsets."""
        zeros = bytes(_COPY_CHUNK)
        for offset in range(0, self.size, _COPY_CHUNK):
            chunk = contents[offset : offset + _COPY_CHUNK]
            if not zeros.startswith(chunk):  # all zeros (a memcmp, no copy): leave a hole
                self.write(offset, chunk)
