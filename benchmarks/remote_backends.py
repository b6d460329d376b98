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
- ``AoE → rbd: by loadgen.c, window 64``: the same gateway driven by the
  compiled load generator of ``raw_capacity.py`` (``loadgen.c``, in the
  client namespace, 64 requests in flight) instead of the user-space
  initiator: what the gateway serves when the initiator costs next to
  nothing ("this process CPU" is then the generator's);
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
  the issue's figure for NBD; ``AoE → nbd: by loadgen.c`` as for ``rbd:``.

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

"gateway µs/req" is the gateway's CPU (all its threads) per request
served; "retransmits" counts the initiator's, summed over the repeats.

    sudo .venv/bin/python benchmarks/remote_backends.py [--duration 2] [--repeat 3] [--json FILE]
        [--only rbd|nbd] [--row TEXT]... [--against-source [LABEL=]SRC]...
        [--py-spy PATH] [--cprofile] [--keep]

``--only nbd`` leaves the Ceph cluster out; ``--row`` keeps the rows whose
name holds TEXT.  ``--against-source`` runs another gateway from another
source tree's ``src`` (say a ``git archive`` of the commit before) at the
next shelf, and every AoE row is measured on each gateway in turn: an
interleaved before/after on the same initiator, cluster and nbdkit.
``--py-spy`` samples each gateway for the whole run (py-spy can be
installed from PyPI anywhere, e.g. a venv in /tmp) and ``--cprofile`` runs
them under cProfile (calls per request; the IOPS are then not the real
ones); both print the top entries.

Needs root (namespaces, raw sockets), ceph-mon, ceph-osd and python3-rbd;
nbdkit and python3-libnbd for the ``nbd:`` rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import socket
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
    ("AoE → rbd: by loadgen.c", DEPTH),
    ("AoE → file:", DEPTH),
)
CPROFILE_ENV = "AOE_REMOTE_BACKENDS_CPROFILE"
NBD_ROWS = (
    ("libnbd aio", DEPTH),
    ("libnbd sync", 1),
    ("NBDBackend", DEPTH),
    ("AoE → nbd:", DEPTH),
    ("AoE → nbd:", 1),
    ("AoE → nbd: by loadgen.c", DEPTH),
)
#: The rows driven by the compiled load generator rather than the user-space initiator.
LOADGEN = " by loadgen.c"


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
    stats = os.environ.get(CPROFILE_ENV)
    if not stats:
        reactor.run()  # type: ignore[attr-defined]
        return
    import cProfile

    profile = cProfile.Profile()
    profile.enable()
    try:
        reactor.run()  # type: ignore[attr-defined]
    finally:
        profile.disable()
        profile.dump_stats(stats)


def start_gateway(
    netns: str,
    argv: list[str],
    log: Path,
    source: str | None = None,
    cprofile: Path | None = None,
) -> subprocess.Popen[bytes]:
    """
    Start ``serve`` in a child process; return once it serves every target (or raise).

    ``source``: the ``src`` directory of another aoe-twisted to run (put
    first on ``PYTHONPATH``); ``cprofile``: run the gateway under cProfile
    and write its statistics there when it stops.
    """
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    if cprofile is not None:
        env[CPROFILE_ENV] = str(cprofile)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-in", netns, "--", *argv],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
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


def sync_iops(
    read: Callable[[int], Any],
    write: Callable[[bytes, int], Any] | None,
    duration: float,
    rng: random.Random,
) -> float:
    """
    Random 4 KiB synchronous requests, one at a time, for ``duration`` s; return IOPS.

    ``read(offset)`` reads a block; ``write(payload, offset)``, if given, is
    called instead of ``read`` (librbd's and libnbd's calls take these orders).
    """
    payload = os.urandom(BLOCK)
    blocks = IMAGE_BYTES // BLOCK
    done = 0
    start = time.perf_counter()
    deadline = start + duration
    while time.perf_counter() < deadline:
        offset = rng.randrange(blocks) * BLOCK
        if write is not None:
            write(payload, offset)
        else:
            read(offset)
        done += 1
    return done / (time.perf_counter() - start)


def librbd_sync(image: Any, write: bool, duration: float, rng: random.Random) -> float:
    """Random 4 KiB synchronous librbd requests, one at a time (``sync_iops``)."""
    return sync_iops(
        lambda offset: image.read(offset, BLOCK), image.write if write else None, duration, rng
    )


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
    """Random 4 KiB synchronous libnbd requests, one at a time (``sync_iops``)."""
    return sync_iops(
        lambda offset: handle.pread(BLOCK, offset), handle.pwrite if write else None, duration, rng
    )


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
    while True:
        # The socket file appears at bind(), before listen(): wait for a connection.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(socket_path))
            except OSError:
                pass
            else:
                return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            bc.stop(proc)
            raise RuntimeError(f"nbdkit did not start: {log.read_text(errors='replace')}")
        time.sleep(0.01)


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


