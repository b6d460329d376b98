#!/usr/bin/env python3
"""
Micro-benchmark of the AoE wire codec: frames decoded and re-encoded per second.

Every frame a target serves goes through ``EthernetFrame.from_bytes``,
``Header.from_bytes``, ``Header.to_bytes`` and ``EthernetFrame.to_bytes``, so
their cost bounds how many frames one CPU can serve before any disk I/O.  The
cases are the frames that dominate real traffic (see ``tests/data/``): a
1 KiB (2-sector) READ SECTORS EXT request and its response, as at MTU 1500,
and an 8 KiB (16-sector) WRITE SECTORS EXT request, as at MTU 9000.

Run from a checkout with the package installed (``pip install -e .``)::

    python benchmarks/micro_codec.py [-n 20000] [--repeat 7]

Each figure is the median of ``--repeat`` timed runs of ``-n`` operations
(``time.perf_counter``); the spread (min-max) shows how noisy the machine is.
Only the standard library and ``aoe_twisted`` are used.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from attrs import frozen

from aoe_twisted.core.wire import (
    ETHERTYPE,
    SECTOR_SIZE,
    ATAArg,
    ATACmdStatus,
    Command,
    EthernetFrame,
    Header,
)

__all__ = ["Case", "Result", "cases", "main", "measure"]

_INITIATOR = bytes.fromhex("525400ae0001")
_TARGET = bytes.fromhex("22de2c46f732")


@frozen
class Case:
    """One frame to benchmark: a name for the report and the bytes as received."""

    name: str
    frame: bytes


@frozen
class Result:
    """Operations per second of one case and step: median, slowest and fastest run."""

    case: str
    step: str
    median: float
    low: float
    high: float
    payload: int

    def row(self) -> str:
        """Format the result as one line of the report."""
        mib = self.median * self.payload / (1 << 20)
        return (
            f"{self.case:<26} {self.step:<10} {self.median:>12,.0f} "
            f"{self.low:>12,.0f} {self.high:>12,.0f} {mib:>10,.1f}"
        )


def _frame(src: bytes, dst: bytes, header: Header) -> bytes:
    """Encode ``header`` into an Ethernet frame from ``src`` to ``dst``."""
    return EthernetFrame(dst, src, ETHERTYPE, header.to_bytes()).to_bytes()


def cases() -> list[Case]:
    """The frames benchmarked: 1 KiB read request and response, 8 KiB write request."""
    tag = bytes.fromhex("0002dd26")
    read = ATAArg(
        flag_lba48_extended=True,
        sector_count=2,
        cmd_status=ATACmdStatus.READ_48BIT,
        lba=1003520,
    )
    read_data = bytes(range(256)) * (2 * SECTOR_SIZE // 256)
    write_data = bytes(range(256)) * (16 * SECTOR_SIZE // 256)
    return [
        Case(
            "read 1 KiB request",
            _frame(
                _INITIATOR,
                _TARGET,
                Header(major=1, command=Command.ISSUE_ATA_COMMAND, tag=tag, arg=read),
            ),
        ),
        Case(
            "read 1 KiB response",
            _frame(
                _TARGET,
                _INITIATOR,
                Header(
                    flag_response=True,
                    major=1,
                    command=Command.ISSUE_ATA_COMMAND,
                    tag=tag,
                    arg=ATAArg(
                        flag_lba48_extended=True,
                        cmd_status=ATACmdStatus.READY_STATUS,
                        lba=1003520,
                        data=read_data,
                    ),
                ),
            ),
        ),
        Case(
            "write 8 KiB request",
            _frame(
                _INITIATOR,
                _TARGET,
                Header(
                    major=1,
                    command=Command.ISSUE_ATA_COMMAND,
                    tag=tag,
                    arg=ATAArg(
                        flag_lba48_extended=True,
                        flag_write=True,
                        sector_count=16,
                        cmd_status=ATACmdStatus.WRITE_48BIT,
                        lba=1003520,
                        data=write_data,
                    ),
                ),
            ),
        ),
    ]


def _decode(frame: bytes) -> tuple[EthernetFrame, Header]:
    """Decode a received frame to its Ethernet header and AoE message."""
    ethernet = EthernetFrame.from_bytes(frame)
    return ethernet, Header.from_bytes(ethernet.payload)


def _encode(ethernet: EthernetFrame, message: Header) -> bytes:
    """Encode a message back into a padded frame to the sender, as a reply is built."""
    return EthernetFrame(
        ethernet.src, ethernet.dst, ethernet.ethertype, message.to_bytes()
    ).to_bytes(pad=True)


def _steps(case: Case) -> dict[str, Callable[[], object]]:
    """The operations timed for ``case``: decode, encode, and both in turn."""
    ethernet, message = _decode(case.frame)
    frame = case.frame
    return {
        "decode": lambda: _decode(frame),
        "encode": lambda: _encode(ethernet, message),
        "roundtrip": lambda: _encode(*_decode(frame)),
    }


def measure(operation: Callable[[], object], n: int, repeat: int) -> list[float]:
    """Time ``repeat`` runs of ``n`` calls of ``operation``; return each run's operations/s."""
    rates = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(n):
            operation()
        rates.append(n / (time.perf_counter() - start))
    return rates


def _check(case: Case) -> None:
    """Fail loudly if the codec does not reproduce the case's frame (the benchmark would lie)."""
    ethernet, message = _decode(case.frame)
    rebuilt = EthernetFrame(ethernet.dst, ethernet.src, ethernet.ethertype, message.to_bytes())
    if rebuilt.to_bytes() != case.frame:
        raise SystemExit(f"micro_codec: {case.name} does not round-trip")


def run(n: int, repeat: int) -> list[Result]:
    """Benchmark every case and step."""
    results = []
    for case in cases():
        _check(case)
        payload = len(_decode(case.frame)[1].arg.data)
        for step, operation in _steps(case).items():
            measure(operation, max(1, n // 10), 1)  # warm up
            rates = measure(operation, n, repeat)
            results.append(
                Result(case.name, step, statistics.median(rates), min(rates), max(rates), payload)
            )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the benchmark and print one line per case and step."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
    parser.add_argument("-n", type=int, default=20000, help="operations per timed run")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs; the median is shown")
    args = parser.parse_args(argv)
    if args.n < 1 or args.repeat < 1:
        parser.error("-n and --repeat must be at least 1")
    print(f"Python {sys.version.split()[0]}, n={args.n}, repeat={args.repeat}")
    print(
        f"{'case':<26} {'step':<10} {'median op/s':>12} {'min op/s':>12} {'max op/s':>12} "
        f"{'data MiB/s':>10}"
    )
    for result in run(args.n, args.repeat):
        print(result.row())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
