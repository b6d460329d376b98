"""
Ceph RBD behind aoe-twisted gateways (issue #13 item 4), end to end.

Each gateway is a real ``twistd -n aoe`` in a network namespace of its own
(its own interface, its own MAC) serving ``--target 5.0=rbd:rbd/IMAGE,
conf=...,id=...`` from the one-node cluster of ``tests.cephcluster``, which
listens on this process's 127.0.0.1.  A namespace has a loopback of its own,
so ``NamespaceRelay`` makes 127.0.0.1:PORT inside it lead to the cluster's
port here (the monitor's and the OSD's, the addresses the monitor hands
out): the gateway talks to Ceph over TCP as it would across a network.

1. ``UserspaceGatewayTests``: one gateway, the user-space initiator
   (``AoEClient``) on a veth pair: a pattern written and read back with the
   target's whole window (64 frames) in flight, and the image read directly
   with librbd holds exactly that pattern.  With the OSD stopped (SIGSTOP)
   longer than ``--backend-timeout``: an initiator that resends sooner than
   that (with a new tag, as Linux does) sees a stall and then its data; one
   whose first copy waits longer gets the gateway's ATA error.

2. ``GatewayFailoverTests``: the Linux initiator (Debian's ``aoe.ko`` in QEMU,
   ``tests/linuxguest.py``) whose one NIC reaches, through a bridge, two
   gateways A and B exporting the SAME image at the SAME address.  The image
   has only the ``layering`` feature: with ``exclusive-lock`` a killed
   gateway's lock blocks the other's writes until the OSD notices the dead
   client (30 s, its watch timeout).  The test checks that each gateway
   takes the other for a second path of its disk (an info line; no critical
   duplicate line), that the guest's driver lists both MACs for ``e5.0``
   (debugfs), and that a direct ``dd`` of a pattern, running when A is
   killed with SIGKILL, completes with the right data, in the guest and in
   the image read with librbd on the host.  The guest samples the write
   counter of ``/sys/block/etherd!e5.0/stat`` every 20 ms; the longest time
   without progress after the kill is the stall, printed with the rest of
   the figures.  The driver resends a frame to the same gateway until it has
   waited ``HARD_SCORN_SECS`` (10 s, ``drivers/block/aoe/aoe.h``), then
   avoids that gateway and gives the frame to the other: a stall of about
   10 s is what the Linux initiator costs, and the test bounds it well
   below the 30 s of the exclusive-lock case.

3. ``GatewayDocTests``: the commands and the config file of
   ``docs/gateways.md`` are valid.

Skips, saying why, without root, QEMU, the guest kernel, Ceph or python3-rbd,
unless ``AOE_TWISTED_REQUIRE_INTEROP=1`` makes that a failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import random
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Generator, Iterable
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aoe_twisted.backends.rbd import parse_spec
from aoe_twisted.config import parse_config, parse_target_option
from aoe_twisted.initiator.client import AoEClient, ATAError, RetryPolicy
from aoe_twisted.net.netns import network_namespace
from tests import linuxguest
from tests.cephcluster import CephCluster, shared_cluster
from tests.netns import VethPair, require, run
from tests.test_linux_initiator import (
    TWISTD,
    InteropTestCase,
    TwistdTarget,
    fill,
    log_problems,
)
from tests.test_linux_runtime import OneNicGuest
from tests.test_twistd import TwistdProcessMixin, _twistd

MIB = 1 << 20
SECTOR = 512
SHELF, SLOT = 5, 0
#: librbd's feature bit ``layering`` alone: no exclusive-lock (see the module docstring).
LAYERING = 1
#: ``--backend-timeout`` of the gateway whose OSD is stopped (seconds).
SILENT_TIMEOUT = 2.0
#: Bytes one relay thread moves per system call.
_RELAY_CHUNK = 1 << 18

Gen = Generator[defer.Deferred[Any], Any, None]


# -- reaching the cluster from a namespace ----------------------------------------------


def cluster_ports(cluster: CephCluster) -> list[int]:
    """Return the TCP ports a client of ``cluster`` connects to: the monitor's and the OSDs'."""
    ports = {cluster.port}
    dump = json.loads(cluster.command({"prefix": "osd dump", "format": "json"}))
    for osd in dump["osds"]:
        for address in osd["public_addrs"]["addrvec"]:
            ports.add(int(address["addr"].rpartition(":")[2]))
    return sorted(ports)


class NamespaceRelay:
    """
    Make ``127.0.0.1:PORT`` inside network namespace ``netns`` lead to ``127.0.0.1:PORT`` here.

    For each port, a listening socket is made inside the namespace (a socket
    keeps the namespace it was made in) and every connection to it is joined
    to a new connection to the same port here, by two threads copying
    bytes.  The addresses the monitor hands out (``127.0.0.1:PORT`` of each
    OSD) then work unchanged in the namespace, whose ``lo`` must be up.
    ``connections`` counts the connections relayed.
    """

    def __init__(self, netns: str, ports: Iterable[int]) -> None:
        self.netns = netns
        self.ports = list(ports)
        self.connections = 0
        self._listeners: list[socket.socket] = []
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        """Listen on every port inside the namespace; relay from now on."""
        with network_namespace(self.netns):
            for port in self.ports:
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(("127.0.0.1", port))
                listener.listen(64)
                self._listeners.append(listener)
        for listener, port in zip(self._listeners, self.ports, strict=True):
            threading.Thread(
                target=self._accept, args=(listener, port), name=f"relay {port}", daemon=True
            ).start()

    def stop(self) -> None:
        """Stop listening and cut every relayed connection."""
        with self._lock:
            sockets = [*self._listeners, *self._open]
            self._listeners.clear()
            self._open.clear()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket, port: int) -> None:
        """Accept connections in the namespace; join each to a new one here (thread)."""
        while True:
            try:
                inside, _ = listener.accept()
            except OSError:
                return
            try:
                outside = socket.create_connection(("127.0.0.1", port))
            except OSError:
                inside.close()
                continue
            for sock in (inside, outside):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
                self._open.update((inside, outside))
            for source, sink in ((inside, outside), (outside, inside)):
                threading.Thread(
                    target=self._copy, args=(source, sink), name=f"relay {port}", daemon=True
                ).start()

    def _copy(self, source: socket.socket, sink: socket.socket) -> None:
        """Copy ``source`` to ``sink`` until either ends; then end both (thread)."""
        buffer = bytearray(_RELAY_CHUNK)
        view = memoryview(buffer)
        try:
            while True:
                n = source.recv_into(buffer)
                if not n:
                    break
                sink.sendall(view[:n])
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            for sock in (source, sink):
                if sock in self._open:
                    self._open.discard(sock)
                    sock.close()


def relay_into(case: TestCase, cluster: CephCluster, netns: str) -> NamespaceRelay:
    """Bring ``netns``'s loopback up and relay the cluster's ports into it until cleanup."""
    run("ip", "-n", netns, "link", "set", "lo", "up")
    relay = NamespaceRelay(netns, cluster_ports(cluster))
    relay.start()
    case.addCleanup(relay.stop)
    return relay


# -- the image, seen directly -----------------------------------------------------------


def read_image(cluster: CephCluster, image: str, offset: int, length: int) -> bytes:
    """Read ``length`` bytes at ``offset`` of ``image`` with a librbd client of our own."""
    import rbd

    client = cluster.connect()
    try:
        with client.open_ioctx("rbd") as ioctx, rbd.Image(ioctx, image, read_only=True) as img:
            return img.read(offset, length)
    finally:
        client.shutdown()


def evict_watchers(cluster: CephCluster, image: str) -> list[str]:
    """
    Blocklist every client still watching ``image``; return their addresses.

    A gateway killed with SIGKILL leaves its watch on the image's header
    until the OSD times it out (30 s); until then the image cannot be
    removed.  Blocklisting the dead client is what an operator does too.
    """
    import rbd

    client = cluster.connect()
    try:
        with client.open_ioctx("rbd") as ioctx:
            try:
                with rbd.Image(ioctx, image, read_only=True) as img:
                    addresses = [w["addr"] for w in img.watchers_list()]
            except rbd.ImageNotFound:
                return []
    finally:
        client.shutdown()
    for address in addresses:
        cluster.command({"prefix": "osd blocklist", "blocklistop": "add", "addr": address})
    return addresses


def rbd_target(cluster: CephCluster, image: str, client_id: str) -> str:
    """The ``--target`` value serving ``image`` at e5.0 as Ceph client ``client_id``."""
    return f"{SHELF}.{SLOT}=rbd:rbd/{image},conf={cluster.conf},id={client_id}"


def pattern(size: int, seed: int) -> bytes:
    """``size`` pseudo-random bytes, the same for the same seed."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:size])


