#!/usr/bin/env python3
"""
Micro-benchmark of the whole per-frame path: requests served per second.

One call of ``Dispatcher.frame_received`` is everything the server does for a
frame apart from the two system calls: decode the Ethernet frame and the AoE
message, route it to the target, serve it against a memory disk and encode
the padded reply frame (``Dispatcher.serve`` on the general path, which also
carries out the disk operation the decision asks for).  The cases are a 1 KiB
(2-sector) read, as at MTU 1500, and an 8 KiB (16-sector) write, as at MTU
9000, the same frames ``micro_codec.py`` decodes.  Both take the fast path
(``aoe_twisted.core.fastpath``); ``--no-fast-path`` measures the general path alone,
``--into`` the zero-copy variant the port uses with ``PACKET_MMAP`` rings
(``Dispatcher.frame_received_into``: the request read from a ``memoryview``,
the reply written into a reused buffer, as into a TX ring slot).  ``--lane``
measures the compiled lane (``aoe_twisted.lane``) as the port runs it: one
``Lane.drain`` walking an in-memory ring of ``LANE_BATCH`` slots holding the
frame, its replies written into the TX ring (handed back between calls, as the
kernel does); the figure is per frame, the slots' hand-back included.

    python benchmarks/micro_serve.py [-n 20000] [--repeat 7] [--no-fast-path | --into | --lane]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from micro_codec import _INITIATOR, _TARGET, cases, measure

from aoe_twisted import lane
from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.core.dispatch import Dispatcher
from aoe_twisted.core.target import Target
from aoe_twisted.lane.table import build_table
from aoe_twisted.net.ring import RX_SLOT_HEADER, PacketRings, RingGeometry

#: Slots one ``--lane`` drain walks (the port's drains are up to 256).
LANE_BATCH = 64


def lane_server(target: Target, frame: bytes) -> object:
    """
    Return a function that serves ``LANE_BATCH`` copies of ``frame`` by one ``Lane.drain``.

    The RX ring (in a ``bytearray``) holds the frame in every slot; the
    function marks them the user's (as the kernel does), drains them and
    gives the TX slots back (as the kernel does once sent).
    """
    native = lane.native
    if native is None:
        raise SystemExit(f"micro_serve: no compiled lane ({lane.lane_reason})")
    geometry = RingGeometry.for_mtu(9000, LANE_BATCH)
    tx_geometry = RingGeometry.for_mtu(9000, LANE_BATCH)
    rings = PacketRings(bytearray(geometry.size + tx_geometry.size), geometry, tx_geometry)
    at = 80  # tp_mac: where the frame starts in its slot (past the headers, aligned)
    for offset in rings.rx_offsets:
        RX_SLOT_HEADER.pack_into(rings.view, offset + 4, len(frame), len(frame), at)
        rings.view[offset + at : offset + at + len(frame)] = frame
    runner = native.Lane(
        rings.view, rings.rx_offsets, geometry.frame_size, rings.tx_offsets,
        tx_geometry.frame_size, _TARGET, 9100, False,
    )  # fmt: skip
    table = build_table([target])
    status = rings.status
    rx_words = [offset >> 2 for offset in rings.rx_offsets[:LANE_BATCH]]
    tx_words = [offset >> 2 for offset in rings.tx_offsets[:LANE_BATCH]]

    def serve() -> object:
        for word in rx_words:
            status[word] = 1
        result = runner.drain(table, 0, 0, LANE_BATCH, 0, 1 << 30)
        for word in tx_words:
            status[word] = 0
        return result

    stop, _rx, _tx, _received, _ignored, answered, _unflushed = serve()  # type: ignore[misc]
    if answered != LANE_BATCH:
        raise SystemExit(f"micro_serve: the lane answered {answered} of {LANE_BATCH} (stop {stop})")
    return serve


def main(argv: Sequence[str] | None = None) -> int:
    """Serve each case ``-n`` times, ``--repeat`` times over, and print requests per second."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("-n", type=int, default=20000, help="requests per timed run")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per case")
    parser.add_argument(
        "--no-fast-path", action="store_true", help="serve through the general path alone"
    )
    parser.add_argument(
        "--into",
        action="store_true",
        help="serve with frame_received_into (zero copy, as from the rings)",
    )
    parser.add_argument(
        "--lane", action="store_true", help="serve by the compiled lane, walking a ring"
    )
    args = parser.parse_args(argv)
    if sum((args.into, args.no_fast_path, args.lane)) > 1:
        parser.error("--into, --lane and --no-fast-path are different paths: choose one")
    if args.lane and lane.native is None:
        print(f"micro_serve: no compiled lane to measure ({lane.lane_reason})")
        return 0
    slot = memoryview(bytearray(16384))

    target = Target(1, 0, MemoryBackend(1 << 30), max_sectors=16)
    dispatcher = Dispatcher(_TARGET, [target], fast_path=not args.no_fast_path)
    served = {c.name: c.frame for c in cases() if c.name != "read 1 KiB response"}
    print(f"{'case':<22} {'median req/s':>13} {'min':>10} {'max':>10} {'us/req':>8}")
    for name, frame in served.items():
        replies = dispatcher.serve(frame)
        if len(replies) != 1 or replies[0][:6] != _INITIATOR:
            raise SystemExit(f"micro_serve: {name} was not answered")
        if dispatcher.fast_path and not dispatcher.counters.fast:
            raise SystemExit(f"micro_serve: {name} did not take the fast path")

        # The fast path's decision is the whole answer; the general path's
        # read is settled (its disk operation carried out) as the server does.
        def serve(frame: bytes = frame) -> object:
            if dispatcher.fast_path:
                return dispatcher.frame_received(frame)
            return dispatcher.serve(frame)

        if args.into:
            view = memoryview(frame)
            if not dispatcher.frame_received_into(view, slot):
                raise SystemExit(f"micro_serve: {name} was not answered into the buffer")

            def serve(view: memoryview = view) -> object:
                return dispatcher.frame_received_into(view, slot)

        per_call = 1
        if args.lane:
            serve = lane_server(target, frame)  # type: ignore[assignment]
            per_call = LANE_BATCH
        calls = max(1, args.n // per_call)
        measure(serve, max(1, calls // 10), 1)  # warm up
        rates = [rate * per_call for rate in measure(serve, calls, args.repeat)]
        median = statistics.median(rates)
        print(
            f"{name:<22} {median:>13,.0f} {min(rates):>10,.0f} {max(rates):>10,.0f} "
            f"{1e6 / median:>8.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
