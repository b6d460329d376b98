# -*- test-case-name: tests.test_backends -*-
"""``file:PATH``: a disk image in a regular file."""

from __future__ import annotations

import os
import stat
from typing import ClassVar

from attrs import define
from zope.interface import implementer

from aoe_twisted.backends._fd import FDBackend
from aoe_twisted.backends.identity import file_identity
from aoe_twisted.interfaces import IDiskIdentity

__all__ = ["FileBackend"]


@implementer(IDiskIdentity)
@define
class FileBackend(FDBackend):
    """
    A regular file served as a disk; its size is the file's size.

    Open it with ``FileBackend.open(path, read_only=False, direct=False)``.
    Writes reach the page cache when ``write`` returns (the disk itself with
    ``direct``, through ``O_DIRECT``); ``flush`` is ``fsync`` and
    ``sync_data`` is ``fdatasync``.  Its identity (``IDiskIdentity``) is this
    host, the file's filesystem and its inode (``identity.file_identity``):
    the same for every server of this file on this host, after a restart,
    a rename or through a hard link.
    """

    kind: ClassVar[str] = "file"

    @classmethod
    def _check_type(cls, path: str, mode: int) -> str | None:
        if stat.S_ISREG(mode):
            return None
        if stat.S_ISBLK(mode):
            return f"not a regular file (serve it with block:{path})"
        return "not a regular file"

    @classmethod
    def _measure(cls, fd: int) -> int:
        return os.fstat(fd).st_size

    @classmethod
    def _identify(cls, fd: int, direct: bool) -> bytes | None:
        return file_identity(fd)
