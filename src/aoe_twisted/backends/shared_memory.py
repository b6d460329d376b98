# -*- test-case-name: tests.test_workers -*-
"""
A memory disk that several processes serve: ``memory:SIZE`` under ``--workers``.

A ``MemoryBackend`` lives in one process's heap, so with ``--workers N``
each worker would serve a disk of its own.  ``SharedMemoryBackend`` keeps
the disk in a ``memfd`` instead: an anonymous file in RAM, read and written
like any ``FDBackend`` and passed to the workers by descriptor, so they all
serve the same bytes.  Like a memory disk, it is zeros at start and lost
when the last process closes it.
"""

from __future__ import annotations

import os
from typing import ClassVar, Self

from attrs import define
from zope.interface import implementer

from aoe_twisted.backends._fd import FDBackend
from aoe_twisted.errors import BackendSpecError
from aoe_twisted.interfaces import IBlockBackend
from aoe_twisted.units import check_disk_size

__all__ = ["SharedMemoryBackend"]


@implementer(IBlockBackend)
@define
class SharedMemoryBackend(FDBackend):
    """A zero-filled disk of ``size`` bytes in a ``memfd``; ``flush`` costs nothing."""

    kind: ClassVar[str] = "memory disk"

    @classmethod
    def create(cls, size: int, read_only: bool = False) -> Self:
        """
        Make a zero-filled shared memory disk of ``size`` bytes.

        @raise BackendSpecError: if the size is not a whole, non-zero number
            of sectors or the memory cannot be had.
        """
        check_disk_size(size, "memory disk")
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
        return cls(path="memfd:aoe-twisted-disk", size=size, read_only=read_only, fd=fd)
