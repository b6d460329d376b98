"""
The ``rbd:`` backend against a real one-node Ceph cluster, and that cluster itself.

``SpecTests`` need nothing: the spec syntax and its one-line errors, and the
one line a missing python3-rbd gives.  Everything else runs against the
cluster of ``tests.cephcluster`` (one monitor, one memstore OSD on
127.0.0.1), started once per test run by the first test that needs it; each
test makes its own images and removes them.  Skipped, saying why, when
Ceph or python3-rbd is missing, unless ``AOE_TWISTED_REQUIRE_INTEROP=1``.

The backend provides ``IAsyncBlockBackend`` and ``IDiskIdentity``, checked
with ``verifyObject``.
"""

from __future__ import annotations

import errno
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from aoe_twisted.backends import rbd as rbdbackend
from aoe_twisted.backends.rbd import DEFAULT_TIMEOUT, RBDBackend, RBDSpec, open_async, parse_spec
from aoe_twisted.errors import BackendSpecError
from aoe_twisted.interfaces import IAsyncBlockBackend, IDiskIdentity
from tests.cephcluster import CephCluster, CephClusterError, require_ceph, shared_cluster

SECTOR = 512


class SpecTests(unittest.SynchronousTestCase):
    """``parse_spec``: what an ``rbd:`` spec says, and one line for what is wrong with it."""

    def test_minimal(self) -> None:
        """``POOL/IMAGE`` alone: the head of the image, default conf, client.admin, 30 s."""
        self.assertEqual(parse_spec("rbd/disk0"), RBDSpec(pool="rbd", image="disk0"))
        self.assertEqual(parse_spec("rbd/disk0").timeout, DEFAULT_TIMEOUT)
        self.assertEqual(parse_spec("rbd/disk0").name, "rbd/disk0")

    def test_everything(self) -> None:
        """Snapshot and every option are read; ``client.`` before the id is optional."""
        spec = parse_spec("pool1/disk@gold,conf=/etc/ceph/x.conf,id=client.aoe,timeout=2.5")
        self.assertEqual(
            spec,
            RBDSpec(
                pool="pool1", image="disk", snapshot="gold", conf="/etc/ceph/x.conf",
                client_id="aoe", timeout=2.5,
            ),
        )
        self.assertEqual(spec.name, "pool1/disk@gold")

    def test_namespace(self) -> None:
        """A namespace is named as the rbd command names it, or with ``namespace=``."""
        expected = RBDSpec(pool="p", image="i", namespace="ns", snapshot="s")
        self.assertEqual(parse_spec("p/ns/i@s"), expected)
        self.assertEqual(parse_spec("p/i@s,namespace=ns"), expected)
        self.assertEqual(expected.name, "p/ns/i@s")

    def test_bad_specs(self) -> None:
        """Each malformed spec gives one line that quotes it and names the problem."""
        cases = {
            "disk0": "is not POOL/IMAGE",
            "/disk0": "is not POOL/IMAGE",
            "rbd/": "is not POOL/IMAGE",
            "a/b/c/d": "is not POOL/IMAGE",
            "rbd/disk@": "nothing after '@'",
            "rbd/disk@a@b": "more than one '@'",
            "rbd/disk,size=3": "unknown option 'size'",
            "rbd/disk,conf": "option 'conf' needs a value",
            "rbd/disk,conf=": "option 'conf' needs a value",
            "rbd/disk,id=a,id=b": "option 'id' given twice",
            "rbd/ns/disk,namespace=ns": "namespace given twice",
            "rbd/disk,timeout=0": "timeout=0 is not a positive number",
            "rbd/disk,timeout=soon": "timeout=soon is not a positive number",
            "rbd/disk,timeout=inf": "timeout=inf is not a positive number",
            "rbd/disk,timeout=nan": "timeout=nan is not a positive number",
            "rbd/disk,id=client.": "needs a client name",
        }
        for spec, problem in cases.items():
            with self.subTest(spec=spec):
                error = self.assertRaises(BackendSpecError, parse_spec, spec)
                message = str(error)
                self.assertIn(problem, message)
                self.assertTrue(message.startswith(f"rbd:{spec}: "), message)
                self.assertNotIn("\n", message)

    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet="rb/@,=:.-_ 0a\n", max_size=40))
    def test_any_text(self, spec: str) -> None:
        """Any text is either a spec or one line of ``BackendSpecError``; never anything else."""
        try:
            parsed = parse_spec(spec)
        except BackendSpecError as e:
            self.assertNotIn("\n", str(e))
            self.assertTrue(str(e).startswith("rbd:"))
            return
        self.assertTrue(parsed.pool and parsed.image)
        self.assertGreater(parsed.timeout, 0)

    def test_missing_module(self) -> None:
        """Without python3-rbd, opening gives the one line that says which package to install."""
        for name in ("rbd", "rados"):
            saved = sys.modules.get(name)
            sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError
            self.addCleanup(_restore_module, name, saved)
        error = self.assertRaises(BackendSpecError, rbdbackend.open_rbd, "rbd/disk0")
        self.assertEqual(
            str(error), "rbd: backend needs python3-rbd (apt-get install python3-rbd)"
        )
        failure = self.failureResultOf(open_async("rbd/disk0"), BackendSpecError)
        self.assertEqual(str(failure.value), str(error))


