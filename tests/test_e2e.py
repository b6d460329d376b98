"""
End-to-end tests: the real server on a real ``AF_PACKET`` socket, talked to with real frames.

Each test makes its own pair of network namespaces joined by a veth pair
(``tests.netns``), runs ``AoEService`` in this process on the trial reactor
with its socket in the server namespace, and talks to it from the client
namespace with ``tests.peer.Peer``, another raw socket in the same process.
The namespaces, and the veth pair with them, are deleted when the test ends.

Root only: without it (or without ``ip``) the tests skip, or fail under
``AOE_TWISTED_REQUIRE_INTEROP=1``.

The tests of reads, writes, access control, disks and malformed input run
with both data lanes (``tests.test_fastpath.LaneChoice``): the Python lane
(``aoe_twisted.lane.native`` patched to ``None``, which is what
``AOE_TWISTED_PURE_PYTHON=1`` gives a server started in its own process)
and, when it is built, the compiled one (the ``CompiledLane*`` cases).
Each checks which lane answered: with the compiled lane every frame the
fast path could answer was answered by it, with the Python lane none was.
The other tests run with whichever lane the environment gives.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import defer, reactor, task, utils
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from aoe_twisted import lane as _lane
from aoe_twisted.backends.block import BlockDeviceBackend
from aoe_twisted.backends.file import FileBackend
from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import (
    BROADCAST_MAC,
    SECTOR_SIZE,
    ATAArg,
    ATACmdStatus,
    ATAError,
    Command,
    ConfigArg,
    ConfigCommand,
    Directive,
    DirectiveCommand,
    Error,
    Header,
    MACMaskArg,
    MACMaskCommand,
    ReserveReleaseArg,
    ReserveReleaseCommand,
    WireError,
)
from aoe_twisted.net.port import AoEPort
from aoe_twisted.server import AoEService
from aoe_twisted.testing import (
    OTHER_MAC,
    ata_arg,
    ata_request,
    config_request,
    ethernet_frame,
    mask_request,
    reserve_request,
)
from tests.netns import VethPair, require, run
from tests.peer import Peer, Reply
from tests.test_fastpath import LaneChoice

Gen = Generator[defer.Deferred[Any], Any, None]

#: A forged source MAC that no interface has.
FORGED = OTHER_MAC
#: The reply to "no reply expected" comes within this many seconds if it comes at all.
SILENCE = 0.3

_DRDY = int(ATACmdStatus.READY_STATUS)
_ERR_DRDY = int(ATACmdStatus.ERR_STATUS) | _DRDY


def pattern(size: int, seed: int) -> bytes:
    """Return ``size`` reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


def memory_target(shelf: int, slot: int, sectors: int = 256, seed: int = 1) -> Target:
    """Return a target on a memory disk of ``sectors`` sectors filled with a pattern."""
    backend = MemoryBackend(sectors * SECTOR_SIZE)
    backend.write(0, pattern(backend.size, seed))
    return Target(shelf, slot, backend)


def digest(target: Target) -> str:
    """Return a hash of the whole disk of ``target``."""
    backend = target.backend
    return hashlib.sha256(backend.read(0, backend.size)).hexdigest()


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> defer.Deferred[None]:
    """Fire once ``condition()`` is true, polling the reactor; fail after ``timeout`` s."""

    @defer.inlineCallbacks
    def poll() -> Gen:
        waited = 0.0
        while not condition():
            if waited > timeout:
                raise AssertionError(f"condition not met within {timeout} s")
            yield task.deferLater(reactor, 0.005, lambda: None)
            waited += 0.005

    return poll()


