"""
The ``nbd:`` backend end to end (issue #13, Tests, NBD): NBD servers behind ``twistd aoe``.

The NBD servers are the ones of ``tests.nbdservers``, on UNIX sockets the
tests create: ``qemu-nbd`` serving a qcow2 overlay over a raw base image,
``nbdkit file`` (whose data outlives a crash) and ``nbdkit memory``.  The
AoE server is a real ``twistd -n aoe --target 6.1=nbd:unix:SOCKET`` in a
network namespace the test makes (``ip netns exec``); a socket path on the
file system is reachable from every network namespace, so it connects to
the server of this one directly.

1. ``UserspaceNBDTests``: the user-space initiator (``AoEClient``) at the
   other end of a veth pair (MTU 9000: 17 sectors per frame).

   - qemu-nbd overlay: a pattern written with the target's whole window (64
     frames) in flight and the whole disk read back have the md5 of the
     base with the pattern in it; after the AoE server and qemu-nbd have
     stopped the raw base is byte-identical, and a fresh qemu-nbd on the
     overlay, read with libnbd, shows the writes.
   - ``nbdkit file`` behind its ``delay`` filter (5 ms a request, so
     requests are at nbdkit when it dies) killed (SIGKILL) mid-transfer: 64
     one-frame requests in flight at random non-overlapping sectors (reads,
     writes, flushes), every byte read checked against a model kept here.
     Each request either succeeds with the right data or fails with an ATA
     error: never a wrong byte, never a timeout.  A write that failed may
     or may not have reached the disk, so its sectors may hold the old or
     the new bytes, nothing else.  Once nbdkit is back on the same socket
     the backend reconnects (back-off from 0.1 s doubling to 5 s) and I/O
     succeeds again; the whole disk, read through AoE and then the image
     file itself, agrees with the model.

2. ``LinuxInitiatorNBDTests``: the Linux initiator (Debian's ``aoe.ko`` in a
   QEMU guest on a tap, ``tests/linuxguest.py``) against one ``twistd aoe``
   serving ``nbdkit memory 64M`` at e6.1 and a qemu-nbd overlay at e6.2:
   ``dd`` of a random pattern with direct I/O to each disk and back; its md5
   in the guest equals the pattern's, and so does what libnbd reads from
   nbdkit on the host before nbdkit stops and what ``qemu-img convert``
   finds in the overlay afterwards (the raw base unchanged).

Every test prints its figures.  Skipped, saying why, without root, python3-
libnbd, qemu-nbd/qemu-img or nbdkit, QEMU or the guest kernel, unless
``AOE_TWISTED_REQUIRE_INTEROP=1`` makes that a failure.
"""

from __future__ import annotations

import hashlib
import random
import re
import signal
import subprocess
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from aoe_twisted.initiator.client import AoEClient, ATAError, RemoteDisk, RetryPolicy
from tests import linuxguest
from tests.nbdservers import NBDServer, nbdkit, qemu_nbd_overlay, require_nbd
from tests.netns import VethPair, require
from tests.test_linux_initiator import (
    TWISTD,
    InteropTestCase,
    TwistdTarget,
    fill,
    log_problems,
    twistd_unavailable_reason,
)
from tests.workload import ModelWorkload

Gen = Generator[defer.Deferred[Any], Any, None]

MIB = 1 << 20
SECTOR = 512
SHELF, SLOT = 6, 1
DEPTH = 64
#: nbdkit's delay filter: every read and write waits this long in the server.
SLOW = ("rdelay=5ms", "wdelay=5ms")
#: Requests completed before nbdkit is killed (of 3000).
KILL_AFTER = 1000
#: Seconds the service may take to come back once nbdkit is back (the back-off is 5 s at most).
BACK_WITHIN = 10.0


