#!/usr/bin/env python3
"""
atheris target: the AoE codec (``EthernetFrame.from_bytes``, ``Header.from_bytes``).

Each input is read both as a whole Ethernet frame and as a bare AoE message;
``fuzz.harness.check_decode`` asserts that only ``WireError`` comes out and
that whatever decodes round-trips.  Run through ``make fuzz`` (``fuzz/run.py``)
or directly: ``python fuzz/fuzz_decode.py fuzz/corpus/decode -max_total_time=60``.
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with atheris.instrument_imports(include=["aoe_twisted", "fuzz"]):
    from fuzz.harness import check_decode


def test_one_input(data: bytes) -> None:
    """Check the codec on one input."""
    check_decode(data)


def main() -> None:
    """Hand the command line to libFuzzer."""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
