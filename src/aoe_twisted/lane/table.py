# -*- test-case-name: tests.test_lane -*-
"""The compiled lane's table of targets, built from the targets a dispatcher serves."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aoe_twisted import lane as _lane
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import SECTOR_SIZE
from aoe_twisted.interfaces import ILaneBackend

__all__ = ["build_table", "lane_served"]


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
        storage = backend.lane_storage()  # type: ignore[attr-defined]
        entries.append((
            target.shelf,
            target.slot,
            target.max_sectors,
            backend.size // SECTOR_SIZE,
            storage.fd,
            storage.buffer,
            storage.offset,
            storage.direct,
            storage.alignment,
            native.WRITES_HELD if hold_writes or target.sync else native.WRITES_SENT,
            target,
            backend,
            target.stats.tally,
        ))
    if not entries:
        return None
    return native.Table(entries)
