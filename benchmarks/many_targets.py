#!/usr/bin/env python3
"""
Many targets on one server: memory, start-up time, discovery time and per-frame cost.

For each MTU and each number of targets, ``twistd aoe`` serves that many
``file:`` targets (sparse 64 KiB images, or ``memory:64K`` with
``--backend memory``) on one end of a veth pair between two namespaces.  A
probe process in the other namespace (``--probe``; a raw ``AF_PACKET``
socket, no Twisted) measures:

- start-up: from spawning ``twistd`` to the first answered config query
  (the probe broadcasts one every 10 ms from before the server starts);
- discovery: from one broadcast config query (shelf 0xffff, slot 0xff, as
  ``aoe-discover`` sends) to the last of the N targets' answers;

and the orchestrator reads the server's ``VmRSS`` and ``VmHWM`` after
discovery, and the receive ring the port logged.

``--capacity`` then runs ``raw_capacity.py``'s load generator against
e0.1 (a 64 MiB image) served alone, first among N targets and last among
N targets, interleaved: a per-frame cost that grows with the number of
targets shows as fewer IOPS and more server CPU per request.

    sudo python benchmarks/many_targets.py [--targets 1 --targets 100 --targets 1000]
        [--mtu 1500 --mtu 9000] [--backend file|memory] [--repeat 3]
        [--capacity] [--capacity-targets 1000] [--ours-args "--ring-frames 8192"]

Needs root (namespaces, raw sockets).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchcommon as bc
import raw_capacity as rc

ETHERTYPE = 0x88A2
_REQ_HDR = struct.Struct(">6s6sHBBHBBI")  # Ethernet + AoE header (24 bytes)
#: Targets are numbered from e1.0 on: 250 slots a shelf (e0.1 is raw capacity's).
SLOTS_PER_SHELF = 250
SMALL_IMAGE = 64 * 1024
_RING_LOG = re.compile(r"PACKET_MMAP rings: (\d+) receive slots, ([\d.]+) MiB")


def address(index: int) -> tuple[int, int]:
    """The shelf.slot of the ``index``-th small target."""
    return 1 + index // SLOTS_PER_SHELF, index % SLOTS_PER_SHELF


# --------------------------------------------------------------------------
# The probe (runs in the client namespace)


def _query(mac: bytes, shelf: int, slot: int, tag: int) -> bytes:
    """A broadcast config query for ``shelf``.``slot`` (0xffff/0xff: every target)."""
    frame = _REQ_HDR.pack(b"\xff" * 6, mac, ETHERTYPE, 0x10, 0, shelf, slot, 1, tag)
    return (frame + bytes(8)).ljust(60, b"\0")


def _replies(sock: socket.socket, buf: bytearray, tag: int, until: float):
    """Yield (time, shelf, slot) of each config reply with ``tag`` until ``until``."""
    while (left := until - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            return
        n = sock.recv_into(buf)
        if n < 24 or buf[12:14] != b"\x88\xa2" or not buf[14] & 0x08 or buf[19] != 1:
            continue
        if struct.unpack_from(">I", buf, 20)[0] != tag:
            continue
        shelf, slot = struct.unpack_from(">HB", buf, 16)
        yield time.monotonic(), shelf, slot


def probe(args: argparse.Namespace) -> int:
    """The ``--probe`` process: time the first answer, then one discovery; print JSON."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    sock.bind((args.iface, ETHERTYPE))
    sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: room for every reply
    mac = bytes(sock.getsockname()[4])
    buf = bytearray(16384)
    first = None
    deadline = time.monotonic() + args.timeout
    tag = 1
    shelf, slot = address(0)
    while first is None and time.monotonic() < deadline:
        tag += 1
        sock.send(_query(mac, shelf, slot, tag))
        for when, _shelf, _slot in _replies(sock, buf, tag, time.monotonic() + 0.01):
            first = when
            break
    if first is None:
        print(json.dumps({"error": "no answer"}))
        return 1
    time.sleep(0.5)  # let the start-up announcements pass
    while select.select([sock], [], [], 0)[0]:
        sock.recv_into(buf)
    results = []
    for _ in range(args.discoveries):
        tag += 1
        seen: set[tuple[int, int]] = set()
        last = sent = time.monotonic()
        sock.send(_query(mac, 0xFFFF, 0xFF, tag))
        for when, shelf, slot in _replies(sock, buf, tag, sent + 10.0):
            seen.add((shelf, slot))
            last = when
            if len(seen) >= args.expect:
                break
        results.append({"seconds": last - sent, "answered": len(seen)})
        time.sleep(0.2)
    print(json.dumps({"first": first, "discoveries": results}))
    return 0


# --------------------------------------------------------------------------
# The orchestrator


