# -*- test-case-name: tests.test_backends -*-
"""``file:PATH``: a disk image in a regular file."""

from __future__ import annotations

import os
import stat
from typing import ClassVar

from attrs import define

from aoe_twisted.backends._fd import FDBackend

__all__ = ["FileBackend"]


@define
class FileBackend(FDBackend):
    """
    A regular file served as a disk; its size is the file's size.

    Open it with ``FileBackend.open(path, read_only=False, direct=False)``.
    Writes reach the page cache when ``write`` returns (the disk itself with
    ``direct``, through ``O_DIRECT``); ``flush`` is ``fsync`` and
    ``sync_data`` is ``fdatasync``.
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
