"""
Links that come and go (issue #11): the link notifications, and serving through flaps.

The parser is tested on bytes shaped as the kernel sends them; the rest runs
the real server (``AoEService`` with its ``LinkMonitor``) on veth pairs in
namespaces the tests make, with a raw peer on the other end.
"""

from __future__ import annotations

import struct
from collections.abc import Generator
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aoe_twisted.backends.memory import MemoryBackend
from aoe_twisted.core.target import Target
from aoe_twisted.core.wire import SECTOR_SIZE, ConfigArg
from aoe_twisted.net.link import RTM_DELLINK, RTM_NEWLINK, LinkEvent, parse_link_messages
from aoe_twisted.server import AoEService
from tests.netns import VethPair, require, run
from tests.peer import Peer
from tests.test_e2e import wait_for

Gen = Generator[Any, Any, None]


def link_message(
    kind: int, index: int, name: str, flags: int, mtu: int = 1500, mac: bytes = b"\x02" * 6
) -> bytes:
    """Return one ``RTM_NEWLINK``/``RTM_DELLINK`` message as the kernel lays it out."""

    def attr(kind: int, payload: bytes) -> bytes:
        data = struct.pack("=HH", 4 + len(payload), kind) + payload
        return data + bytes(-len(data) % 4)

    body = struct.pack("=BxHiII", 0, 1, index, flags, 0xFFFFFFFF)
    body += attr(3, name.encode() + b"\0") + attr(4, struct.pack("=I", mtu)) + attr(1, mac)
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


class ParseTests(SynchronousTestCase):
    """``parse_link_messages``: the kernel's bytes to ``LinkEvent`` values."""

    def test_new_and_deleted(self) -> None:
        """Several messages in one datagram give one event each, in order."""
        data = link_message(RTM_NEWLINK, 7, "eth0", 0x1 | 0x40 | 0x10000, 9000) + link_message(
            RTM_DELLINK, 8, "vlan5", 0x1
        )
        self.assertEqual(
            parse_link_messages(data),
            [
                LinkEvent(7, "eth0", True, True, True, 9000, b"\x02" * 6),
                LinkEvent(8, "vlan5", False, True, False, 1500, b"\x02" * 6),
            ],
        )

    def test_states(self) -> None:
        """Usable needs present, up and a carrier; each state reads as one word."""
        up = parse_link_messages(link_message(RTM_NEWLINK, 1, "a", 0x10041))[0]
        down = parse_link_messages(link_message(RTM_NEWLINK, 1, "a", 0))[0]
        no_carrier = parse_link_messages(link_message(RTM_NEWLINK, 1, "a", 0x1))[0]
        gone = parse_link_messages(link_message(RTM_DELLINK, 1, "a", 0x10041))[0]
        self.assertEqual([e.usable for e in (up, down, no_carrier, gone)], [True] + [False] * 3)
        self.assertEqual(
            [e.describe().split()[0] for e in (up, down, no_carrier, gone)],
            ["up", "down", "up,", "removed"],
        )

    def test_garbage(self) -> None:
        """Truncated, unknown or nameless messages are skipped; nothing raises."""
        good = link_message(RTM_NEWLINK, 3, "eth1", 0x1)
        other = struct.pack("=IHHII", 20, 24, 0, 0, 0) + bytes(4)  # an RTM_NEWADDR
        nameless = struct.pack("=IHHII", 32, RTM_NEWLINK, 0, 0, 0) + bytes(16)
        self.assertEqual(len(parse_link_messages(other + nameless + good)), 1)
        for cut in range(len(good)):
            parse_link_messages(good[:cut])
        self.assertEqual(parse_link_messages(b"\xff" * 64), [])


