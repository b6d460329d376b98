#!/usr/bin/env python3
"""
Raw server capacity: vblade and aoe-twisted driven by a load generator over a veth pair.

For each MTU (1500 and 9000) two network namespaces are joined by a veth pair.
The server under test (``vblade`` or ``twistd aoe``, the same image file)
runs in one; the load generator runs in the other as a separate process: a
raw ``AF_PACKET`` socket, pre-built request frames, no Twisted, and a fixed
window of requests in flight equal to the buffer count the target advertises
in its config reply.  It measures MB/s, IOPS and the p50/p99 latency of every
request, for sequential and random 1-sector and max-sector (what the MTU
allows: 2 at 1500, 17 at 9000) reads and writes.

The generator is ``loadgen.c`` (``recvmmsg`` and ``sendmmsg``, no system call
per frame; ``--loadgen-args "--rx ring"`` for a ``PACKET_MMAP`` RX ring),
compiled with ``cc -O2`` into a cache outside the checkout
(``~/.cache/aoe-twisted/``, keyed by the source's hash) on first use.
``--python-generator`` uses the pure-Python one (``--generator`` below), which
needs about 2.5x the CPU per request and caps at 130-210k requests/s on one
CPU of this machine.  ``--ceiling`` measures the generators themselves: Python
and C in turn against ``loadgen.c``'s trivial echo target (no disk), or
against ``--ceiling-target vblade``/``ours``; see docs/benchmarks-generator.md.
``--with-echo`` runs the echo target as a third server, interleaved with the
other two, and adds a table per MTU of what it reaches: a server that does no
work at all, so echo / vblade is the most any server could show against
vblade with this generator on this machine, row by row.

The servers are interleaved: every repeat starts vblade and then our server
(the order alternates), each for all the rows, and the table gives the median
and the min-max of the repeats with the ratio aoe-twisted / vblade.  It also
shows the generator's own CPU use (CPU seconds / wall seconds) and the
server's, so a reader can see which side is saturated.

    sudo python benchmarks/raw_capacity.py [--quick] [--repeat 5] [--duration 3]
        [--mtu 1500 --mtu 9000] [--ours-args "--workers 2"] [--json out.json]
        [--python-generator] [--ceiling [--ceiling-target echo|vblade|ours]]
        [--with-echo]

Needs root (namespaces, raw sockets) and ``vblade``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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

ETHERTYPE = 0x88A2
SECTOR = 512
_TAG = struct.Struct(">I")
_REQ_HDR = struct.Struct(">6s6sHBBHBBI")  # Ethernet + AoE header (24 bytes)
_ATA_ARG = struct.Struct("<BBBB6sH")  # aflags, feature, count, cmd, lba[6], reserved
READ_EXT, WRITE_EXT = 0x24, 0x34
AFLAG_E, AFLAG_W = 0x40, 0x01
IMAGE_BYTES = 64 << 20
RING = 2048  # pre-built request frames per row, reused round-robin

ROWS = [
    (pattern, size, op)
    for op in ("read", "write")
    for size in ("1", "max")
    for pattern in ("seq", "rand")
]


# --------------------------------------------------------------------------
# The generator (runs in the client namespace, one process for all the rows)


def _discover(sock: socket.socket, mac: bytes, shelf: int, slot: int, timeout: float) -> tuple:
    """Broadcast config queries until e``shelf``.``slot`` answers; return (mac, bufcnt, scnt)."""
    query = _REQ_HDR.pack(b"\xff" * 6, mac, ETHERTYPE, 0x10, 0, 0xFFFF, 0xFF, 1, 0x5A5A)
    query = (query + bytes(8)).ljust(60, b"\0")
    deadline = time.monotonic() + timeout
    buf = bytearray(10000)
    while time.monotonic() < deadline:
        sock.send(query)
        end = time.monotonic() + 0.2
        while (left := end - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                break
            n = sock.recv_into(buf)
            if n < 32 or buf[12:14] != b"\x88\xa2" or not buf[14] & 0x08 or buf[19] != 1:
                continue
            if struct.unpack_from(">HB", buf, 16) != (shelf, slot):
                continue
            bufcnt, _fw, scnt = struct.unpack_from(">HHB", buf, 24)
            return bytes(buf[6:12]), bufcnt, scnt
    raise SystemExit(f"generator: e{shelf}.{slot} did not answer a config query in {timeout} s")


def _frames(dst: bytes, sources: list[bytes], shelf: int, slot: int, op: str, pattern: str,
            count: int, disk_sectors: int, seed: int) -> list[bytearray]:
    """Pre-build ``RING`` request frames (tags filled in at send time), from each source in turn."""
    rng = random.Random(seed)
    write = op == "write"
    aflags = AFLAG_E | (AFLAG_W if write else 0)
    cmd = WRITE_EXT if write else READ_EXT
    data = bytes([0xA5]) * (count * SECTOR) if write else b""
    slots = disk_sectors // count
    start = rng.randrange(slots)
    frames = []
    for i in range(RING):
        n = rng.randrange(slots) if pattern == "rand" else (start + i) % slots
        lba = (n * count).to_bytes(6, "little")
        frame = (
            _REQ_HDR.pack(dst, sources[i % len(sources)], ETHERTYPE, 0x10, 0, shelf, slot, 0, 0)
            + _ATA_ARG.pack(aflags, 0, count, cmd, lba, 0)
            + data
        )
        frames.append(bytearray(frame.ljust(60, b"\0")))
    return frames


def _drive(sock: socket.socket, server_mac: bytes, frames: list[bytearray], window: int,
           warmup: float, duration: float, server_pid: int, sectors: int) -> dict:
    """Keep ``window`` requests in flight for warmup + duration seconds; return the figures."""
    perf = time.perf_counter
    recv_into = sock.recv_into
    send = sock.send
    pack_tag = _TAG.pack_into
    unpack_tag = _TAG.unpack_from
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    buf = bytearray(16384)
    inflight: dict[int, tuple[float, bytearray]] = {}
    latencies: list[float] = []
    record = latencies.append
    ring = len(frames)
    nxt = 0
    tag = 0x10000
    retransmits = errors = stray = 0
    t0 = perf()
    measure_from = t0 + warmup
    stop_at = measure_from + duration
    measuring = False
    cpu0 = cpu1 = m_start = m_end = 0.0
    sys0 = sys1 = 0.0
    srv0 = srv1 = (0.0, 0.0)

    def issue() -> None:
        nonlocal nxt, tag
        frame = frames[nxt]
        nxt = nxt + 1 if nxt + 1 < ring else 0
        tag = (tag + 1) & 0x7FFFFFFF
        pack_tag(frame, 20, tag)
        inflight[tag] = (perf(), frame)
        send(frame)

    for _ in range(window):
        issue()
    sending = True
    while inflight:
        try:
            n = recv_into(buf)
        except BlockingIOError:
            if not poller.poll(250):
                # Nothing for 250 ms: something was lost; send what is outstanding again.
                for _sent, frame in list(inflight.values()):
                    retransmits += 1
                    send(frame)
                if perf() > stop_at + 5:
                    break
            continue
        if n < 28 or not buf[14] & 0x08 or buf[6:12] != server_mac:
            stray += 1
            continue
        entry = inflight.pop(unpack_tag(buf, 20)[0], None)
        if entry is None:
            continue
        now = perf()
        if measuring:
            record(now - entry[0])
            if buf[27] & 0x01 or buf[14] & 0x04:
                errors += 1
            if now >= stop_at:
                measuring = False
                sending = False
                m_end = now
                cpu1 = time.process_time()
                sys1 = os.times().system
                srv1 = bc.cpu_split(server_pid)
        elif sending and now >= measure_from:
            measuring = True
            m_start = now
            cpu0 = time.process_time()
            sys0 = os.times().system
            srv0 = bc.cpu_split(server_pid)
        if sending:
            issue()
    wall = max(m_end - m_start, 1e-9)
    done = len(latencies)
    latencies.sort()
    return {
        "iops": done / wall,
        "mbps": done * sectors * SECTOR / wall / 1e6,
        "p50_us": latencies[done // 2] * 1e6 if done else float("nan"),
        "p99_us": latencies[min(done - 1, done * 99 // 100)] * 1e6 if done else float("nan"),
        "gen_cpu": (cpu1 - cpu0) / wall,
        "gen_sys": (sys1 - sys0) / wall,
        "server_cpu": (sum(srv1) - sum(srv0)) / wall,
        "server_sys": (srv1[1] - srv0[1]) / wall,
        "requests": done,
        "errors": errors,
        "retransmits": retransmits,
        "stray": stray,
    }


def generator(args: argparse.Namespace) -> int:
    """The ``--generator`` process: discover, then one JSON line per row on stdout."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    sock.bind((args.iface, ETHERTYPE))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    mac = bytes(sock.getsockname()[4])
    server_mac, bufcnt, scnt = _discover(sock, mac, args.shelf, args.slot, 30.0)
    sock.setblocking(False)
    # More initiators: forged, locally administered source MACs after our own.
    sources = [mac] + [bytes([0x02, 0xA0, 0xE0, 0, 0, n]) for n in range(1, args.initiators)]
    window = args.window or bufcnt * len(sources)
    for i, (pattern, size, op) in enumerate(json.loads(args.rows)):
        count = 1 if size == "1" else scnt
        frames = _frames(server_mac, sources, args.shelf, args.slot, op, pattern, count,
                         args.disk_sectors, seed=i)
        result = _drive(sock, server_mac, frames, window, args.warmup, args.duration,
                        args.server_pid, count)
        result.update(row=[pattern, size, op], sectors=count, window=window, bufcnt=bufcnt,
                      generator="python")
        print(json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------
# The orchestrator


def generator_kind(args: argparse.Namespace, wanted: str | None = None) -> str:
    """
    ``"c"`` or ``"python"``: ``wanted``, else ``--python-generator``, else C if it builds.

    A C generator that cannot be built (no compiler) falls back to the Python
    one with a warning, so the benchmark still runs; the rows say which ran.
    """
    kind = wanted or ("python" if getattr(args, "python_generator", False) else "c")
    if kind == "c":
        try:
            bc.loadgen_binary()
        except (OSError, RuntimeError) as e:
            if wanted == "c":
                raise
            print(f"raw_capacity: {e}; using the Python generator", file=sys.stderr)
            return "python"
    return kind


def run_generator(pair: bc.Veth, server_pid: int, rows: list, args: argparse.Namespace,
                  window: int = 0, generator: str | None = None) -> list[dict]:
    """
    Run the generator process in the client namespace for ``rows``; return its results.

    ``generator``: ``"c"`` (``loadgen.c``) or ``"python"`` (``--generator``);
    by default the C one unless ``args.python_generator``.  Both print the same
    JSON rows (the C one adds nothing the report needs but ``generator``).
    """
    common = [
        "--iface", pair.client_if, "--server-pid", str(server_pid),
        "--duration", str(args.duration), "--warmup", str(args.warmup),
        "--disk-sectors", str(IMAGE_BYTES // SECTOR), "--window", str(window),
        "--initiators", str(getattr(args, "initiators", 1)),
    ]  # fmt: skip
    if generator_kind(args, generator) == "c":
        argv = ["ip", "netns", "exec", pair.client_ns, str(bc.loadgen_binary()), "gen",
                "--rows", ",".join(":".join(r) for r in rows), *common,
                *str(getattr(args, "loadgen_args", "") or "").split()]  # fmt: skip
    else:
        argv = ["ip", "netns", "exec", pair.client_ns, sys.executable, __file__, "--generator",
                "--rows", json.dumps(rows), *common]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                          timeout=120 + len(rows) * (args.duration + args.warmup + 10))
    if proc.returncode != 0:
        raise RuntimeError(f"generator failed: {proc.stderr.strip()[-2000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def measure(args: argparse.Namespace, servers: list[bc.ServerSpec], work: Path) -> dict:
    """Every MTU, every repeat, every server in turn: results[mtu][server][row] -> [dict]."""
    image = bc.make_image(work / "disk.img", IMAGE_BYTES)
    results: dict = {}
    for mtu in args.mtu:
        per_mtu = results.setdefault(mtu, {s.name: {} for s in servers})
        with bc.veth_pair(mtu) as pair:
            for rep in range(args.repeat):
                order = servers if rep % 2 == 0 else servers[::-1]
                for spec in order:
                    log = work / f"{spec.kind}-{mtu}.log"
                    proc = bc.start_in_netns(pair.server_ns, spec.argv(pair.server_if, image),
                                             log, spec.source)
                    scraper = _scraper(pair.server_ns, spec)
                    try:
                        rows = run_generator(pair, proc.pid, ROWS, args, window=args.window,
                                             generator=spec.generator)
                    finally:
                        bc.stop(proc)
                        if scraper is not None:
                            bc.stop(scraper)
                    for r in rows:
                        per_mtu[spec.name].setdefault(" ".join(r["row"]), []).append(r)
                    print(f"  MTU {mtu} repeat {rep + 1}/{args.repeat} {spec.name}: "
                          + ", ".join(f"{' '.join(r['row'])} {r['iops']:,.0f} "
                                      f"(gen {r['gen_cpu']:.0%})" for r in rows),
                          file=sys.stderr, flush=True)
    return results


def _scraper(netns: str, spec: bc.ServerSpec) -> subprocess.Popen[bytes] | None:
    """
    For a server started with ``--metrics PORT``: scrape its ``/metrics`` once a second.

    As Prometheus would, so that "metrics on" includes what serving them costs.
    """
    extra = list(spec.extra)
    if "--metrics" not in extra:
        return None
    address = extra[extra.index("--metrics") + 1]
    url = f"http://{address if ':' in address else '127.0.0.1:' + address}/metrics"
    code = (
        "import time, urllib.request\n"
        "while True:\n"
        "    time.sleep(1)\n"
        "    try:\n"
        f"        urllib.request.urlopen({url!r}, timeout=5).read()\n"
        "    except OSError:\n"
        "        pass\n"
    )
    return subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", code],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def report(results: dict, servers: list[bc.ServerSpec], args: argparse.Namespace) -> str:
    """The tables: IOPS and MB/s side by side with ratios, then latency and CPU."""
    a, b = servers[0].name, servers[1].name
    out = [f"Raw capacity over veth, {bc.now_utc()}; {args.machine}",
           f"{args.repeat} interleaved repeats x {args.duration} s per row (after "
           f"{args.warmup} s warm-up); figures are median (min-max); "
           f"{args.initiators} initiator(s), window = the target's buffer count per "
           f"initiator; aoe-twisted options: {args.ours_args or '(none)'}; "
           f"load generator: {_generators(results, servers)}"
           f"{' ' + repr(args.loadgen_args) if getattr(args, 'loadgen_args', '') else ''}. "
           "gen/srv CPU: generator and server CPU seconds per "
           "wall second; srv CPU µs/req: server CPU (of it in the kernel) per request.", ""]
    for mtu, per in results.items():
        rows_out = []
        for pattern, size, op in ROWS:
            key = f"{pattern} {size} {op}"
            ra, rb = per[a].get(key, []), per[b].get(key, [])
            sect = (ra or rb)[0]["sectors"] if (ra or rb) else "?"
            label = f"{pattern} {sect}-sector {op}"

            def s(rs: list, k: str) -> bc.Spread:
                return bc.Spread([r[k] for r in rs])

            def us_per_req(rs: list) -> str:
                if not rs:
                    return "n/a"
                cpu = statistics.median(1e6 * r["server_cpu"] / r["iops"] for r in rs)
                sys_ = statistics.median(1e6 * r["server_sys"] / r["iops"] for r in rs)
                return f"{cpu:.1f} ({sys_:.1f})"

            rows_out.append([
                label,
                s(ra, "iops").fmt(0), s(rb, "iops").fmt(0), bc.ratio(s(rb, "iops"), s(ra, "iops")),
                f"{s(ra, 'mbps').median:.1f} / {s(rb, 'mbps').median:.1f}",
                f"{s(ra, 'p50_us').median:.0f}/{s(ra, 'p99_us').median:.0f}",
                f"{s(rb, 'p50_us').median:.0f}/{s(rb, 'p99_us').median:.0f}",
                f"{s(ra, 'gen_cpu').median:.0%} / {s(ra, 'server_cpu').median:.0%}",
                f"{s(rb, 'gen_cpu').median:.0%} / {s(rb, 'server_cpu').median:.0%}",
                f"{us_per_req(ra)} / {us_per_req(rb)}",
                " / ".join(
                    str(sum(r["errors"] + r["retransmits"] for r in rs)) for rs in (ra, rb)
                ),
            ])  # fmt: skip
        windows = " / ".join(
            str(next(iter(per[name].values()))[0]["window"]) if per.get(name) else "?"
            for name in (a, b)
        )
        out.append(bc.table(
            f"MTU {mtu} (window {windows}, {a} / {b})",
            ["row", f"{a} IOPS", f"{b} IOPS", "ratio", "MB/s (v / a)",
             f"{a} p50/p99 µs", f"{b} p50/p99 µs", f"gen/srv CPU ({a})",
             f"gen/srv CPU ({b})", "srv CPU µs/req (sys) v / a", "err+retx v / a"],
            rows_out,
        ))  # fmt: skip
        if any(spec.generator for spec in servers):
            out.append("")
            out.append(_generator_cost(per, a, b))
        if "echo" in per and len(servers) > 2:
            out.append("")
            out.append(_ceiling_table(mtu, per, a, b))
        out.append("")
    return "\n".join(out)


def _ceiling_table(mtu: int, per: dict, a: str, b: str) -> str:
    """
    For ``--with-echo``: the echo target's IOPS beside ``a``'s and ``b``'s, row by row.

    The echo target answers without a disk and with almost no code, so on a
    machine where the generator and the servers share the CPUs, echo / ``a``
    bounds what any server could show against ``a`` with this generator, and
    ``b`` / echo is how much of that bound ``b`` reaches.
    """
    rows_out = []
    for pattern, size, op in ROWS:
        key = f"{pattern} {size} {op}"
        re_, ra, rb = (per[name].get(key, []) for name in ("echo", a, b))
        if not (re_ and ra and rb):
            continue
        e, va, vb = (bc.Spread([r["iops"] for r in rs]) for rs in (re_, ra, rb))
        label = f"{pattern} {re_[0]['sectors']}-sector {op}"
        gen = statistics.median(1e6 * r["gen_cpu"] / r["iops"] for r in re_)
        rows_out.append([label, e.fmt(0), f"{gen:.1f}", bc.ratio(e, va), bc.ratio(vb, e)])
    return bc.table(
        f"MTU {mtu}: the echo target (no disk), interleaved with both",
        ["row", "echo IOPS", "gen CPU µs/req (echo)", f"echo / {a} (the bound)",
         f"{b} / echo"],
        rows_out,
    )  # fmt: skip


def _generator_cost(per: dict, a: str, b: str) -> str:
    """
    For ``--ceiling``: the generator's CPU µs per request (of it in the kernel), per row.

    Steadier than its IOPS on a shared machine: 1e6 / (µs/req) is what one
    whole CPU would let that generator reach if the target kept up.
    """
    parts = []
    for pattern, size, op in ROWS:
        key = f"{pattern} {size} {op}"
        cells = []
        for name in (a, b):
            rs = per[name].get(key, [])
            if not rs:
                cells.append("n/a")
                continue
            cpu = statistics.median(1e6 * r["gen_cpu"] / r["iops"] for r in rs)
            sys_ = statistics.median(1e6 * r.get("gen_sys", 0.0) / r["iops"] for r in rs)
            cells.append(f"{cpu:.1f} ({sys_:.1f})")
        parts.append(f"{key} {' / '.join(cells)}")
    return f"Generator CPU µs/req (sys), {a} / {b}: " + "; ".join(parts) + "."


def _generators(results: dict, servers: list[bc.ServerSpec]) -> str:
    """Which generator drove each server (from the rows: a C build may have fallen back)."""
    names = {"c": "C (loadgen.c)", "python": "Python"}
    used = []
    for spec in servers:
        kinds = sorted({r.get("generator", "python") for per in results.values()
                        for rs in per.get(spec.name, {}).values() for r in rs})  # fmt: skip
        used.append(f"{spec.name}: {'+'.join(names.get(k, k) for k in kinds) or '?'}")
    return ", ".join(used)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--generator", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--iface", help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--disk-sectors", type=int, default=IMAGE_BYTES // SECTOR,
                        help=argparse.SUPPRESS)
    parser.add_argument("--shelf", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--slot", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--window", type=int, default=0,
                        help="requests in flight (default: the target's buffer count)")
    parser.add_argument("--initiators", type=int, default=1,
                        help="source MACs the generator sends from in turn, each with the "
                             "target's buffer count in flight (default 1); --workers spreads "
                             "frames by initiator, so measure it with 2 or more")
    parser.add_argument("--quick", action="store_true",
                        help="3 repeats of 1 s per row (for make bench)")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved repeats")
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per row")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds per row")
    parser.add_argument("--mtu", type=int, action="append", help="MTU (repeatable)")
    parser.add_argument("--ours-args", default="",
                        help="extra twistd aoe options, e.g. '--workers 2'")
    parser.add_argument("--vblade-args", default="", help="extra vblade options")
    parser.add_argument("--against-args", default=None,
                        help="compare with aoe-twisted run with these options instead of "
                             "vblade (e.g. '' against --ours-args '--metrics 9580': a "
                             "server given --metrics is scraped once a second)")
    parser.add_argument("--against-source", default=None,
                        help="with --against-args: that aoe-twisted from this src directory "
                             "(another version, for before/after)")
    parser.add_argument("--python-generator", action="store_true",
                        help="drive the servers with the pure-Python generator instead of "
                             "loadgen.c (compiled on first use into ~/.cache/aoe-twisted)")
    parser.add_argument("--loadgen-args", default="",
                        help="extra options for loadgen.c's generator, e.g. '--rx ring' or "
                             "'--spin 100'")
    parser.add_argument("--with-echo", action="store_true",
                        help="also run loadgen.c's echo target (no disk), interleaved with "
                             "the two servers, and show what it reaches: the most any "
                             "server could show against the first on this machine")
    parser.add_argument("--ceiling", action="store_true",
                        help="measure the generators, not the servers: the Python and the C "
                             "generator in turn against --ceiling-target")
    parser.add_argument("--ceiling-target", choices=("echo", "vblade", "ours"), default="echo",
                        help="with --ceiling: loadgen.c's trivial echo target (default: no "
                             "disk, so what it reaches is the generator's ceiling), vblade "
                             "(with --vblade-args) or aoe-twisted (with --ours-args)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    if args.generator:
        return generator(args)
    if args.quick:
        args.repeat, args.duration, args.warmup = 3, 1.0, 0.3
    args.mtu = args.mtu or [1500, 9000]
    args.machine = bc.machine()
    servers = [
        bc.ServerSpec("vblade", "vblade", tuple(args.vblade_args.split())),
        bc.ServerSpec("aoe-twisted", "ours", tuple(args.ours_args.split())),
    ]
    if args.against_args is not None or args.against_source is not None:
        label = "before" if args.against_source else "other"
        servers[0] = bc.ServerSpec(
            label, "ours", tuple((args.against_args or "").split()), args.against_source
        )
    if args.with_echo and not args.ceiling:
        servers.append(bc.ServerSpec("echo", "echo", ()))
    if args.ceiling:
        extra = {"echo": "", "vblade": args.vblade_args, "ours": args.ours_args}
        target = args.ceiling_target
        opts = tuple(extra[target].split())
        servers = [
            bc.ServerSpec(f"{target}/py-gen", target, opts, generator="python"),
            bc.ServerSpec(f"{target}/C-gen", target, opts, generator="c"),
        ]
    with tempfile.TemporaryDirectory(prefix="aoe-bench-") as work:
        results = measure(args, servers, Path(work))
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    print(report(results, servers, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
