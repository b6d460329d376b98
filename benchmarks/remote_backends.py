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
  the cluster;
- ``libnbd aio, depth 64`` and ``libnbd sync, depth 1``: this process with
  libnbd (``aio_pread``/``aio_pwrite``, 64 in flight, driven by libnbd's own
  ``poll``; ``pread``/``pwrite`` one at a time) against ``nbdkit memory``
  (64 MiB, filled first) on a UNIX socket;
- ``NBDBackend, depth 64``: the ``nbd:`` backend itself in this process,
  driven by the reactor, 64 in flight;
- ``AoE → nbd:, window 64`` and ``window 1``: the gateway's third target,
  ``nbd:unix:SOCKET`` of the same nbdkit; the ratio to ``libnbd aio`` is
  the issue's figure for NBD.

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

The ``nbd:`` rows are left out, saying why, when no factory registers
``nbd``, or nbdkit or python3-libnbd is missing.  The "vs aio 64" column
compares each ``nbd:`` row with ``libnbd aio, depth 64``, every other row
with ``librbd aio, depth 64``; "server CPU" is the OSD's for the ``rbd:``
and librbd rows, nbdkit's for the NBD rows.

    sudo .venv/bin/python benchmarks/remote_backends.py [--duration 2] [--repeat 3] [--json FILE]

Needs root (namespaces, raw sockets), ceph-mon, ceph-osd and python3-rbd;
nbdkit and python3-libnbd for the ``nbd:`` rows.
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
RBD_SLOT, FILE_SLOT, NBD_SLOT = 0, 1, 2
LAYERING = 1
ROWS = (
    ("librbd aio", DEPTH),
    ("librbd sync", 1),
    ("RBDBackend", DEPTH),
    ("AoE → rbd:", DEPTH),
    ("AoE → rbd:", 1),
    ("AoE → file:", DEPTH),
)
NBD_ROWS = (
    ("libnbd aio", DEPTH),
    ("libnbd sync", 1),
    ("NBDBackend", DEPTH),
    ("AoE → nbd:", DEPTH),
    ("AoE → nbd:", 1),
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


# -- libnbd directly ----------------------------------------------------------------------


def libnbd_aio(handle: Any, write: bool, depth: int, duration: float, rng: random.Random) -> float:
    """
    Random 4 KiB requests with ``depth`` in flight for ``duration`` s; return IOPS.

    libnbd's own ``poll`` drives the handle (no reactor, no threads).
    """
    payload = bytearray(os.urandom(BLOCK))
    blocks = IMAGE_BYTES // BLOCK
    failures: list[int] = []
    in_flight = 0

    def done(error: Any) -> int:
        nonlocal in_flight
        in_flight -= 1
        if error.value:
            failures.append(error.value)
        return 1  # retire the command

    issued = 0
    start = time.perf_counter()
    deadline = start + duration
    while time.perf_counter() < deadline:
        while in_flight >= depth:
            handle.poll(-1)
        offset = rng.randrange(blocks) * BLOCK
        in_flight += 1
        if write:
            handle.aio_pwrite(payload, offset, completion=done)
        else:
            handle.aio_pread(bytearray(BLOCK), offset, completion=done)
        issued += 1
    while in_flight:
        handle.poll(-1)
    seconds = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"libnbd failed {len(failures)} requests: {failures[:3]}")
    return issued / seconds


def libnbd_sync(handle: Any, write: bool, duration: float, rng: random.Random) -> float:
    """Random 4 KiB synchronous requests, one at a time, for ``duration`` s; return IOPS."""
    payload = os.urandom(BLOCK)
    blocks = IMAGE_BYTES // BLOCK
    done = 0
    start = time.perf_counter()
    deadline = start + duration
    while time.perf_counter() < deadline:
        offset = rng.randrange(blocks) * BLOCK
        if write:
            handle.pwrite(payload, offset)
        else:
            handle.pread(BLOCK, offset)
        done += 1
    return done / (time.perf_counter() - start)


def nbd_unavailable(schemes: Any) -> str | None:
    """Why the ``nbd:`` rows cannot be measured here, or ``None``."""
    if "nbd" not in schemes:
        return (
            "no backend factory registers the scheme 'nbd' in this checkout "
            f"(schemes: {', '.join(sorted(schemes))})"
        )
    if shutil.which("nbdkit") is None:
        return "needs nbdkit (apt-get install nbdkit)"
    try:
        import nbd  # noqa: F401
    except ImportError:
        return "needs python3-libnbd importable from this Python"
    return None