class EndToEndCase(LaneChoice, TestCase):
    """Start a server and a peer on a fresh veth pair; check replies."""

    timeout = 30

    def setUp(self) -> None:
        super().setUp()
        require(self)

    def serve(
        self,
        targets: list[Target],
        mtu: int = 1500,
        max_sectors: int | None = None,
        sync: bool = False,
        peer: bool = True,
    ) -> AoEService:
        """
        Serve ``targets`` on the server end of a new veth pair, with a peer on the other.

        The peer starts first so it sees the start-up announcements.  The
        cleanups stop the service, then the peer, then delete the namespaces.
        Without ``peer``, nothing in this process listens on the other end.
        """
        self.pair = VethPair.create(self, mtu=mtu)
        if peer:
            self.peer = Peer(self.pair.client_if, self.pair.client_ns)
            self.peer.start()
            self.addCleanup(self.peer.stop)
        service = AoEService(
            self.pair.server_if, targets, netns=self.pair.server_ns, max_sectors=max_sectors,
            sync=sync,
        )  # fmt: skip
        self.addCleanup(service.stopService)
        service.privilegedStartService()
        service.startService()
        assert service.port is not None and service.port.mac is not None
        self.service = service
        self.server = service.port.mac
        self._watch_lane(service)
        return service

    def _watch_lane(self, service: AoEService) -> None:
        """
        Count the frames the compiled lane answers; check at the end that the lane chosen ran.

        With the compiled lane, every frame the fast path could answer (the
        dispatcher's ``fast``) is one the lane answered; with the Python
        lane the port has no lane and none is answered by it.
        """
        protocol = service.protocol
        port = service.port
        assert protocol is not None and protocol.dispatcher is not None and port is not None
        counters = protocol.dispatcher.counters
        answered = protocol.laneAnswered
        by_lane = [0]

        def counting(count: int) -> None:
            by_lane[0] += count
            answered(count)

        protocol.laneAnswered = counting  # type: ignore[method-assign]
        lane_sink = port._lane_sink

        def check() -> None:
            if self.compiled is None:
                return
            if self.compiled:
                self.assertIsNotNone(lane_sink, "the compiled lane runs on the port")
                self.assertEqual(by_lane[0], counters.fast, "the lane answered every plain frame")
            else:
                self.assertIsNone(lane_sink, "the Python lane: no compiled lane on the port")
                self.assertEqual(by_lane[0], 0)

        # Run before the service stops (cleanups run last first).
        self.addCleanup(check)

    def one(self, replies: list[Reply]) -> Reply:
        """Return the one reply in ``replies``, failing if there is not exactly one."""
        self.assertEqual(len(replies), 1, f"expected one reply, got {replies!r}")
        reply = replies[0]
        self.assertEqual(reply.src, self.server)
        self.assertTrue(reply.header.flag_response)
        return reply

    def ata_ok(self, replies: list[Reply], data: bytes = b"") -> ATAArg:
        """Check one successful ATA reply (``DRDY``), carrying ``data`` if given."""
        reply = self.one(replies)
        self.assertFalse(reply.header.flag_error)
        arg = reply.arg
        assert isinstance(arg, ATAArg)
        self.assertEqual(arg.cmd_status, _DRDY, f"ATA status {arg.cmd_status:#x}")
        if data:
            self.assertEqual(arg.data, data)
        return arg

    def ata_failed(self, replies: list[Reply], error: ATAError) -> None:
        """Check one failed ATA reply (``ERR|DRDY``) with ``error`` in the error register."""
        reply = self.one(replies)
        self.assertFalse(reply.header.flag_error)
        arg = reply.arg
        assert isinstance(arg, ATAArg)
        self.assertEqual(arg.cmd_status, _ERR_DRDY)
        self.assertEqual(arg.err_feature, int(error))
        self.assertEqual(arg.data.strip(b"\x00"), b"", "a failed ATA reply carries no data")


