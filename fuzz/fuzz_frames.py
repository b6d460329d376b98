#!/usr/bin/env python3
"""
atheris target: whole frames through ``Dispatcher.frame_received`` to ``Target.handle``.

An input is a scenario byte (targets, mask/reserve/config state, MTU) and up
to eight length-prefixed Ethernet frames (``fuzz.harness.parse_input``); every
iteration builds fresh memory-disk targets, so nothing accumulates.
``fuzz.harness.check_frames`` asserts the dispatcher's invariants after every
frame, with a model of the write rules as the oracle for the disks.  Run
through ``make fuzz`` or directly:
``python fuzz/fuzz_frames.py fuzz/corpus/frames -max_total_time=60``.
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuzz.native import check_preloaded, preload

# Under make fuzz-native: the lane's Tally (every target's stats) built with sanitizers.
_sanitized = preload()

with atheris.instrument_imports(include=["aoe_twisted", "fuzz"]):
    from fuzz.harness import check_frames

check_preloaded(_sanitized)


def test_one_input(data: bytes) -> None:
    """Send one input's frames through a fresh dispatcher and check everything."""
    check_frames(data)


def main() -> None:
    """Hand the command line to libFuzzer."""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
