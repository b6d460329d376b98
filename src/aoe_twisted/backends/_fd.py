# -*- test-case-name: tests.test_backends -*-
"""
What the ``file`` and ``block`` backends share: a disk behind one file descriptor.

``FDBackend`` opens the path, checks what kind of file it is and measures it
(the two steps a subclass supplies), then reads with ``os.pread``, writes with
``os.pwrite``, flushes with ``os.fsync`` and makes writes durable for
``--sync`` with ``os.fdatasync`` (``sync_data``).

Every ``FDBackend`` provides ``IZeroCopyBackend`` (``read_into`` with
``preadv``; ``write`` copies into the kernel before it returns),
``IDataSyncBackend`` (``sync_data``) and ``IDescriptorBackend``: ``--workers``
passes the descriptor and ``handoff()`` to each worker, which rebuilds the
backend with ``adopt``.  The file and block backends name their disk too
(``IDiskIdentity``): ``open`` asks the subclass's ``_identify`` once, and
``handoff`` passes the answer on, so every worker presents the same one.

With ``direct=True`` (``--direct``) the descriptor is opened ``O_DIRECT``:
reads and writes bypass the page cache and go through one page-aligned buffer
(anonymous ``mmap``), in whole blocks of ``alignment`` bytes, the size the
device or filesystem demands.  A request that is not aligned to it (a 512-byte
write on a 4096-byte-sector disk) is done by read-modify-write of the blocks at
its edges: single-threaded, so no other write can slip in between.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from typing import Any, ClassVar, Self

from attrs import define, field
from zope.interface import implementer

from aoe_twisted.backends._range import check_range
from aoe_twisted.core.wire import SECTOR_SIZE
from aoe_twisted.errors import BackendSpecError
from aoe_twisted.interfaces import (
    IDataSyncBackend,
    IDescriptorBackend,
    ILaneBackend,
    IZeroCopyBackend,
)
from aoe_twisted.lane.storage import LaneStorage, mapped_writes
from aoe_twisted.units import check_disk_size

__all__ = ["FDBackend", "describe_file_type"]

#: Block sizes tried, smallest first, to learn what ``O_DIRECT`` on a regular file demands.
_PROBE_ALIGNMENTS = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)

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


@implementer(IZeroCopyBackend, ILaneBackend, IDataSyncBackend, IDescriptorBackend)
@define
class FDBackend:
    """
    A disk read and written through the file descriptor ``fd``.

    Subclasses set ``kind`` and implement ``_check_type`` and ``_measure``
    (and ``_kernel_read_only`` if the kernel can refuse writes that ``open``
    allowed); build them with ``open``, or with ``adopt`` on a descriptor
    another process handed over.
    """

    kind: ClassVar[str] = "disk"
    """How error messages name this kind of disk, e.g. ``"file"``."""

    path: str = field(kw_only=True)
    size: int = field(kw_only=True)
    read_only: bool = field(kw_only=True)
    _fd: int = field(kw_only=True, repr=False)
    direct: bool = field(default=False, kw_only=True)
    """Whether the descriptor is ``O_DIRECT`` (``--direct``): I/O bypasses the page cache."""
    alignment: int = field(default=SECTOR_SIZE, kw_only=True)
    """The block size, offset and length alignment that ``O_DIRECT`` I/O needs (bytes)."""
    identity: bytes | None = field(default=None, kw_only=True, repr=False)
    """The disk's identity (``IDiskIdentity``), learnt once by ``open``; ``None`` if it has none."""
    mappable: bool = field(factory=mapped_writes, kw_only=True, repr=False)
    """
    Whether the compiled lane may write the disk through a mapping of it (if
    writable and not ``direct``); not if ``AOE_TWISTED_MAPPED_WRITES=0`` when
    the backend was made.
    """
    _buffer: mmap.mmap | None = field(default=None, init=False, repr=False)
    _view: memoryview | None = field(default=None, init=False, repr=False)

    @classmethod
    def open(cls, path: str, read_only: bool = False, *, direct: bool = False) -> Self:
        """
        Open the disk at ``path``, read-only (``O_RDONLY``) if ``read_only``.

        With ``direct`` open it ``O_DIRECT`` and learn the block size direct
        I/O needs: the device's logical block size for a block device, the
        smallest size an aligned read accepts for a file.

        @raise BackendSpecError: with a one-line message naming ``path`` and
            the reason if it cannot be opened, is the wrong type of file, its
            size is not a whole, non-zero number of 512-byte sectors or, with
            ``direct``, its filesystem refuses ``O_DIRECT`` or its size is not
            a whole number of the blocks direct I/O needs.
        """
        kind = cls.kind
        # O_NONBLOCK keeps open() from hanging on a FIFO that we then refuse;
        # O_NOCTTY keeps a terminal from becoming ours.
        flags = os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        flags |= os.O_RDONLY if read_only else os.O_RDWR
        if direct:
            flags |= os.O_DIRECT
        try:
            fd = os.open(path, flags)
        except OSError as e:
            if direct and e.errno == errno.EINVAL:
                raise _no_direct(kind, path) from e
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
            alignment = cls._direct_alignment(fd, path, size) if direct else SECTOR_SIZE
            identity = cls._identify(fd, direct)
        except OSError as e:
            os.close(fd)
            raise BackendSpecError(f"cannot use {kind} {path}: {e.strerror or e}") from e
        except BaseException:
            os.close(fd)
            raise
        return cls(
            path=path,
            size=size,
            read_only=read_only,
            fd=fd,
            direct=direct,
            alignment=alignment,
            identity=identity,
        )

    @classmethod
    def adopt(cls, fd: int, handoff: dict[str, Any]) -> Self:
        """
        Build the backend another process opened, on its descriptor ``fd``.

        ``handoff`` is what that process's ``handoff()`` returned; nothing is
        opened, checked or measured again, and the new backend owns ``fd``
        (``close`` closes it), with the identity the opening process learnt.
        """
        identity = handoff.get("identity")
        return cls(
            path=handoff["path"],
            size=handoff["size"],
            read_only=handoff["read_only"],
            fd=fd,
            direct=handoff["direct"],
            alignment=handoff["alignment"],
            identity=None if identity is None else bytes.fromhex(identity),
        )

    def fileno(self) -> int:
        """Return the descriptor the disk is read and written through (-1 once closed)."""
        return self._fd

    def handoff(self) -> dict[str, Any]:
        """
        Return what ``adopt`` needs besides the descriptor: path, size, how it
        was opened, and the disk's identity (in hex).

        A JSON-serialisable dict: ``--workers`` sends it to each worker.
        """
        return {
            "path": self.path,
            "size": self.size,
            "read_only": self.read_only,
            "direct": self.direct,
            "alignment": self.alignment,
            "identity": None if self.identity is None else self.identity.hex(),
        }

    def disk_identity(self) -> bytes | None:
        """
        Return the disk's identity, learnt when it was opened (``IDiskIdentity``).

        Only the subclasses that can name their disk declare the interface
        (``FileBackend``, ``BlockDeviceBackend``); for the others this is
        ``None`` and never asked.
        """
        return self.identity

    @classmethod
    def _direct_alignment(cls, fd: int, path: str, size: int) -> int:
        """
        Return the block size ``O_DIRECT`` I/O on ``fd`` needs.

        @raise BackendSpecError: if ``size`` is not a whole number of such
            blocks (the last one could not be written without growing the
            file), or no block size works.
        """
        alignment = cls._logical_block_size(fd)
        if alignment is None:
            alignment = _probe_alignment(fd, size)
            if alignment is None:
                raise _no_direct(cls.kind, path)
        if size % alignment:
            raise BackendSpecError(
                f"{cls.kind} {path}: --direct needs whole {alignment}-byte blocks, "
                f"and its size ({size} bytes) is not a multiple of {alignment}"
            )
        return alignment

    @classmethod
    def _logical_block_size(cls, fd: int) -> int | None:
        """Return the device's logical block size, or ``None`` to probe for it."""
        return None

    @classmethod
    def _check_type(cls, path: str, mode: int) -> str | None:
        """Return why a file with ``st_mode`` ``mode`` cannot be served, or ``None``."""
        raise NotImplementedError

    @classmethod
    def _identify(cls, fd: int, direct: bool) -> bytes | None:
        """Return the identity of the disk open as ``fd`` (``O_DIRECT`` if ``direct``), or None."""
        return None

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
        if self.direct:
            return self._read_direct(offset, length)
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

    def read_into(self, offset: int, view: memoryview) -> int:
        """
        Read ``len(view)`` bytes from byte ``offset`` straight into ``view``; return how many.

        The zero-copy read of the fast path: ``preadv`` into the caller's
        buffer (a TX ring slot), where ``read`` makes a new ``bytes``.  With
        ``direct`` it goes through the aligned buffer as ``read`` does, and
        copies once from it.  ``IZeroCopyBackend`` also promises that
        ``write`` takes any bytes-like object and keeps no reference to it.

        @raise OSError: as ``read``.
        """
        length = len(view)
        check_range(offset, length, self.size)
        if self.direct:
            start, end = self._span(offset, length)
            aligned = self._aligned(end - start)
            self._pread_exact(aligned, start)
            view[:length] = aligned[offset - start : offset - start + length]
            return length
        done = os.preadv(self._fd, [view], offset)
        while done < length:
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if not got:
                raise OSError(errno.EIO, f"{self.path} ended at byte {offset + done}")
            done += got
        return length

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """
        Write all of ``data`` at byte ``offset``, looping on short writes.

        ``data`` is in the kernel (or, with ``direct``, copied into the
        aligned buffer) when this returns: no reference to it is kept.

        @raise OSError: ``EROFS`` if the disk was opened read-only, or what
            ``pwrite`` raised.
        """
        if self.read_only:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), self.path)
        check_range(offset, len(data), self.size)
        if self.direct:
            self._write_direct(offset, data)
            return
        view = memoryview(data)
        done = 0
        while done < len(view):
            written = os.pwrite(self._fd, view[done:], offset + done)
            if written == 0:
                raise OSError(errno.EIO, f"{self.path} accepted no bytes at {offset + done}")
            done += written

    def lane_storage(self) -> LaneStorage:
        """
        ``ILaneBackend``: the descriptor, ``O_DIRECT`` and its block size if ``direct``.

        A writable disk that is not ``direct`` is ``mapped`` (unless made with
        ``AOE_TWISTED_MAPPED_WRITES=0``): the compiled lane writes it through
        a shared mapping, into the page cache as ``pwrite`` does, so ``flush``
        and ``sync_data`` make those writes durable as any other.
        """
        return LaneStorage(
            fd=self._fd,
            direct=self.direct,
            alignment=self.alignment,
            mapped=self.mappable and not (self.direct or self.read_only),
        )

    def flush(self) -> None:
        """``fsync`` the disk, so every completed write is durable."""
        os.fsync(self._fd)

    def sync_data(self) -> None:
        """
        ``fdatasync`` the disk: every completed write is durable when this returns.

        What ``--sync`` calls once per group of writes.  Cheaper than
        ``fsync``: it skips metadata that reading the data back does not need
        (the modification time), but still writes what it does need (block
        allocation, the size).
        """
        os.fdatasync(self._fd)

    def close(self) -> None:
        """Close the file descriptor and free the direct I/O buffer; a second call does nothing."""
        self._free_buffer()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    # -- O_DIRECT --------------------------------------------------------

    def _aligned(self, length: int) -> memoryview:
        """Return the first ``length`` bytes of the page-aligned buffer, growing it if needed."""
        view = self._view
        if view is None or len(view) < length:
            self._free_buffer()
            # Anonymous mmap is page-aligned: good for any O_DIRECT alignment up to a page,
            # and the alignment probe never goes beyond what the buffer's start satisfies.
            capacity = max(length, 256 * 1024)
            capacity = -(-capacity // mmap.PAGESIZE) * mmap.PAGESIZE
            self._buffer = mmap.mmap(-1, capacity)
            view = self._view = memoryview(self._buffer)
        return view[:length]

    def _free_buffer(self) -> None:
        """Unmap the direct I/O buffer, if there is one."""
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        """Return the aligned ``[start, end)`` byte range that covers ``offset``, ``length``."""
        alignment = self.alignment
        start = offset - offset % alignment
        end = -(-(offset + length) // alignment) * alignment
        return start, end

    def _pread_exact(self, view: memoryview, offset: int) -> None:
        """Fill aligned ``view`` from byte ``offset`` (``preadv``); ``EIO`` if the disk ends."""
        got = os.preadv(self._fd, [view], offset)
        if got != len(view):
            raise OSError(errno.EIO, f"{self.path} ended at byte {offset + got}")

    def _read_direct(self, offset: int, length: int) -> bytes:
        """Read through the aligned buffer, whole blocks, and return the bytes asked for."""
        start, end = self._span(offset, length)
        view = self._aligned(end - start)
        self._pread_exact(view, start)
        return bytes(view[offset - start : offset - start + length])

    def _write_direct(self, offset: int, data: bytes | memoryview) -> None:
        """
        Write ``data`` through the aligned buffer, whole blocks.

        A partial block at either edge is read first and written back with
        the new bytes in it (read-modify-write).
        """
        length = len(data)
        start, end = self._span(offset, length)
        alignment = self.alignment
        view = self._aligned(end - start)
        head_partial = offset != start
        if head_partial:
            self._pread_exact(view[:alignment], start)
        if offset + length != end and not (head_partial and end - alignment == start):
            self._pread_exact(view[end - start - alignment :], end - alignment)
        view[offset - start : offset - start + length] = data
        written = os.pwritev(self._fd, [view], start)
        if written != len(view):
            raise OSError(errno.EIO, f"{self.path} took {written} of {len(view)} bytes at {start}")


def _no_direct(kind: str, path: str) -> BackendSpecError:
    """The one-line error for a file whose filesystem refuses ``O_DIRECT``."""
    return BackendSpecError(
        f"cannot open {kind} {path} with --direct: its filesystem does not support "
        "direct I/O (O_DIRECT); serve it without --direct"
    )


def _probe_alignment(fd: int, size: int) -> int | None:
    """
    Return the smallest block size an ``O_DIRECT`` read of ``fd`` accepts, or ``None``.

    Reads one block at offset 0 into a page-aligned buffer for each size in
    turn, up to ``size``; ``EINVAL`` means "misaligned", try the next.
    """
    buffer = mmap.mmap(-1, max(_PROBE_ALIGNMENTS))
    view = memoryview(buffer)
    try:
        for alignment in _PROBE_ALIGNMENTS:
            if alignment > size:
                break
            try:
                os.preadv(fd, [view[:alignment]], 0)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                continue
            return alignment
        return None
    finally:
        view.release()
        buffer.close()