# -- 1. one gateway, the user-space initiator -------------------------------------------


class UserspaceGatewayTests(TwistdProcessMixin, TestCase):
    """``twistd aoe`` serving an ``rbd:`` image to the user-space initiator."""

    timeout = 120

    def serve(self, size: int, *options: str, mtu: int = 9000) -> tuple[Any, str]:
        """
        Start a gateway serving a new image of ``size`` bytes at e5.0 on a new veth pair.

        Returns ``(process, image)`` and sets ``self.pair``; the test's
        cleanup kills the gateway and removes the image and the namespaces.
        """
        require(self)
        self.cluster = cluster = shared_cluster(self)
        image = cluster.create_image(self, size)
        self.pair = pair = VethPair.create(self, mtu=mtu)
        self.relay = relay_into(self, cluster, pair.server_ns)
        proc = _twistd(
            "aoe", "--iface", pair.server_if, "--target", rbd_target(cluster, image, "gateway"),
            *options, netns=pair.server_ns,
        )  # fmt: skip
        self.addCleanup(self._kill, proc)
        return proc, image

    def client(self, retry: RetryPolicy) -> AoEClient:
        """The user-space initiator on the client end of ``self.pair``, closed at cleanup."""
        client = AoEClient.listen(
            self.pair.client_if, reactor=reactor, netns=self.pair.client_ns, retry=retry
        )
        self.addCleanup(client.close)
        return client

    @defer.inlineCallbacks
    def test_pattern_64_in_flight(self) -> Gen:
        """
        A 16 MiB pattern written through the gateway with 64 frames in
        flight reads back intact through it, 4 KiB random reads 64 at a time
        find it too, and librbd reading the image directly finds exactly it.
        """
        size, length, offset = 32 * MIB, 16 * MIB, 3 * MIB
        proc, image = self.serve(size)
        client = self.client(RetryPolicy(0.25, 1.0, 40))
        disk = yield client.open(SHELF, SLOT)
        self.assertEqual(disk.size, size)
        self.assertEqual(disk.window, 64)
        data = pattern(length, seed=13)
        started = time.monotonic()
        yield disk.write(offset // SECTOR, data)
        yield disk.flush()
        written = time.monotonic() - started
        self.assertEqual(disk.peak_in_flight, 64)
        started = time.monotonic()
        back = yield disk.read(offset // SECTOR, length // SECTOR)
        read = time.monotonic() - started
        self.assertTrue(back == data, "the pattern read back through the gateway differs")

        # Random 4 KiB reads, 64 at a time, each compared with the pattern.
        rng = random.Random(4)
        places = [rng.randrange(0, length // 4096) * 4096 for _ in range(1024)]

        @defer.inlineCallbacks
        def reader(mine: list[int]) -> Gen:
            for place in mine:
                got = yield disk.read((offset + place) // SECTOR, 8)
                self.assertTrue(got == data[place : place + 4096], f"4 KiB at {place} differs")

        started = time.monotonic()
        yield defer.gatherResults([reader(places[i::64]) for i in range(64)], consumeErrors=True)
        random_seconds = time.monotonic() - started

        direct = read_image(self.cluster, image, offset, length)
        self.assertEqual(hashlib.md5(direct).hexdigest(), hashlib.md5(data).hexdigest())
        self.assertEqual(read_image(self.cluster, image, 0, offset), bytes(offset))
        yield client.close()
        out = yield self.stop_cleanly(proc)
        self.assertIn(f"serving e{SHELF}.{SLOT} = rbd:rbd/{image},", out)
        self.assertIn(f"({size} bytes, rw)", out)
        self.assertEqual(log_problems(out), [], out)
        self.assertGreater(self.relay.connections, 1)
        print(
            f"\n  [rbd gateway, user space] {length // MIB} MiB written in {written:.2f} s"
            f" ({length / written / 1e6:.1f} MB/s), read in {read:.2f} s"
            f" ({length / read / 1e6:.1f} MB/s); {len(places)} random 4 KiB reads, 64 in"
            f" flight: {len(places) / random_seconds:.0f} IOPS",
            flush=True,
        )

    @defer.inlineCallbacks
    def test_cluster_pause_resends_join(self) -> Gen:
        """
        With the OSD stopped (SIGSTOP) for longer than ``--backend-timeout``,
        an initiator that resends sooner than that (as the Linux one does, with
        a new tag each time) gets the timeout's ATA error under the tag it is
        waiting for: its copies join the read already under way instead of
        each starting one more (and being answered too late to count), so the
        error comes ``--backend-timeout`` after the first copy.  Once the OSD
        goes on, the data is read back unchanged.
        """
        proc, _ = self.serve(4 * MIB, "--backend-timeout", str(SILENT_TIMEOUT), mtu=1500)
        client = self.client(RetryPolicy(0.25, 1.0, 40))
        disk = yield client.open(SHELF, SLOT)
        data = pattern(64 * 1024, seed=7)
        yield disk.write(0, data)
        self.cluster.pause_osd()
        self.addCleanup(self.cluster.resume_osd)
        started = time.monotonic()
        error = yield self.assertFailure(disk.read(0, 2), ATAError)
        waited = time.monotonic() - started
        self.cluster.resume_osd()
        self.assertGreaterEqual(waited, SILENT_TIMEOUT * 0.9, error)
        self.assertLess(waited, SILENT_TIMEOUT + 2.0, error)
        back = yield disk.read(0, len(data) // SECTOR)
        self.assertTrue(back == data, "the data read after the OSD came back differs")
        yield client.close()
        out = yield self.stop_cleanly(proc)
        self.assertIn("(ETIMEDOUT); answered with an ATA error", out)
        print(
            f"\n  [rbd gateway, OSD stopped, resending client] ATA error after {waited:.2f} s",
            flush=True,
        )

    @defer.inlineCallbacks
    def test_cluster_silent_ata_error(self) -> Gen:
        """
        An initiator that waits longer than ``--backend-timeout`` for its
        first copy gets an ATA error once that timeout has passed while the
        OSD is stopped, and the gateway logs it as ``ETIMEDOUT``; once the
        OSD goes on, the gateway serves the data again, unchanged.
        """
        proc, _ = self.serve(4 * MIB, "--backend-timeout", str(SILENT_TIMEOUT), mtu=1500)
        patient = SILENT_TIMEOUT * 3
        client = self.client(RetryPolicy(patient, patient, 1))
        disk = yield client.open(SHELF, SLOT)
        data = pattern(64 * 1024, seed=8)
        yield disk.write(0, data)
        self.cluster.pause_osd()
        self.addCleanup(self.cluster.resume_osd)
        started = time.monotonic()
        error = yield self.assertFailure(disk.read(0, 2), ATAError)
        waited = time.monotonic() - started
        self.cluster.resume_osd()
        self.assertGreaterEqual(waited, SILENT_TIMEOUT * 0.9, error)
        self.assertLess(waited, patient, error)
        back = yield disk.read(0, len(data) // SECTOR)
        self.assertTrue(back == data, "the data read after the OSD came back differs")
        yield client.close()
        out = yield self.stop_cleanly(proc)
        self.assertIn("(ETIMEDOUT); answered with an ATA error", out)
        print(f"\n  [rbd gateway, OSD stopped] ATA error after {waited:.2f} s: {error}", flush=True)


# -- 2. two gateways, the Linux initiator, one killed ------------------------------------

#: The two gateways' MACs (their ``aoe0`` in their namespaces).
GATEWAY_MACS = {"a": "02:00:00:00:0e:0a", "b": "02:00:00:00:0e:0b"}
MTU = 9000
DISK_MIB = 80
XFER_OFFSET_MIB, XFER_MIB = 8, 64
#: Frames gateway A must have been sent during the transfer before it is killed.
KILL_AFTER_FRAMES = 1200
#: Seconds the transfer may stall at the kill (exclusive-lock would cost 30).
STALL_BOUND = 25.0

GUEST_SCRIPT = r"""
D=/dev/etherd/e5.0
S='/sys/block/etherd!e5.0'
DBG=/sys/kernel/debug/aoe/e5.0
md5() { set -- $(md5sum "$1"); echo "$1"; }
sync_host() {
    echo "@@MP-SYNC $1@@"
    read -t 120 _go || { echo "no go from the host at $1" >&2; exit 90; }
}
# One line per server MAC: mac:nout:maxout:nframes taint r w interfaces.
paths() {
    awk '/^[0-9a-f]+:[0-9]+:[0-9]+:[0-9]+$/ {if (p) print p; p = $0; next}
         /taint:/ {p = p " " $1} /^\tr:/ {p = p " " $1} /^\tw:/ {p = p " " $1}
         END {if (p) print p}' $DBG
}
written() { read -r _ _ _ _ _ _ w _ < "$S/stat"; echo "$w"; }
mount -t debugfs none /sys/kernel/debug || exit 2
insmod /lib/modules/aoe.ko aoe_iflist=eth0 || exit 4
aoe_wait_disk e5.0 20 || exit 10
n=0
while [ "$(paths | wc -l)" -lt 2 ] && [ $n -lt 50 ]; do
    if [ $((n % 10)) -eq 0 ]; then echo > /dev/etherd/discover; fi
    n=$((n + 1)); usleep 100000
done
echo SIZE=$(cat "$S/size") PAYLOAD=$(cat "$S/payload") NETIF=$(cat "$S/netif")
paths | sed 's/^/PATH0 /'
dd if=/dev/urandom of=/tmp/p bs=1M count=__MIB__ 2>/dev/null || exit 11
echo PATTERN_MD5=$(md5 /tmp/p)
sync_host start
# The write counter, every 20 ms, until the transfer is over.
( while [ ! -e /tmp/done ]; do
    read up _ < /proc/uptime; echo "$up $(written)"; usleep 20000
  done ) > /tmp/progress &
sampler=$!
read t0 _ < /proc/uptime
dd if=/tmp/p of=$D bs=1M seek=__OFF__ oflag=direct 2>/tmp/dd.err &
pid=$!
sync_host transfer
read killed _ < /proc/uptime
echo KILLED_AT=$killed WRITTEN_AT_KILL=$(written)
wait $pid
echo DD_RC=$?
read t1 _ < /proc/uptime
touch /tmp/done
wait $sampler
cat /tmp/dd.err
echo T0=$t0 T1=$t1 WRITTEN=$(written)
awk '$2 != last {print "PROG", $1, $2; last = $2} END {print "PROG", $1, $2}' /tmp/progress
paths | sed 's/^/PATH1 /'
rm /tmp/p
dd if=$D of=/tmp/r bs=1M skip=__OFF__ count=__MIB__ iflag=direct 2>/dev/null || exit 12
echo READ_MD5=$(md5 /tmp/r)
echo STATE=$(cat "$S/state")
"""


def guest_script() -> str:
    """Return ``GUEST_SCRIPT`` with the transfer's place and size filled in."""
    return fill(GUEST_SCRIPT, {"MIB": XFER_MIB, "OFF": XFER_OFFSET_MIB})


class GatewaySegment(linuxguest.GuestNetwork):
    """
    The guest's tap on a bridge, and one namespace per gateway with a port on that bridge.

    The tap and the bridge ``br0`` live in the guest's namespace (``netns``,
    where QEMU runs); gateway ``NAME`` lives in ``gateways[NAME]``, its
    interface ``aoe0`` (MAC ``GATEWAY_MACS[NAME]``) the far end of a veth
    whose near end ``gwNAME`` is a port of ``br0``.  Every namespace is
    named like ``GuestNetwork``'s (``aoetw-PID-HEX``), so
    ``linuxguest.remove_stale_networks`` removes them after a crash.
    """

    def __init__(self, mtu: int = MTU, names: Iterable[str] = ("a", "b")) -> None:
        super().__init__(mtu)
        prefix = self.netns.rpartition("-")[0]
        self.gateways = {name: f"{prefix}-{secrets.token_hex(4)}" for name in names}
        self._gateways_made: list[str] = []

    def open(self) -> None:
        """Make the guest's namespace and tap, the bridge, and each gateway's namespace and port."""
        super().open()
        try:
            ns, mtu = self.netns, str(self.mtu)
            self._ip("-n", ns, "link", "add", "br0", "mtu", mtu, "type", "bridge", "stp_state", "0")
            self._ip("-n", ns, "link", "set", self.tap, "master", "br0")
            self._ip("-n", ns, "link", "set", "br0", "up")
            for name, gateway_ns in self.gateways.items():
                self._ip("netns", "add", gateway_ns)
                self._gateways_made.append(gateway_ns)
                self._ip("-n", gateway_ns, "link", "set", "lo", "up")
                self._ip(
                    "-n", ns, "link", "add", f"gw{name}", "mtu", mtu, "type", "veth", "peer",
                    "name", "aoe0", "netns", gateway_ns, "mtu", mtu,
                    "address", GATEWAY_MACS[name],
                )  # fmt: skip
                self._ip("-n", ns, "link", "set", f"gw{name}", "master", "br0", "up")
                self._ip("-n", gateway_ns, "link", "set", "aoe0", "up")
            self._wait_up()
        except BaseException:
            self.close()
            raise

    def _wait_up(self) -> None:
        """Wait until every gateway's ``aoe0`` and its bridge port say ``state UP``."""
        ends = [(ns, "aoe0") for ns in self.gateways.values()]
        ends += [(self.netns, f"gw{name}") for name in self.gateways]
        deadline = time.monotonic() + 10
        while True:
            states = [run("ip", "-n", ns, "-o", "link", "show", "dev", dev) for ns, dev in ends]
            if all(" state UP " in state for state in states):
                return
            if time.monotonic() > deadline:
                raise linuxguest.GuestError(f"the gateways' links did not come up: {states}")
            time.sleep(0.02)

    def close(self) -> None:
        """Delete the gateways' namespaces, then what ``GuestNetwork.close`` deletes."""
        while self._gateways_made:
            subprocess.run(
                ["ip", "netns", "del", self._gateways_made.pop()], capture_output=True, check=False
            )
        super().close()

    def tx_frames(self, name: str) -> int:
        """Frames the bridge has sent to gateway ``name`` (its port's TX packet counter)."""
        out = run("ip", "-n", self.netns, "-s", "-j", "link", "show", "dev", f"gw{name}")
        return int(json.loads(out)[0]["stats64"]["tx"]["packets"])


class RBDGateway(TwistdTarget):
    """``twistd -n aoe --iface aoe0 --target 5.0=rbd:...`` in a gateway's namespace."""

    def __init__(self, netns: str, target: str, log_path: Path) -> None:
        super().__init__(netns, "aoe0", Path("/nonexistent"), log_path, SHELF, SLOT)
        self.target = target

    @property
    def argv(self) -> list[str]:
        """The command line, without the namespace prefix."""
        return [*TWISTD, "-n", "--pidfile=", "aoe", "--iface", "aoe0", "--target", self.target]


def start_all(gateways: Iterable[RBDGateway]) -> None:
    """Start the gateways at once (each waits for its "serving" line in a thread of its own)."""
    errors: list[BaseException] = []

    def start(gateway: RBDGateway) -> None:
        try:
            gateway.start()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start, args=(g,)) for g in gateways]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def parse_progress(lines: Iterable[str]) -> list[tuple[float, int]]:
    """The guest's ``PROG SECONDS SECTORS`` lines as ``(seconds, sectors written)``."""
    samples = []
    for line in lines:
        words = line.split()
        if len(words) == 3 and words[0] == "PROG":
            samples.append((float(words[1]), int(words[2])))
    return samples


def longest_gaps(samples: list[tuple[float, int]], mark: float) -> tuple[float, float]:
    """
    Return the longest time without progress before ``mark``, and the longest one ending after.

    ``samples`` are the times at which the written count changed (and the
    last sample); a gap is the time between two such changes.
    """
    before = after = 0.0
    for (t0, _), (t1, _) in itertools.pairwise(samples):
        if t1 <= mark:
            before = max(before, t1 - t0)
        else:
            after = max(after, t1 - t0)
    return before, after


class GatewayFailoverTests(InteropTestCase):
    """Two gateways of one RBD image; the Linux initiator uses both and survives losing one."""

    def setUp(self) -> None:
        super().setUp()
        self.cluster = shared_cluster(self)

    def test_kill_one_gateway_mid_transfer(self) -> None:
        """
        Both gateways serve e5.0 from one image and call each other a second
        path; the guest knows e5.0 through both MACs; a direct write running
        when gateway A is SIGKILLed completes, after a stall well under 30 s,
        with the right data in the guest and in the image.
        """
        cluster = self.cluster
        workdir = self.workdir()
        image = cluster.create_image(self, DISK_MIB * MIB, features=LAYERING)
        # Runs before the image's removal: a killed gateway's watch would block it.
        self.addCleanup(evict_watchers, cluster, image)
        started = time.monotonic()
        marks: dict[str, float] = {}
        frames: dict[str, tuple[int, int]] = {}
        with GatewaySegment() as net:
            gateways = {
                name: RBDGateway(
                    ns, rbd_target(cluster, image, f"gateway-{name}"), workdir / f"{name}.log"
                )
                for name, ns in net.gateways.items()
            }
            for ns in net.gateways.values():
                relay_into(self, cluster, ns)
            guest = OneNicGuest(net, workdir)  # type: ignore[arg-type]

            def sample(name: str) -> None:
                frames[name] = (net.tx_frames("a"), net.tx_frames("b"))
                marks[name] = time.monotonic() - started

            def on_sync(name: str) -> str:
                sample(name)
                if name == "transfer":
                    # Kill A once it has carried part of the transfer.
                    deadline = time.monotonic() + 30
                    while net.tx_frames("a") - frames["start"][0] < KILL_AFTER_FRAMES:
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.01)
                    assert gateways["a"].proc is not None
                    gateways["a"].proc.kill()
                    sample("killed")
                return "go"

            try:
                start_all(gateways.values())
                # Each gateway hears the other's announcement; wait for both verdicts.
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and not all(
                    "(a second path)" in g.log for g in gateways.values()
                ):
                    time.sleep(0.05)
                marks["serving"] = time.monotonic() - started
                code = guest.run(guest_script(), on_sync, timeout=150)
                b_alive = gateways["b"].alive()
            finally:
                a_code = gateways["a"].stop()
                b_code = gateways["b"].stop()
        total = time.monotonic() - started
        logs = {name: g.log for name, g in gateways.items()}
        if code != 0:
            self.fail(
                f"guest script exited {code}; console tail:\n{guest.tail()}\n"
                f"--- gateway b:\n{logs['b'][-3000:]}"
            )
        values = guest.values()

        # Each gateway found the other serving the same disk: a second path, no duplicate.
        for name, other in (("a", "b"), ("b", "a")):
            self.assertIn(
                f"e{SHELF}.{SLOT}: {GATEWAY_MACS[other]} serves the same disk (a second path)",
                logs[name],
            )
            self.assertNotIn("#critical]", logs[name])
            self.assertEqual(log_problems(logs[name]), [], logs[name])
        # The guest's driver knows e5.0 through both gateways' MACs.
        macs = {name: mac.replace(":", "") for name, mac in GATEWAY_MACS.items()}
        paths0 = guest.paths("PATH0")
        self.assertEqual(sorted(paths0), sorted(macs.values()), guest.output())
        self.assertEqual(int(values["SIZE"]) * SECTOR, DISK_MIB * MIB)

        # The transfer ran through A, was under way at the kill, and completed.
        total_sectors = XFER_MIB * MIB // SECTOR
        at_kill = int(values["WRITTEN_AT_KILL"])
        self.assertGreaterEqual(frames["killed"][0] - frames["start"][0], KILL_AFTER_FRAMES)
        self.assertLess(at_kill, total_sectors, "the transfer was over before the kill")
        self.assertEqual(values["DD_RC"], "0", guest.output())
        self.assertEqual(int(values["WRITTEN"]), total_sectors)
        self.assertEqual(a_code, -signal.SIGKILL, "gateway A was not killed")
        self.assertTrue(b_alive, f"gateway B died:\n{logs['b']}")
        self.assertIn(b_code, (0, -signal.SIGTERM), f"gateway B did not stop cleanly:\n{logs['b']}")
        after_kill_b = frames["transfer"][1], frames["killed"][1]
        self.assertGreater(after_kill_b[1], 0)

        # The right data, in the guest and in the image.
        self.assertEqual(values["READ_MD5"], values["PATTERN_MD5"])
        on_image = read_image(cluster, image, XFER_OFFSET_MIB * MIB, XFER_MIB * MIB)
        self.assertEqual(hashlib.md5(on_image).hexdigest(), values["PATTERN_MD5"])

        # The stall: the longest time without progress after the kill.
        progress = parse_progress(guest.output())
        self.assertGreater(len(progress), 5, guest.output())
        killed_at = float(values["KILLED_AT"])
        before, stall = longest_gaps(progress, killed_at)
        self.assertLess(stall, STALL_BOUND, progress)
        paths1 = guest.paths("PATH1")
        seconds = float(values["T1"]) - float(values["T0"])
        print(
            f"\n  [rbd gateways, linux initiator] total {total:.1f} s (gateways serving at"
            f" {marks['serving']:.1f} s); paths {paths0}"
            f"\n  {XFER_MIB} MiB direct write took {seconds:.1f} s; A killed after"
            f" {frames['killed'][0] - frames['start'][0]} frames to A, at"
            f" {at_kill * SECTOR / MIB:.0f} MiB written;"
            f"\n  stall after the kill {stall:.2f} s (longest gap before it {before:.2f} s);"
            f" paths then {paths1}",
            flush=True,
        )


# -- 3. docs/gateways.md says what runs -----------------------------------------------------

GATEWAYS_DOC = Path(__file__).resolve().parent.parent / "docs" / "gateways.md"


class GatewayDocTests(SynchronousTestCase):
    """The commands and the config file of docs/gateways.md are valid for this code."""

    def setUp(self) -> None:
        self.text = GATEWAYS_DOC.read_text()

    def test_config_file(self) -> None:
        """The gateway's config file parses: one rbd: target at 5.0, on the AoE interface."""
        [body] = re.findall(r"^```toml\n(.*?)^```", self.text, re.DOTALL | re.MULTILINE)
        config = parse_config(body, "gateways.md")
        [target] = config.targets
        self.assertEqual((target.address, target.interfaces), ("e5.0", ("eth1",)))
        self.assertEqual(config.backend_timeout, 30)
        spec = parse_spec(target.backend.removeprefix("rbd:"))
        self.assertEqual((spec.pool, spec.image, spec.client_id), ("rbd", "disk0", "aoe-gw1"))

    def test_command_lines(self) -> None:
        """The ``--target`` of each twistd command line: one address, one image, two clients."""
        targets = re.findall(r"^twistd -n aoe .*--target (\S+)$", self.text, re.MULTILINE)
        self.assertEqual(len(targets), 2)
        parsed = [parse_target_option(t, {"interfaces": ("eth1",)}) for t in targets]
        self.assertEqual({p.address for p in parsed}, {"e5.0"})
        specs = [parse_spec(p.backend.removeprefix("rbd:")) for p in parsed]
        self.assertEqual(
            {(s.pool, s.image, s.conf) for s in specs}, {("rbd", "disk0", "/etc/ceph/ceph.conf")}
        )
        self.assertEqual(sorted(s.client_id for s in specs), ["aoe-gw1", "aoe-gw2"])

    def test_second_path_line(self) -> None:
        """The second-path line the document quotes is the one ``SecondPath`` logs."""
        from aoe_twisted.core.duplicates import SecondPath

        line = SecondPath((SHELF, SLOT), bytes.fromhex("020000000e0b")).describe()
        self.assertIn(line, self.text)