def loadgen_random(
    pair: Any, shelf: int, slot: int, write: bool, depth: int, duration: float
) -> tuple[float, float]:
    """
    Random 4 KiB requests to e``shelf``.``slot`` from ``loadgen.c``; return (IOPS, its CPU).

    The compiled generator of ``raw_capacity.py``, run in the client
    namespace of ``pair`` with ``depth`` requests in flight; its CPU is in
    CPU seconds per second.
    """
    argv = [
        "ip", "netns", "exec", pair.client_ns, str(bc.loadgen_binary()), "gen",
        "--rows", f"rand:{BLOCK // SECTOR}:{'write' if write else 'read'}",
        "--iface", pair.client_if, "--shelf", str(shelf), "--slot", str(slot),
        "--disk-sectors", str(IMAGE_BYTES // SECTOR), "--window", str(depth),
        "--duration", f"{duration:g}", "--warmup", "0.3",
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"loadgen.c failed: {out.stderr.strip()[-300:]}")
    row = json.loads(lines[-1])
    if row.get("errors"):
        raise RuntimeError(f"loadgen.c: {row['errors']} requests answered with an error")
    return float(row["iops"]), float(row["gen_cpu"])


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


def open_disk(client: Any, shelf: int, slot: int) -> Any:
    """Open e``shelf``.``slot`` with ``client`` (runs the reactor until it is open)."""
    from twisted.internet import reactor

    return _run_in_reactor(reactor, lambda: client.open(shelf, slot))


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
    parser.add_argument(
        "--only", choices=("all", "rbd", "nbd"), default="all",
        help="measure only the rbd: rows or only the nbd: rows (no Ceph cluster for nbd)",
    )  # fmt: skip
    parser.add_argument(
        "--against-source", metavar="[LABEL=]SRC", action="append", default=[],
        help="also run a gateway from this src directory (another aoe-twisted; rows "
             "labelled LABEL, 'before' by default) at the next free shelf; every AoE row is "
             "measured on each gateway in turn, interleaved (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--py-spy", metavar="PATH",
        help="sample every gateway with this py-spy for the whole run; print the top entries",
    )  # fmt: skip
    parser.add_argument(
        "--cprofile", action="store_true",
        help="run the gateways under cProfile (slower: for calls per request, not IOPS)",
    )  # fmt: skip
    parser.add_argument(
        "--row", action="append", metavar="TEXT",
        help="measure only the rows whose name holds TEXT (repeatable; e.g. 'AoE → nbd:'); "
             "the ratio needs the reference row too",
    )  # fmt: skip
    parser.add_argument("--top", type=int, default=25, help="profile entries listed")
    parser.add_argument(
        "--keep", action="store_true",
        help="keep the work directory (the gateways' and nbdkit's logs) and say where",
    )  # fmt: skip
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, raw sockets)", file=sys.stderr)
        return 2
    want_rbd = args.only in ("all", "rbd")
    want_nbd = args.only in ("all", "nbd")
    if want_rbd:
        reason = unavailable_reason()
        if reason is not None:
            print(f"cannot start the Ceph cluster: {reason}", file=sys.stderr)
            return 2

    from twisted.internet import reactor, task

    from aoe_twisted.backendspec import find_backend_factories
    from aoe_twisted.initiator.client import AoEClient

    schemes = find_backend_factories()
    print(f"# Remote backends (issue #13), {bc.now_utc()}\n\n{bc.machine()}\n")
    no_nbd = nbd_unavailable(schemes) if want_nbd else "not asked for (--only rbd)"
    if no_nbd is not None and want_nbd:
        print(f"nbd: not measured: {no_nbd}.\n")
        if not want_rbd:
            return 2
    rows: tuple[tuple[str, int], ...] = ROWS if want_rbd else (("AoE → file:", DEPTH),)
    rows += NBD_ROWS if no_nbd is None else ()
    if args.row:
        rows = tuple(
            (name, depth)
            for name, depth in rows
            if any(text in f"{name}, {depth}" for text in args.row)
        )
    # (label, source): this checkout's gateway, and those to compare with.
    gateways: list[tuple[str, str | None]] = [("", None)]
    for index, against in enumerate(args.against_source):
        label, _, source = against.rpartition("=")
        label = label or ("before" if index == 0 else f"before{index + 1}")
        gateways.append((label, source))
        print(f"'{label}' rows: a gateway from {source}\n")
    work = Path(tempfile.mkdtemp(prefix="aoe-remote-bench-"))
    cluster = CephCluster(work / "ceph", memstore_bytes=1 << 30) if want_rbd else None
    procs: dict[str, subprocess.Popen[bytes]] = {}
    spies: dict[str, subprocess.Popen[bytes]] = {}
    nbdkit = None
    figures: dict[str, dict[str, list[float]]] = {}
    cpu: dict[str, dict[str, list[float]]] = {}
    served: dict[str, float] = {label: 0.0 for label, _ in gateways}
    try:
        chunk = os.urandom(4 << 20)
        image = ioctx = client_rados = backend = None
        image_name = ""
        if cluster is not None:
            import rbd

            from aoe_twisted.backends.rbd import open_rbd

            cluster.start()
            image_name = cluster.create_image(None, IMAGE_BYTES, name="bench", features=LAYERING)
            client_rados = cluster.connect()
            ioctx = client_rados.open_ioctx("rbd")
            image = rbd.Image(ioctx, image_name)
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
            client = AoEClient.listen(pair.client_if, netns=pair.client_ns)
            disks: dict[tuple[str, str], Any] = {}
            for index, (label, source) in enumerate(gateways):
                shelf = SHELF + index
                argv = ["--iface", pair.server_if]
                if cluster is not None:
                    argv += [
                        "--target", f"{shelf}.{RBD_SLOT}=rbd:rbd/{image_name},"
                        f"conf={cluster.conf},id=gateway{index}",
                    ]  # fmt: skip
                argv += ["--target", f"{shelf}.{FILE_SLOT}=file:{file_image}"]
                if no_nbd is None:
                    argv += ["--target", f"{shelf}.{NBD_SLOT}=nbd:unix:{nbd_socket}"]
                name = label or "this"
                proc = start_gateway(
                    pair.server_ns,
                    argv,
                    work / f"gateway-{name}.log",
                    source=source,
                    cprofile=work / f"gateway-{name}.pstats" if args.cprofile else None,
                )
                procs[label] = proc
                if args.py_spy:
                    spies[label] = subprocess.Popen(
                        [args.py_spy, "record", "--pid", str(proc.pid), "--rate", "250",
                         "--format", "raw", "--output", str(work / f"pyspy-{name}.txt"),
                         "--nonblocking"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                if cluster is not None:
                    disks[(label, "AoE → rbd:")] = open_disk(client, shelf, RBD_SLOT)
                disks[(label, "AoE → file:")] = open_disk(client, shelf, FILE_SLOT)
                if no_nbd is None:
                    disks[(label, "AoE → nbd:")] = open_disk(client, shelf, NBD_SLOT)
            for disk in disks.values():
                if disk.window < DEPTH or disk.sectors_per_frame < BLOCK // SECTOR:
                    raise RuntimeError(
                        f"{disk.name}: window {disk.window}, "
                        f"{disk.sectors_per_frame} sectors per frame"
                    )
            osd_pid = cluster.daemon_pids()[-1] if cluster is not None else None
            rng = random.Random(13)
            for repeat in range(args.repeat):
                for name, depth in rows:
                    server_pid = nbdkit.pid if "nbd" in name.lower() and nbdkit else osd_pid
                    for label, _ in gateways if "AoE" in name else gateways[:1]:
                        gateway_pid = procs[label].pid
                        key = f"{name}, {'window' if 'AoE' in name else 'depth'} {depth}"
                        key += f" [{label}]" if label else ""
                        for write in (False, True):
                            op = "write" if write else "read"
                            before = (
                                bc.cpu_seconds(gateway_pid),
                                bc.cpu_seconds(server_pid) if server_pid else 0.0,
                                own_cpu(),
                            )
                            resent = client.protocol.retransmits
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
                            elif name.endswith(LOADGEN):
                                iops, generator_cpu = loadgen_random(
                                    pair,
                                    SHELF + [g[0] for g in gateways].index(label),
                                    RBD_SLOT if "rbd" in name else NBD_SLOT,
                                    write,
                                    depth,
                                    args.duration,
                                )
                                # The generator's replies filled this process's receive
                                # ring meanwhile: let the client drain them now, or the
                                # next row's first window of replies finds it full.
                                _run_in_reactor(
                                    reactor, lambda: task.deferLater(reactor, 0.2, lambda: None)
                                )
                            else:
                                iops = aoe_random(
                                    disks[(label, name)], write, depth, args.duration, rng
                                )
                            wall = time.perf_counter() - began
                            after = (
                                bc.cpu_seconds(gateway_pid),
                                bc.cpu_seconds(server_pid) if server_pid else 0.0,
                                own_cpu(),
                            )
                            figures.setdefault(key, {}).setdefault(op, []).append(iops)
                            row_cpu = cpu.setdefault(key, {})
                            gateway_cpu = (after[0] - before[0]) / wall
                            row_cpu.setdefault(f"gateway {op}", []).append(gateway_cpu)
                            row_cpu.setdefault(f"gateway_us {op}", []).append(
                                1e6 * gateway_cpu / iops if iops else 0.0
                            )
                            row_cpu.setdefault(f"server {op}", []).append(
                                (after[1] - before[1]) / wall
                            )
                            row_cpu.setdefault(f"client {op}", []).append(
                                generator_cpu
                                if name.endswith(LOADGEN)
                                else (after[2] - before[2]) / wall
                            )
                            row_cpu.setdefault(f"retransmits {op}", []).append(
                                client.protocol.retransmits - resent
                            )
                            if "AoE" in name:
                                served[label] += iops * wall
                print(f"repeat {repeat + 1}/{args.repeat} done", file=sys.stderr, flush=True)
            _run_in_reactor(reactor, client.close)
            if backend is not None:
                _run_in_reactor(reactor, backend.close)
            if nbd_backend is not None:
                _run_in_reactor(reactor, nbd_backend.close)
                handle.shutdown()
            if image is not None:
                image.close()
                ioctx.close()
                client_rados.shutdown()
            for label in list(procs):
                bc.stop(procs.pop(label), grace=60)
            profiles = _profiles(args, gateways, spies, served, work)
    finally:
        for proc in procs.values():
            bc.stop(proc)
        for spy in spies.values():
            if spy.poll() is None:
                spy.kill()
        if nbdkit is not None:
            bc.stop(nbdkit)
        if cluster is not None:
            cluster.stop()
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    lines = []
    for key in figures:
        path = key.split(",")[0]
        reference = "libnbd aio, depth 64" if "nbd" in path.lower() else "librbd aio, depth 64"
        reads, writes = (bc.Spread(figures[key][op]) for op in ("read", "write"))
        if reference in figures:
            ref_reads, ref_writes = (bc.Spread(figures[reference][op]) for op in ("read", "write"))
            vs_reads, vs_writes = bc.ratio(reads, ref_reads), bc.ratio(writes, ref_writes)
        else:
            vs_reads = vs_writes = "-"
        aoe = "AoE" in key
        lines.append([
            key, reads.fmt(0), vs_reads, writes.fmt(0), vs_writes,
            _cpu(cpu[key], "client"),
            _cpu(cpu[key], "gateway") if aoe else "-",
            _us(cpu[key]) if aoe else "-",
            "-" if "file:" in key else _cpu(cpu[key], "server"),
            " / ".join(f"{sum(cpu[key][f'retransmits {op}']):.0f}" for op in ("read", "write"))
            if aoe else "-",
        ])  # fmt: skip
    print(bc.table(
        f"4 KiB random requests, IOPS: median (min-max) of {args.repeat} x {args.duration:g} s"
        + (" (gateways under cProfile)" if args.cprofile else ""),
        ["path", "read IOPS", "vs aio 64", "write IOPS", "vs aio 64",
         "this process CPU r/w", "gateway CPU r/w", "gateway µs/req r/w", "server CPU r/w",
         "retransmits r/w"],
        lines,
    ))  # fmt: skip
    for text in profiles:
        print(f"\n{text}")
    if args.json is not None:
        args.json.write_text(json.dumps({"iops": figures, "cpu": cpu}, indent=1))
    return 0


def _us(figures: dict[str, list[float]]) -> str:
    """``READ / WRITE``: the gateway's median CPU microseconds per request in the rows."""
    return " / ".join(
        f"{bc.Spread(figures[f'gateway_us {op}']).median:.0f}" for op in ("read", "write")
    )


def _profiles(
    args: argparse.Namespace,
    gateways: list[tuple[str, str | None]],
    spies: dict[str, subprocess.Popen[bytes]],
    served: dict[str, float],
    work: Path,
) -> list[str]:
    """The py-spy and cProfile summaries of the stopped gateways, one text per profile."""
    import profile_server

    texts = []
    for label, _ in gateways:
        name = label or "this"
        spy = spies.get(label)
        if spy is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(30)
            raw = work / f"pyspy-{name}.txt"
            body = (
                profile_server._pyspy_summary(raw, args.top)
                if raw.exists()
                else "py-spy wrote nothing"
            )
            texts.append(f"## py-spy, gateway '{name}' (all its busy time in the run)\n\n{body}")
        stats = work / f"gateway-{name}.pstats"
        if args.cprofile:
            body = (
                profile_server._cprofile_summary(stats, int(served[label]), args.top)
                if stats.exists()
                else "cProfile wrote no statistics"
            )
            texts.append(f"## cProfile, gateway '{name}'\n\n{body}")
    return texts


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--serve-in":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        serve(sys.argv[2], sys.argv[4:] if sys.argv[3:4] == ["--"] else sys.argv[3:])
        sys.exit(0)
    sys.exit(main())
