# -*- test-case-name: tests.test_backends -*-
"""The range check every backend does before it touches its disk."""

from __future__ import annotations

__all__ = ["check_range"]


def check_range(offset: int, length: int, size: int) -> None:
    """
    Refuse a byte range that does not lie inside a disk of ``size`` bytes.

    The core checks ranges before it calls a backend, so a bad range is a bug
    in the caller; refusing it keeps a file image from silently growing.

    @raise ValueError: if ``offset`` or ``length`` is negative or the range
        ends past ``size``.
    """
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(f"byte range {offset}+{length} lies outside the disk of {size} bytes")