class NBDTarget(TwistdTarget):
    """
    ``twistd -n aoe --iface IFACE --target 6.1=nbd:unix:SOCKET ...`` in namespace ``netns``.

    The n-th of ``servers`` is served at slot n (6.1, 6.2, ...); ``specs``
    holds their backend specs in that order.
    """

    def __init__(
        self, netns: str, iface: str, servers: Sequence[NBDServer], log_path: Path,
        extra_args: Sequence[str] = (),
    ) -> None:  # fmt: skip
        super().__init__(netns, iface, Path("/nonexistent"), log_path, SHELF, SLOT, extra_args)
        self.specs = [f"nbd:unix:{server.socket_path}" for server in servers]

    @property
    def argv(self) -> list[str]:
        """The command line, without the namespace prefix."""
        targets = []
        for slot, spec in enumerate(self.specs, start=SLOT):
            targets += ["--target", f"{SHELF}.{slot}={spec}"]
        return [
            *TWISTD, "-n", "--pidfile=", "aoe", "--iface", self.iface, *targets,
            *self.extra_args,
        ]  # fmt: skip


def nbd_read(server: NBDServer, offset: int, length: int, chunk: int = 4 * MIB) -> bytes:
    """Read ``length`` bytes at ``offset`` from ``server``'s export with libnbd (blocking)."""
    import nbd

    handle = nbd.NBD()
    handle.connect_unix(str(server.socket_path))
    try:
        return b"".join(
            handle.pread(min(chunk, offset + length - at), at)
            for at in range(offset, offset + length, chunk)
        )
    finally:
        handle.shutdown()


def md5(data: bytes | bytearray) -> str:
    """The md5 of ``data``, in hex."""
    return hashlib.md5(data).hexdigest()


class AoEWorkload(ModelWorkload):
    """
    ``ModelWorkload`` on a remote disk, through AoE.

    Every request is one frame (at most ``disk.sectors_per_frame`` sectors),
    so a failed request left nothing of itself on its way to the server that
    could land after a later request to the same sectors.  ``ata_errors``
    lists every ``ATAError``, ``others`` every other failure (a timeout: the
    server did not answer).
    """

    recorded = (Exception,)

    def __init__(self, disk: RemoteDisk, model: bytearray, seed: int, depth: int = DEPTH) -> None:
        super().__init__(model, seed, depth, disk.sectors_per_frame)
        self.disk = disk
        self.ata_errors: list[ATAError] = []
        self.others: list[BaseException] = []

    def read(self, start: int, count: int) -> defer.Deferred[bytes]:
        return self.disk.read(start, count)

    def write(self, start: int, data: bytes) -> defer.Deferred[Any]:
        return self.disk.write(start, data)

    def flush(self) -> defer.Deferred[Any]:
        return self.disk.flush()

    def failed(self, error: BaseException) -> None:
        if isinstance(error, ATAError):
            self.ata_errors.append(error)
        else:
            self.others.append(error)


# -- 1. the user-space initiator -----------------------------------------------------------