class LinkFlapTests(TestCase):
    """The server keeps serving through link flaps, re-creation and MTU changes."""

    timeout = 40

    def setUp(self) -> None:
        require(self)
        self.lines: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            self.lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.pair = VethPair.create(self)
        self.target = Target(1, 2, MemoryBackend(64 * SECTOR_SIZE))
        self.service = AoEService(self.pair.server_if, [self.target], netns=self.pair.server_ns)
        self.addCleanup(self.service.stopService)
        self.service.privilegedStartService()
        self.service.startService()
        self.start_peer()

    def start_peer(self) -> None:
        """Open a raw peer on the client end (again, after the pair was re-created)."""
        self.peer = Peer(self.pair.client_if, self.pair.client_ns)
        self.peer.start()
        self.addCleanup(self.peer.stop)

    @property
    def server_mac(self) -> bytes:
        port = self.service.port
        assert port is not None and port.mac is not None
        return port.mac

    @defer.inlineCallbacks
    def round_trip(self, fill: int, lba: int = 3) -> Gen:
        """Write a sector and read it back through the peer; fail unless both are answered."""
        data = bytes([fill]) * SECTOR_SIZE
        written = yield self.peer.write(self.server_mac, 1, 2, lba, data, timeout=0.5)
        self.assertEqual(len(written), 1, "the write was not answered")
        replies = yield self.peer.read(self.server_mac, 1, 2, lba, timeout=0.5)
        self.assertEqual(len(replies), 1, "the read was not answered")
        self.assertEqual(replies[0].arg.data, data)

    @defer.inlineCallbacks
    def answered_within(self, seconds: float) -> Gen:
        """Wait until a config query is answered, at most ``seconds``; return the reply."""
        deadline = reactor.seconds() + seconds
        while True:
            replies = yield self.peer.discover(1, 2, timeout=0.1)
            if replies:
                return replies[0]
            if reactor.seconds() > deadline:
                raise AssertionError(f"not answered within {seconds} s of the link's return")

    def link(self, *words: str) -> None:
        """``ip link set`` on the server's end."""
        run("ip", "-n", self.pair.server_ns, "link", "set", "dev", self.pair.server_if, *words)

    def logged(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]

    @defer.inlineCallbacks
    def test_down_and_up(self) -> Gen:
        """
        A link that goes down and up again is served again within a second,
        with one log line per transition and the process's port never closed.
        """
        yield self.round_trip(0x11)
        self.link("down")
        yield wait_for(lambda: self.logged("link aoesrv0: down"))
        yield task.deferLater(reactor, 1.0, lambda: None)
        self.link("up")
        self.pair.wait_until_up()
        yield self.answered_within(1.0)
        yield self.round_trip(0x22)
        self.assertEqual(len(self.logged("link aoesrv0: down")), 1)
        self.assertEqual(len(self.logged("link aoesrv0: up")), 1)
        self.assertEqual(self.logged("AoE port closed"), [])
        port = self.service.port
        assert port is not None
        self.assertTrue(port.connected)

    @defer.inlineCallbacks
    def test_recreated(self) -> Gen:
        """
        An interface deleted and created again with the same name (a new
        index) is bound again and served, without a restart.
        """
        yield self.round_trip(0x33)
        run("ip", "-n", self.pair.server_ns, "link", "delete", self.pair.server_if)
        yield wait_for(lambda: self.logged("link aoesrv0: removed"))
        run(
            "ip", "link", "add", self.pair.server_if, "netns", self.pair.server_ns,
            "type", "veth", "peer", "name", self.pair.client_if, "netns", self.pair.client_ns,
        )  # fmt: skip
        for ns, interface in self.pair.ends():
            run("ip", "-n", ns, "link", "set", "dev", interface, "up")
        self.pair.wait_until_up()
        # The peer's own end was re-created too: bind it again (it has no monitor).
        self.assertTrue(self.peer.port.rebind())
        reply = yield self.answered_within(1.0)
        self.assertEqual(reply.src, self.server_mac)
        yield self.round_trip(0x44)
        self.assertEqual(self.target.backend.read(3 * SECTOR_SIZE, 1), b"\x44")

    @defer.inlineCallbacks
    def test_mtu_change(self) -> Gen:
        """A new MTU is read again: config replies carry the sector count it allows."""
        reply = yield self.answered_within(1.0)
        self.assertEqual(reply.arg.sector_count, 2)
        for ns, interface in self.pair.ends():
            run("ip", "-n", ns, "link", "set", "dev", interface, "mtu", "9000")
        self.peer.port.rebind()
        yield wait_for(lambda: self.logged("MTU 9000, 17 sectors per frame"))
        reply = yield self.answered_within(1.0)
        assert isinstance(reply.arg, ConfigArg)
        self.assertEqual(reply.arg.sector_count, 17)
        yield self.round_trip(0x55)