def _vm(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def _images(work: Path, count: int, backend: str) -> list[str]:
    """``--target`` arguments for ``count`` small targets."""
    argv = []
    for i in range(count):
        shelf, slot = address(i)
        if backend == "memory":
            spec = f"memory:{SMALL_IMAGE // 1024}K"
        else:
            image = work / f"small-{i}.img"
            if not image.exists():
                with image.open("wb") as f:
                    f.truncate(SMALL_IMAGE)
            spec = f"file:{image}"
        argv += ["--target", f"{shelf}.{slot}={spec}"]
    return argv


def startup(args: argparse.Namespace, work: Path) -> list[dict]:
    """Start-up, discovery and memory for every MTU and number of targets, ``repeat`` times."""
    rows = []
    for mtu in args.mtu:
        with bc.veth_pair(mtu) as pair:
            for rep in range(args.repeat):
                for count in args.targets:
                    log = work / f"startup-{mtu}-{count}-{rep}.log"
                    argv = [*bc.TWISTD, "-n", "--pidfile=", "--logfile", str(log), "aoe",
                            "--iface", pair.server_if, *_images(work, count, args.backend),
                            *args.ours_args.split()]  # fmt: skip
                    probe_proc = subprocess.Popen(
                        ["ip", "netns", "exec", pair.client_ns, sys.executable, __file__,
                         "--probe", "--iface", pair.client_if, "--expect", str(count),
                         "--discoveries", str(args.discoveries), "--timeout", str(args.timeout)],
                        stdout=subprocess.PIPE, text=True,
                    )  # fmt: skip
                    time.sleep(0.3)  # the probe is sending before the server starts
                    spawned = time.monotonic()
                    server = bc.start_in_netns(pair.server_ns, argv, work / "stdout.log")
                    try:
                        out, _ = probe_proc.communicate(timeout=args.timeout + 60)
                        memory = _vm(server.pid)
                    finally:
                        bc.stop(server)
                    result = json.loads(out.strip().splitlines()[-1])
                    if "error" in result:
                        text = log.read_text() if log.exists() else ""
                        lines = [line for line in text.splitlines() if "Error" in line]
                        rows.append({"mtu": mtu, "targets": count, "failed": (lines or
                                     [result["error"]])[-1][-200:]})  # fmt: skip
                        print(
                            f"  MTU {mtu} {count} targets: did not start: {rows[-1]['failed']}",
                            file=sys.stderr,
                            flush=True,
                        )
                        continue
                    ring = _RING_LOG.search(log.read_text())
                    discoveries = result["discoveries"]
                    row = {
                        "mtu": mtu, "targets": count,
                        "startup_s": result["first"] - spawned,
                        "discovery_s": statistics.median(d["seconds"] for d in discoveries),
                        "answered": min(d["answered"] for d in discoveries),
                        "rss_kib": memory.get("VmRSS", 0), "hwm_kib": memory.get("VmHWM", 0),
                        "ring_slots": int(ring.group(1)) if ring else 0,
                        "ring_mib": float(ring.group(2)) if ring else 0.0,
                    }  # fmt: skip
                    rows.append(row)
                    print(f"  MTU {mtu} {count} targets: start {row['startup_s']:.2f} s, "
                          f"discovery {row['discovery_s'] * 1000:.0f} ms "
                          f"({row['answered']}/{count}), RSS {row['rss_kib'] // 1024} MiB",
                          file=sys.stderr, flush=True)  # fmt: skip
    return rows


def capacity(args: argparse.Namespace, work: Path) -> list[dict]:
    """raw_capacity rows on e0.1 alone, first among N and last among N, interleaved."""
    image = bc.make_image(work / "disk.img", rc.IMAGE_BYTES)
    others = _images(work, args.capacity_targets - 1, "file")
    big = ["--target", f"0.1=file:{image}"]
    layouts = {
        "alone": big,
        f"first of {args.capacity_targets}": big + others,
        f"last of {args.capacity_targets}": others + big,
    }
    rows_wanted = [r for r in rc.ROWS if r[0] == "seq"]
    gen_args = argparse.Namespace(duration=args.duration, warmup=args.warmup, initiators=1)
    results = []
    for mtu in args.mtu:
        with bc.veth_pair(mtu) as pair:
            for rep in range(args.repeat):
                names = list(layouts) if rep % 2 == 0 else list(layouts)[::-1]
                for name in names:
                    argv = [*bc.TWISTD, "-n", "--pidfile=", "aoe", "--iface", pair.server_if,
                            *layouts[name], *args.ours_args.split()]  # fmt: skip
                    server = bc.start_in_netns(pair.server_ns, argv, work / f"cap-{mtu}.log")
                    try:
                        rows = rc.run_generator(pair, server.pid, rows_wanted, gen_args)
                    finally:
                        bc.stop(server)
                    for r in rows:
                        r.update(mtu=mtu, layout=name)
                        results.append(r)
                    print(f"  MTU {mtu} {name}: "
                          + ", ".join(f"{' '.join(r['row'])} {r['iops']:,.0f}" for r in rows),
                          file=sys.stderr, flush=True)  # fmt: skip
    return results


def report(start_rows: list[dict], cap_rows: list[dict], args: argparse.Namespace) -> str:
    """The tables: medians over the repeats (min-max where it matters)."""
    out = [f"Many targets over veth, {bc.now_utc()}; {args.machine}",
           f"{args.backend}: targets of 64 KiB; {args.repeat} repeats; aoe-twisted options: "
           f"{args.ours_args or '(none)'}", ""]  # fmt: skip
    if start_rows:
        table = []
        for mtu in args.mtu:
            for count in args.targets:
                rs = [r for r in start_rows if r["mtu"] == mtu and r["targets"] == count]
                failed = [r["failed"] for r in rs if "failed" in r]
                rs = [r for r in rs if "failed" not in r]
                if failed:
                    table.append([str(mtu), str(count), f"did not start: {failed[0]}"])
                if not rs:
                    continue

                def s(key: str, scale: float = 1.0, rs: list = rs) -> bc.Spread:
                    return bc.Spread([r[key] * scale for r in rs])

                table.append([
                    str(mtu), str(count), s("rss_kib", 1 / 1024).fmt(0),
                    s("hwm_kib", 1 / 1024).fmt(0),
                    f"{rs[0]['ring_slots']} / {rs[0]['ring_mib']:.1f}",
                    s("startup_s").fmt(2), s("discovery_s", 1000).fmt(1),
                    f"{min(r['answered'] for r in rs)}/{count}",
                ])  # fmt: skip
        out.append(bc.table(
            "Memory, start-up and discovery",
            ["MTU", "targets", "RSS MiB", "peak RSS MiB", "RX slots / rings MiB",
             "start-up s", "discovery ms", "answered"],
            table,
        ))  # fmt: skip
        out.append("")
    if cap_rows:
        for mtu in args.mtu:
            table = []
            layouts = list(dict.fromkeys(r["layout"] for r in cap_rows if r["mtu"] == mtu))
            for pattern, size, op in [r for r in rc.ROWS if r[0] == "seq"]:
                line = [f"{pattern} {size} {op}"]
                for layout in layouts:
                    rs = [r for r in cap_rows if r["mtu"] == mtu and r["layout"] == layout
                          and r["row"] == [pattern, size, op]]  # fmt: skip
                    iops = bc.Spread([r["iops"] for r in rs])
                    us = statistics.median(1e6 * r["server_cpu"] / r["iops"] for r in rs)
                    retx = sum(r["retransmits"] + r["errors"] for r in rs)
                    line.append(f"{iops.fmt(0)} ({us:.1f} µs, {retx})")
                table.append(line)
            out.append(bc.table(
                f"Raw capacity of e0.1, MTU {mtu}: IOPS median (min-max) "
                "(server CPU µs per request, errors+retransmits)",
                ["row", *layouts], table,
            ))  # fmt: skip
            out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--iface", help=argparse.SUPPRESS)
    parser.add_argument("--expect", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument(
        "--discoveries",
        type=int,
        default=3,
        help="broadcast discoveries per start (median reported)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds a server may take to answer its first query",
    )
    parser.add_argument(
        "--targets",
        type=int,
        action="append",
        help="numbers of targets (repeatable; default 1, 100, 1000)",
    )
    parser.add_argument("--mtu", type=int, action="append", help="MTU (repeatable)")
    parser.add_argument("--backend", choices=("file", "memory"), default="file")
    parser.add_argument("--repeat", type=int, default=3, help="repeats")
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up table")
    parser.add_argument(
        "--capacity",
        action="store_true",
        help="also raw capacity of one target alone and among many",
    )
    parser.add_argument("--capacity-targets", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=1.0, help="capacity seconds per row")
    parser.add_argument("--warmup", type=float, default=0.3, help="unmeasured seconds per row")
    parser.add_argument("--ours-args", default="", help="extra twistd aoe options")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    if args.probe:
        return probe(args)
    args.targets = args.targets or [1, 100, 1000]
    args.mtu = args.mtu or [1500, 9000]
    args.machine = bc.machine()
    with tempfile.TemporaryDirectory(prefix="aoe-many-") as work:
        start_rows = [] if args.no_startup else startup(args, Path(work))
        cap_rows = capacity(args, Path(work)) if args.capacity else []
    if args.json:
        args.json.write_text(json.dumps({"startup": start_rows, "capacity": cap_rows}, indent=1))
    print(report(start_rows, cap_rows, args))
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
