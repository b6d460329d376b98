# -*- test-case-name: tests.test_backends -*-
"""
What the ``file`` and ``block`` backends share: a disk behind one file descriptor.

``FDBackend`` opens the path, checks what kind of file it is and measures it
(the two steps a subclass supplies), then reads with ``os.pread``, writes with
``os.pwrite`` and flushes with ``os.fsync``.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import ClassVar, Self

from attrs import define, field
from zope.interface import implementer

from aoe_twisted.backends._range import check_range
from aoe_twisted.errors import BackendSpecError
from aoe_twisted.interfaces import IBlockBackend
from aoe_twisted.units import check_disk_size

__all__ = ["FDBackend", "describe_file_type"]

_FILE_TYPES = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def describe_file_type(mode: int) -> str:
    """Name the type of file that ``mode`` (an ``st_mode``) describes: ``"a directory"``."""
    for test, name in _FILE_TYPES:
        if test(mode):
            return name
    return "an unknown type of file"


def _open_failure(kind: str, path: str, read_only: bool, error: OSError) -> BackendSpecError:
    """Build the one-line error for an ``os.open`` that failed."""
    reason = error.strerror or str(error)
    if not read_only and error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return BackendSpecError(
            f"cannot open {kind} {path} for writing: {reason}; "
            "to serve it read-only, use --read-only"
        )
    return BackendSpecError(f"cannot open {kind} {path}: {reason}")


@implementer(IBlockBackend)
@define
class FDBackend:
    """
    A disk read and written through the file descriptor ``fd``.

    Subclasses set ``kind`` and implement ``_check_type`` and ``_measure``
    (and ``_kernel_read_only`` if the kernel can refuse writes that ``open``
    allowed); build them with ``open``.
    """

    kind: ClassVar[str] = "disk"
    """How error messages name this kind of disk, e.g. ``"file"``."""

    path: str = field(kw_only=True)
    size: int = field(kw_only=True)
    read_only: bool = field(kw_only=True)
    _fd: int = field(kw_only=True, repr=False)

    @classmethod
    def open(cls, path: str, read_only: bool = False) -> Self:
        """
        Open the disk at ``path``, read-only (``O_RDONLY``) if ``read_only``.

        @raise BackendSpecError: with a one-line message naming ``path`` and
            the reason if it cannot be opened, is the wrong type of file or
            its size is not a whole, non-zero number of 512-byte sectors.
        """
        kind = cls.kind
        # O_NONBLOCK keeps open() from hanging on a FIFO that we then refuse;
        # O_NOCTTY keeps a terminal from becoming ours.
        flags = os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        flags |= os.O_RDONLY if read_only else os.O_RDWR
        try:
            fd = os.open(path, flags)
        except OSError as e:
            raise _open_failure(kind, path, read_only, e) from e
        try:
            mode = os.fstat(fd).st_mode
            problem = cls._check_type(path, mode)
            if problem is not None:
                raise BackendSpecError(f"{path} is {describe_file_type(mode)}, {problem}")
            size = check_disk_size(cls._measure(fd), f"{kind} {path}")
            if not read_only and cls._kernel_read_only(fd):
                raise BackendSpecError(
                    f"{kind} {path} is read-only (the kernel refuses writes to it); "
                    "to serve it read-only, use --read-only"
                )
            os.set_blocking(fd, True)
        except OSError as e:
            os.close(fd)
            raise BackendSpecError(f"cannot use {kind} {path}: {e.strerror or e}") from e
        except BaseException:
            os.close(fd)
            raise
        return cls(path=path, size=size, read_only=read_only, fd=fd)

    @classmethod
    def _check_type(cls, path: str, mode: int) -> str | None:
        """Return why a file with ``st_mode`` ``mode`` cannot be served, or ``None``."""
        raise NotImplementedError

    @classmethod
    def _measure(cls, fd: int) -> int:
        """Return the size in bytes of the open disk ``fd``."""
        raise NotImplementedError

    @classmethod
    def _kernel_read_only(cls, fd: int) -> bool:
        """Return whether the kernel refuses writes to ``fd`` although it opened read-write."""
        return False

    def read(self, offset: int, length: int) -> bytes:
        """
        Return ``length`` bytes from byte ``offset``.

        @raise OSError: if ``pread`` fails, or ``EIO`` if the disk ends early
            (a file shrunk behind our back).
        """
        check_range(offset, length, self.size)
        data = os.pread(self._fd, length, offset)
        if len(data) == length:
            return data
        pieces = [data]
        done = len(data)
        while done < length:
            piece = os.pread(self._fd, length - done, offset + done)
            if not piece:
                raise OSError(errno.EIO, f"{self.path} ended at byte {offset + done}")
            pieces.append(piece)
            done += len(piece)
        return b"".join(pieces)

    def write(self, offset: int, data: bytes) -> None:
        """
        Write all of ``data`` at byte ``offset``, looping on short writes.

        @raise OSError: ``EROFS`` if the disk was opened read-only, or what
            ``pwrite`` raised.
        """
        if self.read_only:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), self.path)
        check_range(offset, len(data), self.size)
        view = memoryview(data)
        done = 0
        while done < len(view):
            written = os.pwrite(self._fd, view[done:], offset + done)
            if written == 0:
                raise OSError(errno.EIO, f"{self.path} accepted no bytes at {offset + done}")
            done += written

    def flush(self) -> None:
        """``fsync`` the disk, so every completed write is durable."""
        os.fsync(self._fd)

    def close(self) -> None:
        """Close the file descriptor; a second call does nothing."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
