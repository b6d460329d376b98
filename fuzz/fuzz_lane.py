#!/usr/bin/env python3
"""
atheris target: the compiled data lane against the Python paths, byte for byte.

An input is a lane options byte, a ring seed byte and a frames input
(``fuzz.lane_harness.parse_lane_input``); every iteration builds fresh
targets three times over (the lane's, the Python lane's, the general
path's) and ``fuzz.lane_harness.check_lane`` asserts after every frame that
the replies, counters, disks and target stats are the same, through
``Lane.answer`` or through ``Lane.drain`` over a ring with hostile slot
headers.  ``make fuzz-native`` runs it with the extension built with ASan
and UBSan (``fuzz/native.py``); directly:
``python fuzz/fuzz_lane.py fuzz/corpus/lane -max_total_time=60``.
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuzz.native import check_preloaded, preload

_sanitized = preload()

with atheris.instrument_imports(include=["aoe_twisted", "fuzz"]):
    from aoe_twisted import lane
    from fuzz.lane_harness import check_lane

check_preloaded(_sanitized)
if lane.native is None:
    # Nothing to fuzz; not a crash either (make fuzz runs every target).
    print(f"fuzz_lane: the compiled lane is not built ({lane.lane_reason})", file=sys.stderr)
    sys.exit(0)


def test_one_input(data: bytes) -> None:
    """Send one input's frames through the lane and the Python paths and compare."""
    check_lane(data)


def main() -> None:
    """Hand the command line to libFuzzer."""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