def start_nbdkit(socket_path: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start ``nbdkit memory`` of ``IMAGE_BYTES`` on ``socket_path``; return once it listens."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["nbdkit", "--unix", str(socket_path), "--foreground", "memory", str(IMAGE_BYTES)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 10
    while not socket_path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            bc.stop(proc)
            raise RuntimeError(f"nbdkit did not start: {log.read_text(errors='replace')}")
        time.sleep(0.01)
    return proc


def backend_random(
    backend: Any, write: bool, depth: int, duration: float, rng: random.Random
) -> float:
    """
    Random 4 KiB requests on an ``IAsyncBlockBackend`` in this process, ``depth`` workers.

    The ``rbd:`` or ``nbd:`` backend without the network and the AoE server
    around it: its completions reach the reactor as they do in the gateway.
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
    no_nbd = nbd_unavailable(schemes)
    if no_nbd is not None:
        print(f"nbd: not measured: {no_nbd}; rbd: and file: only.\n")
    rows = ROWS + (NBD_ROWS if no_nbd is None else ())
    work = Path(tempfile.mkdtemp(prefix="aoe-remote-bench-"))
    cluster = CephCluster(work / "ceph", memstore_bytes=1 << 30)
    gateway = None
    nbdkit = None
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
        handle = nbd_backend = None
        if no_nbd is None:
            import nbd

            from aoe_twisted.backends.nbd import NBDBackendFactory

            nbd_socket = work / "nbdkit.sock"
            nbdkit = start_nbdkit(nbd_socket, work / "nbdkit.log")
            handle = nbd.NBD()
            handle.connect_unix(str(nbd_socket))
            for offset in range(0, IMAGE_BYTES, len(chunk)):
                handle.pwrite(chunk, offset)
            nbd_backend = NBDBackendFactory().open(f"unix:{nbd_socket}")
        with bc.veth_pair(MTU) as pair:
            argv = [
                "--iface", pair.server_if,
                "--target", f"{SHELF}.{RBD_SLOT}=rbd:rbd/{image_name},conf={cluster.conf},"
                "id=gateway",
                "--target", f"{SHELF}.{FILE_SLOT}=file:{file_image}",
            ]  # fmt: skip
            if no_nbd is None:
                argv += ["--target", f"{SHELF}.{NBD_SLOT}=nbd:unix:{nbd_socket}"]
            gateway = start_gateway(pair.server_ns, argv, work / "gateway.log")
            client = AoEClient.listen(pair.client_if, netns=pair.client_ns)
            disks = {"AoE → rbd:": open_disk(client, RBD_SLOT)}
            disks["AoE → file:"] = open_disk(client, FILE_SLOT)
            if no_nbd is None:
                disks["AoE → nbd:"] = open_disk(client, NBD_SLOT)
            for disk in disks.values():
                if disk.window < DEPTH or disk.sectors_per_frame < BLOCK // SECTOR:
                    raise RuntimeError(
                        f"{disk.name}: window {disk.window}, "
                        f"{disk.sectors_per_frame} sectors per frame"
                    )
            osd_pid = cluster.daemon_pids()[-1]
            rng = random.Random(13)
            for repeat in range(args.repeat):
                for name, depth in rows:
                    server_pid = nbdkit.pid if "nbd" in name.lower() and nbdkit else osd_pid
                    for write in (False, True):
                        key = f"{name}, {'window' if 'AoE' in name else 'depth'} {depth}"
                        op = "write" if write else "read"
                        before = (
                            bc.cpu_seconds(gateway.pid),
                            bc.cpu_seconds(server_pid),
                            own_cpu(),
                        )
                        began = time.perf_counter()
                        if name == "librbd aio":
                            iops = librbd_aio(image, write, depth, args.duration, rng)
                        elif name == "librbd sync":
                            iops = librbd_sync(image, write, args.duration, rng)
                        elif name == "RBDBackend":
                            iops = backend_random(backend, write, depth, args.duration, rng)
                        elif name == "libnbd aio":
                            iops = libnbd_aio(handle, write, depth, args.duration, rng)
                        elif name == "libnbd sync":
                            iops = libnbd_sync(handle, write, args.duration, rng)
                        elif name == "NBDBackend":
                            iops = backend_random(nbd_backend, write, depth, args.duration, rng)
                        else:
                            iops = aoe_random(disks[name], write, depth, args.duration, rng)
                        wall = time.perf_counter() - began
                        after = (bc.cpu_seconds(gateway.pid), bc.cpu_seconds(server_pid), own_cpu())
                        figures.setdefault(key, {}).setdefault(op, []).append(iops)
                        cpu.setdefault(key, {}).setdefault(f"gateway {op}", []).append(
                            (after[0] - before[0]) / wall
                        )
                        cpu[key].setdefault(f"server {op}", []).append(
                            (after[1] - before[1]) / wall
                        )
                        cpu[key].setdefault(f"client {op}", []).append(
                            (after[2] - before[2]) / wall
                        )
                print(f"repeat {repeat + 1}/{args.repeat} done", file=sys.stderr, flush=True)
            _run_in_reactor(reactor, client.close)
            _run_in_reactor(reactor, backend.close)
            if nbd_backend is not None:
                _run_in_reactor(reactor, nbd_backend.close)
                handle.shutdown()
            image.close()
            ioctx.close()
            client_rados.shutdown()
            bc.stop(gateway)
            gateway = None
    finally:
        if gateway is not None:
            bc.stop(gateway)
        if nbdkit is not None:
            bc.stop(nbdkit)
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)

    lines = []
    for key in figures:
        reference = "libnbd aio, depth 64" if "nbd" in key.lower() else "librbd aio, depth 64"
        reads, writes = (bc.Spread(figures[key][op]) for op in ("read", "write"))
        ref_reads, ref_writes = (bc.Spread(figures[reference][op]) for op in ("read", "write"))
        lines.append([
            key, reads.fmt(0), bc.ratio(reads, ref_reads), writes.fmt(0),
            bc.ratio(writes, ref_writes), _cpu(cpu[key], "client"),
            _cpu(cpu[key], "gateway") if "AoE" in key else "-",
            "-" if "file:" in key else _cpu(cpu[key], "server"),
        ])  # fmt: skip
    print(bc.table(
        f"4 KiB random requests, IOPS: median (min-max) of {args.repeat} x {args.duration:g} s",
        ["path", "read IOPS", "vs aio 64", "write IOPS", "vs aio 64",
         "this process CPU r/w", "gateway CPU r/w", "server CPU r/w"],
        lines,
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
