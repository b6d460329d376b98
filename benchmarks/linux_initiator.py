#!/usr/bin/env python3
"""
Through the real Linux initiator: vblade and aoe-twisted side by side.

Debian's ``aoe.ko`` runs in a QEMU guest (``tests/linuxguest.py``, TCG) on a
tap device in a private network namespace.  The tap is in a bridge there,
and each server under test runs on its own veth port of that bridge, so a
frame for one server never reaches the other (each has its own MAC), and all
of them serve the same image file:

    e0.1  vblade            e0.2  twistd aoe
    e0.3  vblade -s         e0.4  twistd aoe --sync   (only with --sync, if twistd has it)

Each guest boot measures one direction: it discovers the disks, then runs
``dd bs=1M iflag=direct`` (read) or ``oflag=direct`` (write) over the first
``--size`` MiB of each disk in turn (the order alternates between boots).
The host reads every server's CPU seconds (``/proc/PID/stat`` utime+stime)
before and after the boot; a server only works during its own pass, so the
difference is the CPU of that pass (plus discovery, a few frames).  Boots are
repeated (``--repeat``) and the table gives MB/s (10**6 bytes/s, timed in the
guest) and server CPU seconds per GB (10**9 bytes): median (min-max) and the
ratio aoe-twisted / vblade.

    sudo python benchmarks/linux_initiator.py [--quick] [--size 256] [--repeat 3]
        [--mtu 1500 --mtu 9000] [--sync] [--ours-args "..."]

Throughput here is bounded by the emulated guest (TCG): compare ratios and
CPU per GB, not absolute MB/s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchcommon as bc

from tests import linuxguest

MIB = 1 << 20


@dataclass
class Disk:
    """One server on its own bridge port, exporting e0.``slot``."""

    slot: int
    spec: bc.ServerSpec
    directions: tuple[str, ...]
    proc: subprocess.Popen[bytes] | None = None
    port: str = ""


def _bridge(net: linuxguest.GuestNetwork, mtu: int, disks: list[Disk]) -> None:
    """Put the tap into a bridge and give every disk a veth port on it."""
    ns = net.netns
    bc.run("ip", "-n", ns, "link", "add", "aoebr0", "type", "bridge")
    bc.run("ip", "-n", ns, "link", "set", net.tap, "master", "aoebr0")
    for d in disks:
        d.port = f"aoesv{d.slot}"
        peer = f"aoebp{d.slot}"
        bc.run("ip", "-n", ns, "link", "add", peer, "mtu", str(mtu), "type", "veth",
               "peer", "name", d.port, "mtu", str(mtu))
        bc.run("ip", "-n", ns, "link", "set", peer, "master", "aoebr0", "up")
        bc.run("ip", "-n", ns, "link", "set", d.port, "up")
    bc.run("ip", "-n", ns, "link", "set", "aoebr0", "mtu", str(mtu), "up")


def _wait_ready(disk: Disk, log: Path, timeout: float = 60.0) -> None:
    """Wait for twistd's 'serving' line (vblade is ready at once)."""
    if disk.spec.kind == "vblade":
        time.sleep(0.2)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert disk.proc is not None
        if disk.proc.poll() is not None:
            raise RuntimeError(f"{disk.spec.name} exited: {log.read_text()[-2000:]}")
        if "serving e0." in log.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{disk.spec.name} did not start: {log.read_text()[-2000:]}")


def _script(direction: str, slots: list[int], mib: int) -> str:
    """Guest script: discover every slot, then one dd pass per slot in order."""
    lines = []
    for s in slots:
        lines.append(f"aoe_wait_disk e0.{s} 30 || exit 10")
        lines.append(f"echo PAYLOAD_{s}=$(cat '/sys/block/etherd!e0.{s}/payload')")
    for s in slots:
        dev = f"/dev/etherd/e0.{s}"
        if direction == "read":
            dd = f"dd if={dev} of=/dev/null bs=1M count={mib} iflag=direct"
        else:
            dd = f"dd if=/dev/zero of={dev} bs=1M count={mib} oflag=direct"
        lines += [
            "t0=$(now_us)",
            f"{dd} 2>/dev/null || exit 11",
            "t1=$(now_us)",
            f"echo US_{s}=$((t1 - t0))",
        ]
    return "\n".join(lines) + "\n"