def _restore_module(name: str, saved: Any) -> None:
    """Put ``sys.modules[name]`` back as it was."""
    if saved is None:
        sys.modules.pop(name, None)
    else:
        sys.modules[name] = saved


class _ClusterTestCase(unittest.TestCase):
    """Tests on the shared cluster: ``self.cluster``, ``self.conf`` and an ``open`` helper."""

    def setUp(self) -> None:
        self.cluster = shared_cluster(self)
        self.conf = self.cluster.conf

    def spec(self, image: str, extra: str = "") -> str:
        """Return the spec of ``image`` (``@SNAP`` and options in ``extra``) on this cluster."""
        return f"rbd/{image}{extra},conf={self.conf}"

    @defer.inlineCallbacks
    def open(self, image: str, extra: str = "", read_only: bool = False) -> Any:
        """Open ``image`` with ``open_async``; the test's cleanup closes it."""
        backend = yield open_async(self.spec(image, extra), read_only=read_only, reactor=reactor)
        self.addCleanup(backend.close)
        return backend

    def read_directly(self, image: str, offset: int, length: int) -> bytes:
        """Read from ``image`` with a librbd client of its own (no cache), synchronously."""
        import rbd

        client = self.cluster.connect()
        try:
            with client.open_ioctx("rbd") as ioctx, rbd.Image(ioctx, image, read_only=True) as img:
                return img.read(offset, length)
        finally:
            client.shutdown()


