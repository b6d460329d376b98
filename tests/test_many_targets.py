# -*- test-case-name: tests.test_many_targets -*-
"""
Many targets on one server (issue #12, item 6): rings sized by what is in flight, not by targets.

The receive ring used to hold four initiators' full windows of every
target, so 1,000 targets at MTU 9000 asked for a 2.4 GB ring and a receive
buffer that is no C ``int`` (the server did not start).  Now the ring is
capped (``--ring-frames``, ``DEFAULT_RING_FRAMES``); these tests check the
cap in the service and on the command line, and serve 1,000 targets at MTU
9000 on a real veth pair: the server starts, its ring stays under the cap,
and one broadcast discovery is answered by all of them.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.core.target import Target
from aoe_twisted.net.port import TX_RING_FRAMES, AoEPort
from aoe_twisted.net.ring import DEFAULT_RING_FRAMES, RingGeometry
from aoe_twisted.server import AoEService
from aoe_twisted.tap import Options, makeService
from aoe_twisted.testing import TARGET_MAC, MemoryPacketSystem
from tests.netns import VethPair, require
from tests.peer import Peer

Gen = Generator[defer.Deferred[Any], Any, None]

#: How many targets a diskless lab of 1,000 clients exports, and how small each is.
MANY = 1000
SMALL = 64 * 1024
#: How long the peer collects the answers to one broadcast discovery of ``MANY`` targets:
#: every answer must be in by then (docs/performance.md measures 10-15 ms).
DISCOVERY_BOUND = 2.0


def many_targets(count: int = MANY, buffer_count: int = 64) -> list[Target]:
    """``count`` targets of 64 KiB memory disks, e1.0 onwards, 250 slots a shelf."""
    return [
        Target(1 + i // 250, i % 250, MemoryBackend(SMALL), buffer_count=buffer_count)
        for i in range(count)
    ]


def ring_bound(mtu: int, frames: int = DEFAULT_RING_FRAMES) -> int:
    """The bytes an RX ring of ``frames`` slots and the TX ring map at ``mtu``."""
    return RingGeometry.for_mtu(mtu, frames).size + RingGeometry.for_mtu(mtu, TX_RING_FRAMES).size


class RingSizingTests(SynchronousTestCase):
    """``AoEService`` sizes each port's receive ring by the cap, not by the targets."""

    def serve(self, targets: list[Target], **kwargs: Any) -> AoEPort:
        system = MemoryPacketSystem(rings=True)
        system.add_interface("eth0", mac=TARGET_MAC, mtu=9000)
        service = AoEService("eth0", targets, reactor=MemoryReactorClock(), system=system, **kwargs)
        service.startService()
        self.addCleanup(service.stopService)
        assert service.port is not None
        return service.port

    def test_capped(self) -> None:
        """1,000 targets of buffer count 64 get the default cap: 36.6 MiB at MTU 9000."""
        port = self.serve(many_targets())
        self.assertLess(port.ring_frames, DEFAULT_RING_FRAMES + 7)  # a 64 KiB block: 7 slots
        self.assertGreaterEqual(port.ring_frames, DEFAULT_RING_FRAMES)
        self.assertLessEqual(port.ring_size, ring_bound(9000))

    def test_few_targets_unchanged(self) -> None:
        """Under the cap, four full windows of every target, as before."""
        port = self.serve(many_targets(3))
        self.assertGreaterEqual(port.ring_frames, 4 * 3 * 64)
        self.assertLess(port.ring_frames, 4 * 3 * 64 + 7)

    def test_cap_given(self) -> None:
        """``ring_frames`` (``--ring-frames``) moves the cap."""
        port = self.serve(many_targets(), ring_frames=8192)
        self.assertGreaterEqual(port.ring_frames, 8192)
        self.assertLess(port.ring_frames, 8192 + 7)

    def test_one_full_window_at_least(self) -> None:
        """A cap below a target's buffer count still leaves room for one full window of it."""
        port = self.serve(many_targets(2, buffer_count=2000), ring_frames=512)
        self.assertGreaterEqual(port.ring_frames, 2000)


class RingFramesOptionTests(SynchronousTestCase):
    """``twistd aoe --ring-frames N``."""

    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(["-i", "eth0", "-b", "memory:1M", *argv])
        return options

    def assertRefused(self, *argv: str) -> str:
        """Parsing exits with one line naming ``--ring-frames``."""
        with self.assertRaises(SystemExit) as caught:
            self.parse(*argv)
        message = str(caught.exception.code)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith("twistd aoe: --ring-frames: "), message)
        return message

    def test_default(self) -> None:
        """Without it, the service gets no cap of its own (the default one applies)."""
        options = self.parse()
        self.assertIsNone(options["ring-frames"])
        self.assertIsNone(makeService(options).ring_frames)  # type: ignore[attr-defined]

    def test_given(self) -> None:
        """A number in range goes to the service."""
        options = self.parse("--ring-frames", "8192")
        self.assertEqual(makeService(options).ring_frames, 8192)  # type: ignore[attr-defined]

    def test_range(self) -> None:
        """256..65536, or one line saying so."""
        for text in ("255", "65537", "lots"):
            with self.subTest(text=text):
                self.assertRefused("--ring-frames", text)

    def test_below_buffer_count(self) -> None:
        """A ring that cannot hold one full window of the buffer count is refused."""
        message = self.assertRefused("--ring-frames", "300", "--buffer-count", "1000")
        self.assertIn("one full window", message)

    def test_workers(self) -> None:
        """With ``--workers`` every worker is told the cap (its config carries it)."""
        from aoe_twisted.tap import makeService

        options = self.parse("--ring-frames", "8192", "--workers", "2")
        service = makeService(options)
        self.addCleanup(service.state.close)
        for target in service.targets:
            self.addCleanup(target.backend.close)
        self.assertEqual(service.ring_frames, 8192)
        self.assertEqual(service.worker_config(1)["ring_frames"], 8192)


class ManyTargetsEndToEndTests(TestCase):
    """1,000 targets at MTU 9000 served on a real veth pair."""

    timeout = 60

    def setUp(self) -> None:
        require(self)

    @defer.inlineCallbacks
    def test_thousand_targets_discovered(self) -> Gen:
        """
        The server starts (it used to raise ``TypeError`` from ``SO_RCVBUFFORCE``),
        its rings map no more than the cap, and one broadcast config query is
        answered by every one of the 1,000 targets within ``DISCOVERY_BOUND``.
        """
        pair = VethPair.create(self, mtu=9000)
        peer = Peer(pair.client_if, pair.client_ns)
        # 1,000 replies arrive in one burst, while this process (the server's too)
        # is busy sending them: the peer's ring must hold them all.
        peer.port = AoEPort(
            pair.client_if, peer.protocol, netns=pair.client_ns,
            accept_other_hosts=True, pad_frames=False, receive_frames=2 * MANY,
        )  # fmt: skip
        peer.start()
        self.addCleanup(peer.stop)
        service = AoEService(pair.server_if, many_targets(), netns=pair.server_ns)
        self.addCleanup(service.stopService)
        service.privilegedStartService()
        service.startService()
        port = service.port
        assert port is not None
        self.assertLessEqual(port.ring_size, ring_bound(9000))
        yield peer.discover(timeout=0.5)  # the start-up announcements are over
        replies = yield peer.discover(timeout=DISCOVERY_BOUND)
        answered = {(reply.header.major, reply.header.minor) for reply in replies}
        self.assertEqual(len(answered), MANY)
        self.assertEqual(answered, {(t.shelf, t.slot) for t in service.targets})
        self.assertEqual(port.frames_dropped, 0)