def measure(args: argparse.Namespace, work: Path) -> dict:
    """results[mtu][direction][server name] -> list of {mbps, cpu_per_gb}."""
    image = bc.make_image(work / "disk.img", max(args.size, 64) * MIB)
    nbytes = args.size * MIB
    results: dict = {}
    for mtu in args.mtu:
        disks = [
            Disk(1, bc.ServerSpec("vblade", "vblade", tuple(args.vblade_args.split())),
                 ("read", "write")),
            Disk(2, bc.ServerSpec("aoe-twisted", "ours", tuple(args.ours_args.split())),
                 ("read", "write")),
        ]
        if args.sync:
            disks += [
                Disk(3, bc.ServerSpec("vblade -s", "vblade", ("-s", *args.vblade_args.split())),
                     ("write",)),
                Disk(4, bc.ServerSpec("aoe-twisted --sync", "ours",
                                      ("--sync", *args.ours_args.split())), ("write",)),
            ]
        per_mtu = results.setdefault(mtu, {})
        with linuxguest.GuestNetwork(mtu=mtu) as net:
            _bridge(net, mtu, disks)
            for d in disks:
                log = work / f"e0.{d.slot}-{mtu}.log"
                d.proc = net.spawn(d.spec.argv(d.port, image, 0, d.slot),
                                   stdout=log.open("ab"), stderr=subprocess.STDOUT)
                _wait_ready(d, log)
            for rep in range(args.repeat):
                for direction in ("write", "read"):
                    slots = [d.slot for d in disks if direction in d.directions]
                    if rep % 2:
                        slots.reverse()
                    by_slot = {d.slot: d for d in disks}
                    cpu0 = {s: bc.cpu_seconds(by_slot[s].proc.pid) for s in slots}
                    result = net.boot(_script(direction, slots, args.size),
                                      timeout=args.timeout, append="loglevel=1")
                    cpu1 = {s: bc.cpu_seconds(by_slot[s].proc.pid) for s in slots}
                    result.check()
                    line = []
                    for s in slots:
                        us = int(result.values[f"US_{s}"])
                        row = {
                            "mbps": nbytes / us,
                            "cpu_per_gb": (cpu1[s] - cpu0[s]) / (nbytes / 1e9),
                            "payload": int(result.values.get(f"PAYLOAD_{s}", 0)),
                        }
                        name = by_slot[s].spec.name
                        per_mtu.setdefault(direction, {}).setdefault(name, []).append(row)
                        line.append(f"{name} {row['mbps']:.1f} MB/s "
                                    f"{row['cpu_per_gb']:.2f} s/GB")
                    print(f"  MTU {mtu} {direction} {rep + 1}/{args.repeat}: "
                          + "; ".join(line), file=sys.stderr, flush=True)
    return results


def report(results: dict, args: argparse.Namespace) -> str:
    """One table per MTU: rows read/write (and durable write), vblade | ours | ratio."""
    out = [f"Linux initiator (QEMU/TCG guest, aoe.ko), {bc.now_utc()}; {args.machine}",
           f"{args.repeat} boots per direction, {args.size} MiB dd bs=1M direct per pass, "
           "servers interleaved in each boot; median (min-max).", ""]
    pairs = [("vblade", "aoe-twisted")]
    if args.sync:
        pairs.append(("vblade -s", "aoe-twisted --sync"))
    for mtu, per in results.items():
        rows = []
        for a, b in pairs:
            for direction in ("read", "write"):
                ra = per.get(direction, {}).get(a, [])
                rb = per.get(direction, {}).get(b, [])
                if not ra and not rb:
                    continue
                label = direction if a == "vblade" else f"durable {direction} ({a} vs {b})"
                for metric, unit, digits in (("mbps", "MB/s", 1), ("cpu_per_gb", "CPU s/GB", 2)):
                    sa = bc.Spread([r[metric] for r in ra])
                    sb = bc.Spread([r[metric] for r in rb])
                    rows.append([f"{label} {unit}", sa.fmt(digits), sb.fmt(digits),
                                 bc.ratio(sb, sa)])
        payload = next((r[0]["payload"] for d in per.values() for r in d.values() if r), 0)
        out.append(bc.table(f"MTU {mtu} (payload {payload} bytes per frame)",
                            ["row", "vblade", "aoe-twisted", "ratio"], rows))
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 MiB passes, 2 boots each")
    parser.add_argument("--size", type=int, default=256, help="MiB per dd pass")
    parser.add_argument("--repeat", type=int, default=3, help="boots per direction")
    parser.add_argument("--mtu", type=int, action="append", help="MTU (repeatable)")
    parser.add_argument("--sync", action="store_true",
                        help="add durable writes: vblade -s vs twistd aoe --sync")
    parser.add_argument("--ours-args", default="", help="extra twistd aoe options")
    parser.add_argument("--vblade-args", default="", help="extra vblade options, e.g. '-b 64'")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per guest boot")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.repeat = 32, 2
    args.mtu = args.mtu or [1500, 9000]
    reason = linuxguest.unavailable_reason()
    if reason:
        print(f"linux_initiator: skipped: {reason}")
        return 0
    if args.sync and not bc.has_option("--sync"):
        print("linux_initiator: twistd aoe has no --sync option yet: durable rows skipped",
              file=sys.stderr)
        args.sync = False
    linuxguest.remove_stale_networks()
    args.machine = bc.machine()
    with tempfile.TemporaryDirectory(prefix="aoe-bench-") as work:
        results = measure(args, Path(work))
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