class DiscoveryTests(EndToEndCase):
    """Finding targets."""

    @defer.inlineCallbacks
    def test_discovery_by_broadcast(self) -> Gen:
        """
        A broadcast config query (32 bytes, unpadded, as Linux sends it) gets one
        padded reply from the target, to the querier, with its address and limits.
        """
        self.serve([memory_target(1, 2)])
        header = Header.from_bytes(config_request(tag=self.peer.next_tag()))
        self.assertEqual(len(self.peer.frame(header, BROADCAST_MAC)), 32)
        reply = self.one((yield self.peer.request(header, BROADCAST_MAC, timeout=SILENCE)))
        self.assertEqual(reply.dst, self.peer.mac)
        self.assertEqual(len(reply.frame), 60)
        self.assertEqual((reply.header.major, reply.header.minor), (1, 2))
        self.assertEqual(reply.header.tag, header.tag)
        arg = reply.arg
        assert isinstance(arg, ConfigArg)
        self.assertEqual((arg.buffer_count, arg.sector_count, arg.version), (16, 2, 1))

    @defer.inlineCallbacks
    def test_announces_at_start(self) -> Gen:
        """A peer that is already up hears each target announce itself by broadcast at start."""
        self.serve([memory_target(1, 2), memory_target(7, 8)])
        yield wait_for(lambda: len(self.peer.unsolicited) >= 2)
        announced = sorted(
            (r.header.major, r.header.minor) for r in self.peer.unsolicited
        )
        self.assertEqual(announced, [(1, 2), (7, 8)])
        for reply in self.peer.unsolicited:
            self.assertEqual((reply.src, reply.dst), (self.server, BROADCAST_MAC))
            self.assertEqual(reply.header.command, Command.QUERY_CONFIG_INFORMATION)
            self.assertEqual(reply.header.tag, bytes(4))

    @defer.inlineCallbacks
    def test_several_targets_on_one_interface(self) -> Gen:
        """
        Three targets on one interface: discovery finds all three, a shelf
        wildcard those on the shelf, and I/O reaches only the addressed disk.
        """
        targets = [memory_target(1, 1, 64, 1), memory_target(1, 2, 128, 2),
                   memory_target(2, 1, 32, 3)]
        self.serve(targets)
        replies = yield self.peer.discover()
        self.assertEqual(
            sorted((r.header.major, r.header.minor) for r in replies), [(1, 1), (1, 2), (2, 1)]
        )
        shelf_one = yield self.peer.discover(shelf=1)
        self.assertEqual(sorted(r.header.minor for r in shelf_one), [1, 2])
        before = [digest(t) for t in targets]
        data = pattern(SECTOR_SIZE, 99)
        self.ata_ok((yield self.peer.write(self.server, 1, 2, 5, data)))
        after = [digest(t) for t in targets]
        self.assertEqual([b == a for b, a in zip(before, after, strict=True)], [True, False, True])
        self.ata_ok((yield self.peer.read(self.server, 1, 2, 5)), data)
        for t in targets:
            arg = self.ata_ok((yield self.peer.identify(self.server, t.shelf, t.slot)))
            self.assertEqual(int.from_bytes(arg.data[200:208], "little"),
                             t.backend.size // SECTOR_SIZE)


class ATATests(EndToEndCase):
    """Identify, read and write (the Python lane)."""

    compiled = False

    @defer.inlineCallbacks
    def test_identify(self) -> Gen:
        """IDENTIFY gives a 512-byte page with the size in words 60-61 and 100-103 and LBA48 on."""
        self.serve([memory_target(0, 0, sectors=2048)])
        page = self.ata_ok((yield self.peer.identify(self.server, 0, 0))).data
        self.assertEqual(len(page), 512)

        def word(i: int) -> int:
            return int.from_bytes(page[2 * i : 2 * i + 2], "little")

        self.assertTrue(word(83) & 0x0400)
        self.assertEqual(word(60) | word(61) << 16, 2048)
        self.assertEqual(sum(word(100 + i) << (16 * i) for i in range(4)), 2048)

    @defer.inlineCallbacks
    def test_first_and_last_sector(self) -> Gen:
        """Writes to the first and last sector read back, and reach the disk."""
        target = memory_target(0, 1, sectors=256)
        self.serve([target])
        first, last = pattern(SECTOR_SIZE, 10), pattern(SECTOR_SIZE, 11)
        self.ata_ok((yield self.peer.write(self.server, 0, 1, 0, first)))
        self.ata_ok((yield self.peer.write(self.server, 0, 1, 255, last)))
        self.ata_ok((yield self.peer.read(self.server, 0, 1, 0)), first)
        self.ata_ok((yield self.peer.read(self.server, 0, 1, 255)), last)
        self.assertEqual(target.backend.read(0, SECTOR_SIZE), first)
        self.assertEqual(target.backend.read(255 * SECTOR_SIZE, SECTOR_SIZE), last)

    @defer.inlineCallbacks
    def test_advertised_maximum(self) -> Gen:
        """At MTU 1500 the target advertises 2 sectors, serves 2 and aborts 3."""
        self.serve([memory_target(0, 1)])
        (reply,) = yield self.peer.discover()
        self.assertEqual(reply.arg.sector_count, 2)
        data = pattern(2 * SECTOR_SIZE, 12)
        self.ata_ok((yield self.peer.write(self.server, 0, 1, 100, data)))
        self.ata_ok((yield self.peer.read(self.server, 0, 1, 100, 2)), data)
        self.ata_failed((yield self.peer.read(self.server, 0, 1, 100, 3)), ATAError.ABRT)

    @defer.inlineCallbacks
    def test_jumbo_frames(self) -> Gen:
        """At MTU 9000 the target advertises 17 sectors and moves 17 in one frame each way."""
        self.serve([memory_target(0, 1, sectors=512)], mtu=9000)
        (reply,) = yield self.peer.discover()
        self.assertEqual(reply.arg.sector_count, 17)
        data = pattern(17 * SECTOR_SIZE, 13)
        self.ata_ok((yield self.peer.write(self.server, 0, 1, 400, data)))
        replies = yield self.peer.read(self.server, 0, 1, 400, 17)
        self.ata_ok(replies, data)
        self.assertEqual(len(replies[0].frame), 14 + 10 + 12 + 17 * SECTOR_SIZE)

    @defer.inlineCallbacks
    def test_max_sectors_option(self) -> Gen:
        """``max_sectors`` caps what is advertised below what the MTU allows."""
        self.serve([memory_target(0, 1)], mtu=9000, max_sectors=8)
        (reply,) = yield self.peer.discover()
        self.assertEqual(reply.arg.sector_count, 8)

    @defer.inlineCallbacks
    def test_sync_writes(self) -> Gen:
        """
        With ``sync`` (writes acknowledged once durable) writes on a file disk are
        acknowledged, read back, and are in the file.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(pattern(64 * SECTOR_SIZE, 50))
        target = Target(0, 1, FileBackend.open(path))
        self.serve([target], sync=True)
        data = [pattern(2 * SECTOR_SIZE, 51 + n) for n in range(4)]
        replies = yield defer.gatherResults(
            [self.peer.write(self.server, 0, 1, 8 * n, d) for n, d in enumerate(data)]
        )
        for reply in replies:
            self.ata_ok(reply)
        for n, d in enumerate(data):
            self.ata_ok((yield self.peer.read(self.server, 0, 1, 8 * n, 2)), d)
            self.assertEqual(target.backend.read(8 * n * SECTOR_SIZE, 2 * SECTOR_SIZE), d)

    @defer.inlineCallbacks
    def test_out_of_range(self) -> Gen:
        """Reads and writes past the end fail with IDNF and change nothing."""
        target = memory_target(0, 1, sectors=256)
        self.serve([target])
        before = digest(target)
        self.ata_failed((yield self.peer.read(self.server, 0, 1, 256)), ATAError.IDNF)
        self.ata_failed((yield self.peer.read(self.server, 0, 1, 255, 2)), ATAError.IDNF)
        self.ata_failed(
            (yield self.peer.write(self.server, 0, 1, 255, bytes(2 * SECTOR_SIZE))), ATAError.IDNF
        )
        self.assertEqual(digest(target), before)


class ConfigTests(EndToEndCase):
    """Config strings (AoEr11 3.2)."""

    @defer.inlineCallbacks
    def test_set_and_test(self) -> Gen:
        """
        Set stores the string; test and prefix test answer only on a match;
        set over another string is refused, force set replaces it.
        """
        self.serve([memory_target(3, 4)])
        config = self.peer.config
        reply = self.one((yield config(self.server, 3, 4, ConfigCommand.SET, b"alpha")))
        self.assertEqual(reply.arg.string, b"alpha")
        self.one((yield config(self.server, 3, 4, ConfigCommand.TEST, b"alpha")))
        self.assertEqual(
            (yield config(self.server, 3, 4, ConfigCommand.TEST, b"beta", timeout=SILENCE)), []
        )
        self.one((yield config(self.server, 3, 4, ConfigCommand.TEST_PREFIX, b"al")))
        self.assertEqual(
            (yield config(self.server, 3, 4, ConfigCommand.TEST_PREFIX, b"be", timeout=SILENCE)),
            [],
        )
        refused = self.one((yield config(self.server, 3, 4, ConfigCommand.SET, b"beta")))
        self.assertTrue(refused.header.flag_error)
        self.assertEqual(refused.header.error, Error.CONFIG_STRING_PRESENT)
        self.assertEqual(refused.arg.string, b"alpha")
        self.one((yield config(self.server, 3, 4, ConfigCommand.FORCE_SET, b"beta")))
        (found,) = yield self.peer.discover()
        self.assertEqual(found.arg.string, b"beta")


class AccessControlTests(EndToEndCase):
    """MAC mask lists (AoEr11 3.3) and reserve lists (3.4), with a forged second host (Python)."""

    compiled = False

    @defer.inlineCallbacks
    def test_mask_list(self) -> Gen:
        """
        Once the mask list holds our MAC, a host not on it gets no reply to
        anything; adding that host lets it in.
        """
        target = memory_target(0, 1)
        self.serve([target])
        peer, server = self.peer, self.server
        add = DirectiveCommand.ADD
        reply = self.one(
            (yield peer.mask(server, 0, 1, MACMaskCommand.EDIT, [Directive(add, peer.mac)]))
        )
        self.assertEqual([d.mac for d in reply.arg.directives], [peer.mac])
        self.assertEqual((yield peer.read(server, 0, 1, 0, src=FORGED, timeout=SILENCE)), [])
        self.assertEqual(
            (yield peer.mask(server, 0, 1, MACMaskCommand.READ, src=FORGED, timeout=SILENCE)), []
        )
        before = digest(target)
        self.assertEqual(
            (yield peer.write(server, 0, 1, 0, bytes(SECTOR_SIZE), src=FORGED, timeout=SILENCE)),
            [],
        )
        self.assertEqual(digest(target), before)
        self.ata_ok((yield peer.read(server, 0, 1, 0)))
        reply = self.one(
            (yield peer.mask(server, 0, 1, MACMaskCommand.EDIT, [Directive(add, FORGED)]))
        )
        self.assertEqual(sorted(d.mac for d in reply.arg.directives), sorted([peer.mac, FORGED]))
        replies = yield peer.read(server, 0, 1, 0, src=FORGED)
        self.ata_ok(replies)
        self.assertEqual(replies[0].dst, FORGED)

    @defer.inlineCallbacks
    def test_reserve_list(self) -> Gen:
        """
        Reserved by us, the target refuses another host's writes and reserve
        changes with error 6 but still identifies; a force set releases it.
        """
        target = memory_target(0, 1)
        self.serve([target])
        peer, server = self.peer, self.server
        reply = self.one((yield peer.reserve(server, 0, 1, ReserveReleaseCommand.SET, [peer.mac])))
        self.assertEqual(reply.arg.macs, (peer.mac,))
        listed = self.one(
            (yield peer.reserve(server, 0, 1, ReserveReleaseCommand.READ, src=FORGED))
        )
        self.assertEqual(listed.arg.macs, (peer.mac,))
        before = digest(target)
        refused = self.one(
            (yield peer.write(server, 0, 1, 3, pattern(SECTOR_SIZE, 5), src=FORGED))
        )
        self.assertTrue(refused.header.flag_error)
        self.assertEqual(refused.header.error, Error.TARGET_IS_RESERVED)
        self.assertEqual(digest(target), before)
        self.ata_ok((yield peer.identify(server, 0, 1)))
        refused = self.one(
            (yield peer.reserve(server, 0, 1, ReserveReleaseCommand.SET, [FORGED], src=FORGED))
        )
        self.assertEqual(refused.header.error, Error.TARGET_IS_RESERVED)
        data = pattern(SECTOR_SIZE, 6)
        self.ata_ok((yield peer.write(server, 0, 1, 3, data)))
        self.one((yield peer.reserve(server, 0, 1, ReserveReleaseCommand.FORCE_SET, src=FORGED)))
        self.ata_ok((yield peer.write(server, 0, 1, 4, data, src=FORGED)))
        self.assertEqual(target.backend.read(3 * SECTOR_SIZE, 2 * SECTOR_SIZE), data + data)


class BackendTests(EndToEndCase):
    """Disks that outlive the server: bytes are checked where they landed (the Python lane)."""

    compiled = False

    @defer.inlineCallbacks
    def test_file_backend(self) -> Gen:
        """Writes through AoE are in the image file, byte for byte, after the server stops."""
        path = self.mktemp()
        original = pattern(128 * SECTOR_SIZE, 20)
        with open(path, "wb") as f:
            f.write(original)
        backend = FileBackend.open(path)
        service = self.serve([Target(0, 1, backend)])
        first, last = pattern(SECTOR_SIZE, 21), pattern(2 * SECTOR_SIZE, 22)
        self.ata_ok((yield self.peer.write(self.server, 0, 1, 0, first)))
        self.ata_ok((yield self.peer.write(self.server, 0, 1, 126, last)))
        self.ata_ok((yield self.peer.read(self.server, 0, 1, 126, 2)), last)
        yield service.stopService()
        with open(path, "rb") as f:
            on_disk = f.read()
        self.assertEqual(len(on_disk), len(original))
        self.assertEqual(on_disk, first + original[SECTOR_SIZE:-2 * SECTOR_SIZE] + last)

    @defer.inlineCallbacks
    def test_block_backend(self) -> Gen:
        """
        A loop device served with ``block:``: its size comes from the kernel,
        and writes are in the backing file once the device is detached.
        """
        require(self, None if shutil.which("losetup") else "needs losetup (util-linux)")
        backing = self.mktemp()
        original = pattern(512 * SECTOR_SIZE, 30)
        with open(backing, "wb") as f:
            f.write(original)
        try:
            device = run("losetup", "--find", "--show", backing).strip()
        except RuntimeError as e:
            require(self, f"cannot attach a loop device: {e}")
        self.addCleanup(_detach, device)
        backend = BlockDeviceBackend.open(device)
        self.assertEqual(backend.size, len(original))
        service = self.serve([Target(0, 1, backend)])
        page = self.ata_ok((yield self.peer.identify(self.server, 0, 1))).data
        self.assertEqual(int.from_bytes(page[200:208], "little"), 512)
        first, last = pattern(SECTOR_SIZE, 31), pattern(SECTOR_SIZE, 32)
        self.ata_ok((yield self.peer.write(self.server, 0, 1, 0, first)))
        self.ata_ok((yield self.peer.write(self.server, 0, 1, 511, last)))
        self.ata_ok((yield self.peer.read(self.server, 0, 1, 0)), first)
        self.ata_ok((yield self.peer.read(self.server, 0, 1, 511)), last)
        yield service.stopService()
        _detach(device)
        with open(backing, "rb") as f:
            on_disk = f.read()
        self.assertEqual(on_disk, first + original[SECTOR_SIZE:-SECTOR_SIZE] + last)


class CompiledLaneATATests(ATATests):
    """``ATATests`` with the compiled lane answering."""

    compiled = True


class CompiledLaneAccessControlTests(AccessControlTests):
    """``AccessControlTests`` with the compiled lane answering (it reads the lists per frame)."""

    compiled = True


class CompiledLaneBackendTests(BackendTests):
    """``BackendTests`` with the compiled lane answering (``pread``/``pwrite``)."""

    compiled = True


class StaleFrameTests(EndToEndCase):
    """
    A request that waited in the ring while the server's process did not run is
    dropped when it runs again (``AoEPort.stale_after``), by the kernel's own
    receive time in the slot.
    """

    @defer.inlineCallbacks
    def test_stalled_server_drops_old_write(self) -> Gen:
        """
        The server's reactor is blocked (as a stopped process is) for 2.2 s while a
        write reaches its ring; with ``stale_after`` 1 s it is neither done nor
        answered when the server runs again, and the same write sent afresh is.
        """
        target = memory_target(1, 0)
        service = self.serve([target])
        port = service.port
        assert port is not None
        port.stale_after = 1
        before = target.backend.read(0, SECTOR_SIZE)
        data = b"\x5a" * SECTOR_SIZE
        tag = self.peer.next_tag()
        arg = ata_arg(ATACmdStatus.WRITE_48BIT, lba=0, data=data)
        frame = self.peer.frame(Header(1, False, False, 0, 1, 0, 0, tag, arg), self.server)
        self.peer.send_raw(frame)  # not awaited: any reply lands in ``unsolicited``
        time.sleep(2.2)  # this process (the server's reactor) does not run
        yield task.deferLater(reactor, 0.5, lambda: None)
        self.assertEqual([r for r in self.peer.unsolicited if r.header.tag == tag], [])
        self.assertEqual(target.backend.read(0, SECTOR_SIZE), before)
        self.assertEqual(port.frames_stale, 1)
        self.ata_ok((yield self.peer.write(self.server, 1, 0, 0, data)))
        self.assertEqual(target.backend.read(0, SECTOR_SIZE), data)


class CompiledLaneStaleFrameTests(StaleFrameTests):
    """``StaleFrameTests`` with the compiled lane walking the ring."""

    compiled = True


#: A client in its own process: for ``argv[3]`` seconds, one request at a time to
#: ``argv[2]`` over ``argv[1]``, each reply awaited: the n-th a 1-sector read of LBA
#: n % 256, or, with ``argv[4]`` = "mixed", every other one an IDENTIFY DEVICE (the
#: Python lane's).  Then it prints how many it sent and a hash of the sectors read.
_ONE_AT_A_TIME = """
import hashlib, socket, sys, time
from aoe_twisted.testing import ata_request, ethernet_frame
interface, server, seconds = sys.argv[1], bytes.fromhex(sys.argv[2]), float(sys.argv[3])
mixed = sys.argv[4] == "mixed"
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88A2))
s.bind((interface, 0x88A2))
s.settimeout(2)
mac = s.getsockname()[4]
data = hashlib.sha256()
count = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    identify = mixed and count % 2 == 1
    request = ata_request(0xEC, tag=count) if identify else ata_request(lba=count % 256, tag=count)
    s.send(ethernet_frame(request, src=mac, dst=server))
    while True:
        reply = s.recv(2048)
        if reply[6:12] == server and int.from_bytes(reply[20:24], "big") == count:
            break
    if reply[27] & 0x01:
        sys.exit("ATA error")
    if not identify:
        data.update(reply[36:36 + 512])
    count += 1