class UserspaceNBDTests(TestCase):
    """``twistd aoe`` serving ``nbd:unix:SOCKET`` to the user-space initiator on a veth pair."""

    timeout = 120

    def setUp(self) -> None:
        require(self)
        require(self, twistd_unavailable_reason())

    def serve(self, server: NBDServer) -> NBDTarget:
        """Start ``twistd aoe`` serving ``server`` at e6.1 on a new veth pair (``self.pair``)."""
        self.pair = pair = VethPair.create(self, mtu=9000)
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        target = NBDTarget(pair.server_ns, pair.server_if, [server], work / "twistd.log")
        self.addCleanup(target.stop)
        target.start()
        return target

    def client(self, retry: RetryPolicy) -> AoEClient:
        """The user-space initiator on the client end of ``self.pair``, closed at cleanup."""
        client = AoEClient.listen(
            self.pair.client_if, reactor=reactor, netns=self.pair.client_ns, retry=retry
        )
        self.addCleanup(client.close)
        return client

    def stop_cleanly(self, target: NBDTarget) -> str:
        """Stop ``target`` with SIGTERM; check it stopped cleanly; return its log."""
        code = target.stop()
        log = target.log
        self.assertIn(code, (0, -signal.SIGTERM), log)
        self.assertNotIn("Traceback", log)
        self.assertIn("Server Shut Down.", log)
        return log

    @defer.inlineCallbacks
    def test_qemu_nbd_overlay(self) -> Gen:
        """
        qemu-nbd on a qcow2 overlay over a raw base: a 16 MiB pattern written
        with 64 frames in flight, and the whole 32 MiB disk read back, have
        the md5 of the base with the pattern in it; the raw base is unchanged
        afterwards and a fresh qemu-nbd on the overlay holds the writes.
        """
        require_nbd(self, "qemu-nbd", "qemu-img")
        size, length, offset = 32 * MIB, 16 * MIB, 3 * MIB
        base_contents = random.Random(0xBA5E).randbytes(size)
        server, base, overlay = qemu_nbd_overlay(self, base_contents)
        target = self.serve(server)
        client = self.client(RetryPolicy(0.25, 1.0, 40))
        disk = yield client.open(SHELF, SLOT)
        self.assertEqual(disk.size, size)
        self.assertEqual(disk.window, DEPTH)
        self.assertEqual(disk.sectors_per_frame, 17)

        data = random.Random(0xDA7A).randbytes(length)
        expected = bytearray(base_contents)
        expected[offset : offset + length] = data
        started = time.monotonic()
        yield disk.write(offset // SECTOR, data)
        yield disk.flush()
        written = time.monotonic() - started
        self.assertEqual(disk.peak_in_flight, DEPTH)
        started = time.monotonic()
        back = yield disk.read(0, size // SECTOR)
        read = time.monotonic() - started
        self.assertEqual(md5(back), md5(expected), "the disk read back through AoE differs")
        yield client.close()

        log = self.stop_cleanly(target)
        self.assertIn(f"serving e{SHELF}.{SLOT} = {target.specs[0]} ({size} bytes, rw", log)
        self.assertEqual(log_problems(log), [], log)
        server.stop()
        self.assertEqual(md5(base.read_bytes()), md5(base_contents), "the base image changed")
        self.assertGreater(overlay.stat().st_size, length, "the overlay holds no writes")
        server.start()  # a fresh qemu-nbd on the same overlay
        self.assertEqual(md5(nbd_read(server, 0, size)), md5(expected))
        print(
            f"\n  [nbd e2e, qemu-nbd overlay, user space] {length // MIB} MiB written in"
            f" {written:.2f} s ({length / written / 1e6:.1f} MB/s), {size // MIB} MiB read in"
            f" {read:.2f} s ({size / read / 1e6:.1f} MB/s), {DEPTH} frames in flight",
            flush=True,
        )

    @defer.inlineCallbacks
    def test_nbdkit_killed_mid_transfer(self) -> Gen:
        """
        ``nbdkit file`` killed with 64 requests in flight: every request is
        right or fails with an ATA error (no wrong byte, no timeout); once
        nbdkit is back on the same socket, I/O through AoE succeeds again
        within the back-off, and the whole disk, through AoE and in the file,
        agrees with what every acknowledged write wrote.
        """
        require_nbd(self, "nbdkit")
        size = 16 * MIB
        image = Path(self.mktemp()).resolve()
        initial = random.Random(0x1417).randbytes(size)
        image.write_bytes(initial)
        # Each request waits 5 ms in nbdkit: requests are in flight there when it dies.
        server = nbdkit(self, "file", str(image), *SLOW, filters=("delay",))
        target = self.serve(server)
        # Patient: every request is answered (data or ATA error) long before a resend.
        client = self.client(RetryPolicy(3.0, 3.0, 2))
        disk = yield client.open(SHELF, SLOT)
        self.assertEqual(disk.size, size)
        model = bytearray(initial)
        work = AoEWorkload(disk, model, seed=5)

        def kill_at(completed: int) -> None:
            if completed == KILL_AFTER:
                server.kill()

        work.on_complete = kill_at
        started = time.monotonic()
        yield work.run(3000)
        first_run = time.monotonic() - started
        self.assertFalse(server.running)
        self.assertEqual(work.wrong, [])
        self.assertEqual(work.others, [])
        self.assertGreater(len(work.ata_errors), 0)
        self.assertGreaterEqual(disk.peak_in_flight, DEPTH)
        failed = len(work.ata_errors)

        # nbdkit back on the same socket: a one-sector read succeeds within the back-off.
        server.start()
        restarted = time.monotonic()
        refusals = 0
        while True:
            try:
                got = yield disk.read(0, 1)
            except ATAError:
                refusals += 1
                if time.monotonic() - restarted > BACK_WITHIN:
                    self.fail(f"still ATA errors {BACK_WITHIN} s after nbdkit came back")
                yield task.deferLater(reactor, 0.05, lambda: None)
                continue
            break
        back_after = time.monotonic() - restarted
        work.check(0, got)
        work.ata_errors.clear()
        yield work.run(1500)
        self.assertEqual((work.wrong, work.others, work.ata_errors), ([], [], []))
        yield work.check_all()
        self.assertEqual(work.wrong, [])
        yield client.close()

        log = self.stop_cleanly(target)
        lost = re.findall(r"connection lost \(.*\); (\d+) requests in flight failed", log)
        self.assertEqual(len(lost), 1, log)
        in_flight = int(lost[0])
        self.assertGreater(in_flight, 0, f"none in flight at nbdkit when it was killed? {lost}")
        self.assertEqual(len(re.findall(r"reconnected after \d+ attempts", log)), 1, log)
        self.assertIn("answered with an ATA error", log)
        server.stop()
        on_disk = image.read_bytes()
        self.assertEqual(len(on_disk), size)
        for start in range(0, size // SECTOR, 128):  # the file itself against the model
            work.check(start, on_disk[start * SECTOR : (start + 128) * SECTOR])
        self.assertEqual(work.wrong, [], "the image file differs from the model")
        print(
            f"\n  [nbd e2e, nbdkit killed mid-transfer, user space] 3000 requests, 64 in flight,"
            f" in {first_run:.2f} s, nbdkit killed after {KILL_AFTER} with {in_flight} of them"
            f" in flight there: {failed} ATA errors, no wrong byte, no timeout; I/O back"
            f" {back_after:.2f} s after nbdkit ({refusals} refused reads meanwhile)",
            flush=True,
        )


# -- 2. the Linux initiator in QEMU ---------------------------------------------------------

GUEST_MTU = 9000
#: Sizes of the two disks: ``nbdkit memory`` at e6.1, the qemu-nbd overlay at e6.2.
MEMORY_MIB, OVERLAY_MIB = 64, 32
PATTERN_OFFSET_MIB, PATTERN_MIB = 8, 16

GUEST_SCRIPT = r"""
md5() { set -- $(md5sum "$1"); echo "$1"; }
# exercise SLOT: a random pattern to e6.SLOT and back, direct I/O; KEY_SLOT=value lines.
exercise() {
    D=/dev/etherd/e__SHELF__.$1
    S="/sys/block/etherd!e__SHELF__.$1"
    aoe_wait_disk e__SHELF__.$1 20 || return 10
    echo SIZE_$1=$(cat "$S/size") PAYLOAD_$1=$(cat "$S/payload") STATE_$1=$(cat "$S/state")
    dd if=/dev/urandom of=/tmp/p bs=1M count=__MIB__ 2>/dev/null || return 11
    echo PATTERN_MD5_$1=$(md5 /tmp/p)
    t0=$(now_us)
    dd if=/tmp/p of=$D bs=1M seek=__OFF__ oflag=direct 2>/dev/null || return 12
    t1=$(now_us)
    rm /tmp/p
    dd if=$D of=/tmp/r bs=1M skip=__OFF__ count=__MIB__ iflag=direct 2>/dev/null || return 13
    t2=$(now_us)
    echo READ_MD5_$1=$(md5 /tmp/r)
    rm /tmp/r
    echo WRITE_US_$1=$((t1 - t0)) READ_US_$1=$((t2 - t1))
}
exercise __SLOT1__ || exit $?
exercise __SLOT2__ || exit $?
"""


class LinuxInitiatorNBDTests(InteropTestCase):
    """The Linux initiator in QEMU writes and reads disks nbdkit and qemu-nbd serve."""

    def test_dd_direct(self) -> None:
        """
        A 16 MiB random pattern written with ``dd oflag=direct`` to each of
        ``/dev/etherd/e6.1`` (``nbdkit memory 64M``) and ``e6.2`` (qemu-nbd
        on a qcow2 overlay over a raw base) reads back with the same md5 in
        the guest; libnbd on the host reads it from nbdkit before it stops;
        afterwards the raw base is unchanged and the overlay, converted to
        raw by ``qemu-img``, holds the base with the pattern in it.
        """
        require_nbd(self, "nbdkit", "qemu-nbd", "qemu-img")
        workdir = self.workdir()
        memory = nbdkit(self, "memory", f"{MEMORY_MIB}M")
        base_contents = random.Random(0xBA5E2).randbytes(OVERLAY_MIB * MIB)
        qemu, base, overlay = qemu_nbd_overlay(self, base_contents)
        script = fill(
            GUEST_SCRIPT,
            {"SHELF": SHELF, "SLOT1": SLOT, "SLOT2": SLOT + 1, "MIB": PATTERN_MIB,
             "OFF": PATTERN_OFFSET_MIB},
        )  # fmt: skip
        offset, length = PATTERN_OFFSET_MIB * MIB, PATTERN_MIB * MIB
        started = time.monotonic()
        with linuxguest.GuestNetwork(mtu=GUEST_MTU) as net:
            target = NBDTarget(net.netns, net.tap, [memory, qemu], workdir / "twistd.log")
            try:
                target.start(targets=len(target.specs))
                result = net.boot(
                    script, timeout=90, console_log=workdir / "console.log", append="loglevel=1"
                )
                alive = target.alive()
                in_memory = nbd_read(memory, offset, length)
            finally:
                code = target.stop()
        elapsed = time.monotonic() - started
        result.check()
        log = target.log
        self.assertTrue(alive, f"twistd exited during the session; log:\n{log}")
        self.assertIn(code, (0, -signal.SIGTERM), log)
        self.assertEqual(log_problems(log), [], log)
        v = result.values
        for slot, mib in ((SLOT, MEMORY_MIB), (SLOT + 1, OVERLAY_MIB)):
            self.assertEqual(int(v[f"SIZE_{slot}"]) * SECTOR, mib * MIB)
            self.assertEqual(v[f"PAYLOAD_{slot}"], "8704")
            self.assertEqual(v[f"STATE_{slot}"], "up")
            self.assertEqual(
                v[f"READ_MD5_{slot}"], v[f"PATTERN_MD5_{slot}"], f"e{SHELF}.{slot} read back wrong"
            )
        self.assertEqual(md5(in_memory), v[f"PATTERN_MD5_{SLOT}"], "nbdkit holds other bytes")

        qemu.stop()
        self.assertEqual(md5(base.read_bytes()), md5(base_contents), "the base image changed")
        raw = workdir / "overlay.raw"
        subprocess.run(
            ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(overlay), str(raw)],
            check=True, capture_output=True,
        )  # fmt: skip
        converted = raw.read_bytes()
        self.assertEqual(md5(converted[offset : offset + length]), v[f"PATTERN_MD5_{SLOT + 1}"])
        self.assertEqual(md5(converted[:offset]), md5(base_contents[:offset]))
        self.assertEqual(md5(converted[offset + length :]), md5(base_contents[offset + length :]))
        figures = "; ".join(
            f"e{SHELF}.{slot} ({what}) dd oflag=direct"
            f" {length / int(v[f'WRITE_US_{slot}']):.1f} MB/s,"
            f" iflag=direct {length / int(v[f'READ_US_{slot}']):.1f} MB/s"
            for slot, what in ((SLOT, "nbdkit memory"), (SLOT + 1, "qemu-nbd overlay"))
        )
        print(
            f"\n  [nbd e2e, linux initiator, mtu={GUEST_MTU}] boot {result.boot_seconds:.1f} s;"
            f" {PATTERN_MIB} MiB each: {figures}; whole test {elapsed:.1f} s",
            flush=True,
        )
