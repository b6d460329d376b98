# -*- test-case-name: tests.test_lane -*-
"""
The compiled data lane: plain ATA reads and writes answered in C, straight from the rings.

``_lane`` (``_lane.c``, built by the package's own build) walks a port's
``PACKET_MMAP`` receive ring and answers the frames ``core.fastpath``
answers, with the same bytes and counters, for the targets whose disks it
can reach itself (``ILaneBackend``: file and block descriptors, memory, and
slices of them); it stops at every other frame and the Python path, the
reference, decides about it as before.

``native`` is the extension module, or ``None`` when the Python lane runs:
the extension was not built (``lane_reason`` says why) or
``AOE_TWISTED_PURE_PYTHON=1`` is set.  It is decided once, when this
module is first imported; ``describe()`` is the one log line the service
writes about it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from aoe_twisted.lane.storage import MAPPED_WRITES_VARIABLE, LaneStorage, mapped_writes, sliced

__all__ = [
    "MAPPED_WRITES_VARIABLE",
    "PURE_PYTHON_VARIABLE",
    "LaneStorage",
    "describe",
    "lane_reason",
    "mapped_writes",
    "native",
    "sliced",
]

PURE_PYTHON_VARIABLE = "AOE_TWISTED_PURE_PYTHON"
"""The environment variable that, set to ``1``, keeps the compiled lane off."""


def _load() -> tuple[ModuleType | None, str]:
    """Import the extension unless told not to; return it (or ``None``) and why."""
    if os.environ.get(PURE_PYTHON_VARIABLE, "") not in ("", "0"):
        return None, f"{PURE_PYTHON_VARIABLE}={os.environ[PURE_PYTHON_VARIABLE]} is set"
    try:
        module = importlib.import_module("aoe_twisted.lane._lane")
    except ImportError as e:
        return None, f"the extension is not built: {e}"
    return module, "built"


native, lane_reason = _load()


def describe() -> str:
    """Say which data lane serves plain reads and writes, for the log."""
    if native is not None:
        how = (
            "file and block disks written through a mapping"
            if mapped_writes()
            else f"file and block disks written with pwrite, {MAPPED_WRITES_VARIABLE}=0 is set"
        )
        return f"data lane: compiled (aoe_twisted.lane._lane answers plain reads and writes; {how})"
    return f"data lane: Python ({lane_reason})"