print(count, data.hexdigest())
"""


class _RecordingLane:
    """A port's compiled lane, counting the calls of ``linger`` that may wait."""

    def __init__(self, lane: Any) -> None:
        self.lane = lane
        self.waits = 0

    def linger(self, *args: Any) -> Any:
        if args[8] > 0:
            self.waits += 1
        return self.lane.linger(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.lane, name)


class LingerTests(EndToEndCase):
    """
    The compiled lane waits in C for the port's next frame (``Lane.linger``) while
    nothing else in the reactor needs it, and hands the reactor back on time.
    """

    compiled = True

    def started(self, port: AoEPort) -> None:
        """Called with the port once the service has started (tests instrument it)."""

    @defer.inlineCallbacks
    def one_at_a_time(self, mixed: bool) -> Gen:
        """
        Serve a memory disk; let a client in another process send one request at a
        time for 1 s (``mixed``: every other one for the Python lane) while a timed
        call ticks every 10 ms and the port may linger 5 s.  Check the replies;
        return the client's request count, the port and the gaps between ticks.
        """
        target = memory_target(1, 0)
        service = self.serve([target], peer=False)
        port = service.port
        assert port is not None and port.mac is not None
        if port._epoll is None:
            raise SkipTest("the lane waits only on Twisted's epoll reactor")
        port.linger_ms = 5000
        self.started(port)
        ticks: list[float] = []
        clock = task.LoopingCall(lambda: ticks.append(reactor.seconds()))
        clock.start(0.01)
        self.addCleanup(lambda: clock.running and clock.stop())
        out, err, code = yield utils.getProcessOutputAndValue(
            "ip",
            ["netns", "exec", self.pair.client_ns, sys.executable, "-c", _ONE_AT_A_TIME,
             self.pair.client_if, port.mac.hex(), "1.0", "mixed" if mixed else "reads"],
            env=os.environ,
        )  # fmt: skip
        clock.stop()
        self.assertEqual(code, 0, err)
        count_text, digest_text = out.split()
        count = int(count_text)
        self.assertGreater(count, 100)
        disk = target.backend.read(0, 256 * SECTOR_SIZE)
        expected = hashlib.sha256()
        for n in range(0, count, 2 if mixed else 1):
            expected.update(disk[(n % 256) * SECTOR_SIZE : (n % 256 + 1) * SECTOR_SIZE])
        self.assertEqual(digest_text.decode(), expected.hexdigest())
        gaps = [later - earlier for earlier, later in itertools.pairwise(ticks)]
        self.assertGreater(len(gaps), 50)
        self.assertLess(max(gaps), 0.25, "the timed call waited for the lane")
        return count, port

    @defer.inlineCallbacks
    def test_one_at_a_time(self) -> Gen:
        """
        Plain reads one at a time: many are answered by the lane's wake-ups, not a
        reactor turn (each tick of the timed call costs a few turns: the frames of the
        last millisecond before it, too short a wait to start), the replies are right,
        and the timed call keeps its time.  (Here, about 93 % of 5,500.)
        """
        count, port = yield self.one_at_a_time(mixed=False)
        self.assertGreater(port.lane_wakeups, count // 4)

    @defer.inlineCallbacks
    def test_python_frames_end_the_wait(self) -> Gen:
        """
        Every other request for the Python lane: each ends the lane's wait (a frame for
        Python does not start another one), so the timed call keeps its time.
        """
        drains = [0]
        recording: list[_RecordingLane] = []

        def started(port: AoEPort) -> None:
            rings = port._rings
            assert rings is not None and _lane.native is not None
            recording.append(_RecordingLane(port._ring_lane(rings, _lane.native)))
            rings.lane = recording[0]
            # Let go of the lane before the port unmaps the rings it exports.
            self.addCleanup(setattr, recording[0], "lane", None)
            read = port.doRead

            def counting() -> None:
                drains[0] += 1
                read()

            port.doRead = counting  # type: ignore[method-assign]

        self.started = started
        yield self.one_at_a_time(mixed=True)
        self.assertGreater(recording[0].waits, 0)
        self.assertLessEqual(recording[0].waits, drains[0], "one wait per drain at most")


def _detach(device: str) -> None:
    """Detach loop device ``device`` if it is still attached."""
    with contextlib.suppress(RuntimeError):
        run("losetup", "--detach", device)


# -- malformed input ----------------------------------------------------------


class _Garbage:
    """
    Builds malformed frames for one target from one host: every one of them is
    something a target must not act on, and many are near-misses of a write.
    """

    def __init__(self, rng: random.Random, dst: bytes, src: bytes, shelf: int, slot: int,
                 sectors: int, max_sectors: int) -> None:
        self.rng = rng
        self.dst, self.src = dst, src
        self.shelf, self.slot = shelf, slot
        self.sectors, self.max_sectors = sectors, max_sectors

    def frame(self, payload: bytes, broadcast: bool = False) -> bytes:
        return ethernet_frame(payload, self.src, BROADCAST_MAC if broadcast else self.dst)

    def tag(self) -> bytes:
        return self.rng.randbytes(4)

    def write(self, lba: int = 0, count: int = 1, data: bytes | None = None,
              opcode: int = ATACmdStatus.WRITE_48BIT, write_flag: bool = True) -> bytes:
        """A write of ``count`` sectors (random ``data`` by default) at ``lba``, E flag set."""
        if data is None:
            data = self.rng.randbytes(count * SECTOR_SIZE)
        return ata_request(opcode, lba=lba, count=count, data=data, extended=True,
                           write=write_flag, shelf=self.shelf, slot=self.slot, tag=self.tag())

    def a_write(self) -> bytes:
        """The bytes of a valid write of one random sector somewhere on the disk."""
        lba = self.rng.randrange(self.sectors)
        return self.write(lba=lba)

    # Each maker returns one payload.

    def random_bytes(self) -> bytes:
        while True:
            payload = self.rng.randbytes(self.rng.randrange(0, 120))
            if not _acts(payload):
                return payload

    def truncated_header(self) -> bytes:
        return self.a_write()[: self.rng.randrange(0, 10)]

    def truncated_argument(self) -> bytes:
        return self.a_write()[: self.rng.randrange(10, 22)]

    def bad_version(self) -> bytes:
        payload = bytearray(self.a_write())
        payload[0] = self.rng.choice([0, 2, 3, 15]) << 4
        return bytes(payload)

    def response_flag(self) -> bytes:
        payload = bytearray(self.a_write())
        payload[0] |= 0x08
        return bytes(payload)

    def unknown_command(self) -> bytes:
        payload = bytearray(self.a_write())
        payload[5] = self.rng.randrange(4, 256)
        return bytes(payload)

    def ata_reserved_bytes(self) -> bytes:
        payload = bytearray(self.a_write())
        payload[20] = self.rng.randrange(1, 256)
        return bytes(payload)

    def write_out_of_range(self) -> bytes:
        lba = self.rng.choice([self.sectors, self.sectors + 7, (1 << 48) - 1])
        return self.write(lba=lba)

    def write_straddling_end(self) -> bytes:
        return self.write(lba=self.sectors - 1, count=2)

    def write_too_many_sectors(self) -> bytes:
        count = self.rng.randrange(self.max_sectors + 1, 256)
        return self.write(count=count, data=self.rng.randbytes(SECTOR_SIZE))

    def write_short_data(self) -> bytes:
        count = self.max_sectors
        data = self.rng.randbytes(count * SECTOR_SIZE - self.rng.randrange(1, SECTOR_SIZE))
        return self.write(count=count, data=data)

    def write_zero_count(self) -> bytes:
        return self.write(count=0, data=self.rng.randbytes(SECTOR_SIZE))

    def write_without_flag(self) -> bytes:
        return self.write(write_flag=False)

    def unknown_ata_opcode(self) -> bytes:
        opcode = self.rng.choice([0x00, 0x25, 0x35, 0xC8, 0xCA, 0xFF])
        return self.write(opcode=opcode)

    def config_bad(self) -> bytes:
        string = self.rng.randbytes(self.rng.randrange(0, 40))
        payload = bytearray(config_request(ConfigCommand.FORCE_SET, string, shelf=self.shelf,
                                           slot=self.slot, tag=self.tag()))
        kind = self.rng.randrange(3)
        if kind == 0:  # string longer than the 1024 bytes allowed
            payload[16:18] = self.rng.randrange(1025, 65536).to_bytes(2, "big")
        elif kind == 1:  # string longer than what the frame holds
            payload[16:18] = (len(string) + self.rng.randrange(1, 500)).to_bytes(2, "big")
        else:  # an undefined sub-command (5..15)
            payload[15] = 0x10 | self.rng.randrange(5, 16)
        return bytes(payload)

    def mask_bad(self) -> bytes:
        directive = Directive(DirectiveCommand.ADD, FORGED)
        payload = bytearray(mask_request(MACMaskCommand.EDIT, [directive], shelf=self.shelf,
                                         slot=self.slot, tag=self.tag()))
        kind = self.rng.randrange(5)
        if kind == 0:  # reserved byte of the argument
            payload[10] = self.rng.randrange(1, 256)
        elif kind == 1:  # more directives than the frame holds
            payload[13] = self.rng.randrange(2, 256)
        elif kind == 2:  # reserved byte of the directive
            payload[14] = self.rng.randrange(1, 256)
        elif kind == 3:  # an undefined directive command
            payload[15] = self.rng.randrange(3, 256)
        else:  # an undefined mask command
            payload[11] = self.rng.randrange(2, 256)
        return bytes(payload)

    def reserve_bad(self) -> bytes:
        payload = bytearray(reserve_request(ReserveReleaseCommand.FORCE_SET, [FORGED],
                                            shelf=self.shelf, slot=self.slot, tag=self.tag()))
        if self.rng.randrange(2):  # more MACs than the frame holds
            payload[11] = self.rng.randrange(2, 256)
        else:  # an undefined sub-command
            payload[10] = self.rng.randrange(3, 256)
        return bytes(payload)

    def frames(self, count: int) -> list[bytes]:
        """Return ``count`` malformed frames, cycling through every kind, some broadcast."""
        makers = [
            self.random_bytes, self.truncated_header, self.truncated_argument, self.bad_version,
            self.response_flag, self.unknown_command, self.ata_reserved_bytes,
            self.write_out_of_range, self.write_straddling_end, self.write_too_many_sectors,
            self.write_short_data, self.write_zero_count, self.write_without_flag,
            self.unknown_ata_opcode, self.config_bad, self.mask_bad, self.reserve_bad,
        ]
        return [
            self.frame(makers[i % len(makers)](), broadcast=self.rng.random() < 0.1)
            for i in range(count)
        ]


def _acts(payload: bytes) -> bool:
    """Return whether ``payload`` decodes as a request that could change a target's state."""
    try:
        header = Header.from_bytes(payload)
    except WireError:
        return False
    if header.flag_response:
        return False
    arg = header.arg
    if isinstance(arg, ATAArg):
        return arg.cmd_status in (ATACmdStatus.WRITE_28BIT, ATACmdStatus.WRITE_48BIT)
    if isinstance(arg, ConfigArg):
        return arg.command in (ConfigCommand.SET, ConfigCommand.FORCE_SET)
    if isinstance(arg, MACMaskArg):
        return arg.command == MACMaskCommand.EDIT
    if isinstance(arg, ReserveReleaseArg):
        return arg.command != ReserveReleaseCommand.READ
    return False


class MalformedInputTests(EndToEndCase):
    """A flood of garbage changes nothing and costs nothing but a log line (the Python lane)."""

    compiled = False

    FRAMES = 2000
    BATCH = 50

    @defer.inlineCallbacks
    def test_malformed_flood(self) -> Gen:
        """
        After 2,000 malformed frames (random bytes, truncated headers and
        arguments, bad versions, the response flag, unknown commands, bad
        arguments, invalid writes) every one was received, the disk is
        unchanged, one log line reported them, and the target still answers.
        """
        target = memory_target(1, 1, sectors=64, seed=40)
        service = self.serve([target])
        assert service.protocol is not None and service.protocol.dispatcher is not None
        counters = service.protocol.dispatcher.counters
        # Garbage for other addresses would stop in the kernel's filter: let
        # it all through, to the code under test.
        assert service.port is not None
        service.port.filter_addresses(None)
        lines: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if "malformed AoE frame" in event.get("log_format", ""):
                lines.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        before = digest(target)
        garbage = _Garbage(random.Random(2000), self.server, self.peer.mac, 1, 1, 64, 2)
        frames = garbage.frames(self.FRAMES)
        self.assertTrue(all(len(frame) <= 1514 for frame in frames))
        received = counters["received"]
        for start in range(0, len(frames), self.BATCH):
            for frame in frames[start : start + self.BATCH]:
                self.peer.send_raw(frame)
            yield task.deferLater(reactor, 0.002, lambda: None)
        yield wait_for(lambda: counters["received"] >= received + self.FRAMES)
        self.assertEqual(counters["received"], received + self.FRAMES)
        self.assertGreater(counters["malformed"], self.FRAMES // 3)
        self.assertEqual(digest(target), before)
        self.assertEqual(len(lines), 1)

        (found,) = yield self.peer.discover()
        self.assertEqual((found.header.major, found.header.minor), (1, 1))
        data = pattern(2 * SECTOR_SIZE, 41)
        self.ata_ok((yield self.peer.write(self.server, 1, 1, 62, data)))
        self.ata_ok((yield self.peer.read(self.server, 1, 1, 62, 2)), data)
        self.ata_ok((yield self.peer.identify(self.server, 1, 1)))

        malformed = counters["malformed"]
        yield service.stopService()
        self.assertEqual(len(lines), 2)
        self.assertEqual(lines[1]["count"], malformed - 1)


class CompiledLaneMalformedInputTests(MalformedInputTests):
    """``MalformedInputTests`` with the compiled lane walking the ring first."""

    compiled = True


class NamespaceTests(SynchronousTestCase):
    """The harness itself: nothing is left behind."""

    def test_namespaces_removed(self) -> None:
        """The namespaces a test makes are gone once its cleanups ran."""
        require(self)
        from tests.netns import leftover_namespaces

        names: list[str] = []

        class Inner(SynchronousTestCase):
            def test_make(self) -> None:
                pair = VethPair.create(self)
                names.extend([pair.server_ns, pair.client_ns])
                self.assertEqual(
                    sorted(n for n in leftover_namespaces() if n in names), sorted(names)
                )

        from twisted.trial.reporter import TestResult

        result = TestResult()
        Inner("test_make").run(result)
        self.assertTrue(result.wasSuccessful(), result.errors + result.failures)
        self.assertEqual(len(names), 2)
        self.assertEqual([n for n in leftover_namespaces() if n in names], [])
        self.assertFalse(any(os.path.exists(f"/var/run/netns/{n}") for n in names))
