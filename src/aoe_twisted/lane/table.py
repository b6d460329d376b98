# -*- test-case-name: tests.test_lane -*-
"""The compiled lane's table of targets, built from the targets a dispatcher serves."""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterable
from typing import Any

from twisted.logger import Logger

from aoe_twisted import lane as _lane
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import SECTOR_SIZE
from aoe_twisted.interfaces import ILaneBackend
from aoe_twisted.lane.storage import LaneStorage

__all__ = ["build_table", "lane_served"]

_log = Logger()

#: The disks already said to be written with ``pwrite`` for want of a mapping (once
#: each), by ``id`` (disks need not be hashable), weakly.
_unmapped_said: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()

#: The largest ``O_DIRECT`` block the lane moves through its aligned buffer.
_MAX_ALIGNMENT = 1 << 20


def lane_served(target: Target) -> bool:
    """Whether the compiled lane can answer for ``target``: its disk says where its bytes are."""
    return ILaneBackend.providedBy(target.backend) and target.stats.tally is not None


def build_table(targets: Iterable[Target], hold_writes: bool = False) -> Any:
    """
    Return the lane's table for ``targets`` (those it can serve), or ``None`` if none.

    With ``hold_writes`` (``--sync``), and for a target whose own ``sync``
    is set, the lane still does the writes, but holds each reply in its TX
    slot until group commit: ``Lane.held`` names the disks to sync and
    ``Lane.release`` sends the replies (or refusals).  The table holds the
    targets and their disks as they are now: build a new one when the
    targets served change (``Dispatcher.generation``).
    """
    native = _lane.native
    if native is None:
        return None
    entries = []
    for target in targets:
        if not lane_served(target):
            continue
        backend = target.backend
        try:
            storage = backend.lane_storage()  # type: ignore[attr-defined]
            _check(storage, backend.size)
        except Exception as e:
            # A plugin's mistake costs its target the lane, never the port.
            _log.error(
                "{target}: the compiled lane cannot serve this disk ({error}); "
                "the Python lane serves it",
                target=target.name,
                error=e,
            )
            continue
        held = hold_writes or target.sync
        # Under group commit each fdatasync write-protects the pages again, so every write
        # through a mapping would fault (and the filesystem's page_mkwrite run): pwrite costs less.
        mapped = True if storage.mapped and not held else None
        entries.append((
            target.shelf,
            target.slot,
            target.max_sectors,
            backend.size // SECTOR_SIZE,
            storage.fd,
            storage.buffer if storage.fd < 0 else mapped,
            storage.offset,
            storage.direct,
            storage.alignment,
            native.WRITES_HELD if held else native.WRITES_SENT,
            target,
            backend,
            target.stats.tally,
        ))
    if not entries:
        return None
    table = native.Table(entries)
    for target, error in table.unmapped():
        backend = target.backend
        if _unmapped_said.get(id(backend)) is not backend:
            with contextlib.suppress(TypeError):  # a plugin's disk that takes no weak reference
                _unmapped_said[id(backend)] = backend
            _log.warn(
                "{target}: cannot be written through a mapping ({error}); the compiled lane "
                "writes it with pwrite",
                target=target.name,
                error=_map_error(native, error),
            )
    return table


def _map_error(native: Any, error: int) -> str:
    """Say what ``Table.unmapped`` reported: an errno, or ``MAP_SHORT``."""
    if error == native.MAP_SHORT:
        return "the file is shorter than the disk"
    return os.strerror(error) if error else "unknown error"


def _check(storage: Any, size: int) -> None:
    """
    Raise ``ValueError`` unless ``storage`` is one the lane can use for a disk of ``size``.

    What ``Table`` itself would refuse, said in words: a buffer that does
    not hold the disk, an ``O_DIRECT`` block size that is not a power of
    two up to 1 MiB.
    """
    if not isinstance(storage, LaneStorage):
        raise ValueError(f"lane_storage() returned {storage!r}, not a LaneStorage")
    alignment = storage.alignment
    if alignment <= 0 or alignment & (alignment - 1) or alignment > _MAX_ALIGNMENT:
        raise ValueError(f"O_DIRECT block size {alignment} is not a power of two up to 1 MiB")
    if storage.buffer is not None:
        view = memoryview(storage.buffer)
        if view.readonly or not view.c_contiguous:
            raise ValueError("its buffer is read-only or not contiguous")
        if storage.offset + size > view.nbytes:
            raise ValueError(
                f"its buffer of {view.nbytes} bytes does not hold {size} bytes "
                f"from {storage.offset}"
            )