class RBDBackendTests(_ClusterTestCase):
    """Reading, writing and flushing an image through ``RBDBackend``."""

    @defer.inlineCallbacks
    def test_contract(self) -> defer.Deferred[None]:
        """The backend has the asynchronous contract's methods and attributes, the image's size."""
        image = self.cluster.create_image(self, 8 << 20)
        backend = yield self.open(image)
        verifyObject(IAsyncBlockBackend, backend)
        verifyObject(IDiskIdentity, backend)
        self.assertEqual(backend.size, 8 << 20)
        self.assertFalse(backend.read_only)
        self.assertIsInstance(backend, RBDBackend)

    @defer.inlineCallbacks
    def test_open_blocking(self) -> defer.Deferred[None]:
        """``open_rbd`` opens in the calling thread; the backend works as ``open_async``'s does."""
        image = self.cluster.create_image(self, 1 << 20)
        backend = rbdbackend.open_rbd(self.spec(image), reactor=reactor)
        self.addCleanup(backend.close)
        yield backend.write(4096, b"w" * 4096)
        yield backend.flush()
        self.assertEqual((yield backend.read(4096, 4096)), b"w" * 4096)
        self.assertEqual(self.read_directly(image, 4096, 4096), b"w" * 4096)

    @defer.inlineCallbacks
    def test_integrity_64_in_flight(self) -> defer.Deferred[None]:
        """
        Random reads and writes, 64 in flight, agree with a local model of the disk.

        Requests of 1 to 128 sectors at random offsets; a request never
        overlaps a write in flight (the order of two overlapping requests in
        flight is undefined, as on a disk), and every read is compared with
        the model when it completes.  Then a flush, and the whole image read
        back through the backend and through a separate librbd client.
        """
        size = 16 << 20
        image = self.cluster.create_image(self, size)
        backend = yield self.open(image)
        model = bytearray(size)
        rng = random.Random(1313)
        busy: dict[int, tuple[int, int, bool]] = {}  # request number -> (start, end, is_write)
        numbers = iter(range(10**9))
        stats = {"reads": 0, "writes": 0, "max_in_flight": 0}

        def pick(write: bool) -> tuple[int, int]:
            while True:
                length = rng.randint(1, 128) * SECTOR
                start = rng.randrange(0, size - length + 1, SECTOR)
                end = start + length
                if all(
                    end <= s or e <= start or not (write or w) for s, e, w in busy.values()
                ):
                    return start, end

        def one() -> defer.Deferred[None]:
            write = rng.random() < 0.5
            start, end = pick(write)
            n = next(numbers)
            busy[n] = (start, end, write)
            stats["max_in_flight"] = max(stats["max_in_flight"], len(busy))
            if write:
                data = rng.randbytes(end - start)
                d = backend.write(start, data)

                def written(result: None) -> None:
                    self.assertIsNone(result)
                    model[start:end] = data
                    stats["writes"] += 1

                d.addCallback(written)
            else:
                d = backend.read(start, end - start)

                def read(data: bytes) -> None:
                    self.assertEqual(len(data), end - start)
                    self.assertTrue(data == model[start:end], f"read at {start} differs")
                    stats["reads"] += 1

                d.addCallback(read)
            d.addBoth(lambda r: (busy.pop(n), r)[1])
            return d

        total = 3000

        def worker() -> Any:
            for _ in range(total // 64):
                yield one()

        yield defer.gatherResults(
            [task.cooperate(worker()).whenDone() for _ in range(64)], consumeErrors=True
        )
        self.assertEqual(stats["max_in_flight"], 64)
        yield backend.flush()
        whole = yield backend.read(0, size)
        self.assertTrue(whole == model, "the image differs from the model")
        self.assertTrue(self.read_directly(image, 0, size) == model, "another client differs")
        self.assertEqual(stats["reads"] + stats["writes"], total // 64 * 64)
        self.assertEqual(backend.in_flight, 0)

    @defer.inlineCallbacks
    def test_write_visible_once_acknowledged(self) -> defer.Deferred[None]:
        """When a write's Deferred fires, another client reads the data (no cache, no flush)."""
        image = self.cluster.create_image(self, 4 << 20)
        backend = yield self.open(image)
        data = os.urandom(64 * 1024)
        yield backend.write(1 << 20, data)
        self.assertEqual(self.read_directly(image, 1 << 20, len(data)), data)

    @defer.inlineCallbacks
    def test_two_backends_one_image(self) -> defer.Deferred[None]:
        """
        Two backends on one image (two gateways) each read at once what the other wrote.

        With librbd's default features the exclusive lock moves between the
        two connections at each change of writer; no write is lost or stale.
        """
        image = self.cluster.create_image(self, 4 << 20)
        first = yield self.open(image)
        second = yield self.open(image)
        for round_ in range(3):
            for writer, reader in ((first, second), (second, first)):
                data = os.urandom(8192)
                offset = round_ * 8192
                yield writer.write(offset, data)
                self.assertEqual((yield reader.read(offset, 8192)), data)

    @defer.inlineCallbacks
    def test_write_memoryview(self) -> defer.Deferred[None]:
        """A write accepts any bytes-like data (a view of a reused buffer is copied first)."""
        image = self.cluster.create_image(self, 4 << 20)
        backend = yield self.open(image)
        buffer = bytearray(b"\x5a" * 4096)
        d = backend.write(8192, memoryview(buffer))
        buffer[:] = bytes(4096)
        yield d
        self.assertEqual((yield backend.read(8192, 4096)), b"\x5a" * 4096)

    @defer.inlineCallbacks
    def test_refusals(self) -> defer.Deferred[None]:
        """Out-of-range requests fail with EINVAL, and every request after close with ENOTCONN."""
        image = self.cluster.create_image(self, 1 << 20)
        backend = yield self.open(image)
        for d in (backend.read(1 << 20, 512), backend.write((1 << 20) - 512, bytes(1024))):
            error = yield self.assertFailure(d, OSError)
            self.assertEqual(error.errno, errno.EINVAL)
        yield backend.close()
        yield backend.close()
        for d in (backend.read(0, 512), backend.write(0, bytes(512)), backend.flush()):
            error = yield self.assertFailure(d, OSError)
            self.assertEqual(error.errno, errno.ENOTCONN)

    @defer.inlineCallbacks
    def test_read_only(self) -> defer.Deferred[None]:
        """Opened read-only, the image reads and refuses writes with EROFS; flush succeeds."""
        image = self.cluster.create_image(self, 1 << 20)
        backend = yield self.open(image, read_only=True)
        self.assertTrue(backend.read_only)
        self.assertEqual((yield backend.read(0, 4096)), bytes(4096))
        error = yield self.assertFailure(backend.write(0, b"x" * 512), OSError)
        self.assertEqual(error.errno, errno.EROFS)
        yield backend.flush()

    @defer.inlineCallbacks
    def test_snapshot(self) -> defer.Deferred[None]:
        """``@SNAP`` serves the snapshot, read-only even when asked for read-write."""
        image = self.cluster.create_image(self, 1 << 20)
        head = yield self.open(image)
        yield head.write(0, b"A" * 4096)
        self.cluster.create_snapshot(image, "before")
        yield head.write(0, b"B" * 4096)
        snap = yield self.open(image, "@before", read_only=False)
        self.assertTrue(snap.read_only)
        self.assertEqual((yield snap.read(0, 4096)), b"A" * 4096)
        self.assertEqual((yield head.read(0, 4096)), b"B" * 4096)
        error = yield self.assertFailure(snap.write(0, b"C" * 512), OSError)
        self.assertEqual(error.errno, errno.EROFS)

    @defer.inlineCallbacks
    def test_deadline(self) -> defer.Deferred[None]:
        """
        A request the cluster does not answer in ``timeout`` fails with ETIMEDOUT and a warning.

        The OSD is stopped (SIGSTOP) while a read is sent, to go on 3 s
        later at the latest; the read fails after ``timeout=0.5``, before
        that.  Then the OSD goes on, the late answer is dropped, and the
        next request succeeds.
        """
        image = self.cluster.create_image(self, 1 << 20)
        backend = yield self.open(image, ",timeout=0.5")
        yield backend.write(0, b"z" * 512)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.cluster.pause_osd()
        self.addCleanup(self.cluster.resume_osd)
        resume = reactor.callLater(3, self.cluster.resume_osd)
        self.addCleanup(lambda: resume.cancel() if resume.active() else None)
        began = time.monotonic()
        error = yield self.assertFailure(backend.read(0, 512), OSError)
        waited = time.monotonic() - began
        self.assertEqual(error.errno, errno.ETIMEDOUT)
        self.assertTrue(resume.active(), "the read ended only when the OSD went on")
        resume.cancel()
        self.cluster.resume_osd()
        self.assertGreaterEqual(waited, 0.45)
        self.assertEqual(backend.in_flight, 0)
        logged = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]
        self.assertTrue(any("failed with ETIMEDOUT" in line for line in logged), logged)
        self.assertEqual((yield backend.read(0, 512)), b"z" * 512)

    @defer.inlineCallbacks
    def test_close_releases_the_image(self) -> defer.Deferred[None]:
        """After close, the image has no watcher left: it can be removed at once."""
        import rbd

        image = self.cluster.create_image(None, 1 << 20)
        backend = yield open_async(self.spec(image), reactor=reactor)
        yield backend.write(0, b"q" * 512)
        yield backend.close()
        client = self.cluster.connect()
        self.addCleanup(client.shutdown)
        with client.open_ioctx("rbd") as ioctx:
            rbd.RBD().remove(ioctx, image)


class IdentityTests(_ClusterTestCase):
    """``disk_identity``: one per image and snapshot, the same from every client."""

    @defer.inlineCallbacks
    def test_same_image_same_identity(self) -> defer.Deferred[None]:
        """Two opens of one image (read-write and read-only) present one identity."""
        import rbd

        image = self.cluster.create_image(self, 1 << 20)
        first = yield self.open(image)
        second = yield self.open(image, read_only=True)
        self.assertEqual(first.disk_identity(), second.disk_identity())
        client = self.cluster.connect()
        self.addCleanup(client.shutdown)
        with client.open_ioctx("rbd") as ioctx, rbd.Image(ioctx, image, read_only=True) as img:
            image_id = img.id()
        identity = first.disk_identity()
        self.assertIn(f"image={image_id}".encode(), identity)
        self.assertIn(self.cluster.fsid.encode(), identity)

    @defer.inlineCallbacks
    def test_different_disks_different_identities(self) -> defer.Deferred[None]:
        """Two images, an image and its snapshot, and an image recreated by name all differ."""
        one = self.cluster.create_image(self, 1 << 20)
        two = self.cluster.create_image(self, 1 << 20)
        self.cluster.create_snapshot(one, "s")
        backends = [(yield self.open(one)), (yield self.open(two)), (yield self.open(one, "@s"))]
        identities = {b.disk_identity() for b in backends}
        self.assertEqual(len(identities), 3)
        old = backends[1].disk_identity()
        yield backends[1].close()
        self.cluster.remove_image(two)
        self.cluster.create_image(self, 1 << 20, name=two)
        recreated = yield self.open(two)
        self.assertNotEqual(recreated.disk_identity(), old)

    @defer.inlineCallbacks
    def test_cache_on_makes_identity_host_local(self) -> defer.Deferred[None]:
        """An image whose own setting turns librbd's cache on gets an identity local to the host."""
        import rbd

        image = self.cluster.create_image(self, 1 << 20)
        plain = yield self.open(image)
        client = self.cluster.connect()
        self.addCleanup(client.shutdown)
        with client.open_ioctx("rbd") as ioctx, rbd.Image(ioctx, image) as img:
            img.config_set("rbd_cache", "true")
        cached = yield self.open(image)
        self.assertTrue(cached.disk_identity().startswith(b"host="))
        self.assertTrue(cached.disk_identity().endswith(plain.disk_identity()))
        self.assertFalse(plain.disk_identity().startswith(b"host="))


class OpenErrorTests(_ClusterTestCase):
    """What cannot be opened fails with one line that names what is missing."""

    @defer.inlineCallbacks
    def assertOpenFails(self, spec: str, problem: str) -> defer.Deferred[None]:
        """``open_async(spec)`` fails with a one-line ``BackendSpecError`` naming ``problem``."""
        error = yield self.assertFailure(open_async(spec, reactor=reactor), BackendSpecError)
        self.assertIn(problem, str(error))
        self.assertNotIn("\n", str(error))
        self.assertTrue(str(error).startswith("rbd:"), str(error))

    @defer.inlineCallbacks
    def test_missing(self) -> defer.Deferred[None]:
        """A missing pool, namespace, image, snapshot or conf file is named."""
        image = self.cluster.create_image(self, 1 << 20)
        conf = f",conf={self.conf}"
        yield self.assertOpenFails(f"nopool/{image}{conf}", "pool 'nopool' does not exist")
        yield self.assertOpenFails(f"rbd/nons/{image}{conf}", "namespace 'nons' does not exist")
        yield self.assertOpenFails(f"rbd/noimage{conf}", "image 'noimage' does not exist")
        yield self.assertOpenFails(f"rbd/noimage@s{conf}", "image 'noimage' does not exist")
        yield self.assertOpenFails(f"rbd/{image}@nosnap{conf}", "has no snapshot 'nosnap'")
        yield self.assertOpenFails(f"rbd/{image},conf=/nonexistent.conf", "does not exist")

    @defer.inlineCallbacks
    def test_size_not_whole_sectors(self) -> defer.Deferred[None]:
        """An image whose size is not a whole number of sectors is refused, saying so."""
        image = self.cluster.create_image(self, (1 << 20) + 100)
        yield self.assertOpenFails(self.spec(image), "not a whole multiple of 512")

    @defer.inlineCallbacks
    def test_no_cluster(self) -> defer.Deferred[None]:
        """A cluster that does not answer fails the open after ``timeout``, in one line."""
        directory = Path(self.mktemp())
        directory.mkdir()
        conf = directory / "ceph.conf"
        conf.write_text(
            "[global]\nmon host = v2:127.0.0.1:9\nauth client required = none\n"
            f"log file = {directory}/client.log\n"
        )
        began = time.monotonic()
        yield self.assertOpenFails(
            f"rbd/x,conf={conf},timeout=1", "cannot connect to the cluster as client.admin"
        )
        self.assertLess(time.monotonic() - began, 10)


class ClusterTests(unittest.TestCase):
    """The test cluster itself: on the loopback only, and clear when it cannot start."""

    def test_loopback_only(self) -> None:
        """Every TCP socket the monitor and the OSD listen on is bound to 127.0.0.1."""
        cluster = shared_cluster(self)
        listening = _listening_addresses(cluster.daemon_pids())
        self.assertTrue(listening)
        self.assertEqual({address for address, _ in listening}, {"127.0.0.1"})
        self.assertIn(("127.0.0.1", cluster.port), listening)

    def test_start_failure_quotes_logs(self) -> None:
        """A start that times out stops what it started and quotes the daemons' logs."""
        require_ceph(self)
        cluster = CephCluster(self.mktemp(), timeout=0.5)
        self.patch(cluster, "_monitor_listens", lambda: False)
        error = self.assertRaises(CephClusterError, cluster.start)
        self.assertIn("waiting for the monitor to listen: still not there after 0.5 s", str(error))
        self.assertIn("--- mon.a.log", str(error))
        self.assertEqual(cluster.daemon_pids(), [])


def _listening_addresses(pids: list[int]) -> set[tuple[str, int]]:
    """Return the (IPv4 address, port) pairs the processes ``pids`` listen on with TCP."""
    inodes = set()
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state != "0A" or inode not in inodes:  # 0A: LISTEN
                    continue
                address, port = local.split(":")
                if len(address) == 8:
                    octets = bytes.fromhex(address)[::-1]
                    found.add((".".join(map(str, octets)), int(port, 16)))
                else:
                    found.add((f"ipv6:{address}", int(port, 16)))
    return found
