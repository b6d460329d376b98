#!/usr/bin/env python3
"""
The Figures of issue #13: a remote disk through aoe-twisted against the disk's own client.

What is compared, 4 KiB random reads and writes, in IOPS:

- ``librbd aio, depth 64``: this Python process with librbd's asynchronous
  calls (``aio_read``/``aio_write``), 64 requests in flight: the most a
  Python gateway can hope for from this cluster;
- ``librbd sync, depth 1``: the same with the synchronous calls
  (``read``/``write``), one round trip at a time: what a backend that
  blocks gets (the bound a synchronous ``rbd:`` would have);
- ``RBDBackend, depth 64``: the ``rbd:`` backend itself
  (``aoe_twisted.backends.rbd``) in this process, driven by the reactor
  with 64 requests in flight, no network and no AoE around it: what the
  completions' hop from librbd's threads to the reactor costs;
- ``AoE → rbd:, window 64``: the user-space initiator of this process
  (``AoEClient``, as ``aoe-twisted bench`` drives it: one worker per
  request in flight) against a gateway serving ``rbd:`` over a veth pair at
  MTU 9000 (so 4 KiB is one frame), 64 requests in flight; the ratio to
  ``librbd aio`` is the issue's figure (at least 0.8x wanted);
- ``AoE → rbd:, window 1``: the same one request at a time (the latency);
- ``AoE → file:, window 64``: the same gateway's ``file:`` target (an image
  in ``/tmp``), for reference: what the client and the server cost without
  the cluster.

The cluster is ``tests.cephcluster``'s: one monitor and one memstore OSD on
127.0.0.1 (pool size 1, no cephx), started here; the image (64 MiB,
``layering`` only) is filled before measuring, so reads read data.  The
gateway is ``twistd aoe``'s service (``aoe_twisted.tap.makeService``, the
same options) run in a child process that stays in this network namespace,
to reach the cluster on 127.0.0.1, with its packet socket opened inside the
server namespace of the veth pair (``AoEService.netns``): ``twistd aoe``
itself has no ``--netns`` option, and a TCP relay into the namespace would
add its own cost.  The rows are interleaved: each repeat measures every row
once, in the order above; the table gives the median and min-max of the
repeats and the CPU this process (initiator or librbd client), the gateway
and the OSD used (median CPU seconds per second).

``nbd:`` is not measured: the report says whether an ``nbd`` scheme is
registered.  Its rows (a gateway serving ``nbd:unix:SOCKET`` of ``nbdkit
memory``, against libnbd's ``aio_pread``/``aio_pwrite`` at depth 64 and
``pread``/``pwrite`` at depth 1) belong here once it is.

    sudo .venv/bin/python benchmarks/remote_backends.py [--duration 2] [--repeat 3] [--json FILE]

Needs root (namespaces, raw sockets), ceph-mon, ceph-osd and python3-rbd.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchcommon as bc

from tests.cephcluster import CephCluster, unavailable_reason

BLOCK = 4096
SECTOR = 512
IMAGE_BYTES = 64 << 20
DEPTH = 64
MTU = 9000
SHELF = 5
RBD_SLOT, FILE_SLOT = 0, 1
LAYERING = 1
ROWS = (
    ("librbd aio", DEPTH),
    ("librbd sync", 1),
    ("RBDBackend", DEPTH),
    ("AoE → rbd:", DEPTH),
    ("AoE → rbd:", 1),
    ("AoE → file:", DEPTH),
)


# -- the gateway, in a child process --------------------------------------------------------


def serve(netns: str, argv: list[str]) -> None:
    """
    Run ``twistd aoe ARGV``'s service with its packet sockets in ``netns``, until SIGTERM.

    The process stays in its own namespace (the cluster's 127.0.0.1).
    """
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from aoe_twisted.tap import Options, makeService

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    options = Options()
    options.parseOptions(argv)
    service = makeService(options)
    service.netns = netns  # type: ignore[attr-defined]
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()  # type: ignore[attr-defined]


def start_gateway(netns: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``serve`` in a child process; return once it serves every target (or raise)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-in", netns, "--", *argv],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    targets = sum(1 for a in argv if a == "--target")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if text.count("] serving e") >= targets:
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    bc.stop(proc)
    raise RuntimeError(f"the gateway did not start serving:\n{log.read_text(errors='replace')}")


# -- librbd directly ----------------------------------------------------------------------


def librbd_aio(image: Any, write: bool, depth: int, duration: float, rng: random.Random) -> float:
    """Random 4 KiB requests with ``depth`` in flight for ``duration`` s; return IOPS."""
    slots = threading.Semaphore(depth)
    failures: list[int] = []
    payload = os.urandom(BLOCK)
    blocks = IMAGE_BYTES // BLOCK

    def done(completion: Any, *_: Any) -> None:
        if completion.get_return_value() < 0:
            failures.append(completion.get_return_value())
        slots.release()

    issued = 0
    start = time.perf_counter()
    deadline = start + duration
    while time.perf_counter() < deadline:
        slots.acquire()
        offset = rng.randrange(blocks) * BLOCK
        if write:
            image.aio_write(payload, offset, done)
        else:
            image.aio_read(offset, BLOCK, done)
        issued += 1
    for _ in range(depth):
        slots.acquire()
    seconds = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"librbd failed {len(failures)} requests: {failures[:3]}")
    return issued / seconds


def librbd_sync(image: Any, write: bool, duration: float, rng: random.Random) -> float:
    """Random 4 KiB synchronous requests, one at a time, for ``duration`` s; return IOPS."""
    payload = os.urandom(BLOCK)
    blocks = IMAGE_BYTES // BLOCK
    done = 0
    start = time.perf_counter()
    deadline = start + duration
    while time.perf_counter() < deadline:
        offset = rng.randrange(blocks) * BLOCK
        if write:
            image.write(payload, offset)
        else:
            image.read(offset, BLOCK)
        done += 1
    return done / (time.perf_counter() - start)


def backend_random(
    backend: Any, write: bool, depth: int, duration: float, rng: random.Random
) -> float:
    """
    Random 4 KiB requests on an ``IAsyncBlockBackend`` in this process, ``depth`` workers.

    The ``rbd:`` backend without the network and the AoE server around it:
    librbd's completions hop to the reactor as they do in the gateway.
    """
    from twisted.internet import defer, reactor

    payload = os.urandom(BLOCK)
    blocks = IMAGE_BYTES // BLOCK
    issued = 0
    deadline = 0.0

    async def worker() -> None:
        nonlocal issued
        while time.perf_counter() < deadline:
            issued += 1
            offset = rng.randrange(blocks) * BLOCK
            if write:
                await backend.write(offset, payload)
            else:
                await backend.read(offset, BLOCK)

    def run() -> defer.Deferred[float]:
        nonlocal deadline
        start = time.perf_counter()
        deadline = start + duration
        d = defer.gatherResults(
            [defer.Deferred.fromCoroutine(worker()) for _ in range(depth)], consumeErrors=True
        )
        return d.addCallback(lambda _: issued / (time.perf_counter() - start))

    return float(_run_in_reactor(reactor, run))


# -- through AoE -------------------------------------------------------------------------


def aoe_random(disk: Any, write: bool, depth: int, duration: float, rng: random.Random) -> float:
    """
    Random 4 KiB requests through ``disk`` (a ``RemoteDisk``), ``depth`` workers; return IOPS.

    As ``aoe-twisted bench`` does it (``_random_io``): each worker awaits one
    request at a time.  Runs the reactor until done (it is not running).
    """
    from twisted.internet import defer, reactor

    payload = os.urandom(BLOCK)
    sectors = BLOCK // SECTOR
    blocks = IMAGE_BYTES // BLOCK
    issued = 0
    deadline = 0.0

    async def worker() -> None:
        nonlocal issued
        while time.perf_counter() < deadline:
            issued += 1
            lba = rng.randrange(blocks) * sectors
            if write:
                await disk.write(lba, payload)
            else:
                await disk.read(lba, sectors)

    result: dict[str, float] = {}

    def run() -> defer.Deferred[None]:
        nonlocal deadline
        start = time.perf_counter()
        deadline = start + duration
        d = defer.gatherResults(
            [defer.Deferred.fromCoroutine(worker()) for _ in range(depth)], consumeErrors=True
        )

        def finished(_: object) -> None:
            result["iops"] = issued / (time.perf_counter() - start)

        d.addCallback(finished)
        return d

    _run_in_reactor(reactor, run)
    return result["iops"]


def _run_in_reactor(reactor: Any, work: Callable[[], Any]) -> Any:
    """Run the reactor until the Deferred ``work()`` returns has fired; return its result."""
    from twisted.internet import defer

    box: dict[str, Any] = {}

    def go() -> None:
        d = defer.maybeDeferred(work)

        def settle(result: Any) -> None:
            box["result"] = result
            reactor.crash()

        d.addBoth(settle)

    reactor.callLater(0, go)
    reactor.run(installSignalHandlers=False)
    result = box.get("result")
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


def open_disk(client: Any, slot: int) -> Any:
    """Open e5.``slot`` with ``client`` (runs the reactor until it is open)."""
    from twisted.internet import reactor

    return _run_in_reactor(reactor, lambda: client.open(SHELF, slot))


def own_cpu() -> float:
    """User + system CPU seconds of this process (all its threads, librbd's too) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu(figures: dict[str, list[float]], who: str) -> str:
    """``READ / WRITE``: the median CPU seconds per second ``who`` used in the rows."""
    return " / ".join(f"{bc.Spread(figures[f'{who} {op}']).median:.2f}" for op in ("read", "write"))


# -- the report --------------------------------------------------------------------------


def main() -> int:
    """Measure every row ``--repeat`` times, interleaved; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="repeats of every row")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, raw sockets)", file=sys.stderr)
        return 2
    reason = unavailable_reason()
    if reason is not None:
        print(f"cannot start the Ceph cluster: {reason}", file=sys.stderr)
        return 2

    import rbd
    from twisted.internet import reactor

    from aoe_twisted.backends.rbd import open_rbd
    from aoe_twisted.backendspec import find_backend_factories
    from aoe_twisted.initiator.client import AoEClient

    schemes = find_backend_factories()
    print(f"# Remote backends (issue #13), {bc.now_utc()}\n\n{bc.machine()}\n")
    if "nbd" not in schemes:
        print(
            "nbd: no backend factory registers the scheme 'nbd' in this checkout "
            f"(schemes: {', '.join(sorted(schemes))}); rbd: and file: only.\n"
        )
    work = Path(tempfile.mkdtemp(prefix="aoe-remote-bench-"))
    cluster = CephCluster(work / "ceph", memstore_bytes=1 << 30)
    gateway = None
    figures: dict[str, dict[str, list[float]]] = {}
    cpu: dict[str, dict[str, list[float]]] = {}
    try:
        cluster.start()
        image_name = cluster.create_image(None, IMAGE_BYTES, name="bench", features=LAYERING)
        client_rados = cluster.connect()
        ioctx = client_rados.open_ioctx("rbd")
        image = rbd.Image(ioctx, image_name)
        chunk = os.urandom(4 << 20)
        for offset in range(0, IMAGE_BYTES, len(chunk)):
            image.write(chunk, offset)
        backend = open_rbd(f"rbd/{image_name},conf={cluster.conf},id=bench", reactor=reactor)
        file_image = bc.make_image(work / "file.img", IMAGE_BYTES)
        with bc.veth_pair(MTU) as pair:
            argv = [
                "--iface", pair.server_if,
                "--target", f"{SHELF}.{RBD_SLOT}=rbd:rbd/{image_name},conf={cluster.conf},"
                "id=gateway",
                "--target", f"{SHELF}.{FILE_SLOT}=file:{file_image}",
            ]  # fmt: skip
            gateway = start_gateway(pair.server_ns, argv, work / "gateway.log")
            client = AoEClient.listen(pair.client_if, netns=pair.client_ns)
            disks = {"AoE → rbd:": open_disk(client, RBD_SLOT)}
            disks["AoE → file:"] = open_disk(client, FILE_SLOT)
            for disk in disks.values():
                if disk.window < DEPTH or disk.sectors_per_frame < BLOCK // SECTOR:
                    raise RuntimeError(
                        f"{disk.name}: window {disk.window}, "
                        f"{disk.sectors_per_frame} sectors per frame"
                    )
            osd_pid = cluster.daemon_pids()[-1]
            rng = random.Random(13)
            for repeat in range(args.repeat):
                for name, depth in ROWS:
                    for write in (False, True):
                        key = f"{name}, {'window' if 'AoE' in name else 'depth'} {depth}"
                        op = "write" if write else "read"
                        before = (bc.cpu_seconds(gateway.pid), bc.cpu_seconds(osd_pid), own_cpu())
                        began = time.perf_counter()
                        if name == "librbd aio":
                            iops = librbd_aio(image, write, depth, args.duration, rng)
                        elif name == "librbd sync":
                            iops = librbd_sync(image, write, args.duration, rng)
                        elif name == "RBDBackend":
                            iops = backend_random(backend, write, depth, args.duration, rng)
                        else:
                            iops = aoe_random(disks[name], write, depth, args.duration, rng)
                        wall = time.perf_counter() - began
                        after = (bc.cpu_seconds(gateway.pid), bc.cpu_seconds(osd_pid), own_cpu())
                        figures.setdefault(key, {}).setdefault(op, []).append(iops)
                        cpu.setdefault(key, {}).setdefault(f"gateway {op}", []).append(
                            (after[0] - before[0]) / wall
                        )
                        cpu[key].setdefault(f"osd {op}", []).append((after[1] - before[1]) / wall)
                        cpu[key].setdefault(f"client {op}", []).append(
                            (after[2] - before[2]) / wall
                        )
                print(f"repeat {repeat + 1}/{args.repeat} done", file=sys.stderr, flush=True)
            _run_in_reactor(reactor, client.close)
            _run_in_reactor(reactor, backend.close)
            image.close()
            ioctx.close()
            client_rados.shutdown()
            bc.stop(gateway)
            gateway = None
    finally:
        if gateway is not None:
            bc.stop(gateway)
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)

    reference = "librbd aio, depth 64"
    rows = []
    for key in figures:
        reads, writes = (bc.Spread(figures[key][op]) for op in ("read", "write"))
        ref_reads, ref_writes = (bc.Spread(figures[reference][op]) for op in ("read", "write"))
        rows.append([
            key, reads.fmt(0), bc.ratio(reads, ref_reads), writes.fmt(0),
            bc.ratio(writes, ref_writes), _cpu(cpu[key], "client"),
            _cpu(cpu[key], "gateway") if "AoE" in key else "-", _cpu(cpu[key], "osd"),
        ])  # fmt: skip
    print(bc.table(
        f"4 KiB random requests, IOPS: median (min-max) of {args.repeat} x {args.duration:g} s",
        ["path", "read IOPS", "vs aio 64", "write IOPS", "vs aio 64",
         "this process CPU r/w", "gateway CPU r/w", "OSD CPU r/w"],
        rows,
    ))  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps({"iops": figures, "cpu": cpu}, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--serve-in":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        serve(sys.argv[2], sys.argv[4:] if sys.argv[3:4] == ["--"] else sys.argv[3:])
        sys.exit(0)
    sys.exit(main())