class SeveralInterfacesTests(TestCase):
    """One target on several interfaces: each answers for itself."""

    timeout = 30

    def setUp(self) -> None:
        require(self)

    @defer.inlineCallbacks
    def test_each_interface_answers_with_its_own_mac_and_mtu(self) -> Gen:
        """
        Two interfaces (MTU 1500 and 9000) serve one target: each answers a
        discovery from its own MAC with its own sector count, and a write
        through one is read back through the other.
        """
        first = VethPair.create(self, mtu=1500)
        second = VethPair.create(self, mtu=9000)
        # Move the second pair's server end into the first pair's server namespace.
        run("ip", "-n", second.server_ns, "link", "set", second.server_if, "netns",
            first.server_ns, "name", "aoesrv1")  # fmt: skip
        run("ip", "-n", first.server_ns, "link", "set", "aoesrv1", "up")
        target = Target(1, 2, MemoryBackend(64 * SECTOR_SIZE))
        service = AoEService([first.server_if, "aoesrv1"], [target], netns=first.server_ns)
        self.addCleanup(service.stopService)
        service.privilegedStartService()
        service.startService()
        peers = []
        for pair in (first, second):
            peer = Peer(pair.client_if, pair.client_ns)
            peer.start()
            self.addCleanup(peer.stop)
            peers.append(peer)
        answers = []
        for peer in peers:
            for _ in range(50):
                replies = yield peer.discover(1, 2, timeout=0.1)
                if replies:
                    break
            answers.append(replies[0])
        macs = [service.ports[name].mac for name in (first.server_if, "aoesrv1")]
        self.assertEqual([a.src for a in answers], macs)
        self.assertNotEqual(macs[0], macs[1])
        self.assertEqual([a.arg.sector_count for a in answers], [2, 17])
        data = b"\x66" * (4 * SECTOR_SIZE)
        written = yield peers[1].write(macs[1], 1, 2, 8, data)
        self.assertEqual(len(written), 1)
        replies = yield peers[0].read(macs[0], 1, 2, 8, count=2)
        self.assertEqual(replies[0].arg.data, data[: 2 * SECTOR_SIZE])

    @defer.inlineCallbacks
    def test_missing_interface_is_waited_for(self) -> Gen:
        """
        With two interfaces, one that does not exist yet is waited for, with
        a warning, and served once it appears.
        """
        pair = VethPair.create(self)
        lines: list[str] = []
        observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        target = Target(1, 2, MemoryBackend(64 * SECTOR_SIZE))
        service = AoEService(["aoesrv9", pair.server_if], [target], netns=pair.server_ns)
        self.addCleanup(service.stopService)
        service.privilegedStartService()
        service.startService()
        self.assertTrue([line for line in lines if "aoesrv9 does not exist" in line])
        self.assertFalse(service.ports["aoesrv9"].bound)
        run("ip", "-n", pair.server_ns, "link", "add", "aoesrv9", "type", "veth", "peer",
            "name", "aoecli9", "netns", pair.client_ns)  # fmt: skip
        run("ip", "-n", pair.server_ns, "link", "set", "aoesrv9", "up")
        run("ip", "-n", pair.client_ns, "link", "set", "aoecli9", "up")
        yield wait_for(lambda: service.ports["aoesrv9"].bound)
        peer = Peer("aoecli9", pair.client_ns)
        peer.start()
        self.addCleanup(peer.stop)
        for _ in range(100):
            replies = yield peer.discover(1, 2, timeout=0.1)
            if replies:
                break
        self.assertEqual(replies[0].src, service.ports["aoesrv9"].mac)

    def test_no_interface_at_all(self) -> None:
        """When none of the interfaces exists, start-up fails with one line naming them."""
        pair = VethPair.create(self)
        service = AoEService(
            ["aoesrv8", "aoesrv9"], [Target(1, 2, MemoryBackend(SECTOR_SIZE))],
            netns=pair.server_ns, exit_on_error=True,
        )  # fmt: skip
        error = self.assertRaises(SystemExit, service.privilegedStartService)
        self.assertEqual(
            str(error), "twistd aoe: cannot open interfaces aoesrv8, aoesrv9: none of them exists"
        )
